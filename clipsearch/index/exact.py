"""Exact search and recall: brute force over the stored vectors, the ground truth every approximate answer is
measured against, the re-scoring of candidates, and the recall figures tuning keeps.

Every search on IVF-PQ fetches candidates and re-scores them here with the exact vectors of the store, so every
reported score is an exact cosine and PQ error only costs recall, never wrong scores.
"""

from __future__ import annotations

import math

import numpy as np

from clipsearch.vectors import VectorStore

CONFIDENCE_Z = 1.645  # tuned recall must reach the target at this one-sided confidence (95%)


def exact_search(queries: np.ndarray, k: int, store: VectorStore, ids: np.ndarray,
                 chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over the stored vectors of `ids` (the ground truth, and the small-filter path)."""
    queries = as_queries(queries, store.dim)
    best_scores, best_ids = empty_result(len(queries), k)
    for chunk_ids, vectors in store.iter_chunks(np.asarray(ids, dtype=np.int64), chunk):
        scores = queries @ vectors.T
        take = min(k, len(chunk_ids))
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores, best_ids = _merge_topk(
            best_scores, best_ids, np.take_along_axis(scores, part, axis=1), chunk_ids[part], k
        )
    return best_scores, best_ids


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
    padded_scores, padded_ids = empty_result(len(scores), k)
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


def drop_excluded(truth: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's excluded id (the query itself) and keep the first k of the rest."""
    kept = np.where(truth == exclude[:, None], -1, truth)
    order = np.argsort(kept < 0, axis=1, kind="stable")  # valid ids first, order kept
    return np.take_along_axis(kept, order, axis=1)[:, :k]


def empty_result(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -np.inf, dtype=np.float32), np.full((q, k), -1, dtype=np.int64)


def as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (q, {dim}), got {queries.shape}")
    return queries


def _merge_topk(scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
