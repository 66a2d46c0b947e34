"""Everything about an index that is not in its FAISS file, stored as JSON beside it (``index.json``).

`IndexParams` holds the plan it was built with, the search parameters tuned for each query kind (`QueryParams`,
with one `FilterBand` per measured filter size), the recall they measured, and the names, sizes and checksum of
the files. The JSON is the commit point of a save (`files`); older files still load (missing fields default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from clipsearch.index.plan import IndexPlan
from clipsearch.index.policy import DEFAULT_POLICY, EXACT_SUBSET_MAX_ROWS, TARGET_RECALL

if TYPE_CHECKING:
    from clipsearch.index.policy import IndexPolicy

FORMAT_VERSION = 2  # 2: on-disk indexes (ivfdata_file, ivfdata_bytes)
PARAMS_FILE = "index.json"
QUERY_KINDS = ("image", "text")


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

    def plan(self) -> IndexPlan:
        """The plan the index was built with."""
        return IndexPlan(self.kind, self.factory, self.nlist, self.m, self.nbits, self.train_size)

    def for_query(self, kind: str, nprobe: int | None = None, rerank: int | None = None) -> QueryParams:
        """The parameters of `kind` ("image", "text" or "combined"); an explicit nprobe/rerank replaces both the
        unfiltered and the filtered one."""
        if kind == "combined":  # a mix of both: take the more thorough setting of each
            base = more_thorough(self.query["image"], self.query["text"])
        elif kind in self.query:
            base = self.query[kind]
        else:
            raise ValueError(f"unknown query kind {kind!r}; expected 'image', 'text' or 'combined'")
        bands = [replace(b, nprobe=nprobe or b.nprobe, rerank=rerank or b.rerank) for b in base.filtered]
        return replace(base, nprobe=nprobe or base.nprobe, rerank=rerank or base.rerank, filtered=bands)

    def override(self, kind: str, *, nprobe: int | None = None, rerank: int | None = None,
                 filtered_nprobe: int | None = None, filtered_rerank: int | None = None) -> None:
        """Replace the tuned parameters of one query kind ("image" or "text"; kept by a save).

        `nprobe`/`rerank` apply to filtered searches too unless `filtered_nprobe`/`filtered_rerank` are
        given, which then hold for filters of every selectivity.
        """
        if kind not in QUERY_KINDS:
            raise ValueError(f"unknown query kind {kind!r}; expected 'image' or 'text'")
        current = self.for_query(kind, nprobe, rerank)
        bands = current.filtered or [FilterBand(1.0, current.nprobe, current.rerank)]
        if filtered_nprobe or filtered_rerank:
            bands = [FilterBand(1.0, filtered_nprobe or max(b.nprobe for b in bands),
                                filtered_rerank or max(b.rerank for b in bands))]
        self.query[kind] = replace(current, recall_at_10=None, source="set by caller",
                                   filtered=[replace(b, recall_at_10=None) for b in bands])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexParams:
        data = json.loads(text)
        data["query"] = {kind: QueryParams(**{**values, "filtered": [FilterBand(**band) for band in
                                                                    values.get("filtered", [])]})
                         for kind, values in data.get("query", {}).items()}
        return cls(**data)


def more_thorough(a: QueryParams, b: QueryParams) -> QueryParams:
    """Parameters at least as thorough as both `a` and `b`, filtered bands included."""
    bands = []
    for selectivity in sorted({band.selectivity for band in a.filtered + b.filtered}):
        (nprobe_a, rerank_a), (nprobe_b, rerank_b) = a.for_filter(selectivity), b.for_filter(selectivity)
        bands.append(FilterBand(selectivity, max(nprobe_a, nprobe_b), max(rerank_a, rerank_b)))
    return QueryParams(max(a.nprobe, b.nprobe), max(a.rerank, b.rerank), filtered=bands)
