"""Decoding and encoding on a Ray cluster, for `clipsearch index --ray ADDRESS`.

    driver (this process)                                     Ray workers (one actor per GPU, or per node)
    crawl ─▶ plan ─▶ files to encode ─▶ Ray Data ─────────▶  decode pool (processes) ─▶ encoder (fp16 on GPU)
                                                               │
    writer (the only one that touches the library) ◀───────────┘ vectors + metadata, in the files' order

Everything before and after the encoding is the local pipeline's (`pipeline.py`): the driver crawls and plans,
applies moves and deletions, and writes every batch with the same write order (vectors fsynced, then one SQLite
transaction), so a killed driver resumes like a local run. What runs on the cluster is the part that scales
with the number of files: a Ray Data `map_batches` over an actor pool (run by a small coordinating actor, so that
a driver connected through Ray Client works too), each actor loading the model once and decoding with a pool of
worker processes (a hostile file that crashes a decoder costs a worker process and is recorded, exactly as
locally; it never kills the actor, so Ray never retries it).

Workers open files by the paths the driver found, so every node must see the photos at the same paths (an
NFS or SMB mount, a bucket mounted at the same place), and must have clipsearch installed with the same model
weights reachable (a `local-dir:` folder on shared storage, or the same Hugging Face cache). A path a worker
cannot read is recorded as a bad file with its reason, like any other.

Failures: Ray restarts a lost actor and re-runs its batch (`TASK_RETRIES` times); a batch that fails that often
is recorded as bad files with the reason, never retried forever, and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from clipsearch.indexer.crawl import FoundFile
from clipsearch.indexer.workers import DecodedItem, DecodePool

from clipsearch.errors import ClusterError
from clipsearch.model import ModelSpec

CONNECT_TIMEOUT_S = 5.0
TASK_RETRIES = 3  # a batch whose actor dies this many times is recorded as failed
CPU_DECODE_NICENESS = 19  # as locally: on a CPU worker, decoders take what the encoder leaves
INSTALL_HINT = "Indexing on Ray needs the ray extra: pip install 'clipsearch[ray]'."


@dataclass(frozen=True)
class ClusterPlan:
    """How to spread the work: how many actors, what each reserves, and what it runs on."""

    actors: int
    cpus_per_actor: int
    gpus_per_actor: int
    device: str  # "cuda" or "cpu"
    decode_workers: int  # decode processes per actor

    @property
    def description(self) -> str:
        unit = "GPU" if self.gpus_per_actor else f"{self.cpus_per_actor} CPU"
        return f"ray: {self.actors} actor{'s' if self.actors != 1 else ''} x {unit}"


@dataclass
class EncodedBatch:
    """One batch back from the cluster, in the files' order: items (failures carry their reason) and the
    vectors of the items that have a record, in the same order."""

    items: list[DecodedItem]
    vectors: np.ndarray
    encode_seconds: float


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` ("auto", "host:port" or "ray://host:10001"); False when this
    process had already joined one (then the caller's connection is used, and left open)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    _check_reachable(address)
    # The driver's Ray core otherwise prints its internal notices (in C++, past Python's logging) on stderr,
    # in the middle of the progress bar; errors that concern the run still reach us as exceptions.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise _no_cluster(address, _first_line(error)) from error
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at the cluster's address: Ray itself keeps retrying for minutes."""
    host_port = _host_and_port(_resolved(address))
    if host_port is None:
        return  # "auto" with no cluster recorded on this machine: Ray says so at once
    try:
        socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise _no_cluster(address, error.strerror or str(error)) from error


def _no_cluster(address: str, why: str) -> ClusterError:
    return ClusterError(f"No Ray cluster answers at {address!r} ({why}); start one with `ray start --head` or "
                        "give the address of a running one.")


def _resolved(address: str) -> str:
    """"auto" is the cluster in $RAY_ADDRESS, else the one `ray start` last recorded on this machine."""
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        return Path(tempfile.gettempdir(), "ray", "ray_current_cluster").read_text().strip()
    except OSError:
        return address


