"""Which index to build for N vectors, and when an index needs another: `IndexPolicy` and the choices made with it.

* `choose_index`: flat while the vectors take at most ``flat_max_bytes`` (64 MiB: 32,768 vectors at 512-d) and
  the flat build fits the memory budget, else IVF-PQ (`plan`), once there is enough data to train it.
* `escalate`: when tuning cannot reach the target recall, bigger PQ codes, then flat (if it fits the budget).
* `needs_rebuild`: another kind called for, growth past ``rebuild_growth`` times the training size, or an
  in-RAM part that would no longer fit the budget.

The thresholds live in an `IndexPolicy` whose defaults are the measured values (docs/index.md, "Choosing the
index" and "Tuning"); a caller with other needs passes its own policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clipsearch.index.memory import plan_build_memory
from clipsearch.index.plan import MIN_TRAIN_PER_LIST, IndexPlan, flat_plan, ivfpq_plan, pq_subquantizers

if TYPE_CHECKING:
    from clipsearch.index.params import IndexParams

FLAT_MAX_BYTES = 64 * 1024 * 1024  # flat while the matrix is at most this big
REBUILD_GROWTH = 4  # retrain once the collection is this many times the size it was trained on
TARGET_RECALL = {"image": 0.97, "text": 0.95, "filtered": 0.99}  # "filtered": either kind, with a filter
EXACT_SUBSET_MAX_ROWS = 4096  # measured switch point for filtered search, see benchmarks/README.md


@dataclass(frozen=True)
class IndexPolicy:
    """The thresholds the choice of index, its tuning and its upkeep follow.

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
    """The index to build for `n` vectors of dimension `dim`.

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


def needs_rebuild(params: IndexParams, n: int, held_in_ram: int, memory_budget_bytes: int | None = None,
                  policy: IndexPolicy = DEFAULT_POLICY) -> bool:
    """True when `n` vectors call for another kind of index than `params` describes, or n outgrew the training
    set several-fold, or (given a budget) the `held_in_ram` vectors the index would then hold in RAM (all of them
    in RAM, those added since the last save on disk) no longer fit `memory_budget_bytes`.

    An IVF-PQ plan that escalated to flat is retried after the same growth (the data may allow it then).
    """
    planned = choose_index(n, params.dim, memory_budget_bytes, policy)
    if planned.kind != (params.planned_kind or params.kind):
        return True
    if planned.kind != "flat" and n >= policy.rebuild_growth * max(params.trained_on, 1):
        return True
    if memory_budget_bytes is None:
        return False
    memory = plan_build_memory(params.plan(), held_in_ram, params.dim, memory_budget_bytes)
    return not memory.fits if params.kind == "flat" else memory.on_disk
