"""Building an index from the stored vectors: `BuildJob` says what to build and how, `BuildJob.run` builds it.

A build chooses a plan (or takes the caller's), sizes itself to the memory budget (`memory`), trains IVF-PQ on a
sample of the store, adds every id (in RAM, or in shards merged into an .ivfdata file when the lists do not fit),
then tunes (`tuning`). When tuning cannot reach a target the index changes instead of returning worse results:
bigger PQ codes, then exact flat (`policy.escalate`); when flat would not fit the budget, the IVF-PQ index keeps
its most thorough setting. Nothing is ever re-encoded: everything comes from the stored vectors.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.index import ondisk
from clipsearch.index.budget import format_size, resolve_memory_budget
from clipsearch.index.core import VectorIndex
from clipsearch.index.ids import mask_of, sorted_unique
from clipsearch.index.memory import PQ_MAX_POINTS_PER_CENTROID, BuildMemory, plan_build_memory
from clipsearch.index.params import IndexParams
from clipsearch.index.plan import IndexPlan
from clipsearch.index.policy import DEFAULT_POLICY, IndexPolicy, choose_index, escalate
from clipsearch.index.runtime import available_cores, faiss, faiss_threads, gpu_count
from clipsearch.index.tuning import Tuner, use_most_thorough_setting
from clipsearch.vectors import VectorStore

Progress = Callable[[str], None]


@dataclass
class BuildJob:
    """One index build over the stored vectors of `ids` (sorted and deduplicated on creation)."""

    store: VectorStore
    ids: np.ndarray
    text_queries: np.ndarray | None = None  # text-encoder embeddings of the captions; None: synthetic ones
    plan: IndexPlan | None = None  # None: `choose_index` decides
    use_gpu: bool | None = None  # None: train on the GPUs when faiss has any
    seed: int = 0
    progress: Progress | None = None
    memory_budget_bytes: int | None = None  # None: `resolve_memory_budget`
    folder: Path | None = None  # where an on-disk build writes its lists (the library's index folder)
    policy: IndexPolicy = DEFAULT_POLICY
    budget: int = field(init=False)  # the memory budget resolved

    def __post_init__(self) -> None:
        self.ids = sorted_unique(self.ids)
        self.budget = resolve_memory_budget(self.memory_budget_bytes)

    def report(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def run(self) -> VectorIndex:
        """Build, tune and, while a target is out of reach, rebuild more accurately; the index is not saved.

        An index that does not fit the budget is built on disk in shards, its .ivfdata written to `folder`
        (a private temporary folder when None, copied by the first save).
        """
        n, dim = len(self.ids), self.store.dim
        planned = self.plan or choose_index(n, dim, self.budget, self.policy)
        current = planned
        while True:
            memory = plan_build_memory(current, n, dim, self.budget)
            if not memory.fits:
                self.report(f"the memory budget ({format_size(self.budget)}) is below the least this build needs "
                            f"({format_size(memory.peak_estimate(current, n, dim))}); building with the "
                            "smallest buffers and shards")
            index = self._fill(current, planned.kind, memory)
            if self._tuned(index):
                return index
            following = escalate(current, n, dim, self.budget)
            if following is None:
                use_most_thorough_setting(index.params)
                self.report(f"target recall not reached and an exact index would not fit the memory budget; keeping "
                            f"{index.params.factory} with its most thorough search setting")
                return index
            index.discard()
            self.report(f"target recall not reached; rebuilding as {following.factory}")
            current = following

    def _tuned(self, index: VectorIndex) -> bool:
        """Tune (flat needs none); a failure deletes the files this build wrote."""
        try:
            return index.params.kind == "flat" or Tuner(index, self.seed).tune(self.text_queries, self.report)
        except BaseException:
            index.discard()
            raise

    def _fill(self, plan: IndexPlan, planned_kind: str, memory: BuildMemory) -> VectorIndex:
        params = IndexParams.from_plan(plan, self.store.dim, len(self.ids), planned_kind, self.policy)
        if memory.on_disk:
            return self._fill_on_disk(plan, params, memory)
        index = new_faiss_index(plan, self.store.dim)
        if plan.kind != "flat":
            train(index, self, plan, memory, self.folder)
        built = VectorIndex(index, params, self.store, np.zeros(0, dtype=bool), buffer_bytes=memory.buffer_bytes)
        self.report(f"adding {len(self.ids):,} vectors")
        built.add(self.ids)
        return built

    def _fill_on_disk(self, plan: IndexPlan, params: IndexParams, memory: BuildMemory) -> VectorIndex:
        """Train, add in shards, merge the shards' lists into a fresh .ivfdata in `folder`."""
        owned = Path(tempfile.mkdtemp(prefix="clipsearch-index-")) if self.folder is None else None
        target = owned if owned is not None else Path(self.folder)  # type: ignore[arg-type]
        target.mkdir(parents=True, exist_ok=True)
        ivfdata = target / ondisk.fresh_ivfdata_name()
        try:
            index = build_on_disk(self, plan, memory, target, ivfdata)
        except BaseException:
            ivfdata.unlink(missing_ok=True)
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        disk = ondisk.DiskState(ivfdata, saved=False, owned_folder=owned)
        return VectorIndex(index, params, self.store, mask_of(self.ids), disk=disk, buffer_bytes=memory.buffer_bytes)


def new_faiss_index(plan: IndexPlan, dim: int) -> Any:
    module = faiss()
    if plan.kind == "flat":
        return module.IndexIDMap2(module.IndexFlatIP(dim))
    return module.index_factory(dim, plan.factory, module.METRIC_INNER_PRODUCT)