def _host_and_port(address: str) -> tuple[str, int] | None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def disconnect() -> None:
    ray = _import_ray()
    if ray.is_initialized():
        ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the extra brings both; a bare `ray` lacks Ray Data's dependencies)
    except ImportError as error:
        raise ClusterError(INSTALL_HINT) from error
    return ray


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def plan_cluster(resources: dict[str, float], cpus_per_node: Sequence[float], device: str | None) -> ClusterPlan:
    """One actor per GPU when the cluster has GPUs (and ``device`` does not say cpu), sharing each node's
    CPUs between its GPUs for decoding; otherwise one actor per node, reserving the smallest node's CPUs (so
    an actor fits any node), whose encoder and decoders share them as a local CPU run does."""
    gpus = int(resources.get("GPU", 0))
    if gpus and (device is None or device.startswith("cuda")):
        cpus = max(1, int(resources.get("CPU", 1)) // gpus)
        return ClusterPlan(gpus, cpus, 1, "cuda", decode_workers=max(1, cpus - 1))
    if device is not None and device.startswith("cuda"):
        raise ClusterError("The Ray cluster has no GPU; leave out --device cuda to encode on its CPUs.")
    smallest = max(1, int(min(cpus_per_node, default=1)))
    return ClusterPlan(max(1, len(cpus_per_node)), smallest, 0, "cpu", decode_workers=smallest)


def current_cluster_plan(device: str | None) -> ClusterPlan:
    ray = _import_ray()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    cpus = [node.get("Resources", {}).get("CPU", 0) for node in nodes if node.get("Resources", {}).get("CPU", 0) > 0]
    return plan_cluster(ray.cluster_resources(), cpus, device)


def encode_on_cluster(
    files: Sequence[FoundFile], spec: ModelSpec, cluster: ClusterPlan, batch_size: int,
    request: tuple[str | None, str | None] = (None, None),
) -> Iterator[EncodedBatch]:
    """Decode and encode ``files`` on the cluster; batches come back in the files' order. Files whose batch
    failed on the cluster come back as failed items (with the reason) at the end. ``request`` is the
    (backend, precision) asked for; each worker otherwise uses its machine's probe record, else torch."""
    ray = _import_ray()
    seen = np.zeros(len(files), dtype=bool)
    model = {"spec": spec.to_dict(), "backend": request[0], "precision": request[1]}
    coordinator = ray.remote(num_cpus=0, max_restarts=0)(_Coordinator).remote(
        _file_blocks(files, batch_size), model, cluster.__dict__, batch_size, worker_environment())
    try:
        pending = coordinator.next_batch.remote()
        while (columns := ray.get(pending)) is not None:
            pending = coordinator.next_batch.remote()  # the cluster goes on while this batch is written
            seen[columns["ordinal"]] = True
            yield _from_columns(columns, files)
    except (ray.exceptions.RayError, ConnectionError) as error:
        raise ClusterError(
            f"The Ray cluster failed during the run ({_first_line(error)}); every batch written so far is "
            "kept: run the same command again to go on."
        ) from error
    finally:
        ray.kill(coordinator)  # its actor pool goes with it
    lost = [files[int(i)] for i in np.flatnonzero(~seen)]
    if lost:
        yield _lost_batch(lost)


class _Coordinator:
    """Runs the Ray Data pipeline on a node of the cluster and hands its batches to the driver one at a time.

    A driver that is itself a node could iterate the dataset directly, but one connected through Ray Client
    (ray://host:10001) cannot: Ray Data's executor needs the Ray core that only nodes have. One path serves
    both; what it costs is one hop of the vectors through the object store.
    """

    def __init__(self, blocks: list[Any], model: dict[str, Any], cluster: dict[str, Any], batch_size: int,
                 environment: dict[str, str]) -> None:
        ray = _import_ray()
        with _data_context(ray):  # a dataset keeps the settings that are current when it is made
            dataset = _encoded_dataset(ray, ray.data.from_arrow(blocks), model, cluster, batch_size, environment)
        self._batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))

    def next_batch(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _encoded_dataset(ray: Any, files: Any, model: dict[str, Any], cluster: dict[str, Any], batch_size: int,
                     environment: dict[str, str]) -> Any:
    plan = ClusterPlan(**cluster)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing max_task_retries to map_batches but offers no other way to bound them.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return files.map_batches(
            _EncodeActor,
            batch_size=batch_size,
            # Two calls at once per actor: one decodes batch n+1 while the other encodes batch n (see _EncodeActor).
            compute=ray.data.ActorPoolStrategy(size=plan.actors, max_concurrent_calls_per_actor=2,
                                               enable_true_multi_threading=True),
            fn_constructor_kwargs={"model": model, "cluster": cluster, "batch_size": batch_size},
            num_cpus=plan.cpus_per_actor,
            num_gpus=plan.gpus_per_actor,
            runtime_env={"env_vars": environment},
            max_task_retries=TASK_RETRIES,
            max_restarts=-1,
        )


def _file_blocks(files: Sequence[FoundFile], batch_size: int) -> list[Any]:
    """The files as Arrow tables of one batch each: for Ray Data, each is one unit of work and of retry."""
    import pyarrow as pa

    blocks = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        blocks.append(pa.table({
            "ordinal": np.arange(start, start + len(chunk), dtype=np.int64),
            "path": [os.fsencode(f.path) for f in chunk],  # bytes: a file name need not be valid UTF-8
            "size": np.array([f.size for f in chunk], dtype=np.int64),
            "mtime_ns": np.array([f.mtime_ns for f in chunk], dtype=np.int64),
        }))
    return blocks


class _data_context:  # noqa: N801  (used as a context manager, named like one)
    """Ray Data settings for one run, restored afterwards: results in input order (so ids are given in the
    same order as a local run), failed batches dropped rather than failing the run (their files are recorded
    as bad by the driver), and no Ray progress bars on our stderr (clipsearch draws its own)."""

    def __init__(self, ray: Any) -> None:
        self._context = ray.data.DataContext.get_current()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        context = self._context
        self._saved = {"log_levels": {name: logging.getLogger(name).level for name in ("ray", "ray.data")},
                       "preserve_order": context.execution_options.preserve_order,
                       "max_errored_blocks": context.max_errored_blocks,
                       "enable_progress_bars": context.enable_progress_bars,
                       "print_on_execution_start": getattr(context, "print_on_execution_start", None)}
        for name in ("ray", "ray.data"):  # Ray Data reports progress at INFO on stderr
            logging.getLogger(name).setLevel(logging.ERROR)
        context.execution_options.preserve_order = True
        context.max_errored_blocks = -1
        context.enable_progress_bars = False
        if self._saved["print_on_execution_start"] is not None:
            context.print_on_execution_start = False

    def __exit__(self, *_exc: object) -> None:
        context = self._context
        for name, level in self._saved["log_levels"].items():
            logging.getLogger(name).setLevel(level)
        context.execution_options.preserve_order = self._saved["preserve_order"]
        context.max_errored_blocks = self._saved["max_errored_blocks"]
        context.enable_progress_bars = self._saved["enable_progress_bars"]
        if self._saved["print_on_execution_start"] is not None:
            context.print_on_execution_start = self._saved["print_on_execution_start"]


LOST_REASON = f"its batch failed on the Ray cluster {TASK_RETRIES + 1} times (a worker kept dying)"


def _lost_batch(files: Sequence[FoundFile]) -> EncodedBatch:
    items = [DecodedItem(f.path, f.size, f.mtime_ns, reason=LOST_REASON) for f in files]
    return EncodedBatch(items, np.zeros((0, 0), dtype=np.float32), 0.0)


# ------------------------------------------------------------------------------------------- on the workers


class _EncodeActor:
    """Lives on a Ray worker: loads the model once, keeps a decode pool open, encodes batch after batch.

    Ray runs two calls at once on each actor, so that the encoder never waits for a batch to be decoded: while
    one call encodes, the other decodes the next batch. Each stage takes one call at a time (its own lock): one
    encoder, and one user of the decode pool, whose crash recovery must see only its own files in flight.
    """

    def __init__(self, model: dict[str, Any], cluster: dict[str, Any], batch_size: int) -> None:
        from clipsearch.inference.loader import ImageEncoderLoader, Request

        plan = ClusterPlan(**cluster)
        request = Request(model["backend"], model["precision"], plan.device,
                          threads=plan.cpus_per_actor if plan.device == "cpu" else None)
        self._clip = ImageEncoderLoader(ModelSpec.from_dict(model["spec"]), request).encoder()
        if plan.device == "cpu" and self._clip.backend == "torch":
            import torch

            torch.set_num_threads(plan.cpus_per_actor)
        niceness = CPU_DECODE_NICENESS if plan.device == "cpu" else 0
        self._pool = DecodePool("processes", plan.decode_workers, self._clip.pixel_transform,
                                self._clip.image_size, niceness)
        self._window = 2 * batch_size
        self._decoding, self._encoding = threading.Lock(), threading.Lock()

    def __call__(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files = [FoundFile(os.fsdecode(bytes(p)), int(s), int(m))
                 for p, s, m in zip(columns["path"], columns["size"], columns["mtime_ns"], strict=True)]
        with self._decoding:
            items = list(self._pool.decode(files, self._window))
        pixels = [item.pixels for item in items if item.pixels is not None]
        with self._encoding:
            started = time.perf_counter()
            vectors = self._clip.encode_pixels(pixels) if pixels else np.zeros((0, self._clip.dim), np.float32)
            seconds = time.perf_counter() - started
        return _to_columns(columns["ordinal"], items, vectors, seconds, self._clip.dim)


def _to_columns(ordinal: np.ndarray, items: list[DecodedItem], vectors: np.ndarray, seconds: float,
                dim: int) -> dict[str, np.ndarray]:
    """One row per file: its ordinal in the driver's list (which knows its path), its record or the reason it
    failed, and its vector (zeros for a failure, never stored). Text goes as JSON, which is plain ASCII even
    for a file name that is not valid UTF-8 (Arrow, underneath Ray Data, accepts nothing else)."""
    full = np.zeros((len(items), dim), dtype=np.float32)
    good = np.array([item.pixels is not None for item in items], dtype=bool)
    full[good] = vectors
    return {
        "ordinal": np.asarray(ordinal, dtype=np.int64),
        "record": np.array([json.dumps(item.record) if item.pixels is not None else "" for item in items]),
        "reason": np.array([json.dumps(item.reason) for item in items]),
        "decode_seconds": np.array([item.decode_seconds for item in items], dtype=np.float64),
        "encode_seconds": np.full(len(items), seconds / max(len(items), 1), dtype=np.float64),
        "vector": full,
    }


def _from_columns(columns: dict[str, np.ndarray], files: Sequence[FoundFile]) -> EncodedBatch:
    items = [_item(columns, i, files[int(n)]) for i, n in enumerate(columns["ordinal"])]
    good = np.array([item.record is not None for item in items], dtype=bool)
    vectors = np.asarray(columns["vector"], dtype=np.float32).reshape(len(items), -1)[good]
    return EncodedBatch(items, vectors, float(np.sum(columns["encode_seconds"])))


def _item(columns: dict[str, np.ndarray], i: int, found: FoundFile) -> DecodedItem:
    record = str(columns["record"][i])
    return DecodedItem(
        found.path, found.size, found.mtime_ns,
        record={**json.loads(record), "path": found.path} if record else None,
        reason=json.loads(str(columns["reason"][i])),
        decode_seconds=float(columns["decode_seconds"][i]),
    )


def worker_environment() -> dict[str, str]:
    """Environment the driver passes on, so workers find the same models offline."""
    keys = ("HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "CLIPSEARCH_CACHE")
    return {key: os.environ[key] for key in keys if key in os.environ}
