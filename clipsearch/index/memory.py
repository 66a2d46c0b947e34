"""How a build fits its memory budget: pure functions of the plan, N, dim and the budget in bytes.

`plan_build_memory` accounts for what each phase of a build holds at once (fixed costs, training, adding and
tuning) and decides whether the lists are built in RAM or on disk in shards, how many vectors are read per step,
and whether the k-means sample fits in RAM. The row-buffer functions size the reads of the exact vectors that
adding, exact search and re-ranking do to the same working share. The model behind the figures is told in
docs/index.md, "The memory budget"; where the budget itself comes from is `budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipsearch.index.plan import ID_BYTES, MIN_TRAIN_PER_LIST, IndexPlan

WORKING_SHARE = 4  # a quarter of the memory budget goes to transient buffers
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
RERANK_QUERIES = 16  # queries re-scored at once when memory is plentiful


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
        """The most the build holds at once: while training, or while adding and tuning with one shard's (or, in
        RAM, all) lists."""
        fixed = _fixed_bytes(plan, n, dim)
        sample = plan.train_size * dim * 4 if self.sample_in_ram and plan.kind != "flat" else 0
        lists = min(n, self.shard_rows) * plan.bytes_per_vector(dim) * LIST_SLACK
        return max(fixed + self.training_bytes + sample, fixed + self.working_bytes + lists)


def plan_build_memory(plan: IndexPlan, n: int, dim: int, budget: int) -> BuildMemory:
    """Split `budget` bytes between working buffers, fixed costs and the lists."""
    working = working_share(budget, dim)
    buffers = buffer_bytes(budget, dim)
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


def working_share(budget: int, dim: int) -> int:
    """A quarter of the budget, but no more than the biggest buffers take (so a big budget goes to the lists):
    `MAX_READ_ROWS` stored rows with, for up to `MAX_TUNING_QUERIES` queries, their exact-search scores."""
    return max(1, min(budget // WORKING_SHARE, BLAS_BYTES + MAX_READ_ROWS * (dim * 4 + MAX_TUNING_QUERIES * 16)))


def buffer_bytes(budget: int, dim: int) -> int:
    """What the working share of `budget` leaves for row buffers once BLAS has its share."""
    return max(working_share(budget, dim) - BLAS_BYTES, 0)


# --------------------------------------------------------------------------------------------- row buffers
# Each takes the row-buffer bytes (None: memory is plentiful, use the largest sizes).


def read_rows(buffers: int | None, dim: int) -> int:
    """Stored vectors read per step while adding."""
    if buffers is None:
        return MAX_READ_ROWS
    return _clamp(buffers // _add_bytes_per_row(dim), MIN_READ_ROWS, MAX_READ_ROWS)


def exact_rows(buffers: int | None, dim: int, queries: int) -> int:
    """Stored rows per block of an exact search for `queries` queries: each row costs its vector plus, per query,
    its score, the score's negation and argpartition's int64 index."""
    if buffers is None:
        return MAX_READ_ROWS
    return _clamp(buffers // (dim * 4 + queries * 16), MIN_READ_ROWS, MAX_READ_ROWS)


def rerank_queries(buffers: int | None, dim: int, depth: int) -> int:
    """Queries re-scored at once when each has `depth` candidates: their rows are read into one block."""
    if buffers is None:
        return RERANK_QUERIES
    return _clamp(buffers // (depth * dim * 4 * 2), 1, RERANK_QUERIES)


# ------------------------------------------------------------------------------------------------ the model


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