# ---------------------------------------------------------------------------------------------- in shards


def build_on_disk(job: BuildJob, plan: IndexPlan, memory: BuildMemory, folder: Path, ivfdata: Path) -> Any:
    """Train once, add in shards, merge the shards' lists into `ivfdata` (scratch files go, whatever happens)."""
    module = faiss()
    with tempfile.TemporaryDirectory(prefix="build-", dir=folder) as scratch_name:
        scratch = Path(scratch_name)
        index = new_faiss_index(plan, job.store.dim)
        train(index, job, plan, memory, scratch)
        trained = scratch / "trained.faiss"
        module.write_index(index, str(trained))
        job.report(f"adding {len(job.ids):,} vectors in shards of {memory.shard_rows:,} "
                   f"(memory budget {format_size(memory.budget)})")
        with faiss_threads(available_cores()):
            shards = write_shards(trained, job, memory, scratch)
            job.report(f"merging {len(shards)} shards into {ivfdata.name}")
            merge_shards(index, shards, ivfdata)
    return index


def write_shards(trained_path: Path, job: BuildJob, memory: BuildMemory, folder: Path) -> list[Path]:
    """Add the job's ids in shards of `memory.shard_rows` vectors, each into a fresh copy of the trained index
    read from `trained_path`, written to `folder` and freed before the next one starts."""
    module = faiss()
    paths = []
    ids, rows = job.ids, memory.shard_rows
    count = -(-len(ids) // rows)
    for number, start in enumerate(range(0, len(ids), rows)):
        job.report(f"adding shard {number + 1} of {count} ({min(rows, len(ids) - start):,} vectors)")
        shard = module.read_index(str(trained_path))
        for chunk_ids, vectors in job.store.iter_chunks(ids[start : start + rows], memory.read_rows):
            shard.add_with_ids(vectors, chunk_ids)
        path = folder / f"shard-{number:05d}.faiss"
        module.write_index(shard, str(path))
        del shard  # its lists are on disk now; free them before the next shard
        paths.append(path)
    return paths


def merge_shards(index: Any, shard_paths: list[Path], ivfdata: Path) -> None:
    """Give the trained, empty `index` inverted lists in the new file `ivfdata` holding every shard's entries.

    The shards are memory-mapped (``IO_FLAG_MMAP``) rather than read, so the merge needs no RAM for them.
    """
    module = faiss()
    shards = [module.read_index(str(path), module.IO_FLAG_MMAP) for path in shard_paths]
    ondisk.merge_into_file(index, [module.extract_index_ivf(shard).invlists for shard in shards], ivfdata)
    del shards  # unmaps the shard files


# ------------------------------------------------------------------------------------------------ training


def train(index: Any, job: BuildJob, plan: IndexPlan, memory: BuildMemory, folder: Path | None) -> None:
    """Train `index` on a random sample of the job's stored vectors (scratch files, if any, go to `folder`)."""
    job.report(f"training {plan.factory} on {plan.train_size:,} vectors")
    with training_sample(job, plan.train_size, memory, folder) as sample:
        _train(index, sample, job.seed, job.use_gpu, memory.pq_points_per_centroid)


@contextlib.contextmanager
def training_sample(job: BuildJob, size: int, memory: BuildMemory, folder: Path | None) -> Iterator[np.ndarray]:
    """A random sample of the stored vectors: in RAM when it fits the budget, else written to a scratch file in
    `folder` (the system's temporary folder when None) and memory-mapped, so the kernel can page it."""
    rng = np.random.default_rng(job.seed)
    chosen = np.sort(rng.choice(job.ids, min(size, len(job.ids)), replace=False))  # sorted: sequential reads
    if memory.sample_in_ram:
        yield job.store.get(chosen)
        return
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=folder) as scratch:
        path = Path(scratch) / "sample.f32"
        with open(path, "wb") as f:
            for _, vectors in job.store.iter_chunks(chosen, memory.read_rows):
                f.write(vectors.tobytes())
        sample = np.memmap(path, dtype=np.float32, mode="r", shape=(len(chosen), job.store.dim))
        try:
            yield sample
        finally:
            del sample


def _train(index: Any, sample: np.ndarray, seed: int, use_gpu: bool | None,
           pq_points_per_centroid: int = PQ_MAX_POINTS_PER_CENTROID) -> None:
    module = faiss()
    ivf = module.downcast_index(module.extract_index_ivf(index))
    ivf.cp.seed = seed
    if hasattr(ivf, "pq"):
        ivf.pq.cp.seed = seed
        # faiss trains the codebooks on (and copies, with their residuals) up to this many points per entry
        ivf.pq.cp.max_points_per_centroid = pq_points_per_centroid
        # index_factory turns on polysemous training, which only serves Hamming-filtered search (unused here)
        # and made training ~25x slower (18 s instead of 0.8 s for 20,000 x 32-d, IVF128,PQ4x8).
        ivf.do_polysemous_training = False
    with faiss_threads(available_cores()):
        if gpu_count(use_gpu) > 0:
            _train_on_gpu(index, sample)
        else:
            index.train(sample)


def _train_on_gpu(index: Any, sample: np.ndarray) -> None:
    """Run the coarse k-means (nlist centroids over the sample) on the GPUs; the index itself stays on CPU, so
    the files written are the same."""
    module = faiss()
    ivf = module.extract_index_ivf(index)
    ivf.clustering_index = module.index_cpu_to_all_gpus(module.IndexFlatIP(ivf.d))
    try:
        index.train(sample)
    finally:
        ivf.clustering_index = None
