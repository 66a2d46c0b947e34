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
  A memory budget smaller than the flat matrix also forces IVF-PQ (once there is enough data to train it).
* **IVF-PQ** (`IVF{nlist},PQ{m}x8`, inner product) beyond: ``nlist = 4 * sqrt(N)`` rounded to a power of two
  (4,096 at 10^6), but never more than N / 39 so every centroid gets the 39 training points k-means needs;
  ``m = dim / 8`` sub-quantisers of 8 bits (64 for 512-d: 64 bytes of code + 8 bytes of id per vector),
  shrunk by halves while the codes do not fit a given memory budget. The training sample is
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
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import math
import os
import secrets
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.errors import IndexFileError
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
FORMAT_VERSION = 1
PARAMS_FILE = "index.json"

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


def choose_index(n: int, dim: int, memory_budget_bytes: int | None = None) -> IndexPlan:
    """The index to build for `n` vectors of dimension `dim` (rule and reasons in the module docstring)."""
    flat_bytes = n * dim * 4
    over_budget = memory_budget_bytes is not None and flat_bytes > memory_budget_bytes
    trainable = n >= MIN_TRAIN_PER_LIST * 2
    if flat_bytes <= FLAT_MAX_BYTES and not (over_budget and trainable):
        return flat_plan()
    if not trainable:
        return flat_plan()
    plan = ivfpq_plan(n, dim)
    while memory_budget_bytes is not None and plan.m > 1 and n * plan.bytes_per_vector(dim) > memory_budget_bytes:
        smaller = _halved_divisor(dim, plan.m)
        if smaller == plan.m:
            break
        plan = ivfpq_plan(n, dim, nlist=plan.nlist, m=smaller)
    return plan


def escalate(plan: IndexPlan, n: int, dim: int) -> IndexPlan | None:
    """The next, more accurate index when `plan` cannot reach the target recall: bigger codes, then flat."""
    if plan.kind == "flat":
        return None
    bigger = pq_subquantizers(dim, sub_dim=4)
    if plan.m < bigger:
        return ivfpq_plan(n, dim, nlist=plan.nlist, m=bigger, nbits=plan.nbits)
    return flat_plan()


