"""FAISS: choosing the index, training, add/remove, atomic save/load, search with exact re-rank.

The FAISS id of a vector is the image id (the SQLite primary key, the row in `VectorStore`), so the index
never needs its own id table and can always be rebuilt from the stored vectors without re-encoding anything.

Choosing the index (`choose_index`, a pure function of N, dim and an optional memory budget)
--------------------------------------------------------------------------------------------
* **Flat** (`IndexIDMap2(IndexFlatIP)`, exact) while ``N * dim * 4 <= FLAT_MAX_BYTES`` (64 MiB, i.e. 32,768
  vectors at 512-d). A single-query flat scan is bound by memory bandwidth; on the 2-core reference machine
  it measured 0.43-0.57 ms for 10^4 x 512 vectors on one thread (so about 1.4-1.9 ms at the threshold),
  8-12 ms at 10^5 and 82 ms at 10^6 (benchmarks/README.md). Past the threshold flat can no longer answer
  inside the 2 ms budget for 10^5, so IVF-PQ takes over.
  A memory budget too small for building the flat index also forces IVF-PQ (once there is enough data to
  train it).
* **IVF-PQ** (`IVF{nlist},PQ{m}x8`, inner product) beyond: ``nlist = 4 * sqrt(N)`` rounded to a power of two
  (4,096 at 10^6), but never more than N / 39 so every centroid gets the 39 training points k-means needs;
  ``m = dim / 8`` sub-quantisers of 8 bits (64 for 512-d: 64 bytes of code + 8 bytes of id per vector);
  a memory budget never shrinks them: lists that do not fit in RAM go to disk. The training sample is
  ``clamp(131,072, 39 * nlist, 256 * nlist)`` vectors (capped at N): enough for stable centroids, small enough
  that k-means for 10^6 vectors finishes in minutes on 2 cores.
* Every search on IVF-PQ fetches ``k * rerank`` candidates and re-scores them with the exact vectors from the
  store, so every reported score is an exact cosine and PQ error only costs recall, never wrong scores.

Tuning (`VectorIndex.build`)
----------------------------
After training, recall@10 is measured against brute force over the store for two query kinds:
* ``image``: a sample of the library's own vectors, each query leaving itself out of both the exact top-10
  and the index's answer (leave-one-out, so the index need not be built twice);
* ``text``: the caller's text-encoder embeddings of the built-in captions (`builtin_captions`). When the caller
  passes none (no model at hand), text-like queries are synthesised from library vectors with
  `text_like_queries`: a shared offset direction plus a weak pull towards a library vector plus noise, so the
  true neighbours sit at cosine ~0.3, as CLIP text queries do. Falling back to the image parameters instead
  would repeat exactly the failure of issue 8 (image-tuned IVF-PQ losing most text results).
For each kind the cheapest (nprobe, rerank) on the grid nprobe = 1, 2, 4 ... nlist/16 and rerank = 1, 2, 4 ...
64 whose recall reaches `TARGET_RECALL` is kept, cost being the codes scanned plus the re-ranked rows weighted
by dim/m (one exact row costs about as much as dim/m PQ codes). "Reaches" means the one-sided 95% lower
confidence bound of the mean over the tuning queries (`recall_lower_bound`): the cheapest setting whose mean
merely crosses the target lands below it on fresh queries about half the time (measured before this rule:
text tuned to 0.952 on 390 queries gave 0.946 on 1,000 fresh ones at 10^6). The same measurement picks the
filtered-search parameters of each kind (next section). When no grid point reaches a target the index changes
instead of returning worse results: bigger PQ codes (m = dim/4), then exact flat. The chosen parameters and
their measured recall are stored with the index (`IndexParams`) and can be overridden (`set_params`, or
``nprobe``/``rerank`` per search).

Filtered search
---------------
`allowed_ids` narrows results to a subset, whose exact top-k is the answer wanted. Subsets of at most
`EXACT_SUBSET_MAX_ROWS` rows are scored exactly from the store (measured switch point, see
benchmarks/README.md). Larger subsets search FAISS with an `IDSelectorBitmap`, probing
``nprobe / selectivity`` lists (capped at nlist) so about as many *allowed* codes are scanned as an
unfiltered query with that nprobe scans, and re-ranking ``k * rerank`` candidates. That (nprobe, rerank) pair
is tuned per query kind like the unfiltered one, to the stricter ``TARGET_RECALL["filtered"]``, against exact
search over random subsets keeping the smallest count that takes the selector path, 1%, 10% and 100% of the
library: one `FilterBand` each, because the effort needed differs a lot between them (measured at 10^6 for
text-like queries: nprobe 8 / selectivity and rerank 32 for the 0.4%, 1% and 10% filters, but nprobe 128 and
rerank 64 for 100%). A filter between two bands uses the more thorough of the two. Any query that still
comes back with fewer than ``min(k, len(allowed))`` results is re-run exactly over the subset, so a filter
never shortens a result list.

Threads: bulk work (training, adding, tuning) uses every available core; searches of fewer than
`SMALL_BATCH` queries run FAISS on one thread, because waking OpenMP threads costs more than a sub-millisecond
scan (measured: a 10^4 flat query took 0.57 ms on one thread and 2.4 ms on two). Idle OpenMP threads sleep
rather than spin (``OMP_WAIT_POLICY=PASSIVE`` unless set; see `_faiss`), which keeps builds from slowing
down tenfold when another process shares the cores. IVF-PQ is trained without polysemous training (which
`index_factory` turns on, serves only Hamming-filtered search and made training ~25x slower).

GPU: with faiss-gpu and a CUDA device (and ``use_gpu`` not False) the coarse k-means, the expensive part of
training, runs on the GPU (`_train_on_gpu`); everything stored stays a CPU index, so files are the same.

The memory budget (`plan_build_memory`)
---------------------------------------
`VectorIndex.build` is given a memory budget in bytes (by default `clipsearch.memory.resolve_memory_budget`:
``$CLIPSEARCH_INDEX_MEMORY``, else half the machine's memory). `plan_build_memory`, a pure function of the plan,
N, dim and the budget, accounts for what each phase of the build holds at once:

* always, fixed costs: two copies of the coarse centroids and PQ codebooks (the trained index and the one being
  filled) and `BOOKKEEPING_BYTES` per vector for the id arrays and presence masks the build holds;
* while training: `BLAS_BYTES` (faiss's 16 MiB block of inner products and the BLAS libraries' buffers), the
  centroids, each sample point's assignment, and the PQ training points (faiss copies up to 256 per codebook
  entry and their residuals: 2 x 128 MiB at 512-d; fewer, never below 39, when the budget is smaller), plus the
  k-means sample itself (``train_size * dim * 4`` bytes: 312 MiB for 10^6 vectors of 512-d, 2.4 GiB for 10^8)
  when it fits; otherwise the sample is written to a scratch file and memory-mapped, so the kernel pages it;
* while adding and tuning: a working share of a quarter of the budget (`WORKING_SHARE`; at most what the
  largest buffers take, 672 MiB at 512-d, so that a big budget goes to the lists), which after
  `BLAS_BYTES` sizes the vectors read from the store per step (with faiss's residual copy of them) and
  tuning's exact-search blocks and re-ranked rows, plus the inverted lists being filled, at
  ``bytes_per_vector * LIST_SLACK`` per vector (faiss grows each list by doubling).

When every vector's lists fit beside the fixed costs and the working share, the index is built in RAM as before
(72 B/vector lists for 10^6 vectors of 512-d fit a 256 MiB budget). Otherwise it is built on disk, in shards of
`shard_rows` vectors (next section). A budget below the smallest buffers and shards (about 133 MiB at 512-d; more
when the 32 bytes per vector of id arrays add up to a good part of it) is reported and the build goes on with
those. Flat indexes (at most `FLAT_MAX_BYTES`) are always built in RAM, and escalation to an exact flat index is
skipped when it would not fit the budget (the IVF-PQ index then keeps its most thorough search setting). The budget
covers what the build allocates; the Python process itself (interpreter, numpy, faiss: about 25-50 MiB of its own
memory) comes on top. Measured peaks of whole builds are in benchmarks/README.md.

Indexes on disk
---------------
The sharded build trains once on the sample, writes the trained empty index to a scratch folder, adds the stored
vectors in shards (each into a copy of the trained index, written as a shard file and freed before the next),
then merges every shard's lists into one `.ivfdata` file (faiss `OnDiskInvertedLists`: compact, memory-mapped),
and tunes as usual. Searches read the lists through the page cache; RAM holds the centroids, the codebooks, the
list offsets and one byte per id. Nothing is ever re-encoded: shards come from the stored vectors.

Every .ivfdata gets a fresh name (``lists-<random>.ivfdata``) and is never changed once written, because a reader
may have it mapped while the writer builds or saves the next one. `save` writes the small FAISS file (quantiser,
codebooks, list offsets) and the JSON as for any index; the JSON names both files and its rename is the commit
point; only then are files that no saved index names deleted (a reader that mapped an older file keeps reading
it: on POSIX a deleted file lives on while it is mapped). `load` checks the FAISS file's checksum and the
.ivfdata's size (checksumming gigabytes on every open would defeat the purpose) and maps the .ivfdata found next
to the JSON, not the path it was written at, so a moved or copied library folder still loads.

Adding and removing on disk (the choice made here): since the file is immutable, changes are held in memory
until the next save. Added vectors go into an in-RAM *twin* (`ondisk.empty_twin`: the same trained quantiser
and codebooks, so the same codes in the same lists); removed or replaced ids are hidden from the file's entries
by an id selector; every search runs on both and merges the two candidate lists by their PQ scores before the
exact re-rank, which is the search one index holding everything would do. So a reader brings a saved index in
step with SQLite without writing a byte. `save` writes the changes as a fresh .ivfdata: a compact merge of the
file's lists and the twin's, then the hidden entries removed from the new file (when an id was replaced, the
file's lists are copied and cleaned first and the twin merged after). A save that changed something thus costs
one sequential copy of the lists file (72 MB per million 512-d vectors), never a re-read of the stored vectors,
let alone a re-encoding of images; an unchanged index re-saves only its FAISS file. The twin costs RAM like an
in-RAM index, about ``bytes_per_vector * LIST_SLACK`` per added vector; when the vectors to add would not fit the
budget, `needs_rebuild` asks for a rebuild (sharded, from the stored vectors) instead.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch import durable, ondisk
from clipsearch.errors import IndexFileError
from clipsearch.memory import format_size, resolve_memory_budget
from clipsearch.vectors import VectorStore

FLAT_MAX_BYTES = 64 * 1024 * 1024  # flat while the matrix is at most this big (see module docstring)
LISTS_PER_SQRT_N = 4  # nlist ~ 4 * sqrt(N)
MIN_TRAIN_PER_LIST = 39  # below this faiss k-means warns and centroids are unstable
MAX_TRAIN_PER_LIST = 256  # beyond this faiss subsamples anyway
TRAIN_TARGET = 131_072  # training sample size aimed for, clamped into [39, 256] * nlist
ID_BYTES = 8  # each IVF entry also stores its int64 id
REBUILD_GROWTH = 4  # retrain once the collection is this many times the size it was trained on
TARGET_RECALL = {"image": 0.97, "text": 0.95, "filtered": 0.99}  # "filtered": either kind, with a filter
RECALL_K = 10
MAX_NPROBE_FRACTION = 16  # never scan more than 1/16 of the lists: past that the index is no faster than flat
FILTER_TUNING_FRACTIONS = (0.0, 0.01, 0.1, 1.0)  # filters the filtered tuning measures (raised to the switch)
RERANK_FACTORS = (1, 2, 4, 8, 16, 32, 64)
CONFIDENCE_Z = 1.645  # tuned recall must reach the target at this one-sided confidence (95%)
IMAGE_TUNING_QUERIES = 300
TEXT_TUNING_QUERIES = 400
EXACT_SUBSET_MAX_ROWS = 4096  # measured switch point for filtered search, see benchmarks/README.md
SMALL_BATCH = 8
QUERY_KINDS = ("image", "text")
FORMAT_VERSION = 2  # 2: on-disk indexes (ivfdata_file, ivfdata_bytes)
PARAMS_FILE = "index.json"
WORKING_SHARE = 4  # a quarter of the memory budget goes to transient buffers (see "The memory budget")
LIST_SLACK = 2  # in-RAM inverted lists grow by doubling: up to twice the bytes of their codes and ids
BOOKKEEPING_BYTES = 32  # per vector: up to three id arrays (8 bytes each) and the masks a build holds
MAX_READ_ROWS = 65536  # vectors read from the store per step when memory is plentiful
MIN_READ_ROWS = 256
MAX_TUNING_QUERIES = 512  # the tuning sets hold at most 400 queries (or the captions' 390)
MIN_SHARD_ROWS = 1024  # below this a shard's file and merge cost more than the memory they save
PQ_CODEBOOK_SIZE = 256  # entries per PQ sub-quantiser with 8-bit codes
PQ_MAX_POINTS_PER_CENTROID = 256  # faiss's default: at most 65,536 PQ training points
# faiss computes inner products in blocks of 4,096 x 1,024 floats (16 MiB); with the packing buffers of the BLAS
# libraries (faiss's and numpy's) a build phase was measured to need up to this much besides its own arrays.
BLAS_BYTES = 32 * 1024 * 1024
LOAD_ATTEMPTS = 3  # reading the JSON again when a writer swapped the index while we opened it

Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------------- faiss access


def _faiss() -> Any:
    """Import faiss on first use (it costs ~0.3 s) and size its thread pool to the cores we may use."""
    if "faiss" not in sys.modules:
        # OpenMP's idle threads spin by default; when another process shares the cores every barrier then
        # waits for a time slice. Measured on 2 cores with one other busy process: training IVF128,PQ4x8 on
        # 20,000 x 32-d took 2.6 s on 2 spinning threads, 0.27 s with passive waiting (0.25 s on one thread);
        # IVF512,PQ32 on 100,000 x 256-d took 22 s spinning and 9 s passive. On free cores passive waiting
        # only adds the wake-up of a sleeping thread per parallel region. A value the user set is kept.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss

    if not getattr(_faiss, "_threads_set", False):
        faiss.omp_set_num_threads(_available_cores())
        _faiss._threads_set = True  # type: ignore[attr-defined]
    return faiss


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _faiss_threads(count: int) -> Iterator[None]:
    """Run the block with `count` OpenMP threads (the setting is per calling thread, so this is thread-safe)."""
    faiss = _faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _gpu_count(use_gpu: bool | None) -> int:
    if use_gpu is False:
        return 0
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


# ------------------------------------------------------------------------------------------- choosing a plan


@dataclass(frozen=True)
class IndexPlan:
    """What to build: a pure decision made by `choose_index` (or by a caller who knows better)."""

    kind: str  # "flat" or "ivfpq"
    factory: str  # faiss index_factory string
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    train_size: int = 0

    def bytes_per_vector(self, dim: int) -> int:
        """Index RAM per vector (vector or code, plus id); fixed costs such as centroids are not included."""
        if self.kind == "flat":
            return dim * 4 + ID_BYTES
        return self.m * self.nbits // 8 + ID_BYTES


def flat_plan() -> IndexPlan:
    return IndexPlan(kind="flat", factory="Flat")


def ivfpq_plan(n: int, dim: int, *, nlist: int | None = None, m: int | None = None, nbits: int = 8) -> IndexPlan:
    """An IVF-PQ plan for `n` vectors; nlist and m follow the documented rule unless given."""
    nlist = nlist or ivf_list_count(n)
    m = m or pq_subquantizers(dim)
    return IndexPlan(
        kind="ivfpq",
        factory=f"IVF{nlist},PQ{m}x{nbits}",
        nlist=nlist,
        m=m,
        nbits=nbits,
        train_size=training_size(n, nlist),
    )


def ivf_list_count(n: int) -> int:
    """nlist ~ 4 sqrt(N) as a power of two, but at most N / 39 so k-means has enough points per centroid."""
    wanted = _nearest_power_of_two(LISTS_PER_SQRT_N * math.sqrt(max(n, 1)))
    trainable = _floor_power_of_two(max(n // MIN_TRAIN_PER_LIST, 1))
    return max(1, min(wanted, trainable))


def training_size(n: int, nlist: int) -> int:
    lower, upper = MIN_TRAIN_PER_LIST * nlist, MAX_TRAIN_PER_LIST * nlist
    return min(n, max(lower, min(upper, TRAIN_TARGET)))


def pq_subquantizers(dim: int, sub_dim: int = 8) -> int:
    """The largest divisor of dim that gives sub-vectors of at least `sub_dim` components (64 for 512-d)."""
    for m in range(max(dim // sub_dim, 1), 0, -1):
        if dim % m == 0:
            return m
    return 1


@dataclass(frozen=True)
class IndexPolicy:
    """The thresholds the choice of index, its tuning and its upkeep follow (reasons in the module docstring).

    The defaults are the measured ones; a caller with other needs (a test that wants IVF-PQ on a small library)
    passes its own policy rather than changing module constants.
    """

    flat_max_bytes: int = FLAT_MAX_BYTES  # flat while the vectors take at most this many bytes
    rebuild_growth: float = REBUILD_GROWTH  # retrain IVF-PQ once the library is this many times its training size
    target_recall: dict[str, float] = field(default_factory=lambda: dict(TARGET_RECALL))  # per query kind
    exact_subset_max: int = EXACT_SUBSET_MAX_ROWS  # filters keeping at most this many rows are scored exactly


DEFAULT_POLICY = IndexPolicy()


def choose_index(n: int, dim: int, memory_budget_bytes: int | None = None,
                 policy: IndexPolicy = DEFAULT_POLICY) -> IndexPlan:
    """The index to build for `n` vectors of dimension `dim` (rule and reasons in the module docstring).

    A `memory_budget_bytes` too small for building the flat index forces IVF-PQ. The budget never shrinks the PQ
    codes: lists that do not fit in RAM are built on disk instead (`plan_build_memory`).
    """
    trainable = n >= MIN_TRAIN_PER_LIST * 2
    flat_fits = memory_budget_bytes is None or plan_build_memory(flat_plan(), n, dim, memory_budget_bytes).fits
    if not trainable or (n * dim * 4 <= policy.flat_max_bytes and flat_fits):
        return flat_plan()
    return ivfpq_plan(n, dim)


def escalate(plan: IndexPlan, n: int, dim: int, memory_budget_bytes: int | None = None) -> IndexPlan | None:
    """The next, more accurate index when `plan` cannot reach the target recall: bigger codes, then flat.

    None when there is nothing more accurate, or the flat matrix would not fit `memory_budget_bytes`.
    """
    if plan.kind == "flat":
        return None
    bigger = pq_subquantizers(dim, sub_dim=4)
    if plan.m < bigger:
        return ivfpq_plan(n, dim, nlist=plan.nlist, m=bigger, nbits=plan.nbits)
    if memory_budget_bytes is not None and not plan_build_memory(flat_plan(), n, dim, memory_budget_bytes).fits:
        return None
    return flat_plan()


@dataclass(frozen=True)
class BuildMemory:
    """How a build fits its memory budget: a pure decision made by `plan_build_memory`."""

    budget: int
    on_disk: bool  # the inverted lists go to an .ivfdata file, built in shards
    shard_rows: int  # vectors added per shard (every vector when the lists stay in RAM)
    read_rows: int  # vectors read from the store per step while adding
    working_bytes: int  # the working share of the budget, BLAS buffers included
    buffer_bytes: int  # what the working share leaves for row buffers: reads, exact-search blocks, re-ranked rows
    sample_in_ram: bool  # the k-means sample fits; otherwise it is read through a memory-mapped file
    pq_points_per_centroid: int  # PQ training points per codebook entry (faiss's default is 256)
    training_bytes: int  # what training allocates, besides the fixed costs and an in-RAM sample
    fits: bool  # False when even the smallest buffers and shards exceed the budget (the build then goes over)

    def peak_estimate(self, plan: IndexPlan, n: int, dim: int) -> int:
        """The most the build holds at once by the model in the module docstring: while training, or while
        adding and tuning with one shard's (or, in RAM, all) lists."""
        fixed = _fixed_bytes(plan, n, dim)
        sample = plan.train_size * dim * 4 if self.sample_in_ram and plan.kind != "flat" else 0
        lists = min(n, self.shard_rows) * plan.bytes_per_vector(dim) * LIST_SLACK
        return max(fixed + self.training_bytes + sample, fixed + self.working_bytes + lists)


