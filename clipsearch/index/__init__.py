"""The FAISS index: a package of small modules, each owning one idea (the reasons behind each rule are in
docs/index.md).

    core      VectorIndex: add, remove, search (unfiltered and filtered), describe; bound to its vector store
    build     BuildJob: choose, train, fill (in RAM, or in shards on disk), tune, escalate
    tuning    the cheapest (nprobe, rerank) per query kind reaching the recall target; tuning queries
    exact     brute force over the stored vectors, exact re-scoring, recall
    search    FAISS candidate searches: id selectors, nprobe for filters, merging candidate lists
    plan      the kinds of index and their sizes (nlist, m, training sample)
    policy    IndexPolicy, and the choices made with it: which index, escalation, when to rebuild
    memory    how a build fits its memory budget (pure functions)
    budget    where the memory budget comes from, and sizes as people write them
    params    the parameters stored as JSON beside the FAISS file
    files     saving and loading, atomically
    ondisk    inverted lists in an .ivfdata file, and the changes held until the next save
    runtime   faiss imported on first use, its threads and GPUs
    ids       id arrays and masks
"""

from clipsearch.index.budget import MEMORY_ENV, format_size, parse_size, resolve_memory_budget
from clipsearch.index.build import BuildJob
from clipsearch.index.core import VectorIndex
from clipsearch.index.exact import exact_search, recall_at
from clipsearch.index.memory import LIST_SLACK, MIN_SHARD_ROWS, BuildMemory, plan_build_memory
from clipsearch.index.params import PARAMS_FILE, FilterBand, IndexParams, QueryParams
from clipsearch.index.plan import IndexPlan, flat_plan, ivfpq_plan, pq_subquantizers
from clipsearch.index.policy import (
    DEFAULT_POLICY,
    EXACT_SUBSET_MAX_ROWS,
    FLAT_MAX_BYTES,
    REBUILD_GROWTH,
    TARGET_RECALL,
    IndexPolicy,
    choose_index,
    escalate,
)
from clipsearch.index.tuning import builtin_captions, text_like_queries

__all__ = [
    "DEFAULT_POLICY",
    "EXACT_SUBSET_MAX_ROWS",
    "FLAT_MAX_BYTES",
    "LIST_SLACK",
    "MEMORY_ENV",
    "MIN_SHARD_ROWS",
    "PARAMS_FILE",
    "REBUILD_GROWTH",
    "TARGET_RECALL",
    "BuildJob",
    "BuildMemory",
    "FilterBand",
    "IndexParams",
    "IndexPlan",
    "IndexPolicy",
    "QueryParams",
    "VectorIndex",
    "builtin_captions",
    "choose_index",
    "escalate",
    "exact_search",
    "flat_plan",
    "format_size",
    "ivfpq_plan",
    "parse_size",
    "plan_build_memory",
    "pq_subquantizers",
    "recall_at",
    "resolve_memory_budget",
    "text_like_queries",
]