def _halved_divisor(dim: int, m: int) -> int:
    for smaller in range(m // 2, 0, -1):
        if dim % smaller == 0:
            return smaller
    return m


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
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_plan(cls, plan: IndexPlan, dim: int, trained_on: int, planned_kind: str) -> IndexParams:
        query = {kind: QueryParams(recall_at_10=1.0 if plan.kind == "flat" else None) for kind in QUERY_KINDS}
        return cls(plan.kind, plan.factory, dim, plan.nlist, plan.m, plan.nbits, plan.train_size,
                   trained_on, planned_kind, query)

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


class VectorIndex:
    """A FAISS index over image ids, with parameters tuned per query kind and exact re-ranking."""

    def __init__(self, index: Any, params: IndexParams, present: np.ndarray) -> None:
        self._index = index
        self.params = params
        self._present = present  # bool per image id: is it in the index (fast filter intersection)

    # ---- building

    @classmethod
    def build(cls, store: VectorStore, ids: np.ndarray, *, text_queries: np.ndarray | None = None,
              plan: IndexPlan | None = None, use_gpu: bool | None = None, seed: int = 0,
              progress: Progress | None = None) -> VectorIndex:
        """Choose (or use `plan`), train on a sample of the store, add every id, then tune per query kind."""
        report = progress or (lambda message: None)
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        planned = plan or choose_index(len(ids), store.dim)
        current: IndexPlan | None = planned
        while current is not None:
            index = cls._fill(store, ids, current, planned.kind, use_gpu, seed, report)
            if current.kind == "flat" or index._tune(store, text_queries, seed, report):
                return index
            current = escalate(current, len(ids), store.dim)
            report(f"target recall not reached; rebuilding as {current.factory if current else 'flat'}")
        raise AssertionError("escalation always ends with a flat index")

    @classmethod
    def _fill(cls, store: VectorStore, ids: np.ndarray, plan: IndexPlan, planned_kind: str,
              use_gpu: bool | None, seed: int, report: Progress) -> VectorIndex:
        index = _new_faiss_index(plan, store.dim)
        if plan.kind != "flat":
            report(f"training {plan.factory} on {plan.train_size:,} vectors")
            _train(index, _training_sample(store, ids, plan.train_size, seed), seed, use_gpu)
        params = IndexParams.from_plan(plan, store.dim, len(ids), planned_kind)
        built = cls(index, params, np.zeros(0, dtype=bool))
        report(f"adding {len(ids):,} vectors")
        built.add(store, ids)
        return built

    # ---- tuning

    def _tune(self, store: VectorStore, text_queries: np.ndarray | None, seed: int, report: Progress) -> bool:
        """Pick the cheapest parameters reaching the targets for each kind, unfiltered and filtered.

        False when some kind cannot reach its target on the grid (the caller then escalates the index).
        """
        rng = np.random.default_rng(seed + 1)
        sets = self._tuning_sets(store, text_queries, rng)
        subsets = self._filter_tuning_subsets(rng)
        for kind, (queries, exclude, source) in sets.items():
            found = self._tune_kind(kind, queries, exclude, store)
            bands = None if found is None else self._tune_filtered(queries, exclude, store, subsets)
            if found is None or bands is None:
                return False
            self.params.query[kind] = replace(found, queries=len(queries), source=source, filtered=bands)
            with_filter = ", ".join(f"{b.selectivity:.2%} kept: nprobe={b.nprobe}/selectivity rerank={b.rerank} "
                                    f"recall@10={b.recall_at_10}" for b in bands)
            report(f"{kind} queries: nprobe={found.nprobe} rerank={found.rerank} recall@10={found.recall_at_10:.3f}"
                   f"; filtered: {with_filter or 'every filter is scored exactly'}")
        return True

    def _tuning_sets(self, store: VectorStore, text_queries: np.ndarray | None,
                     rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
        ids = self.ids()
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

    def _tune_kind(self, kind: str, queries: np.ndarray, exclude: np.ndarray,
                   store: VectorStore) -> QueryParams | None:
        truth = self._leave_one_out_truth(queries, exclude, store)
        return self._cheapest(self.params.target_recall[kind], _nprobe_grid(self.params.nlist),
                              lambda nprobe: self._recalls_for(nprobe, queries, exclude, truth, store))

    def _filter_tuning_subsets(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Random id subsets (like a folder filter that ignores content) that take the id-selector path:
        the smallest such filter, 1%, 10% and all of the library."""
        ids, threshold = self.ids(), self.params.exact_subset_max
        sizes = {min(len(ids), max(round(f * len(ids)), threshold + 1)) for f in FILTER_TUNING_FRACTIONS}
        return [ids if size == len(ids) else np.sort(rng.choice(ids, size, replace=False))
                for size in sorted(sizes) if size > threshold]

    def _tune_filtered(self, queries: np.ndarray, exclude: np.ndarray, store: VectorStore,
                       subsets: list[np.ndarray]) -> list[FilterBand] | None:
        """For each subset, the cheapest (nprobe per selectivity, rerank) reaching the filtered target."""
        bands = []
        for subset in subsets:
            best = self._tune_subset(queries, exclude, store, subset)
            if best is None:
                return None
            bands.append(FilterBand(round(len(subset) / max(self.ntotal, 1), 6), best.nprobe, best.rerank,
                                    best.recall_at_10))
        return bands

    def _tune_subset(self, queries: np.ndarray, exclude: np.ndarray, store: VectorStore,
                     subset: np.ndarray) -> QueryParams | None:
        truth = self._leave_one_out_truth(queries, exclude, store, subset)
        return self._cheapest(self.params.target_recall["filtered"], _nprobe_grid(self.params.nlist, 1),
                              lambda base: self._recalls_for(self._filtered_nprobe(base, len(subset)), queries,
                                                             exclude, truth, store, subset))

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

    def _leave_one_out_truth(self, queries: np.ndarray, exclude: np.ndarray, store: VectorStore,
                             allowed: np.ndarray | None = None) -> np.ndarray:
        _, truth = exact_search(queries, RECALL_K + 1, store, self.ids() if allowed is None else allowed)
        return _drop_excluded(truth, exclude, RECALL_K)

    def _recalls_for(self, nprobe: int, queries: np.ndarray, exclude: np.ndarray, truth: np.ndarray,
                     store: VectorStore, allowed: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Per-query recall@10 for each rerank factor at this nprobe (within `allowed` when given), from one
        FAISS search of the deepest candidate list."""
        depth = min(RECALL_K * RERANK_FACTORS[-1] + 1, self.ntotal if allowed is None else len(allowed))
        selector = None if allowed is None else _bitmap_selector(allowed)
        _, candidates = self._faiss_search(queries, depth, nprobe, selector)
        candidates = np.where(candidates == exclude[:, None], -1, candidates)
        scores = candidate_scores(queries, candidates, store)
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

    # ---- contents

    def add(self, store: VectorStore, ids: np.ndarray) -> None:
        """Add the stored vectors of `ids`; an id already in the index is replaced by its stored vector."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return
        self.remove(ids[self._contains(ids)])
        with _faiss_threads(_available_cores()):
            for chunk_ids, vectors in store.iter_chunks(ids):
                self._index.add_with_ids(vectors, chunk_ids)
        self._grow_present(int(ids[-1]) + 1)
        self._present[ids] = True

    def remove(self, ids: np.ndarray) -> None:
        """Remove `ids` from the index (ids not in it are ignored)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[self._contains(ids)]
        if len(ids) == 0:
            return
        self._index.remove_ids(_faiss().IDSelectorBatch(ids))
        self._present[ids] = False

    def ids(self) -> np.ndarray:
        """The ids currently in the index, sorted."""
        return np.flatnonzero(self._present).astype(np.int64)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        inside = (ids >= 0) & (ids < len(self._present))
        result = np.zeros(len(ids), dtype=bool)
        result[inside] = self._present[ids[inside]]
        return result

    def _grow_present(self, size: int) -> None:
        if size > len(self._present):
            grown = np.zeros(max(size, 2 * len(self._present)), dtype=bool)
            grown[: len(self._present)] = self._present
            self._present = grown

    # ---- searching

    def search(self, queries: np.ndarray, k: int, store: VectorStore, *, kind: str = "image",
               allowed_ids: np.ndarray | None = None, nprobe: int | None = None,
               rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (exact cosine scores, ids) per query, best first, padded with (-inf, -1).

        `kind` ("image", "text" or "combined") picks the tuned parameters; `nprobe`/`rerank` override them.
        `allowed_ids` (sorted) restricts the results to those ids, returning the exact top-k of that subset.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        queries = _as_queries(queries, store.dim)
        chosen = self._query_params(kind, nprobe, rerank)
        with _faiss_threads(1 if len(queries) < SMALL_BATCH else _available_cores()):
            if allowed_ids is None:
                return self._search_all(queries, k, store, chosen)
            return self._search_subset(queries, k, store, chosen, np.asarray(allowed_ids, dtype=np.int64))

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

    def _search_all(self, queries: np.ndarray, k: int, store: VectorStore,
                    chosen: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        if self.params.kind == "flat":
            return self._flat_search(queries, k, None)
        depth = min(k * chosen.rerank, self.ntotal)
        _, candidates = self._faiss_search(queries, depth, chosen.nprobe, None)
        return top_k_by_score(candidate_scores(queries, candidates, store), candidates, k)

    def _search_subset(self, queries: np.ndarray, k: int, store: VectorStore, chosen: QueryParams,
                       allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(allowed) > 1 and np.any(np.diff(allowed) <= 0):
            allowed = np.unique(allowed)  # callers should pass sorted ids; this keeps wrong input correct
        allowed = allowed[self._contains(allowed)]  # only ids in the index can be answers
        if len(allowed) <= self.params.exact_subset_max:
            return exact_search(queries, k, store, allowed)
        selector = _bitmap_selector(allowed)
        if self.params.kind == "flat":
            return self._flat_search(queries, k, selector)
        base, rerank = chosen.for_filter(len(allowed) / max(self.ntotal, 1))
        nprobe = self._filtered_nprobe(base, len(allowed))
        depth = min(k * rerank, len(allowed))
        _, candidates = self._faiss_search(queries, depth, nprobe, selector)
        scores, ids = top_k_by_score(candidate_scores(queries, candidates, store), candidates, k)
        return _fill_short_rows(scores, ids, queries, min(k, len(allowed)), store, allowed)

    def _flat_search(self, queries: np.ndarray, k: int, selector: Any) -> tuple[np.ndarray, np.ndarray]:
        params = None if selector is None else _faiss().SearchParameters(sel=selector)
        scores, ids = self._index.search(queries, k, params=params)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)

    def _faiss_search(self, queries: np.ndarray, depth: int, nprobe: int,
                      selector: Any) -> tuple[np.ndarray, np.ndarray]:
        if depth < 1 or self.ntotal == 0:
            return _empty_result(len(queries), max(depth, 1))
        faiss = _faiss()
        params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        if selector is not None:
            params.sel = selector
        return self._index.search(queries, int(depth), params=params)

    # ---- growth and reporting

    def needs_rebuild(self, n: int) -> bool:
        """True when `n` vectors call for another kind of index, or n outgrew the training set several-fold.

        An IVF-PQ plan that escalated to flat is retried after the same growth (the data may allow it then).
        """
        planned = choose_index(n, self.params.dim)
        if planned.kind != (self.params.planned_kind or self.params.kind):
            return True
        return planned.kind != "flat" and n >= REBUILD_GROWTH * max(self.params.trained_on, 1)

    def describe(self) -> dict[str, Any]:
        """A summary for `clipsearch stats`."""
        per_kind = {kind: {"nprobe": q.nprobe, "rerank": q.rerank, "recall_at_10": q.recall_at_10,
                           "filtered": [asdict(band) for band in q.filtered],
                           "tuned_on": f"{q.queries} {q.source}".strip()} for kind, q in self.params.query.items()}
        plan = IndexPlan(self.params.kind, self.params.factory, self.params.nlist, self.params.m, self.params.nbits)
        bytes_per_vector = plan.bytes_per_vector(self.params.dim)
        return {"kind": self.params.kind, "factory": self.params.factory, "nlist": self.params.nlist,
                "m": self.params.m, "nbits": self.params.nbits, "ntotal": self.ntotal,
                "trained_size": self.params.train_size, "trained_on": self.params.trained_on,
                "bytes_per_vector": bytes_per_vector, "exact_subset_max": self.params.exact_subset_max,
                "queries": per_kind}

    def serialized_bytes(self) -> int:
        """Size of the FAISS index as saved, which is about its RAM (codes, ids, centroids, codebooks)."""
        return int(_faiss().serialize_index(self._index).nbytes)

    # ---- files

    def save(self, folder: Path) -> None:
        """Write the index and its JSON atomically: each goes to a temp file, is fsynced and renamed.

        The FAISS file gets a fresh name and the JSON (renamed last) points at it, so a crash at any moment
        leaves either the old pair or the new pair, never a mix. Old index files are deleted afterwards.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = _faiss().serialize_index(self._index).tobytes()
        name = f"index-{secrets.token_hex(6)}.faiss"
        params = replace(self.params, index_file=name, index_bytes=len(data), index_crc32=zlib.crc32(data))
        try:
            _write_atomically(folder / name, data, folder / "index.faiss.tmp")
            _write_atomically(folder / PARAMS_FILE, params.to_json().encode(), folder / f"{PARAMS_FILE}.tmp")
        except BaseException:
            (folder / name).unlink(missing_ok=True)  # the old JSON still names the old file, which stays
            raise
        self.params = params
        _remove_other_index_files(folder, keep=name)

    @classmethod
    def load(cls, folder: Path) -> VectorIndex | None:
        """The saved index, or None when none was saved; IndexFileError when it cannot be read."""
        params_path = Path(folder) / PARAMS_FILE
        if not params_path.exists():
            return None
        params = _read_params(params_path)
        index = _read_faiss_file(Path(folder) / params.index_file, params)
        return cls(index, params, _present_mask(index))


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
    mask = np.zeros(int(allowed[-1]) + 1, dtype=bool)
    mask[allowed] = True
    return _faiss().IDSelectorBitmap(np.packbits(mask, bitorder="little"))


def _new_faiss_index(plan: IndexPlan, dim: int) -> Any:
    faiss = _faiss()
    if plan.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    return faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)


def _training_sample(store: VectorStore, ids: np.ndarray, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(ids, min(size, len(ids)), replace=False))  # sorted: sequential reads
    return store.get(chosen)


def _train(index: Any, sample: np.ndarray, seed: int, use_gpu: bool | None) -> None:
    faiss = _faiss()
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    if hasattr(ivf, "pq"):
        ivf.pq.cp.seed = seed
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


def _write_atomically(path: Path, data: bytes, temp: Path) -> None:
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if temp.is_file():
            temp.unlink()
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_other_index_files(folder: Path, keep: str) -> None:
    for old in folder.glob("index-*.faiss"):
        if old.name != keep:
            old.unlink(missing_ok=True)


def _read_params(path: Path) -> IndexParams:
    try:
        params = IndexParams.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise IndexFileError(f"The index parameters in {path} cannot be read ({error}); rebuild the index.") from error
    if params.format_version > FORMAT_VERSION:
        raise IndexFileError(f"The index in {path.parent} was written by a newer clipsearch; rebuild the index.")
    return params


def _read_faiss_file(path: Path, params: IndexParams) -> Any:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise IndexFileError(f"The index file {path} cannot be read ({error}); rebuild the index.") from error
    if len(data) != params.index_bytes or zlib.crc32(data) != params.index_crc32:
        raise IndexFileError(f"The index file {path} is damaged (size or checksum differs); rebuild the index.")
    try:
        return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as error:
        raise IndexFileError(f"The index file {path} is not a FAISS index ({error}); rebuild the index.") from error


def _present_mask(index: Any) -> np.ndarray:
    """Which ids the loaded index holds, read from its id map or inverted lists."""
    ids = _index_ids(index)
    present = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=bool)
    present[ids] = True
    return present


def _index_ids(index: Any) -> np.ndarray:
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
             for i in range(invlists.nlist) if invlists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
