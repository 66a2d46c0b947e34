"""One `index` run: crawl → plan → decode (worker processes) → encode (batches) → write (one transaction a batch).

    crawl ─▶ plan ─▶ files to encode ─▶ decode pool (bounded window) ─▶ batches ─▶ encoder ─▶ writer
                  └▶ moves, deletions: SQLite only, no encoding

The decode pool runs ahead of the encoder by a bounded window of files, so the encoder never waits and memory
stays bounded however large the library. Each batch is written in the order that survives a kill at any
instant: vectors appended and fsynced, then the SQLite rows that point at them committed in one transaction.
The FAISS index is brought in step at the end (it is a cache of the stored vectors).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy.exc
from clipsearch.indexer.crawl import CrawlProblem, FoundFile, crawl
from clipsearch.indexer.plan import Plan, make_plan
from clipsearch.indexer.workers import DecodedItem, decode_stream

from clipsearch.errors import LibraryError
from clipsearch.library import Library
from clipsearch.model import ClipModel, ModelSpec

Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class IndexOptions:
    """How to run an index job; ``None`` means choose automatically."""

    exclude: Sequence[str] = ()
    include_hidden: bool = False
    batch_size: int | None = None
    workers: int | None = None
    device: str | None = None
    wait: float = 0.0


@dataclass
class IndexReport:
    """What one run did; the CLI prints it, tests assert on it."""

    found: int = 0
    new: int = 0
    changed: int = 0
    moved: int = 0
    deleted: int = 0
    unchanged: int = 0
    encoded: int = 0
    known_errors: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) recorded this run
    decode_seconds: float = 0.0  # summed over workers
    encode_seconds: float = 0.0
    elapsed: float = 0.0
    workers: int = 0
    interrupted: bool = False
    index_kind: str | None = None

    @property
    def decode_ips(self) -> float:
        """Images decoded per second of one worker's time, times the number of workers."""
        per_worker = self.decode_seconds / max(self.workers, 1)
        return self.encoded / per_worker if per_worker > 0 else 0.0

    @property
    def encode_ips(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "failures"}
        data["errors"] = [{"path": p, "reason": r} for p, r in self.failures]
        data["decode_ips"] = round(self.decode_ips, 1)
        data["encode_ips"] = round(self.encode_ips, 1)
        return data


