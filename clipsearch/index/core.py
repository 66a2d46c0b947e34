"""`VectorIndex`: a FAISS index over the image ids of one vector store, with exact re-ranking from that store.

The FAISS id of a vector is the image id (the SQLite primary key, the row in `VectorStore`), so the index never
needs an id table of its own and can always be rebuilt from the stored vectors. This module holds what an index
does once it exists: add and remove ids, search (unfiltered and filtered), describe itself. Building is `build`,
tuning `tuning`, files `files`, lists on disk `ondisk`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.index import files, memory, ondisk
from clipsearch.index.exact import as_queries, candidate_scores, empty_result, exact_search, top_k_by_score
from clipsearch.index.ids import grown, lookup
from clipsearch.index.params import IndexParams, QueryParams
from clipsearch.index.policy import DEFAULT_POLICY, IndexPolicy, needs_rebuild
from clipsearch.index.runtime import available_cores, faiss, faiss_threads, search_threads
from clipsearch.index.search import (
    bitmap_selector,
    fill_short_rows,
    filtered_nprobe,
    flat_search,
    ivf_search,
    merge_by_score,
    optional_selector,
)
from clipsearch.vectors import VectorStore


class VectorIndex:
    """A FAISS index over the image ids of one vector store, with parameters tuned per query kind and exact
    re-ranking from that store."""

    def __init__(self, faiss_index: Any, params: IndexParams, store: VectorStore, present: np.ndarray, *,
                 disk: ondisk.DiskState | None = None, buffer_bytes: int | None = None) -> None:
        self.faiss_index = faiss_index
        self.params = params
        self.store = store  # the exact vectors: what is added, and what re-ranking and exact search read
        self.disk = disk  # None: the inverted lists are in RAM
        self.buffer_bytes = buffer_bytes  # bytes for row buffers (reads, exact search); None: default sizes
        self._present = present  # bool per image id: is it in the index (fast filter intersection)

    @classmethod
    def load(cls, folder: Path, store: VectorStore) -> VectorIndex | None:
        """The index saved in `folder` over the vectors of `store`, or None when none was saved; IndexFileError
        when it cannot be read."""
        opened = files.load(folder)
        if opened is None:
            return None
        return cls(opened.faiss_index, opened.params, store, opened.present, disk=opened.disk)

    def save(self, folder: Path) -> None:
        """Write the index and its JSON to `folder` atomically (`files.save`)."""
        files.save(self, folder)

    # ---- contents

    def add(self, ids: np.ndarray) -> None:
        """Add the stored vectors of `ids`; an id already in the index is replaced by its stored vector.

        On an on-disk index they go to the in-RAM twin until the next `save` (the .ivfdata never changes).
        """
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return
        self.remove(ids[self._contains(ids)])
        target = self.faiss_index if self.disk is None else self.disk.twin_for_adding(self.faiss_index)
        with faiss_threads(available_cores()):
            for chunk_ids, vectors in self.store.iter_chunks(ids, memory.read_rows(self.buffer_bytes,
                                                                                   self.params.dim)):
                target.add_with_ids(vectors, chunk_ids)
        self._present = grown(self._present, int(ids[-1]) + 1)
        self._present[ids] = True
        if self.disk is not None:
            self.disk.added(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove `ids` from the index (ids not in it are ignored); on disk, they are hidden until `save`."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[self._contains(ids)]
        if len(ids) == 0:
            return
        if self.disk is None:
            self.faiss_index.remove_ids(faiss().IDSelectorBatch(ids))
        else:
            self.disk.remove(ids)
        self._present[ids] = False

    def ids(self) -> np.ndarray:
        """The ids currently in the index, sorted."""
        return np.flatnonzero(self._present).astype(np.int64)

    @property
    def ntotal(self) -> int:
        if self.disk is None:
            return int(self.faiss_index.ntotal)
        return int(self.faiss_index.ntotal) - self.disk.hidden_count + self.disk.twin_count

    @property
    def on_disk(self) -> bool:
        """True when the inverted lists live in an .ivfdata file rather than in RAM."""
        return self.disk is not None

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        return lookup(self._present, ids)

    # ---- searching

    def search(self, queries: np.ndarray, k: int, *, kind: str = "image", allowed_ids: np.ndarray | None = None,
               nprobe: int | None = None, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (exact cosine scores, ids) per query, best first, padded with (-inf, -1).

        `kind` ("image", "text" or "combined") picks the tuned parameters; `nprobe`/`rerank` override them.
        `allowed_ids` (sorted) restricts the results to those ids, returning the exact top-k of that subset.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        queries = as_queries(queries, self.store.dim)
        chosen = self.params.for_query(kind, nprobe, rerank)
        with faiss_threads(search_threads(len(queries))):
            if allowed_ids is None:
                return self._search_all(queries, k, chosen)
            return self._search_subset(queries, k, chosen, np.asarray(allowed_ids, dtype=np.int64))

    def candidates(self, queries: np.ndarray, depth: int, nprobe: int,
                   allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The IVF's `depth` best (PQ scores, ids) per query, only among `allowed` ids when given (sorted).

        On disk with changes held in memory, the file's entries that were removed are left out and the twin's
        candidates are merged in by PQ score: the answer one index holding both would give.
        """
        if depth < 1 or self.ntotal == 0:
            return empty_result(len(queries), max(depth, 1))
        if self.disk is None:
            return ivf_search(self.faiss_index, queries, depth, nprobe, optional_selector(allowed))
        found = ivf_search(self.faiss_index, queries, depth, nprobe, self.disk.file_selector(allowed))
        if not self.disk.twin_count:
            return found
        added = ivf_search(self.disk.twin, queries, depth, nprobe, optional_selector(allowed))
        return merge_by_score(found, added, depth)

    def _search_all(self, queries: np.ndarray, k: int, chosen: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        if self.params.kind == "flat":
            return flat_search(self.faiss_index, queries, k, None)
        depth = min(k * chosen.rerank, self.ntotal)
        _, candidates = self.candidates(queries, depth, chosen.nprobe, None)
        return top_k_by_score(candidate_scores(queries, candidates, self.store), candidates, k)

    def _search_subset(self, queries: np.ndarray, k: int, chosen: QueryParams,
                       allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(allowed) > 1 and np.any(np.diff(allowed) <= 0):
            allowed = np.unique(allowed)  # callers should pass sorted ids; this keeps wrong input correct
        allowed = allowed[self._contains(allowed)]  # only ids in the index can be answers
        if len(allowed) <= self.params.exact_subset_max:
            return exact_search(queries, k, self.store, allowed)
        if self.params.kind == "flat":
            return flat_search(self.faiss_index, queries, k, bitmap_selector(allowed))
        base, rerank = chosen.for_filter(len(allowed) / max(self.ntotal, 1))
        nprobe = filtered_nprobe(base, len(allowed), self.ntotal, self.params.nlist)
        depth = min(k * rerank, len(allowed))
        _, candidates = self.candidates(queries, depth, nprobe, allowed)
        scores, ids = top_k_by_score(candidate_scores(queries, candidates, self.store), candidates, k)
        return fill_short_rows(scores, ids, queries, min(k, len(allowed)), self.store, allowed)

    # ---- upkeep and reporting

    def needs_rebuild(self, n: int, memory_budget_bytes: int | None = None,
                      policy: IndexPolicy = DEFAULT_POLICY) -> bool:
        """True when the library at `n` vectors calls for a new build (`policy.needs_rebuild`): what the index
        would hold in RAM is all of it in RAM, the vectors added until the next save on disk."""
        held = n if self.disk is None else max(n - self.ntotal, 0)
        return needs_rebuild(self.params, n, held, memory_budget_bytes, policy)

    def limit_memory(self, memory_budget_bytes: int) -> None:
        """Size the reads of later `add` calls to a memory budget (a build sizes its own)."""
        self.buffer_bytes = memory.buffer_bytes(memory_budget_bytes, self.params.dim)

    def discard(self) -> None:
        """Delete the files of an index that will not be used (a build that was replaced by another)."""
        if self.disk is not None:
            self.disk.discard()

    def describe(self) -> dict[str, Any]:
        """A summary for `clipsearch stats`."""
        per_kind = {kind: {"nprobe": q.nprobe, "rerank": q.rerank, "recall_at_10": q.recall_at_10,
                           "filtered": [asdict(band) for band in q.filtered],
                           "tuned_on": f"{q.queries} {q.source}".strip()} for kind, q in self.params.query.items()}
        return {"kind": self.params.kind, "factory": self.params.factory, "nlist": self.params.nlist,
                "m": self.params.m, "nbits": self.params.nbits, "ntotal": self.ntotal,
                "trained_size": self.params.train_size, "trained_on": self.params.trained_on,
                "bytes_per_vector": self.params.plan().bytes_per_vector(self.params.dim),
                "exact_subset_max": self.params.exact_subset_max, "on_disk": self.on_disk,
                "ivfdata_file": self.disk.ivfdata.name if self.disk is not None else None,
                "ivfdata_bytes": self.ivfdata_bytes(), "queries": per_kind}

    def serialized_bytes(self) -> int:
        """Size of the FAISS file as saved: the whole index in RAM (codes, ids, centroids, codebooks), or, for an
        on-disk index, all but its lists (see `ivfdata_bytes`)."""
        return int(faiss().serialize_index(self.faiss_index).nbytes)

    def ivfdata_bytes(self) -> int:
        """Size of the .ivfdata file holding an on-disk index's lists (0 when they are in RAM)."""
        if self.disk is None:
            return 0
        try:
            return self.disk.ivfdata.stat().st_size
        except OSError:
            return ondisk.mapped_bytes(self.faiss_index)
