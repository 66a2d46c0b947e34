"""One `index` run: crawl → plan → decode (a pool) → encode (batches) → write (one transaction a batch).

    crawl ─▶ plan ─▶ files to encode ─▶ decode pool (bounded window) ─▶ batches ─▶ encoder ─▶ writer
                  └▶ moves, deletions: SQLite only, no encoding

The decode pool runs ahead of the encoder by a bounded window of files, so the encoder finds its next batch
ready and memory stays bounded however large the library. How many decoders of which kind, and how the cores
are shared with the encoder, is `decode_plan`'s choice, measured in `benchmarks/README.md`. Each batch is
committed by `Library.write_batch`, in the order that survives a kill at any instant: vectors written and
fsynced, then the SQLite rows that point at them in one transaction. The FAISS index is brought in step at the
end (it is a cache of the stored vectors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from clipsearch.indexer.crawl import CrawlProblem, FoundFile, crawl
from clipsearch.indexer.plan import Plan, make_plan
from clipsearch.indexer.workers import DecodedItem, PoolKind, decode_stream

from clipsearch.index import resolve_memory_budget
from clipsearch.library import Library
from clipsearch.model import ModelSpec, PendingVectors

if TYPE_CHECKING:
    from clipsearch.inference.encoders import ImageEncoder, TextEncoder

Progress = Callable[[str, dict[str, Any]], None]


class TextsToVectors(Protocol):
    def encode_texts(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class IndexOptions:
    """How to run an index job; ``None`` means choose automatically."""

    exclude: Sequence[str] = ()
    include_hidden: bool = False
    batch_size: int | None = None
    workers: int | None = None
    device: str | None = None
    backend: str | None = None  # torch, onnxruntime or openvino; None: the probe's choice for this machine
    precision: str | None = None  # fp32, int8, bf16 (fp16 on CUDA); None: the probe's choice
    wait: float = 0.0
    ray: str | None = None  # a Ray cluster's address ("auto", "host:port", "ray://host:10001"): encode there
    memory_budget: int | None = None  # bytes the index build may use (None: $CLIPSEARCH_INDEX_MEMORY, else half RAM)


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
    decoded: int = 0  # files through the decoder, failures included
    known_errors: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) recorded this run
    decode_seconds: float = 0.0  # CPU seconds, summed over workers
    encode_seconds: float = 0.0  # the encoder's working time (on a GPU, GPU time)
    encoding_elapsed: float = 0.0  # wall time from the first decode to the last batch written
    elapsed: float = 0.0
    workers: int = 0
    decode_pool: str = ""  # "threads", "processes" or "in-process"
    interrupted: bool = False
    index_kind: str | None = None
    backend: str = ""  # the encoder that made this run's vectors
    precision: str = ""

    @property
    def decode_ips(self) -> float:
        """What the decoders can do: files per CPU-second of decoding, times the number of workers (each with
        a core to itself). On a CPU that shares its cores with the encoder, more than the run achieved."""
        per_worker = self.decode_seconds / max(self.workers, 1)
        return self.decoded / per_worker if per_worker > 0 else 0.0

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
    memory_budget = resolve_memory_budget(options.memory_budget)  # a bad setting is said before any work
    with library.writer_lock(options.wait), _cluster_connection(options.ray):
        spec = library.resolve_model(model)
        _check_model_request(spec, options)
        library.store.add_roots(root_paths)
        plan = _plan(library, root_paths, options, notify)
        report = _report_from_plan(plan)
        _apply_moves_and_deletions(library, plan)
        clip = _encode_all(library, spec, plan, options, report, notify, stop or threading.Event())
        _refresh_index(library, clip, report, notify, memory_budget)
    report.elapsed = time.perf_counter() - started
    return report


def _ignore(_event: str, _info: dict[str, Any]) -> None:
    return None


def _check_model_request(spec: ModelSpec, options: IndexOptions) -> None:
    """A backend and precision that do not go together, or weights that are neither exported nor on this machine
    with no network to fetch them, are said at once (one sentence, before any other output), not after crawling
    and a minute of download retries."""
    from clipsearch.inference.export import find_export
    from clipsearch.inference.loader import check_request
    from clipsearch.inference.source import locate_or_explain

    if (options.device or "cpu") == "cpu" and (options.backend or options.precision):
        check_request(options.backend, options.precision)
    if find_export(spec) is None:
        locate_or_explain(spec)


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
) -> TextsToVectors | None:
    if not plan.encode:
        return None
    if options.ray:
        return _encode_on_ray(library, spec, plan, options, report, notify, stop)
    from clipsearch.inference.loader import ImageEncoderLoader, Request, resolve_device

    device = resolve_device(options.device)
    loader = ImageEncoderLoader(spec, Request(options.backend, options.precision, device),
                                log=lambda message: notify("model", {"message": message}))
    batch_size = options.batch_size or default_batch_size(device)
    decoding = decode_plan(device, len(plan.encode), options.workers)
    started = time.perf_counter()
    # Decoding starts as soon as the pixel geometry is known (at once from a cached export) while the encoder
    # is still being prepared in the loader's thread.
    stream = decode_stream(plan.encode, loader.pixel_transform(), loader.pixel_transform().size, decoding.workers,
                           window=4 * batch_size, kind=decoding.kind, niceness=decoding.niceness)
    with contextlib.closing(stream):
        batches = _batches(stream, batch_size)
        first = next(batches, [])
        encoder = loader.encoder(_calibration(first) if loader.needs_calibration() else None)
        library.bind_model(spec, encoder.dim)
        report.backend, report.precision = encoder.backend, encoder.precision
        _announce(report, notify, len(plan.encode), decoding.workers, batch_size,
                  decoding.kind if decoding.workers else "in-process")
        with _torch_threads(decoding.torch_threads if encoder.backend == "torch" else None):
            _run_batches(library, encoder, itertools.chain([first], batches), report,
                         _Rate(len(plan.encode), notify), stop)
    report.encoding_elapsed = time.perf_counter() - started
    return _text_encoder_of(encoder, spec)


def _calibration(batch: list[DecodedItem]) -> np.ndarray | None:
    """The probe's calibration photos: the run's first decoded photos, as the encoder will get them."""
    from clipsearch.inference.probe import CALIBRATION_IMAGES

    pixels = [item.pixels for item in batch if item.pixels is not None][:CALIBRATION_IMAGES]
    return np.stack(pixels) if pixels else None


def _text_encoder_of(encoder: Any, spec: ModelSpec) -> TextsToVectors:
    """The torch encoder also encodes texts; for an exported one, the text tower is loaded only if the index
    build asks for it (tuning an approximate index)."""
    if hasattr(encoder, "encode_texts"):
        return encoder  # type: ignore[no-any-return]
    return _LazyTextEncoder(spec)


class _LazyTextEncoder:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        from clipsearch.inference import load_text_encoder

        return load_text_encoder(self.spec).encode_texts(texts)


def _announce(report: IndexReport, notify: Progress, total: int, workers: int, batch_size: int, pool: str) -> None:
    report.workers, report.decode_pool = workers, pool
    notify("encoding", {"total": total, "workers": workers, "batch_size": batch_size, "decode_pool": pool})


def _encode_on_ray(
    library: Library,
    spec: ModelSpec,
    plan: Plan,
    options: IndexOptions,
    report: IndexReport,
    notify: Progress,
    stop: threading.Event,
) -> TextEncoder:
    """Decode and encode on a Ray cluster (`distributed.py`); this process only plans and writes. The text
    encoder is loaded here: its dimension is checked against the library before anything is written, and it
    tunes the index afterwards, as in a local run."""
    from clipsearch.indexer import distributed

    from clipsearch.inference import load_text_encoder

    cluster = distributed.current_cluster_plan(options.device)
    if options.workers:  # decode processes per actor; 0 keeps the plan's (an actor always decodes in a pool)
        cluster = dataclasses.replace(cluster, decode_workers=options.workers)
    clip = load_text_encoder(spec, export_if_missing=True)  # exported here, the workers of this machine reuse it
    library.bind_model(spec, clip.dim)
    batch_size = options.batch_size or default_batch_size(cluster.device)
    _announce(report, notify, len(plan.encode), cluster.actors * cluster.decode_workers, batch_size,
              cluster.description)
    started = time.perf_counter()
    rate = _Rate(len(plan.encode), notify)
    batches = distributed.encode_on_cluster(plan.encode, spec, cluster, batch_size,
                                            (options.backend, options.precision))
    with contextlib.closing(batches):
        for batch in batches:
            _commit_batch(library, batch.items, batch.vectors, batch.encode_seconds, report, rate)
            if stop.is_set():
                report.interrupted = True
                break
    report.encoding_elapsed = time.perf_counter() - started
    return clip


@contextlib.contextmanager
def _cluster_connection(address: str | None) -> Iterator[None]:
    """Join the Ray cluster for the run (before crawling, so a wrong address is said at once), and leave it
    after; a connection the caller already made is used and left open."""
    if address is None:
        yield
        return
    from clipsearch.indexer import distributed

    joined = distributed.connect(address)
    try:
        yield
    finally:
        if joined:
            distributed.disconnect()


def _run_batches(
    library: Library,
    clip: ImageEncoder,
    batches: Iterator[list[DecodedItem]],
    report: IndexReport,
    rate: _Rate,
    stop: threading.Event,
) -> None:
    """Encode and write batch after batch. Where the encoder runs asynchronously (a GPU), batch n+1 is
    queued before batch n is waited for and written, so the GPU is never idle while the host writes, gathers
    and pins; elsewhere each batch is written as soon as it is encoded."""
    in_hand: deque[_Encoding] = deque()
    ahead = 1 if clip.encodes_asynchronously else 0
    for batch in batches:
        in_hand.append(_start(clip, batch))
        if len(in_hand) > ahead:
            _finish(library, in_hand.popleft(), report, rate)
        if stop.is_set():
            report.interrupted = True
            break
    while in_hand:
        _finish(library, in_hand.popleft(), report, rate)


@dataclass
class _Encoding:
    batch: list[DecodedItem]
    vectors: PendingVectors | None  # None when no file of the batch could be decoded


def _start(clip: ImageEncoder, batch: list[DecodedItem]) -> _Encoding:
    pixels = [item.pixels for item in batch if item.pixels is not None]
    return _Encoding(batch, clip.start_encoding(pixels) if pixels else None)


def _finish(library: Library, encoding: _Encoding, report: IndexReport, rate: _Rate) -> None:
    vectors = encoding.vectors.result() if encoding.vectors is not None else None
    seconds = encoding.vectors.seconds if encoding.vectors is not None else 0.0
    _commit_batch(library, encoding.batch, vectors, seconds, report, rate)


def _commit_batch(library: Library, batch: list[DecodedItem], vectors: np.ndarray | None, encode_seconds: float,
                 report: IndexReport, rate: _Rate) -> None:
    """Write one encoded batch (``vectors`` holds a row per item with a record, in order) and count it."""
    records = [item.record for item in batch if item.record is not None]
    failures = [{"path": i.path, "reason": i.reason, "size": i.size, "mtime_ns": i.mtime_ns} for i in batch
                if i.record is None]
    report.encode_seconds += encode_seconds
    library.write_batch(records, vectors if records else None, failures)
    report.encoded += len(records)
    report.decoded += len(batch)
    report.decode_seconds += sum(i.decode_seconds for i in batch)
    report.failures += [(f["path"], f["reason"]) for f in failures]
    rate.batch_done(len(batch), report)


class _Rate:
    """Images per second and the time left, for the progress callback, measured from the start of encoding
    (after the model has loaded)."""

    def __init__(self, total: int, notify: Progress) -> None:
        self.total, self.notify = total, notify
        self.started = time.perf_counter()
        self.done = 0

    def batch_done(self, size: int, report: IndexReport) -> None:
        self.done += size
        elapsed = time.perf_counter() - self.started
        ips = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / ips if ips > 0 else None
        self.notify("batch", {"done": report.encoded, "errors": len(report.failures), "size": size,
                              "total": self.total, "images_per_second": ips, "eta_seconds": eta})


def _batches(items: Iterator[DecodedItem], size: int) -> Iterator[list[DecodedItem]]:
    batch: list[DecodedItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _refresh_index(library: Library, clip: TextsToVectors | None, report: IndexReport, notify: Progress,
                   memory_budget: int) -> None:
    from clipsearch.sync import refresh_index

    if library.dim() is None:
        return
    notify("index", {"message": "updating the index"})
    encoder = clip.encode_texts if clip is not None else None
    index = refresh_index(library, encoder, progress=lambda message: notify("index", {"message": message}),
                          memory_budget_bytes=memory_budget)
    report.index_kind = index.params.kind if index is not None else None


def default_batch_size(device: str) -> int:
    return 256 if device.startswith("cuda") else 32


@dataclass(frozen=True)
class DecodePlan:
    """How to decode: how many workers of which kind, how much nicer than the encoder, and how many threads
    torch may use (None: leave torch's setting alone)."""

    workers: int
    kind: PoolKind
    niceness: int
    torch_threads: int | None


def decode_plan(device: str, files: int, workers: int | None = None) -> DecodePlan:
    """The measured choice for this device (``benchmarks/README.md`` has the figures); ``workers`` overrides
    the count, 0 meaning decode in this thread between batches.

    - GPU: the GPU does the encoding, so every core but the one feeding it decodes, in processes (a decoder
      crash costs a worker, not the run); a small job uses threads, which start at once.
    - CPU: the encoder needs every core, so torch gets them all, and decoding runs in one thread per core at
      the lowest priority: at normal priority only the encoder's threads compete for the cores, and the
      decoders take what it leaves (between its parallel sections, and while it waits for a batch). Threads,
      not processes: measured faster here, as a process must first import torch to unpickle the transform.
    """
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        count = max(1, cores - 1) if workers is None else workers
        kind: PoolKind = "processes" if files >= SMALL_JOB else "threads"
        return DecodePlan(count, kind, niceness=0, torch_threads=None)
    count = cores if workers is None else workers
    return DecodePlan(count, "threads", niceness=CPU_DECODE_NICENESS, torch_threads=cores)


SMALL_JOB = 256  # files: below this, starting worker processes costs more than it saves
CPU_DECODE_NICENESS = 19


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Give torch ``count`` intra-op threads for the run, and put the caller's setting back afterwards."""
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
