"""What to build: the two kinds of index, and how an IVF-PQ index is sized for N vectors of dimension dim.

* **flat**: ``IndexIDMap2(IndexFlatIP)``, exact.
* **ivfpq**: ``IVF{nlist},PQ{m}x8`` (inner product): ``nlist = 4 sqrt(N)`` as a power of two, never more than
  N / 39; ``m = dim / 8`` sub-quantisers of 8 bits; a training sample of ``clamp(131,072, 39 nlist, 256 nlist)``
  vectors, capped at N.

Which of them a library gets, and when it needs another, is `policy`'s choice; why these sizes is told in
docs/index.md, "Choosing the index".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ID_BYTES = 8  # each IVF entry also stores its int64 id
LISTS_PER_SQRT_N = 4  # nlist ~ 4 * sqrt(N)
MIN_TRAIN_PER_LIST = 39  # below this faiss k-means warns and centroids are unstable
MAX_TRAIN_PER_LIST = 256  # beyond this faiss subsamples anyway
TRAIN_TARGET = 131_072  # training sample size aimed for, clamped into [39, 256] * nlist


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


def _nearest_power_of_two(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _floor_power_of_two(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)
