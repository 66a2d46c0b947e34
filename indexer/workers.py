"""Decoding ahead of the encoder: a pool of worker threads or processes behind a bounded window.

Each worker opens a file (``decode.py``: one read, hash, reduced-scale decode, EXIF transpose, metadata) and
applies the model's resize + crop, returning uint8 pixels ready for the encoder. Results come back in input
order; at most ``window`` files are in flight, which bounds memory however many files there are.

Two kinds of pool, chosen by the pipeline (see ``pipeline.decode_plan`` for when each measures faster):

- processes: a decoder crash on a hostile file kills only a worker. The pool is replaced, the oldest file
  that was in flight is decoded again on its own, and only a file that crashes the decoder by itself is
  recorded as bad; the others are decoded as usual.
- threads: no start-up cost, nothing pickled, no second copy of the libraries in memory. Pillow and hashlib
  release the GIL while they work, so threads decode in parallel with each other and with the encoder.

Workers can run at a lower CPU priority (``niceness``): on a machine where the encoder needs every core, decoding
then fills the moments the encoder leaves idle instead of slowing it down.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from clipsearch.indexer.crawl import FoundFile

from clipsearch.decode import DecodeFailure, decode_file
from clipsearch.inference.geometry import PixelTransform
from clipsearch.photo import record_fields

PoolKind = Literal["threads", "processes"]
CRASHED = "decoding crashed the decoder"
RECORD_FIELDS = record_fields()  # what the library stores per image, as clipsearch.photo declares it


@dataclass
class DecodedItem:
    """One file after decoding: pixels and its metadata record, or the reason it failed."""

    path: str
    size: int | None
    mtime_ns: int | None
    record: dict[str, Any] | None = None
    pixels: np.ndarray | None = None
    reason: str | None = None
    decode_seconds: float = 0.0  # CPU time of the decoding thread: what this file cost, however busy the cores


def decode_one(found: FoundFile, transform: PixelTransform, min_side: int) -> DecodedItem:
    """Decode and resize one file; never raises (a failure is an item with a reason)."""
    started = time.thread_time()
    result = decode_file(found.path, min_side=min_side)
    if isinstance(result, DecodeFailure):
        item = DecodedItem(found.path, found.size, found.mtime_ns, reason=result.reason)
    else:
        item = _transformed(result, transform)
    item.decode_seconds = time.thread_time() - started
    return item


def _transformed(result: Any, transform: PixelTransform) -> DecodedItem:
    record = {name: getattr(result, name) for name in RECORD_FIELDS}
    try:
        pixels = transform(result.image)
    except Exception as error:  # one strange image must not stop the run, in a thread least of all
        reason = f"could not be resized for the model ({type(error).__name__}: {error})"
        return DecodedItem(result.path, result.size, result.mtime_ns, reason=reason[:300])
    return DecodedItem(result.path, result.size, result.mtime_ns, record, pixels)


def decode_stream(
    files: Sequence[FoundFile],
    transform: PixelTransform,
    min_side: int,
    workers: int,
    window: int,
    *,
    kind: PoolKind = "processes",
    niceness: int = 0,
) -> Generator[DecodedItem, None, None]:
    """Decoded items in the order of ``files``; ``workers`` = 0 decodes in this thread, when asked for.
    Close the generator to stop early: the pool is shut down then (and when it is exhausted)."""
    if workers <= 0:
        return (decode_one(f, transform, min_side) for f in files)
    pool = _new_pool(kind, workers, transform, min_side, niceness)
    return _in_order(files, pool, max(window, workers), keep_pool=False)


class DecodePool:
    """A pool that stays open across many `decode` calls, for a long-lived encoder (a cluster worker) that
    would otherwise pay the pool's start-up (for processes: importing torch) on every batch."""

    def __init__(self, kind: PoolKind, workers: int, transform: PixelTransform, min_side: int,
                 niceness: int = 0) -> None:
        self.workers = workers
        self._pool = _new_pool(kind, workers, transform, min_side, niceness)

    def decode(self, files: Sequence[FoundFile], window: int) -> Generator[DecodedItem, None, None]:
        """Decoded items in the order of ``files``, with at most ``window`` files in flight."""
        return _in_order(files, self._pool, max(window, self.workers), keep_pool=True)

    def close(self) -> None:
        self._pool.shutdown()


def _new_pool(kind: PoolKind, workers: int, transform: PixelTransform, min_side: int, niceness: int) -> _Pool:
    return (_ThreadPool if kind == "threads" else _ProcessPool)(workers, transform, min_side, niceness)