def index_folders(
    library: Library,
    roots: Iterable[str | os.PathLike[str]],
    *,
    model: ModelSpec | None = None,
    options: IndexOptions | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> IndexReport:
    """Bring ``library`` in step with the image files under ``roots``; returns what was done."""
    options = options or IndexOptions()
    notify = progress or _ignore
    started = time.perf_counter()
    root_paths = [os.path.abspath(os.path.expanduser(os.fspath(r))) for r in roots]
    with library.writer_lock(options.wait):
        spec = library.resolve_model(model)
        library.store.add_roots(root_paths)
        plan = _plan(library, root_paths, options, notify)
        report = _report_from_plan(plan)
        _apply_moves_and_deletions(library, plan)
        clip = _encode_all(library, spec, plan, options, report, notify, stop or threading.Event())
        _refresh_index(library, clip, report, notify)
    report.elapsed = time.perf_counter() - started
    return report


def _ignore(_event: str, _info: dict[str, Any]) -> None:
    return None


def _plan(library: Library, roots: list[str], options: IndexOptions, notify: Progress) -> Plan:
    found = _counting(crawl(roots, exclude=options.exclude, include_hidden=options.include_hidden), notify)
    store = library.store
    plan = make_plan(found, store.file_states(), store.error_states(), roots)
    notify("planned", {"plan": plan})
    return plan


def _counting(items: Iterator[FoundFile | CrawlProblem], notify: Progress) -> Iterator[FoundFile | CrawlProblem]:
    for count, item in enumerate(items, start=1):
        if count % 1000 == 0:
            notify("crawling", {"found": count})
        yield item


def _report_from_plan(plan: Plan) -> IndexReport:
    return IndexReport(
        found=plan.found,
        new=plan.new,
        changed=plan.changed,
        moved=len(plan.moved),
        deleted=len(plan.deleted),
        unchanged=plan.unchanged,
        known_errors=plan.known_errors,
        failures=[(p.path, p.reason) for p in plan.problems],
    )


def _apply_moves_and_deletions(library: Library, plan: Plan) -> None:
    """Moves, deletions and crawl problems touch only SQLite: one transaction, nothing encoded."""
    store = library.store
    moves = [(image_id, f.path, f.size, f.mtime_ns) for image_id, f in plan.moved]
    problems = [{"path": p.path, "reason": p.reason, "size": None, "mtime_ns": None} for p in plan.problems]
    with store.transaction() as conn:
        store.move_images(moves, conn)
        store.delete_images(plan.deleted, conn)
        store.delete_errors(plan.vanished_errors, conn)
        store.record_errors(problems, conn)


def _encode_all(
    library: Library,
    spec: ModelSpec,
    plan: Plan,
    options: IndexOptions,
    report: IndexReport,
    notify: Progress,
    stop: threading.Event,
) -> ClipModel | None:
    if not plan.encode:
        return None
    clip = ClipModel.load(spec, options.device)
    library.bind_model(spec, clip.dim)
    batch_size = options.batch_size or default_batch_size(clip.device)
    workers = options.workers if options.workers is not None else default_workers(clip.device, len(plan.encode))
    _set_torch_threads(clip.device, workers)
    report.workers = workers
    notify("encoding", {"total": len(plan.encode), "workers": workers, "batch_size": batch_size})
    stream = decode_stream(plan.encode, clip.pixel_transform, clip.image_size, workers, window=4 * batch_size)
    for batch in _batches(stream, batch_size):
        _encode_and_write(library, clip, batch, report)
        notify("batch", {"done": report.encoded, "errors": len(report.failures), "size": len(batch)})
        if stop.is_set():
            report.interrupted = True
            break
    stream.close()
    return clip


def _batches(items: Iterator[DecodedItem], size: int) -> Iterator[list[DecodedItem]]:
    batch: list[DecodedItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_and_write(library: Library, clip: ClipModel, batch: list[DecodedItem], report: IndexReport) -> None:
    good = [item for item in batch if item.pixels is not None]
    failures = [{"path": i.path, "reason": i.reason, "size": i.size, "mtime_ns": i.mtime_ns} for i in batch
                if i.pixels is None]
    started = time.perf_counter()
    vectors = clip.encode_pixels(np.stack([i.pixels for i in good])) if good else None
    report.encode_seconds += time.perf_counter() - started
    write_batch(library, [i.record for i in good], vectors, failures)
    report.encoded += len(good)
    report.decode_seconds += sum(i.decode_seconds for i in batch)
    report.failures += [(f["path"], f["reason"]) for f in failures]


def write_batch(
    library: Library, records: list[dict[str, Any]], vectors: np.ndarray | None, failures: list[dict[str, Any]]
) -> list[int]:
    """Vectors first (fsynced), then the rows pointing at them, in one transaction: a kill loses nothing
    committed and leaves at worst unreferenced vector rows, which later writes reuse."""
    store = library.store
    try:
        with store.transaction() as conn:
            ids = store.reserve_ids(len(records), conn)
            if records and vectors is not None:
                library.vectors().write(np.asarray(ids), vectors)
                store.insert_images([{**r, "id": i} for r, i in zip(records, ids, strict=True)], conn)
            store.record_errors(failures, conn)
    except (OSError, sqlalchemy.exc.OperationalError) as exc:
        raise LibraryError(
            f"Could not write to the library at {library.path} ({_reason(exc)}); nothing committed was lost, "
            "free some disk space and run the same command again."
        ) from exc
    return ids


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(getattr(exc, "orig", exc))


def _refresh_index(library: Library, clip: ClipModel | None, report: IndexReport, notify: Progress) -> None:
    from clipsearch.sync import refresh_index

    if library.dim() is None:
        return
    notify("index", {"message": "updating the index"})
    encoder = clip.encode_texts if clip is not None else None
    index = refresh_index(library, encoder, progress=lambda message: notify("index", {"message": message}))
    report.index_kind = index.params.kind if index is not None else None


def default_batch_size(device: str) -> int:
    return 256 if device.startswith("cuda") else 32


def default_workers(device: str, files: int) -> int:
    """Decode processes: on a GPU, every spare core; on a CPU the model needs the cores, and a small job is
    done faster in-process than by starting workers (0 = decode in this process)."""
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, cores - 1)
    if files < 64:
        return 0
    return max(1, cores // 4)


def _set_torch_threads(device: str, workers: int) -> None:
    """On a CPU, the encoder takes the cores the decode workers leave (at least one), so they do not fight."""
    if device.startswith("cuda"):
        return
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores - workers // 2))
