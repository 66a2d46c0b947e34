"""Decoding in worker processes, ahead of the encoder by a bounded window.

Each worker opens a file (``decode.py``: one read, hash, reduced-scale decode, EXIF transpose, metadata) and
applies the model's resize + crop, returning uint8 pixels ready for the encoder. Results come back in input
order; at most ``window`` files are in flight, which bounds memory. A worker that dies (a decoder crash on a
hostile file) is replaced; a file in flight through two such deaths is recorded as bad instead of retried.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
from clipsearch.indexer.crawl import FoundFile
from clipsearch.indexer.decode import DecodeFailure, decode_file

from clipsearch.model import PixelTransform

MAX_ATTEMPTS = 2
RECORD_FIELDS = (
    "path", "size", "mtime_ns", "content_hash", "width", "height", "format",
    "taken_at", "camera_make", "camera_model", "gps_lat", "gps_lon",
)  # fmt: skip


@dataclass
class DecodedItem:
    """One file after decoding: pixels and its metadata record, or the reason it failed."""

    path: str
    size: int | None
    mtime_ns: int | None
    record: dict[str, Any] | None = None
    pixels: np.ndarray | None = None
    reason: str | None = None
    decode_seconds: float = 0.0


def decode_one(found: FoundFile, transform: PixelTransform, min_side: int) -> DecodedItem:
    started = time.perf_counter()
    result = decode_file(found.path, min_side=min_side)
    if isinstance(result, DecodeFailure):
        item = DecodedItem(found.path, found.size, found.mtime_ns, reason=result.reason)
    else:
        record = {name: getattr(result, name) for name in RECORD_FIELDS}
        item = DecodedItem(found.path, result.size, result.mtime_ns, record, transform(result.image))
    item.decode_seconds = time.perf_counter() - started
    return item


_worker_state: dict[str, Any] = {}


def _init_worker(transform: PixelTransform, min_side: int) -> None:
    # Ctrl-C goes to the whole process group; the parent decides when to stop, workers must not die mid-file.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state.update(transform=transform, min_side=min_side)


def _decode_in_worker(found: FoundFile) -> DecodedItem:
    return decode_one(found, _worker_state["transform"], _worker_state["min_side"])


def decode_stream(
    files: Sequence[FoundFile], transform: PixelTransform, min_side: int, workers: int, window: int
) -> Iterator[DecodedItem]:
    """Decoded items in the order of ``files``; ``workers`` = 0 decodes in this process."""
    if workers <= 0:
        return (decode_one(f, transform, min_side) for f in files)
    return _pooled(files, transform, min_side, workers, max(window, workers))


def _pooled(
    files: Sequence[FoundFile], transform: PixelTransform, min_side: int, workers: int, window: int
) -> Iterator[DecodedItem]:
    pool = _Pool(workers, transform, min_side)
    pending: deque[tuple[FoundFile, int, Future[DecodedItem]]] = deque()
    upcoming = iter(files)
    try:
        while True:
            while len(pending) < window and (found := next(upcoming, None)) is not None:
                pending.append((found, 1, pool.submit(found)))
            if not pending:
                return
            yield _next_result(pending, pool)
    finally:
        pool.shutdown()


def _next_result(pending: deque[tuple[FoundFile, int, Future[DecodedItem]]], pool: _Pool) -> DecodedItem:
    while True:
        found, attempt, future = pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            # A dead worker loses every in-flight file; the oldest is the likeliest culprit, so only it is
            # charged an attempt.
            pool.restart()
            _resubmit(pending, pool)
            if attempt >= MAX_ATTEMPTS:
                return DecodedItem(found.path, found.size, found.mtime_ns, reason="decoding crashed the decoder")
            pending.appendleft((found, attempt + 1, pool.submit(found)))


def _resubmit(pending: deque[tuple[FoundFile, int, Future[DecodedItem]]], pool: _Pool) -> None:
    items = list(pending)
    pending.clear()
    pending.extend((found, attempt, pool.submit(found)) for found, attempt, _lost in items)


class _Pool:
    """A process pool that can be replaced after a worker dies."""

    def __init__(self, workers: int, transform: PixelTransform, min_side: int) -> None:
        self._args = (workers, transform, min_side)
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        workers, transform, min_side = self._args
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(_start_method()),
            initializer=_init_worker,
            initargs=(transform, min_side),
        )

    def submit(self, found: FoundFile) -> Future[DecodedItem]:
        return self._executor.submit(_decode_in_worker, found)

    def restart(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._start()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _start_method() -> str:
    # fork after torch has started its thread pools can deadlock the child; forkserver starts clean workers.
    return "forkserver" if sys.platform.startswith("linux") else "spawn"