def _in_order(files: Sequence[FoundFile], pool: _Pool, window: int, *,
              keep_pool: bool) -> Generator[DecodedItem, None, None]:
    pending: deque[_InFlight] = deque()
    upcoming = iter(files)
    try:
        while True:
            while len(pending) < window and (found := next(upcoming, None)) is not None:
                pending.append((found, pool.submit(found)))
            if not pending:
                return
            yield _next_result(pending, pool)
    finally:
        if not keep_pool:
            pool.shutdown()


_InFlight = tuple[FoundFile, "Future[DecodedItem]"]


def _next_result(pending: deque[_InFlight], pool: _Pool) -> DecodedItem:
    found, future = pending.popleft()
    try:
        return future.result()
    except BrokenProcessPool:
        # A dead worker loses every file in flight, and which of them killed it is unknown. The oldest is
        # decoded again alone, where a crash can only be its own; then the others are resubmitted (one that
        # crashes the pool again is found the same way when its turn comes).
        pool.restart()
        item = _decode_alone(found, pool)
        _resubmit(pending, pool)
        return item


def _decode_alone(found: FoundFile, pool: _Pool) -> DecodedItem:
    try:
        return pool.submit(found).result()
    except BrokenProcessPool:
        pool.restart()
        return DecodedItem(found.path, found.size, found.mtime_ns, reason=CRASHED)


def _resubmit(pending: deque[_InFlight], pool: _Pool) -> None:
    files = [found for found, _lost in pending]
    pending.clear()
    pending.extend((found, pool.submit(found)) for found in files)


class _Pool:
    """An executor running ``decode_one`` that can be replaced after a worker dies."""

    def __init__(self, workers: int, transform: PixelTransform, min_side: int, niceness: int) -> None:
        self._args = (workers, transform, min_side, niceness)
        self._executor = self._start()

    def _start(self) -> Executor:
        raise NotImplementedError

    def submit(self, found: FoundFile) -> Future[DecodedItem]:
        raise NotImplementedError

    def restart(self) -> None:
        self._stop(wait=False)
        self._executor = self._start()

    def shutdown(self) -> None:
        self._stop(wait=True)

    def _stop(self, wait: bool) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)


class _ProcessPool(_Pool):
    def _start(self) -> Executor:
        workers, transform, min_side, niceness = self._args
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(_start_method()),
            initializer=_init_worker_process,
            initargs=(transform, min_side, niceness),
        )

    def submit(self, found: FoundFile) -> Future[DecodedItem]:
        try:
            return self._executor.submit(_decode_in_worker, found)
        except BrokenProcessPool as error:  # it broke since the last result came back: say so through the future
            lost: Future[DecodedItem] = Future()
            lost.set_exception(error)
            return lost

    def _stop(self, wait: bool) -> None:
        executor = self._executor
        if getattr(executor, "_broken", False):
            # A worker started while the pool was breaking is never told to stop, and Python 3.11's executor
            # then waits for it forever: end every worker of a broken pool here.
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                process.kill()
        executor.shutdown(wait=wait, cancel_futures=True)


class _ThreadPool(_Pool):
    def _start(self) -> Executor:
        workers, _transform, _min_side, niceness = self._args
        return ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="clipsearch-decode",
            initializer=lower_priority, initargs=(niceness,),
        )

    def submit(self, found: FoundFile) -> Future[DecodedItem]:
        _workers, transform, min_side, _niceness = self._args
        return self._executor.submit(decode_one, found, transform, min_side)


_worker_state: dict[str, Any] = {}


def _init_worker_process(transform: PixelTransform, min_side: int, niceness: int) -> None:
    # Ctrl-C goes to the whole process group; the parent decides when to stop, workers must not die mid-file.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lower_priority(niceness)
    _worker_state.update(transform=transform, min_side=min_side)


def _decode_in_worker(found: FoundFile) -> DecodedItem:
    return decode_one(found, _worker_state["transform"], _worker_state["min_side"])


def lower_priority(niceness: int) -> None:
    """Make the calling thread (on Linux a thread has its own nice value) or process ``niceness`` nicer."""
    if niceness <= 0:
        return
    setter: Callable[[int], None] = _renice_thread if sys.platform.startswith("linux") else _renice_process
    try:
        setter(niceness)
    except OSError:  # a sandbox may forbid it; decoding at normal priority is slower, never wrong
        pass


def _renice_thread(niceness: int) -> None:
    thread_id = threading.get_native_id()
    current = os.getpriority(os.PRIO_PROCESS, thread_id)
    os.setpriority(os.PRIO_PROCESS, thread_id, min(19, current + niceness))


def _renice_process(niceness: int) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # elsewhere a nice value belongs to the whole process, encoder included
    os.nice(niceness)


def _start_method() -> str:
    # fork after torch has started its thread pools can deadlock the child; forkserver starts clean workers.
    return "forkserver" if sys.platform.startswith("linux") else "spawn"
