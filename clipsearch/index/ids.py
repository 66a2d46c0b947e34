"""Id sets as the index keeps them: sorted int64 arrays, and boolean masks indexed by id (an image id is small
and dense, so a mask answers "is it in?" for a whole batch at once)."""

from __future__ import annotations

import numpy as np


def sorted_unique(ids: np.ndarray) -> np.ndarray:
    """`ids` as sorted unique int64, without a copy when they already are (a library's ids are)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids
    return np.unique(ids)


def mask_of(ids: np.ndarray) -> np.ndarray:
    mask = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=bool)
    mask[ids] = True
    return mask


def grown(mask: np.ndarray, size: int) -> np.ndarray:
    """`mask`, or a copy at least `size` long (doubling, so growing id by id stays cheap)."""
    if size <= len(mask):
        return mask
    bigger = np.zeros(max(size, 2 * len(mask)), dtype=bool)
    bigger[: len(mask)] = mask
    return bigger


def lookup(mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """mask[ids], False for ids outside it."""
    inside = (ids >= 0) & (ids < len(mask))
    result = np.zeros(len(ids), dtype=bool)
    result[inside] = mask[ids[inside]]
    return result
