"""Tuning: for each query kind, the cheapest (nprobe, rerank) whose measured recall@10 reaches the policy's target,
unfiltered and for each measured filter size.

Recall is measured against brute force over the store: ``image`` queries are a sample of the library's own
vectors, each leaving itself out (leave-one-out); ``text`` queries are the caller's text-encoder embeddings of the
built-in captions (`builtin_captions`), or, without a text encoder, text-like queries synthesised from library
vectors (`text_like_queries`). A setting "reaches" a target when the one-sided 95% lower confidence bound of its
mean recall does. Reasons and measurements: docs/index.md, "Tuning" and "Filtered search".
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.index import memory
from clipsearch.index.exact import (
    as_queries,
    candidate_scores,
    drop_excluded,
    exact_search,
    recall_lower_bound,
    recall_per_query,
    top_k_by_score,
)
from clipsearch.index.params import QUERY_KINDS, FilterBand, IndexParams, QueryParams
from clipsearch.index.search import filtered_nprobe

if TYPE_CHECKING:
    from clipsearch.index.core import VectorIndex

RECALL_K = 10
MAX_NPROBE_FRACTION = 16  # never scan more than 1/16 of the lists: past that the index is no faster than flat
FILTER_TUNING_FRACTIONS = (0.0, 0.01, 0.1, 1.0)  # filters the filtered tuning measures (raised to the switch)
RERANK_FACTORS = (1, 2, 4, 8, 16, 32, 64)
IMAGE_TUNING_QUERIES = 300
TEXT_TUNING_QUERIES = 400

Progress = Callable[[str], None]
TuningSet = tuple[np.ndarray, np.ndarray, str]  # queries, the id each leaves out (-1: none), where they came from


class Tuner:
    """Measures one built index against brute force over its store and writes the cheapest settings reaching the
    targets into its parameters."""

    def __init__(self, index: VectorIndex, seed: int) -> None:
        self.index = index
        self.params = index.params
        self.rng = np.random.default_rng(seed + 1)

    def tune(self, text_queries: np.ndarray | None, report: Progress) -> bool:
        """Tune every query kind, unfiltered and filtered; False when some kind cannot reach its target on the
        grid (the caller then escalates the index)."""
        sets = self._tuning_sets(text_queries)
        subsets = self._filter_tuning_subsets()
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

    def _tuning_sets(self, text_queries: np.ndarray | None) -> dict[str, TuningSet]:
        ids, store = self.index.ids(), self.index.store
        sample = np.sort(self.rng.choice(ids, min(IMAGE_TUNING_QUERIES, len(ids)), replace=False))
        image_queries = store.get(sample)
        if text_queries is not None and len(text_queries):
            text, source = as_queries(text_queries, store.dim), "caption embeddings"
        else:
            anchors = store.get(np.sort(self.rng.choice(ids, min(TEXT_TUNING_QUERIES, len(ids)), replace=False)))
            text, source = text_like_queries(anchors, self.rng), "synthetic text-like queries"
        no_exclusion = np.full(len(text), -1, dtype=np.int64)
        return {"image": (image_queries, sample, "held-out library vectors (leave-one-out)"),
                "text": (text, no_exclusion, source)}

    def _tune_kind(self, kind: str, queries: np.ndarray, exclude: np.ndarray) -> QueryParams | None:
        truth = self._leave_one_out_truth(queries, exclude)
        return self._cheapest(self.params.target_recall[kind], nprobe_grid(self.params.nlist),
                              lambda nprobe: self._recalls_for(nprobe, queries, exclude, truth))

    def _filter_tuning_subsets(self) -> list[np.ndarray]:
        """Random id subsets (like a folder filter that ignores content) that take the id-selector path:
        the smallest such filter, 1%, 10% and all of the library."""
        ids, threshold = self.index.ids(), self.params.exact_subset_max
        sizes = {min(len(ids), max(round(f * len(ids)), threshold + 1)) for f in FILTER_TUNING_FRACTIONS}
        return [ids if size == len(ids) else np.sort(self.rng.choice(ids, size, replace=False))
                for size in sorted(sizes) if size > threshold]

    def _tune_filtered(self, queries: np.ndarray, exclude: np.ndarray,
                       subsets: list[np.ndarray]) -> list[FilterBand] | None:
        """For each subset, the cheapest (nprobe per selectivity, rerank) reaching the filtered target."""
        bands = []
        for subset in subsets:
            best = self._tune_subset(queries, exclude, subset)
            if best is None:
                return None
            bands.append(FilterBand(round(len(subset) / max(self.index.ntotal, 1), 6), best.nprobe, best.rerank,
                                    best.recall_at_10))
        return bands

    def _tune_subset(self, queries: np.ndarray, exclude: np.ndarray, subset: np.ndarray) -> QueryParams | None:
        truth = self._leave_one_out_truth(queries, exclude, subset)
        ntotal, nlist = self.index.ntotal, self.params.nlist
        return self._cheapest(self.params.target_recall["filtered"], nprobe_grid(nlist, 1),
                              lambda base: self._recalls_for(filtered_nprobe(base, len(subset), ntotal, nlist),
                                                             queries, exclude, truth, subset))

    def _cheapest(self, target: float, nprobes: list[int],
                  recalls_at: Callable[[int], Iterator[tuple[int, np.ndarray]]]) -> QueryParams | None:
        """The (nprobe, rerank) of least `search_cost` whose recall reaches `target` (at 95% confidence), or None."""
        best: tuple[float, QueryParams] | None = None
        for nprobe in nprobes:
            if best is not None and self._cost(nprobe, 1) >= best[0]:
                break  # costs only grow from here
            for rerank, per_query in recalls_at(nprobe):
                cost = self._cost(nprobe, rerank)
                if recall_lower_bound(per_query) >= target and (best is None or cost < best[0]):
                    best = (cost, QueryParams(nprobe, rerank, round(float(np.mean(per_query)), 4)))
        return None if best is None else best[1]

    def _cost(self, nprobe: int, rerank: int) -> float:
        return search_cost(self.params, self.index.ntotal, nprobe, rerank)

    def _leave_one_out_truth(self, queries: np.ndarray, exclude: np.ndarray,
                             allowed: np.ndarray | None = None) -> np.ndarray:
        rows = memory.exact_rows(self.index.buffer_bytes, self.params.dim, len(queries))
        _, truth = exact_search(queries, RECALL_K + 1, self.index.store,
                                self.index.ids() if allowed is None else allowed, chunk=rows)
        return drop_excluded(truth, exclude, RECALL_K)

    def _recalls_for(self, nprobe: int, queries: np.ndarray, exclude: np.ndarray, truth: np.ndarray,
                     allowed: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Per-query recall@10 for each rerank factor at this nprobe (within `allowed` when given), from one
        FAISS search of the deepest candidate list."""
        depth = min(RECALL_K * RERANK_FACTORS[-1] + 1, self.index.ntotal if allowed is None else len(allowed))
        _, candidates = self.index.candidates(queries, depth, nprobe, allowed)
        candidates = np.where(candidates == exclude[:, None], -1, candidates)
        chunk = memory.rerank_queries(self.index.buffer_bytes, self.params.dim, depth)
        scores = candidate_scores(queries, candidates, self.index.store, chunk=chunk)
        self_slot = int(bool(np.any(exclude >= 0)))  # the left-out query itself may take one slot
        for rerank in RERANK_FACTORS:
            width = min(RECALL_K * rerank + self_slot, depth)
            _, found = top_k_by_score(scores[:, :width], candidates[:, :width], RECALL_K)
            yield rerank, recall_per_query(found, truth)


def search_cost(params: IndexParams, ntotal: int, nprobe: int, rerank: int) -> float:
    """Codes scanned plus exact rows re-ranked, an exact row costing about dim/m codes."""
    codes = nprobe * ntotal / max(params.nlist, 1)
    return codes + RECALL_K * rerank * params.dim / max(params.m, 1)


def nprobe_grid(nlist: int, fraction: int = MAX_NPROBE_FRACTION) -> list[int]:
    """1, 2, 4 ... up to nlist / fraction."""
    limit = max(1, nlist // fraction)
    return [1 << i for i in range(limit.bit_length()) if (1 << i) <= limit]


def use_most_thorough_setting(params: IndexParams) -> None:
    """For query kinds that missed their target: the most thorough setting of the tuning grid."""
    nprobe, rerank = nprobe_grid(params.nlist)[-1], RERANK_FACTORS[-1]
    for kind in QUERY_KINDS:
        if not params.query[kind].queries:  # tuning did not reach this kind's target
            params.query[kind] = QueryParams(nprobe, rerank, None, 0, "most thorough (target not reached)",
                                             [FilterBand(1.0, params.nlist, rerank)])


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