def plan_build_memory(plan: IndexPlan, n: int, dim: int, budget: int) -> BuildMemory:
    """Split `budget` bytes between working buffers, fixed costs and the lists (see "The memory budget")."""
    working = _working_share(budget, dim)
    buffers = max(working - BLAS_BYTES, 0)
    read_rows = _clamp(buffers // _add_bytes_per_row(dim), MIN_READ_ROWS, MAX_READ_ROWS)
    buffers_fit = buffers >= MIN_READ_ROWS * _add_bytes_per_row(dim)
    fixed = _fixed_bytes(plan, n, dim)
    if plan.kind == "flat":
        return BuildMemory(budget, False, max(n, 1), read_rows, working, buffers, True, PQ_MAX_POINTS_PER_CENTROID,
                           0, buffers_fit and fixed + working + n * plan.bytes_per_vector(dim) <= budget)
    pq_points = _pq_points(plan, dim, budget - fixed)
    training = _training_bytes(plan, dim, pq_points)
    sample_in_ram = fixed + training + plan.train_size * dim * 4 <= budget
    lists_room = budget - fixed - working
    per_vector = plan.bytes_per_vector(dim) * LIST_SLACK
    fits = buffers_fit and fixed + training <= budget
    if n * per_vector <= lists_room:
        return BuildMemory(budget, False, max(n, 1), read_rows, working, buffers, sample_in_ram, pq_points,
                           training, fits)
    shard_rows = max(MIN_SHARD_ROWS, lists_room // per_vector)
    return BuildMemory(budget, True, shard_rows, min(read_rows, shard_rows), working, buffers, sample_in_ram,
                       pq_points, training, fits and lists_room >= MIN_SHARD_ROWS * per_vector)


def _working_share(budget: int, dim: int) -> int:
    """A quarter of the budget, but no more than the biggest buffers take (so a big budget goes to the lists):
    `MAX_READ_ROWS` stored rows with, for up to `MAX_TUNING_QUERIES` queries, their exact-search scores."""
    return max(1, min(budget // WORKING_SHARE, BLAS_BYTES + MAX_READ_ROWS * (dim * 4 + MAX_TUNING_QUERIES * 16)))


def _fixed_bytes(plan: IndexPlan, n: int, dim: int) -> int:
    """Centroids and codebooks, twice (the trained index and the one being filled), plus the ids and masks."""
    model = (plan.nlist + (PQ_CODEBOOK_SIZE if plan.kind == "ivfpq" else 0)) * dim * 4
    return 2 * model + n * BOOKKEEPING_BYTES


def _training_bytes(plan: IndexPlan, dim: int, pq_points: int) -> int:
    """What training allocates besides the sample: BLAS buffers, the centroids (new and previous), each sample
    point's assignment and distance, and the PQ training points, copied and turned into residuals."""
    return (BLAS_BYTES + 2 * plan.nlist * dim * 4 + plan.train_size * (ID_BYTES + 4)
            + pq_points * PQ_CODEBOOK_SIZE * dim * 4 * 2)


def _pq_points(plan: IndexPlan, dim: int, room: int) -> int:
    """PQ training points per codebook entry that fit `room` bytes beside the rest of training (39 at least)."""
    per_point = PQ_CODEBOOK_SIZE * dim * 4 * 2
    return _clamp((room - _training_bytes(plan, dim, 0)) // per_point, MIN_TRAIN_PER_LIST, PQ_MAX_POINTS_PER_CENTROID)


def _add_bytes_per_row(dim: int) -> int:
    """Adding one vector: its float32 row read from the store, faiss's residual copy, its id, list and code."""
    return 2 * dim * 4 + 3 * ID_BYTES + dim


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, int(value)))


def _nearest_power_of_two(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _floor_power_of_two(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


# ------------------------------------------------------------------------------------------------ parameters


@dataclass
class FilterBand:
    """Filtered-search parameters measured with a random filter keeping `selectivity` of the library."""

    selectivity: float
    nprobe: int  # lists probed = nprobe / (selectivity of the query's filter), capped at nlist
    rerank: int
    recall_at_10: float | None = None


@dataclass
class QueryParams:
    """Search parameters for one query kind, with the recall they measured at tuning time."""

    nprobe: int = 1
    rerank: int = 1  # candidates fetched = k * rerank, re-scored exactly
    recall_at_10: float | None = None
    queries: int = 0
    source: str = ""
    filtered: list[FilterBand] = field(default_factory=list)  # ascending selectivity; none: use the above

    def for_filter(self, selectivity: float) -> tuple[int, int]:
        """(nprobe per selectivity, rerank) for a filter keeping `selectivity` of the library: the more
        thorough of the bands measured either side of it (nothing was measured in between)."""
        if not self.filtered:
            return self.nprobe, self.rerank
        near = [b for b in self.filtered if b.selectivity <= selectivity][-1:]
        near += [b for b in self.filtered if b.selectivity >= selectivity][:1]
        return max(b.nprobe for b in near), max(b.rerank for b in near)


@dataclass
class IndexParams:
    """Everything about the index that is not in the FAISS file; stored as JSON beside it."""

    kind: str
    factory: str
    dim: int
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    train_size: int = 0
    trained_on: int = 0  # collection size when trained
    planned_kind: str = ""  # what choose_index said at build time (before any escalation)
    query: dict[str, QueryParams] = field(default_factory=dict)
    target_recall: dict[str, float] = field(default_factory=lambda: dict(TARGET_RECALL))
    exact_subset_max: int = EXACT_SUBSET_MAX_ROWS
    index_file: str = ""
    index_bytes: int = 0
    index_crc32: int = 0
    ivfdata_file: str = ""  # on-disk indexes: the inverted lists file beside the FAISS file
    ivfdata_bytes: int = 0
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_plan(cls, plan: IndexPlan, dim: int, trained_on: int, planned_kind: str,
                  policy: IndexPolicy = DEFAULT_POLICY) -> IndexParams:
        query = {kind: QueryParams(recall_at_10=1.0 if plan.kind == "flat" else None) for kind in QUERY_KINDS}
        return cls(plan.kind, plan.factory, dim, plan.nlist, plan.m, plan.nbits, plan.train_size,
                   trained_on, planned_kind, query, dict(policy.target_recall), policy.exact_subset_max)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexParams:
        data = json.loads(text)
        data["query"] = {kind: QueryParams(**{**values, "filtered": [FilterBand(**band) for band in
                                                                    values.get("filtered", [])]})
                         for kind, values in data.get("query", {}).items()}
        return cls(**data)


def builtin_captions() -> list[str]:
    """The generic photo captions shipped with the package, used as text-like tuning queries."""
    text = importlib.resources.files("clipsearch").joinpath("captions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def text_like_queries(anchors: np.ndarray, rng: np.random.Generator, *, offset: np.ndarray | None = None,
                      pull: float = 0.38, noise: float = 0.45, gap: float = 0.85) -> np.ndarray:
    """Synthetic text-like queries: gap * offset + pull * anchor + noise * random direction, normalised.

    With unit anchors from CLIP-like data this puts each query's true neighbours at cosine ~0.3 and spreads
    them over many IVF cells, like real text queries. `offset` is the shared modality-gap direction (random
    when not given; it shifts every score by about the same amount, so its exact direction matters little).
    """
    anchors = np.asarray(anchors, dtype=np.float32)
    dim = anchors.shape[1]
    if offset is None:
        offset = _unit_rows(rng.standard_normal((1, dim)))[0]
    directions = _unit_rows(rng.standard_normal(anchors.shape))
    return _unit_rows(gap * offset[None, :] + pull * anchors + noise * directions)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------------- exact helpers


def exact_search(queries: np.ndarray, k: int, store: VectorStore, ids: np.ndarray,
                 chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over the stored vectors of `ids` (the ground truth, and the small-filter path)."""
    queries = _as_queries(queries, store.dim)
    best_scores, best_ids = _empty_result(len(queries), k)
    for chunk_ids, vectors in store.iter_chunks(np.asarray(ids, dtype=np.int64), chunk):
        scores = queries @ vectors.T
        take = min(k, len(chunk_ids))
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores, best_ids = _merge_topk(
            best_scores, best_ids, np.take_along_axis(scores, part, axis=1), chunk_ids[part], k
        )
    return best_scores, best_ids


def _merge_topk(scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _empty_result(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -np.inf, dtype=np.float32), np.full((q, k), -1, dtype=np.int64)


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (q, {dim}), got {queries.shape}")
    return queries


def candidate_scores(queries: np.ndarray, candidates: np.ndarray, store: VectorStore,
                     chunk: int = 16) -> np.ndarray:
    """Exact scores of each query's candidate ids (-1 = no candidate -> -inf), read from the store.

    Each query is scored against its own candidates only (a batched dot product, not all pairs of a chunk).
    """
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for start in range(0, len(queries), chunk):
        part = candidates[start : start + chunk]
        valid = part >= 0
        if not valid.any():
            continue
        filled = np.where(valid, part, part[valid][0])  # any real row stands in for the missing ones
        rows = store.get(filled.ravel()).reshape(*part.shape, store.dim)
        block = np.einsum("qkd,qd->qk", rows, queries[start : start + chunk])
        scores[start : start + chunk] = np.where(valid, block, -np.inf)
    return scores


def top_k_by_score(scores: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k (score, id) pairs of each row, best first, padded with (-inf, -1)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(candidates, order, axis=1), -1)
    padded_scores, padded_ids = _empty_result(len(scores), k)
    padded_scores[:, : order.shape[1]] = top_scores
    padded_ids[:, : order.shape[1]] = top_ids
    return padded_scores, padded_ids


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's true ids (ignoring -1) present in the found row."""
    return float(np.mean(recall_per_query(found, truth)))


def recall_per_query(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    hits = (found[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)
    possible = np.maximum((truth >= 0).sum(axis=1), 1)
    return np.asarray(hits.any(axis=1).sum(axis=1) / possible, dtype=np.float64)


def recall_lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean recall (normal approximation).

    Tuning keeps the cheapest setting whose *bound* reaches the target: picking the first setting whose sample
    mean just crosses it would, on fresh queries, land just below it about half the time.
    """
    spread = float(np.std(per_query, ddof=1)) if len(per_query) > 1 else 0.0
    return float(np.mean(per_query)) - CONFIDENCE_Z * spread / math.sqrt(max(len(per_query), 1))


# ------------------------------------------------------------------------------------------------ the index


class _DiskState:
    """An on-disk index's .ivfdata file and the changes held in memory until the next save (module docstring)."""

    def __init__(self, ivfdata: Path, *, saved: bool, owned_folder: Path | None = None) -> None:
        self.ivfdata = ivfdata
        self.saved = saved  # some saved index names the file: it must never be changed or deleted by this one
        self.twin: Any = None  # in-RAM index holding the vectors added since the file was written
        self.in_twin = np.zeros(0, dtype=bool)  # per id: held by the twin
        self.hidden = np.zeros(0, dtype=bool)  # per id: the file's entry was removed or replaced since
        self.hidden_count = 0
        self._not_hidden: Any = None  # cached selector of the file's entries that still count
        # A build without a library folder keeps its file in a private temporary folder, deleted with the index.
        self._cleanup = weakref.finalize(self, shutil.rmtree, owned_folder, True) if owned_folder else None

    @property
    def changed(self) -> bool:
        return self.hidden_count > 0 or self.twin_count > 0

    @property
    def twin_count(self) -> int:
        return int(self.twin.ntotal) if self.twin is not None else 0

    def twin_for_adding(self, base: Any) -> Any:
        if self.twin is None:
            self.twin = ondisk.empty_twin(base)
        return self.twin

    def added(self, ids: np.ndarray) -> None:
        self.in_twin = _grown(self.in_twin, int(ids[-1]) + 1)
        self.in_twin[ids] = True

    def remove(self, ids: np.ndarray) -> None:
        """Remove present `ids`: from the twin when it holds them, else hide the file's entries."""
        in_twin = _lookup(self.in_twin, ids)
        if in_twin.any():
            self.twin.remove_ids(_faiss().IDSelectorBatch(ids[in_twin]))
            self.in_twin[ids[in_twin]] = False
        from_file = ids[~in_twin]
        if len(from_file):
            self.hidden = _grown(self.hidden, int(from_file[-1]) + 1)
            self.hidden[from_file] = True
            self.hidden_count += len(from_file)
            self._not_hidden = None

    def file_selector(self, allowed: np.ndarray | None) -> Any:
        """The selector for searching the file: `allowed` (or everything) minus the hidden entries."""
        if allowed is not None:
            return _bitmap_selector(allowed[~_lookup(self.hidden, allowed)] if self.hidden_count else allowed)
        if not self.hidden_count:
            return None
        if self._not_hidden is None:
            faiss = _faiss()
            hidden = _bitmap_selector(np.flatnonzero(self.hidden))
            self._not_hidden = (faiss.IDSelectorNot(hidden), hidden)  # the Not selector does not keep its input
        return self._not_hidden[0]

    def discard(self) -> None:
        """Delete the file if no saved index names it (a build that was not kept)."""
        if not self.saved:
            self.ivfdata.unlink(missing_ok=True)
        if self._cleanup is not None:
            self._cleanup()


class VectorIndex:
    """A FAISS index over the image ids of one vector store, with parameters tuned per query kind and exact
    re-ranking from that store."""

    def __init__(self, index: Any, params: IndexParams, store: VectorStore, present: np.ndarray, *,
                 disk: _DiskState | None = None, buffer_bytes: int | None = None) -> None:
        self._index = index
        self.params = params
        self.store = store  # the exact vectors: what is added, and what re-ranking and exact search read
        self._present = present  # bool per image id: is it in the index (fast filter intersection)
        self._disk = disk  # None: the inverted lists are in RAM
        self._buffer_bytes = buffer_bytes  # bytes for row buffers (reads, exact search); None: default sizes

    # ---- building

    @classmethod
    def build(cls, store: VectorStore, ids: np.ndarray, *, text_queries: np.ndarray | None = None,
              plan: IndexPlan | None = None, use_gpu: bool | None = None, seed: int = 0,
              progress: Progress | None = None, memory_budget_bytes: int | None = None,
              folder: Path | None = None, policy: IndexPolicy = DEFAULT_POLICY) -> VectorIndex:
        """Choose (or use `plan`), train on a sample of the store, add every id, then tune per query kind.

        `memory_budget_bytes` (default: `resolve_memory_budget`) bounds what the build holds in memory; an index
        that does not fit is built on disk in shards, its .ivfdata written to `folder` (the library's index
        folder; a private temporary folder when None, copied by `save`). See "The memory budget".
        """
        report = progress or (lambda message: None)
        ids = _sorted_unique(ids)
        budget = resolve_memory_budget(memory_budget_bytes)
        planned = plan or choose_index(len(ids), store.dim, budget, policy)
        current = planned
        while True:
            memory = plan_build_memory(current, len(ids), store.dim, budget)
            if not memory.fits:
                report(f"the memory budget ({format_size(budget)}) is below the least this build needs "
                       f"({format_size(memory.peak_estimate(current, len(ids), store.dim))}); building with the "
                       "smallest buffers and shards")
            index = cls._fill(store, ids, current, planned.kind, memory, folder, use_gpu, seed, report, policy)
            if index._tuned(text_queries, seed, report):
                return index
            following = escalate(current, len(ids), store.dim, budget)
            if following is None:
                index._use_most_thorough_setting(report)
                return index
            index.discard()
            report(f"target recall not reached; rebuilding as {following.factory}")
            current = following

    def _tuned(self, text_queries: np.ndarray | None, seed: int, report: Progress) -> bool:
        """Tune (flat needs none); a failure deletes the files this build wrote."""
        try:
            return self.params.kind == "flat" or self._tune(text_queries, seed, report)
        except BaseException:
            self.discard()
            raise

    @classmethod
    def _fill(cls, store: VectorStore, ids: np.ndarray, plan: IndexPlan, planned_kind: str, memory: BuildMemory,
              folder: Path | None, use_gpu: bool | None, seed: int, report: Progress,
              policy: IndexPolicy) -> VectorIndex:
        params = IndexParams.from_plan(plan, store.dim, len(ids), planned_kind, policy)
        if memory.on_disk:
            return cls._fill_on_disk(store, ids, plan, params, memory, folder, use_gpu, seed, report)
        index = _new_faiss_index(plan, store.dim)
        if plan.kind != "flat":
            _train_from_store(index, store, ids, plan, memory, folder, seed, use_gpu, report)
        built = cls(index, params, store, np.zeros(0, dtype=bool), buffer_bytes=memory.buffer_bytes)
        report(f"adding {len(ids):,} vectors")
        built.add(ids)
        return built

    @classmethod
    def _fill_on_disk(cls, store: VectorStore, ids: np.ndarray, plan: IndexPlan, params: IndexParams,
                      memory: BuildMemory, folder: Path | None, use_gpu: bool | None, seed: int,
                      report: Progress) -> VectorIndex:
        """Train, add in shards, merge the shards' lists into a fresh .ivfdata in `folder`."""
        owned = Path(tempfile.mkdtemp(prefix="clipsearch-index-")) if folder is None else None
        target = owned if owned is not None else Path(folder)  # type: ignore[arg-type]
        target.mkdir(parents=True, exist_ok=True)
        ivfdata = target / _fresh_ivfdata_name()
        try:
            index = _build_on_disk(store, ids, plan, memory, target, ivfdata, use_gpu, seed, report)
        except BaseException:
            ivfdata.unlink(missing_ok=True)
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        disk = _DiskState(ivfdata, saved=False, owned_folder=owned)
        return cls(index, params, store, _mask_of(ids), disk=disk, buffer_bytes=memory.buffer_bytes)

    def _use_most_thorough_setting(self, report: Progress) -> None:
        """For query kinds that missed their target: the most thorough setting of the tuning grid."""
        nprobe, rerank = _nprobe_grid(self.params.nlist)[-1], RERANK_FACTORS[-1]
        for kind in QUERY_KINDS:
            if not self.params.query[kind].queries:  # tuning did not reach this kind's target
                self.params.query[kind] = QueryParams(nprobe, rerank, None, 0, "most thorough (target not reached)",
                                                      [FilterBand(1.0, self.params.nlist, rerank)])
        report(f"target recall not reached and an exact index would not fit the memory budget; keeping "
               f"{self.params.factory} with its most thorough search setting")

    def discard(self) -> None:
        """Delete the files of an index that will not be used (a build that was replaced by another)."""
        if self._disk is not None:
            self._disk.discard()

    def limit_memory(self, memory_budget_bytes: int) -> None:
        """Size the reads of later `add` calls to a memory budget (a build sizes its own)."""
        self._buffer_bytes = max(_working_share(memory_budget_bytes, self.params.dim) - BLAS_BYTES, 0)

    # ---- tuning

    def _tune(self, text_queries: np.ndarray | None, seed: int, report: Progress) -> bool:
        """Pick the cheapest parameters reaching the targets for each kind, unfiltered and filtered.

        False when some kind cannot reach its target on the grid (the caller then escalates the index).
        """
        rng = np.random.default_rng(seed + 1)
        sets = self._tuning_sets(text_queries, rng)
        subsets = self._filter_tuning_subsets(rng)
        for kind, (queries, exclude, source) in sets.items():
            found = self._tune_kind(kind, queries, exclude)
            bands = None if found is None else self._tune_filtered(queries, exclude, subsets)
            if found is None or bands is None:
                return False
            self.params.query[kind] = replace(found, queries=len(queries), source=source, filtered=bands)
            with_filter = ", ".join(f"{b.selectivity:.2%} kept: nprobe={b.nprobe}/selectivity rerank={b.rerank} "
                                    f"recall@10={b.recall_at_10}" for b in bands)
            report(f"{kind} queries: nprobe={found.nprobe} rerank={found.rerank} recall@10={found.recall_at_10:.3f}"
                   f"; filtered: {with_filter or 'every filter is scored exactly'}")
        return True

    def _tuning_sets(self, text_queries: np.ndarray | None,
                     rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
        ids, store = self.ids(), self.store
        sample = np.sort(rng.choice(ids, min(IMAGE_TUNING_QUERIES, len(ids)), replace=False))
        image_queries = store.get(sample)
        if text_queries is not None and len(text_queries):
            text, source = _as_queries(text_queries, store.dim), "caption embeddings"
        else:
            anchors = store.get(np.sort(rng.choice(ids, min(TEXT_TUNING_QUERIES, len(ids)), replace=False)))
            text, source = text_like_queries(anchors, rng), "synthetic text-like queries"
        no_exclusion = np.full(len(text), -1, dtype=np.int64)
        return {"image": (image_queries, sample, "held-out library vectors (leave-one-out)"),
                "text": (text, no_exclusion, source)}

    def _tune_kind(self, kind: str, queries: np.ndarray, exclude: np.ndarray) -> QueryParams | None:
        truth = self._leave_one_out_truth(queries, exclude)
        return self._cheapest(self.params.target_recall[kind], _nprobe_grid(self.params.nlist),
                              lambda nprobe: self._recalls_for(nprobe, queries, exclude, truth))

    def _filter_tuning_subsets(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Random id subsets (like a folder filter that ignores content) that take the id-selector path:
        the smallest such filter, 1%, 10% and all of the library."""
        ids, threshold = self.ids(), self.params.exact_subset_max
        sizes = {min(len(ids), max(round(f * len(ids)), threshold + 1)) for f in FILTER_TUNING_FRACTIONS}
        return [ids if size == len(ids) else np.sort(rng.choice(ids, size, replace=False))
                for size in sorted(sizes) if size > threshold]

    def _tune_filtered(self, queries: np.ndarray, exclude: np.ndarray,
                       subsets: list[np.ndarray]) -> list[FilterBand] | None:
        """For each subset, the cheapest (nprobe per selectivity, rerank) reaching the filtered target."""
        bands = []
        for subset in subsets:
            best = self._tune_subset(queries, exclude, subset)
            if best is None:
                return None
            bands.append(FilterBand(round(len(subset) / max(self.ntotal, 1), 6), best.nprobe, best.rerank,
                                    best.recall_at_10))
        return bands

    def _tune_subset(self, queries: np.ndarray, exclude: np.ndarray, subset: np.ndarray) -> QueryParams | None:
        truth = self._leave_one_out_truth(queries, exclude, subset)
        return self._cheapest(self.params.target_recall["filtered"], _nprobe_grid(self.params.nlist, 1),
                              lambda base: self._recalls_for(self._filtered_nprobe(base, len(subset)), queries,
                                                             exclude, truth, subset))

    def _cheapest(self, target: float, nprobes: list[int],
                  recalls_at: Callable[[int], Iterator[tuple[int, np.ndarray]]]) -> QueryParams | None:
        """The (nprobe, rerank) of least `_cost` whose recall reaches `target` (at 95% confidence), or None."""
        best: tuple[float, QueryParams] | None = None
        for nprobe in nprobes:
            if best is not None and self._cost(nprobe, 1) >= best[0]:
                break  # costs only grow from here
            for rerank, per_query in recalls_at(nprobe):
                cost = self._cost(nprobe, rerank)
                if recall_lower_bound(per_query) >= target and (best is None or cost < best[0]):
                    best = (cost, QueryParams(nprobe, rerank, round(float(np.mean(per_query)), 4)))
        return None if best is None else best[1]

    def _leave_one_out_truth(self, queries: np.ndarray, exclude: np.ndarray,
                             allowed: np.ndarray | None = None) -> np.ndarray:
        _, truth = exact_search(queries, RECALL_K + 1, self.store, self.ids() if allowed is None else allowed,
                                chunk=self._exact_rows(len(queries)))
        return _drop_excluded(truth, exclude, RECALL_K)

    def _recalls_for(self, nprobe: int, queries: np.ndarray, exclude: np.ndarray, truth: np.ndarray,
                     allowed: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Per-query recall@10 for each rerank factor at this nprobe (within `allowed` when given), from one
        FAISS search of the deepest candidate list."""
        depth = min(RECALL_K * RERANK_FACTORS[-1] + 1, self.ntotal if allowed is None else len(allowed))
        _, candidates = self._faiss_search(queries, depth, nprobe, allowed)
        candidates = np.where(candidates == exclude[:, None], -1, candidates)
        scores = candidate_scores(queries, candidates, self.store, chunk=self._rerank_queries(depth))
        self_slot = int(bool(np.any(exclude >= 0)))  # the left-out query itself may take one slot
        for rerank in RERANK_FACTORS:
            width = min(RECALL_K * rerank + self_slot, depth)
            _, found = top_k_by_score(scores[:, :width], candidates[:, :width], RECALL_K)
            yield rerank, recall_per_query(found, truth)

    def _filtered_nprobe(self, base: int, allowed_count: int) -> int:
        """Lists to probe when only `allowed_count` ids may answer: enough to meet about as many allowed codes
        as `base` lists hold in all (capped at every list)."""
        selectivity = allowed_count / max(self.ntotal, 1)
        return max(1, min(self.params.nlist, math.ceil(base / max(selectivity, 1e-12))))

    def _cost(self, nprobe: int, rerank: int) -> float:
        """Codes scanned plus exact rows re-ranked, an exact row costing about dim/m codes."""
        codes = nprobe * self.ntotal / max(self.params.nlist, 1)
        return codes + RECALL_K * rerank * self.params.dim / max(self.params.m, 1)

    def _exact_rows(self, queries: int) -> int:
        """Stored rows per block of an exact search for `queries` queries within the working memory: each row
        costs its vector plus, per query, its score, the score's negation and argpartition's int64 index."""
        if self._buffer_bytes is None:
            return MAX_READ_ROWS
        return _clamp(self._buffer_bytes // (self.params.dim * 4 + queries * 16), MIN_READ_ROWS, MAX_READ_ROWS)

    def _rerank_queries(self, depth: int) -> int:
        """Queries re-scored at once when each has `depth` candidates: their rows are read into one block."""
        if self._buffer_bytes is None:
            return 16
        return _clamp(self._buffer_bytes // (depth * self.params.dim * 4 * 2), 1, 16)

    def _read_rows(self) -> int:
        """Stored vectors read per step while adding."""
        if self._buffer_bytes is None:
            return MAX_READ_ROWS
        return _clamp(self._buffer_bytes // _add_bytes_per_row(self.params.dim), MIN_READ_ROWS, MAX_READ_ROWS)

    # ---- contents

    def add(self, ids: np.ndarray) -> None:
        """Add the stored vectors of `ids`; an id already in the index is replaced by its stored vector.

        On an on-disk index they go to the in-RAM twin until the next `save` (the .ivfdata never changes).
        """
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return
        self.remove(ids[self._contains(ids)])
        target = self._index if self._disk is None else self._disk.twin_for_adding(self._index)
        with _faiss_threads(_available_cores()):
            for chunk_ids, vectors in self.store.iter_chunks(ids, self._read_rows()):
                target.add_with_ids(vectors, chunk_ids)
        self._present = _grown(self._present, int(ids[-1]) + 1)
        self._present[ids] = True
        if self._disk is not None:
            self._disk.added(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove `ids` from the index (ids not in it are ignored); on disk, they are hidden until `save`."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[self._contains(ids)]
        if len(ids) == 0:
            return
        if self._disk is None:
            self._index.remove_ids(_faiss().IDSelectorBatch(ids))
        else:
            self._disk.remove(ids)
        self._present[ids] = False

    def ids(self) -> np.ndarray:
        """The ids currently in the index, sorted."""
        return np.flatnonzero(self._present).astype(np.int64)

    @property
    def ntotal(self) -> int:
        if self._disk is None:
            return int(self._index.ntotal)
        return int(self._index.ntotal) - self._disk.hidden_count + self._disk.twin_count

    @property
    def on_disk(self) -> bool:
        """True when the inverted lists live in an .ivfdata file rather than in RAM."""
        return self._disk is not None

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        return _lookup(self._present, ids)

    # ---- searching

    def search(self, queries: np.ndarray, k: int, *, kind: str = "image", allowed_ids: np.ndarray | None = None,
               nprobe: int | None = None, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (exact cosine scores, ids) per query, best first, padded with (-inf, -1).

        `kind` ("image", "text" or "combined") picks the tuned parameters; `nprobe`/`rerank` override them.
        `allowed_ids` (sorted) restricts the results to those ids, returning the exact top-k of that subset.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        queries = _as_queries(queries, self.store.dim)
        chosen = self._query_params(kind, nprobe, rerank)
        with _faiss_threads(1 if len(queries) < SMALL_BATCH else _available_cores()):
            if allowed_ids is None:
                return self._search_all(queries, k, chosen)
            return self._search_subset(queries, k, chosen, np.asarray(allowed_ids, dtype=np.int64))

    def set_params(self, kind: str, *, nprobe: int | None = None, rerank: int | None = None,
                   filtered_nprobe: int | None = None, filtered_rerank: int | None = None) -> None:
        """Override the tuned parameters of one query kind ("image" or "text"; kept by `save`).

        `nprobe`/`rerank` apply to filtered searches too unless `filtered_nprobe`/`filtered_rerank` are
        given, which then hold for filters of every selectivity.
        """
        if kind not in QUERY_KINDS:
            raise ValueError(f"unknown query kind {kind!r}; expected 'image' or 'text'")
        current = self._query_params(kind, nprobe, rerank)
        bands = current.filtered or [FilterBand(1.0, current.nprobe, current.rerank)]
        if filtered_nprobe or filtered_rerank:
            bands = [FilterBand(1.0, filtered_nprobe or max(b.nprobe for b in bands),
                                filtered_rerank or max(b.rerank for b in bands))]
        self.params.query[kind] = replace(current, recall_at_10=None, source="set by caller",
                                          filtered=[replace(b, recall_at_10=None) for b in bands])

    def _query_params(self, kind: str, nprobe: int | None, rerank: int | None) -> QueryParams:
        """The parameters of `kind`; an explicit nprobe/rerank replaces both the unfiltered and filtered one."""
        if kind == "combined":  # a mix of both: take the more thorough setting of each
            base = _more_thorough(self.params.query["image"], self.params.query["text"])
        elif kind in self.params.query:
            base = self.params.query[kind]
        else:
            raise ValueError(f"unknown query kind {kind!r}; expected 'image', 'text' or 'combined'")
        bands = [replace(b, nprobe=nprobe or b.nprobe, rerank=rerank or b.rerank) for b in base.filtered]
        return replace(base, nprobe=nprobe or base.nprobe, rerank=rerank or base.rerank, filtered=bands)

    def _search_all(self, queries: np.ndarray, k: int, chosen: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        if self.params.kind == "flat":
            return self._flat_search(queries, k, None)
        depth = min(k * chosen.rerank, self.ntotal)
        _, candidates = self._faiss_search(queries, depth, chosen.nprobe, None)
        return top_k_by_score(candidate_scores(queries, candidates, self.store), candidates, k)

    def _search_subset(self, queries: np.ndarray, k: int, chosen: QueryParams,
                       allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(allowed) > 1 and np.any(np.diff(allowed) <= 0):
            allowed = np.unique(allowed)  # callers should pass sorted ids; this keeps wrong input correct
        allowed = allowed[self._contains(allowed)]  # only ids in the index can be answers
        if len(allowed) <= self.params.exact_subset_max:
            return exact_search(queries, k, self.store, allowed)
        if self.params.kind == "flat":
            return self._flat_search(queries, k, _bitmap_selector(allowed))
        base, rerank = chosen.for_filter(len(allowed) / max(self.ntotal, 1))
        nprobe = self._filtered_nprobe(base, len(allowed))
        depth = min(k * rerank, len(allowed))
        _, candidates = self._faiss_search(queries, depth, nprobe, allowed)
        scores, ids = top_k_by_score(candidate_scores(queries, candidates, self.store), candidates, k)
        return _fill_short_rows(scores, ids, queries, min(k, len(allowed)), self.store, allowed)

    def _flat_search(self, queries: np.ndarray, k: int, selector: Any) -> tuple[np.ndarray, np.ndarray]:
        params = None if selector is None else _faiss().SearchParameters(sel=selector)
        scores, ids = self._index.search(queries, k, params=params)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)

    def _faiss_search(self, queries: np.ndarray, depth: int, nprobe: int,
                      allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The IVF's `depth` best (PQ scores, ids) per query, only among `allowed` ids when given (sorted).

        On disk with changes held in memory, the file's entries that were removed are left out and the twin's
        candidates are merged in by PQ score: the answer one index holding both would give.
        """
        if depth < 1 or self.ntotal == 0:
            return _empty_result(len(queries), max(depth, 1))
        if self._disk is None:
            return _ivf_search(self._index, queries, depth, nprobe, _optional_selector(allowed))
        found = _ivf_search(self._index, queries, depth, nprobe, self._disk.file_selector(allowed))
        if not self._disk.twin_count:
            return found
        added = _ivf_search(self._disk.twin, queries, depth, nprobe, _optional_selector(allowed))
        return _merge_by_score(found, added, depth)

    # ---- growth and reporting

    def needs_rebuild(self, n: int, memory_budget_bytes: int | None = None,
                      policy: IndexPolicy = DEFAULT_POLICY) -> bool:
        """True when `n` vectors call for another kind of index, or n outgrew the training set several-fold, or
        (given a budget) what the index would hold in RAM at n vectors no longer fits `memory_budget_bytes`.

        An IVF-PQ plan that escalated to flat is retried after the same growth (the data may allow it then).
        """
        planned = choose_index(n, self.params.dim, memory_budget_bytes, policy)
        if planned.kind != (self.params.planned_kind or self.params.kind):
            return True
        if planned.kind != "flat" and n >= policy.rebuild_growth * max(self.params.trained_on, 1):
            return True
        return memory_budget_bytes is not None and not self._fits(n, memory_budget_bytes)

    def _fits(self, n: int, budget: int) -> bool:
        """Whether bringing the index to `n` vectors keeps its in-RAM part within `budget`: all of it for an
        in-RAM index, the twin holding the vectors added until the next save for an on-disk one."""
        held = n if self._disk is None else max(n - self.ntotal, 0)
        memory = plan_build_memory(self._plan(), held, self.params.dim, budget)
        return memory.fits if self.params.kind == "flat" else not memory.on_disk

    def _plan(self) -> IndexPlan:
        return IndexPlan(self.params.kind, self.params.factory, self.params.nlist, self.params.m, self.params.nbits,
                         self.params.train_size)

    def describe(self) -> dict[str, Any]:
        """A summary for `clipsearch stats`."""
        per_kind = {kind: {"nprobe": q.nprobe, "rerank": q.rerank, "recall_at_10": q.recall_at_10,
                           "filtered": [asdict(band) for band in q.filtered],
                           "tuned_on": f"{q.queries} {q.source}".strip()} for kind, q in self.params.query.items()}
        return {"kind": self.params.kind, "factory": self.params.factory, "nlist": self.params.nlist,
                "m": self.params.m, "nbits": self.params.nbits, "ntotal": self.ntotal,
                "trained_size": self.params.train_size, "trained_on": self.params.trained_on,
                "bytes_per_vector": self._plan().bytes_per_vector(self.params.dim),
                "exact_subset_max": self.params.exact_subset_max, "on_disk": self.on_disk,
                "ivfdata_file": self._disk.ivfdata.name if self._disk is not None else None,
                "ivfdata_bytes": self.ivfdata_bytes(), "queries": per_kind}

    def serialized_bytes(self) -> int:
        """Size of the FAISS file as saved: the whole index in RAM (codes, ids, centroids, codebooks), or, for an
        on-disk index, all but its lists (see `ivfdata_bytes`)."""
        return int(_faiss().serialize_index(self._index).nbytes)

    def ivfdata_bytes(self) -> int:
        """Size of the .ivfdata file holding an on-disk index's lists (0 when they are in RAM)."""
        if self._disk is None:
            return 0
        try:
            return self._disk.ivfdata.stat().st_size
        except OSError:
            return ondisk.mapped_bytes(self._index)

    # ---- files

    def save(self, folder: Path) -> None:
        """Write the index and its JSON atomically: each goes to a temp file, is fsynced and renamed.

        The FAISS file gets a fresh name and the JSON (renamed last) points at it, so a crash at any moment
        leaves either the old pair or the new pair, never a mix. Old index files are deleted afterwards. An
        on-disk index first writes its changes, if any, to a fresh .ivfdata in `folder` (module docstring).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self._disk is not None:
            self._settle_on_disk(folder)
        data = _faiss().serialize_index(self._index).tobytes()
        name = f"index-{secrets.token_hex(6)}.faiss"
        params = replace(self.params, index_file=name, index_bytes=len(data), index_crc32=zlib.crc32(data),
                         ivfdata_file=self._disk.ivfdata.name if self._disk is not None else "",
                         ivfdata_bytes=self.ivfdata_bytes())
        try:
            durable.write_atomically(folder / name, data, folder / "index.faiss.tmp")
            durable.write_atomically(folder / PARAMS_FILE, params.to_json().encode(), folder / f"{PARAMS_FILE}.tmp")
        except BaseException:
            (folder / name).unlink(missing_ok=True)  # the old JSON still names the old files, which stay
            raise
        self.params = params
        if self._disk is not None:
            self._disk.saved = True
        _remove_other_index_files(folder, keep={name, params.ivfdata_file})

    def _settle_on_disk(self, folder: Path) -> None:
        """Make the lists file one that may be saved in `folder`: the current file when it is there and nothing
        changed, else a fresh file holding the file's entries minus the hidden ones plus the twin's."""
        disk = self._disk
        assert disk is not None
        if not disk.changed and disk.ivfdata.parent.resolve() == folder.resolve():
            ondisk.freeze(self._index)
            return
        fresh = folder / _fresh_ivfdata_name()
        merged = self._merged_lists(fresh)
        disk.discard()  # the previous file, unless a saved index names it
        self._index = merged
        self._disk = _DiskState(fresh, saved=False) if ondisk.ivfdata_lists(merged) is not None else None
        ondisk.freeze(self._index)

    def _merged_lists(self, fresh: Path) -> Any:
        """A copy of the index whose lists, written to `fresh`, are the file's minus the hidden entries plus the
        twin's. An id hidden in the file but held by the twin (replaced) has two entries with the same id, so
        then the file's lists are copied and cleaned first and the twin's merged in a second step."""
        disk = self._disk
        assert disk is not None
        faiss = _faiss()
        file_lists = [faiss.extract_index_ivf(self._index).invlists]
        twin_lists = [faiss.extract_index_ivf(disk.twin).invlists] if disk.twin_count else []
        hidden = np.flatnonzero(disk.hidden)
        cleaning = fresh.with_name(fresh.name + ".tmp")
        try:
            if not _lookup(disk.in_twin, hidden).any():
                merged = ondisk.copy_with_lists(self._index, file_lists + twin_lists, fresh)
                ondisk.remove_ids(merged, hidden)
                return merged
            cleaned = ondisk.copy_with_lists(self._index, file_lists, cleaning)
            ondisk.remove_ids(cleaned, hidden)
            return ondisk.copy_with_lists(self._index, [faiss.extract_index_ivf(cleaned).invlists] + twin_lists,
                                          fresh)
        except BaseException:
            fresh.unlink(missing_ok=True)
            raise
        finally:
            cleaning.unlink(missing_ok=True)  # a mapped file lives on until `cleaned` is freed

    @classmethod
    def load(cls, folder: Path, store: VectorStore) -> VectorIndex | None:
        """The index saved in `folder` over the vectors of `store`, or None when none was saved; IndexFileError
        when it cannot be read.

        A writer may swap in a new index between our reading the JSON and opening the files it names (and
        then delete them): when the JSON changed meanwhile, the new one is read instead.
        """
        params_path = Path(folder) / PARAMS_FILE
        for attempt in range(LOAD_ATTEMPTS):
            if not params_path.exists():
                return None
            params = _read_params(params_path)
            try:
                return cls._open(Path(folder), params, store)
            except IndexFileError:
                if attempt + 1 == LOAD_ATTEMPTS or _read_params_or_none(params_path) == params:
                    raise
        return None

    @classmethod
    def _open(cls, folder: Path, params: IndexParams, store: VectorStore) -> VectorIndex:
        data = _read_faiss_bytes(folder / params.index_file, params)
        if not params.ivfdata_file:
            index = _deserialize(data, folder / params.index_file)
            return cls(index, params, store, _present_mask(index))
        ivfdata = folder / params.ivfdata_file
        index = _open_on_disk(data, ivfdata, params)
        return cls(index, params, store, _present_mask(index), disk=_DiskState(ivfdata, saved=True))


# ------------------------------------------------------------------------------------------- module helpers


def _nprobe_grid(nlist: int, fraction: int = MAX_NPROBE_FRACTION) -> list[int]:
    """1, 2, 4 ... up to nlist / fraction."""
    limit = max(1, nlist // fraction)
    return [1 << i for i in range(limit.bit_length()) if (1 << i) <= limit]


def _more_thorough(a: QueryParams, b: QueryParams) -> QueryParams:
    """Parameters at least as thorough as both `a` and `b`, filtered bands included."""
    bands = []
    for selectivity in sorted({band.selectivity for band in a.filtered + b.filtered}):
        (nprobe_a, rerank_a), (nprobe_b, rerank_b) = a.for_filter(selectivity), b.for_filter(selectivity)
        bands.append(FilterBand(selectivity, max(nprobe_a, nprobe_b), max(rerank_a, rerank_b)))
    return QueryParams(max(a.nprobe, b.nprobe), max(a.rerank, b.rerank), filtered=bands)


def _drop_excluded(truth: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's excluded id (the query itself) and keep the first k of the rest."""
    kept = np.where(truth == exclude[:, None], -1, truth)
    order = np.argsort(kept < 0, axis=1, kind="stable")  # valid ids first, order kept
    return np.take_along_axis(kept, order, axis=1)[:, :k]


def _fill_short_rows(scores: np.ndarray, ids: np.ndarray, queries: np.ndarray, wanted: int,
                     store: VectorStore, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-run exactly the queries whose filtered ANN shortlist came back with fewer than `wanted` results."""
    short = np.flatnonzero((ids >= 0).sum(axis=1) < wanted)
    if len(short):
        scores[short], ids[short] = exact_search(queries[short], ids.shape[1], store, allowed)
    return scores, ids


def _bitmap_selector(allowed: np.ndarray) -> Any:
    mask = np.zeros(int(allowed[-1]) + 1 if len(allowed) else 1, dtype=bool)
    mask[allowed] = True
    return _faiss().IDSelectorBitmap(np.packbits(mask, bitorder="little"))


def _optional_selector(allowed: np.ndarray | None) -> Any:
    return None if allowed is None else _bitmap_selector(allowed)


def _ivf_search(index: Any, queries: np.ndarray, depth: int, nprobe: int,
                selector: Any) -> tuple[np.ndarray, np.ndarray]:
    params = _faiss().SearchParametersIVF(nprobe=int(nprobe))
    if selector is not None:
        params.sel = selector
    return index.search(queries, int(depth), params=params)


def _merge_by_score(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                    depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The `depth` best of two (scores, ids) candidate lists per query, by score (missing ones score lowest)."""
    scores = np.concatenate([a[0], b[0]], axis=1)
    ids = np.concatenate([a[1], b[1]], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _sorted_unique(ids: np.ndarray) -> np.ndarray:
    """`ids` as sorted unique int64, without a copy when they already are (a library's ids are)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids
    return np.unique(ids)


def _mask_of(ids: np.ndarray) -> np.ndarray:
    mask = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=bool)
    mask[ids] = True
    return mask


def _grown(mask: np.ndarray, size: int) -> np.ndarray:
    """`mask`, or a copy at least `size` long (doubling, so growing id by id stays cheap)."""
    if size <= len(mask):
        return mask
    grown = np.zeros(max(size, 2 * len(mask)), dtype=bool)
    grown[: len(mask)] = mask
    return grown


def _lookup(mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """mask[ids], False for ids outside it."""
    inside = (ids >= 0) & (ids < len(mask))
    result = np.zeros(len(ids), dtype=bool)
    result[inside] = mask[ids[inside]]
    return result


def _new_faiss_index(plan: IndexPlan, dim: int) -> Any:
    faiss = _faiss()
    if plan.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    return faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)


def _fresh_ivfdata_name() -> str:
    return f"lists-{secrets.token_hex(6)}.ivfdata"


def _build_on_disk(store: VectorStore, ids: np.ndarray, plan: IndexPlan, memory: BuildMemory, folder: Path,
                   ivfdata: Path, use_gpu: bool | None, seed: int, report: Progress) -> Any:
    """Train once, add in shards, merge the shards' lists into `ivfdata` (scratch files go, whatever happens)."""
    faiss = _faiss()
    with tempfile.TemporaryDirectory(prefix="build-", dir=folder) as scratch_name:
        scratch = Path(scratch_name)
        index = _new_faiss_index(plan, store.dim)
        _train_from_store(index, store, ids, plan, memory, scratch, seed, use_gpu, report)
        trained = scratch / "trained.faiss"
        faiss.write_index(index, str(trained))
        report(f"adding {len(ids):,} vectors in shards of {memory.shard_rows:,} "
               f"(memory budget {format_size(memory.budget)})")
        with _faiss_threads(_available_cores()):
            shards = ondisk.write_shards(trained, store, ids, memory.shard_rows, memory.read_rows, scratch, report)
            report(f"merging {len(shards)} shards into {ivfdata.name}")
            ondisk.merge_shards(index, shards, ivfdata)
    return index


def _train_from_store(index: Any, store: VectorStore, ids: np.ndarray, plan: IndexPlan, memory: BuildMemory,
                      folder: Path | None, seed: int, use_gpu: bool | None, report: Progress) -> None:
    report(f"training {plan.factory} on {plan.train_size:,} vectors")
    with _training_sample(store, ids, plan.train_size, seed, memory, folder) as sample:
        _train(index, sample, seed, use_gpu, memory.pq_points_per_centroid)


@contextlib.contextmanager
def _training_sample(store: VectorStore, ids: np.ndarray, size: int, seed: int, memory: BuildMemory,
                     folder: Path | None) -> Iterator[np.ndarray]:
    """A random sample of the stored vectors: in RAM when it fits the budget, else written to a scratch file in
    `folder` (the system's temporary folder when None) and memory-mapped, so the kernel can page it."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(ids, min(size, len(ids)), replace=False))  # sorted: sequential reads
    if memory.sample_in_ram:
        yield store.get(chosen)
        return
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=folder) as scratch:
        path = Path(scratch) / "sample.f32"
        with open(path, "wb") as f:
            for _, vectors in store.iter_chunks(chosen, memory.read_rows):
                f.write(vectors.tobytes())
        sample = np.memmap(path, dtype=np.float32, mode="r", shape=(len(chosen), store.dim))
        try:
            yield sample
        finally:
            del sample


def _train(index: Any, sample: np.ndarray, seed: int, use_gpu: bool | None,
           pq_points_per_centroid: int = PQ_MAX_POINTS_PER_CENTROID) -> None:
    faiss = _faiss()
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    if hasattr(ivf, "pq"):
        ivf.pq.cp.seed = seed
        # faiss trains the codebooks on (and copies, with their residuals) up to this many points per entry
        ivf.pq.cp.max_points_per_centroid = pq_points_per_centroid
        # index_factory turns on polysemous training, which only serves Hamming-filtered search (unused here)
        # and made training ~25x slower (18 s instead of 0.8 s for 20,000 x 32-d, IVF128,PQ4x8).
        ivf.do_polysemous_training = False
    with _faiss_threads(_available_cores()):
        if _gpu_count(use_gpu) > 0:
            _train_on_gpu(index, sample)
        else:
            index.train(sample)


def _train_on_gpu(index: Any, sample: np.ndarray) -> None:
    """Run the coarse k-means (nlist centroids over the sample) on the GPUs; the index itself stays on CPU."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    try:
        index.train(sample)
    finally:
        ivf.clustering_index = None


def _remove_other_index_files(folder: Path, keep: set[str]) -> None:
    """Delete index files no saved index names, and scratch left by builds or saves that were killed.

    The new index is already committed: a file that cannot be deleted now (a system that refuses to delete a
    file another process has open) is left for the next save to try again.
    """
    for pattern in ("index-*.faiss", "*.ivfdata", "*.ivfdata.tmp"):
        for old in folder.glob(pattern):
            if old.name not in keep:
                with contextlib.suppress(OSError):
                    old.unlink(missing_ok=True)
    for scratch in folder.glob("build-*"):
        shutil.rmtree(scratch, ignore_errors=True)


def _read_params(path: Path) -> IndexParams:
    try:
        params = IndexParams.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise IndexFileError(f"The index parameters in {path} cannot be read ({error}); rebuild the index.") from error
    if params.format_version > FORMAT_VERSION:
        raise IndexFileError(f"The index in {path.parent} was written by a newer clipsearch; rebuild the index.")
    return params


def _read_params_or_none(path: Path) -> IndexParams | None:
    try:
        return _read_params(path)
    except IndexFileError:
        return None


def _read_faiss_bytes(path: Path, params: IndexParams) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise IndexFileError(f"The index file {path} cannot be read ({error}); rebuild the index.") from error
    if len(data) != params.index_bytes or zlib.crc32(data) != params.index_crc32:
        raise IndexFileError(f"The index file {path} is damaged (size or checksum differs); rebuild the index.")
    return np.frombuffer(data, dtype=np.uint8)


def _deserialize(data: np.ndarray, path: Path) -> Any:
    try:
        return _faiss().deserialize_index(data)
    except RuntimeError as error:
        raise IndexFileError(f"The index file {path} is not a FAISS index ({error}); rebuild the index.") from error


def _open_on_disk(data: np.ndarray, ivfdata: Path, params: IndexParams) -> Any:
    """The index in `data` with its lists mapped from `ivfdata`, whose size is checked first (mapping a shorter
    file would crash on the first read past its end; checksumming gigabytes on every open would be too slow)."""
    try:
        size = ivfdata.stat().st_size
    except OSError as error:
        raise IndexFileError(f"The index lists file {ivfdata} cannot be read ({error}); rebuild the index.") from error
    if size != params.ivfdata_bytes:
        raise IndexFileError(f"The index lists file {ivfdata} is damaged (its size differs); rebuild the index.")
    try:
        index = ondisk.open_index(data, ivfdata)
    except (RuntimeError, ValueError) as error:
        raise IndexFileError(f"The index in {ivfdata.parent} is not a FAISS on-disk index ({error}); "
                             "rebuild the index.") from error
    if ondisk.mapped_bytes(index) > size:
        raise IndexFileError(f"The index lists file {ivfdata} is shorter than its index says; rebuild the index.")
    return index


def _present_mask(index: Any) -> np.ndarray:
    """Which ids the loaded index holds, read from its id map or inverted lists (list by list, so an on-disk
    index's ids are never all copied into RAM at once)."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap2):
        return _mask_of(faiss.vector_to_array(index.id_map).astype(np.int64))
    invlists = faiss.extract_index_ivf(index).invlists
    present = np.zeros(0, dtype=bool)
    for number in range(invlists.nlist):
        size = invlists.list_size(number)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(number), size)
            present = _grown(present, int(ids.max()) + 1)
            present[ids] = True
    return present
