"""Asking FAISS for candidates: id selectors for filters, IVF searches with an nprobe, merging two candidate
lists, and the exact fallback that keeps a filtered result list from coming back short.

A filter larger than the exact-subset switch searches FAISS with an `IDSelectorBitmap`, probing
``nprobe / selectivity`` lists (capped at nlist) so that about as many *allowed* codes are scanned as an
unfiltered query with that nprobe scans (docs/index.md, "Filtered search").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from clipsearch.index.exact import exact_search
from clipsearch.index.runtime import faiss
from clipsearch.vectors import VectorStore


def bitmap_selector(allowed: np.ndarray) -> Any:
    """A FAISS selector of the sorted ids `allowed`."""
    mask = np.zeros(int(allowed[-1]) + 1 if len(allowed) else 1, dtype=bool)
    mask[allowed] = True
    return faiss().IDSelectorBitmap(np.packbits(mask, bitorder="little"))


def optional_selector(allowed: np.ndarray | None) -> Any:
    return None if allowed is None else bitmap_selector(allowed)


def ivf_search(index: Any, queries: np.ndarray, depth: int, nprobe: int,
               selector: Any) -> tuple[np.ndarray, np.ndarray]:
    """The `depth` best (PQ scores, ids) per query, probing `nprobe` lists, among the selected ids."""
    params = faiss().SearchParametersIVF(nprobe=int(nprobe))
    if selector is not None:
        params.sel = selector
    return index.search(queries, int(depth), params=params)


def flat_search(index: Any, queries: np.ndarray, k: int, selector: Any) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of a flat index (among the selected ids), padded with (-inf, -1)."""
    params = None if selector is None else faiss().SearchParameters(sel=selector)
    scores, ids = index.search(queries, k, params=params)
    return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)


def merge_by_score(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                   depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The `depth` best of two (scores, ids) candidate lists per query, by score (missing ones score lowest)."""
    scores = np.concatenate([a[0], b[0]], axis=1)
    ids = np.concatenate([a[1], b[1]], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def filtered_nprobe(base: int, allowed_count: int, ntotal: int, nlist: int) -> int:
    """Lists to probe when only `allowed_count` of `ntotal` ids may answer: enough to meet about as many allowed
    codes as `base` lists hold in all (capped at every list)."""
    selectivity = allowed_count / max(ntotal, 1)
    return max(1, min(nlist, math.ceil(base / max(selectivity, 1e-12))))


def fill_short_rows(scores: np.ndarray, ids: np.ndarray, queries: np.ndarray, wanted: int,
                    store: VectorStore, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-run exactly the queries whose filtered ANN shortlist came back with fewer than `wanted` results."""
    short = np.flatnonzero((ids >= 0).sum(axis=1) < wanted)
    if len(short):
        scores[short], ids[short] = exact_search(queries[short], ids.shape[1], store, allowed)
    return scores, ids
