"""The FAISS runtime: faiss imported on first use, its OpenMP threads, and its GPUs.

Bulk work (training, adding, tuning) uses every available core; searches of fewer than `SMALL_BATCH` queries run
on one thread, because waking OpenMP threads costs more than a sub-millisecond scan. Idle OpenMP threads sleep
rather than spin. The measurements behind both are in docs/index.md, "Threads".
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

SMALL_BATCH = 8  # searches of fewer queries run FAISS on one thread

_threads_set = False


def faiss() -> Any:
    """Import faiss on first use (it costs ~0.3 s) and size its thread pool to the cores we may use."""
    global _threads_set
    if "faiss" not in sys.modules:
        # OpenMP's idle threads spin by default; when another process shares the cores every barrier then
        # waits for a time slice. Measured on 2 cores with one other busy process: training IVF128,PQ4x8 on
        # 20,000 x 32-d took 2.6 s on 2 spinning threads, 0.27 s with passive waiting (0.25 s on one thread);
        # IVF512,PQ32 on 100,000 x 256-d took 22 s spinning and 9 s passive. On free cores passive waiting
        # only adds the wake-up of a sleeping thread per parallel region. A value the user set is kept.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss as faiss_module

    if not _threads_set:
        faiss_module.omp_set_num_threads(available_cores())
        _threads_set = True
    return faiss_module


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def faiss_threads(count: int) -> Iterator[None]:
    """Run the block with `count` OpenMP threads (the setting is per calling thread, so this is thread-safe)."""
    module = faiss()
    previous = module.omp_get_max_threads()
    module.omp_set_num_threads(count)
    try:
        yield
    finally:
        module.omp_set_num_threads(previous)


def search_threads(queries: int) -> int:
    """Threads for searching `queries` queries at once: one for a few (measured: a 10^4 flat query took 0.57 ms
    on one thread and 2.4 ms on two), every core for a batch."""
    return 1 if queries < SMALL_BATCH else available_cores()


def gpu_count(use_gpu: bool | None) -> int:
    """GPUs faiss can train on: none when `use_gpu` is False or faiss has no GPU support."""
    if use_gpu is False:
        return 0
    module = faiss()
    return int(module.get_num_gpus()) if hasattr(module, "get_num_gpus") else 0
