"""Keeping the FAISS index in step with SQLite.

SQLite is the truth and the index a cache. Whoever opens the index compares its ids with the committed ids: it
adds what is missing (from the stored vectors, never re-encoding) and removes what was deleted. A reader does
this in memory; the writer also saves the result (atomically) so the next reader starts in step.

The writer's builds follow a memory budget (`memory_budget_bytes`, else ``$CLIPSEARCH_INDEX_MEMORY``, else half
the machine's memory: `clipsearch.index.budget`); an index that does not fit is built on disk, in shards, beside
the saved one in the library's index folder (`clipsearch.index.build`; docs/index.md, "The memory budget").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipsearch.errors import IndexFileError, ModelError
from clipsearch.index import (
    DEFAULT_POLICY,
    BuildJob,
    IndexPolicy,
    VectorIndex,
    builtin_captions,
    choose_index,
    flat_plan,
    resolve_memory_budget,
)
from clipsearch.library import Library
from clipsearch.vectors import VectorStore

Progress = Callable[[str], None]


def index_stamp(library: Library) -> tuple[int, int, int] | None:
    """Identifies the saved index file (it is replaced by rename, so the inode changes on every save)."""
    for path in sorted(library.index_dir.glob("*.faiss")):
        stat = path.stat()
        return stat.st_ino, stat.st_mtime_ns, stat.st_size
    return None


def load_synced_index(library: Library, previous: VectorIndex | None, reload: bool = True) -> VectorIndex | None:
    """The saved index (or ``previous``), brought in step with SQLite in memory; built in memory if absent."""
    ids = library.store.all_ids()
    if len(ids) == 0:
        return None
    index = previous if previous is not None and not reload else _load_or_none(library)
    if index is None:
        return _interim_index(library.vectors(), ids)
    sync_index(index, ids)
    return index


def _interim_index(vectors: VectorStore, ids: np.ndarray) -> VectorIndex:
    """What a reader searches when no index is saved yet (the writer's first run is still encoding, or the
    index was deleted): an exact flat index, which is ready in seconds, where training and tuning IVF-PQ would
    keep the first query waiting for minutes at 10^6 photos. The writer saves the tuned index at the end of its
    run, and the reader's next query picks it up. Past the memory budget the reader builds as the writer would."""
    fits = len(ids) * vectors.dim * 4 <= resolve_memory_budget()
    return BuildJob(vectors, ids, plan=flat_plan() if fits else None).run()


def sync_index(index: VectorIndex, ids: np.ndarray) -> bool:
    """Add committed ids the index lacks, remove ids no longer committed; True when anything changed."""
    present = index.ids()
    missing = np.setdiff1d(ids, present, assume_unique=True)
    extra = np.setdiff1d(present, ids, assume_unique=True)
    if len(extra):
        index.remove(extra)
    if len(missing):
        index.add(missing)
    return bool(len(missing) or len(extra))


def refresh_index(
    library: Library,
    text_encoder: Callable[[list[str]], np.ndarray] | None = None,
    *,
    rebuild: bool = False,
    progress: Progress | None = None,
    memory_budget_bytes: int | None = None,
    policy: IndexPolicy = DEFAULT_POLICY,
) -> VectorIndex | None:
    """Writer side: bring the saved index in step with SQLite, rebuilding it when the library outgrew it or
    it would no longer fit the memory budget (`memory_budget_bytes`, default as in `resolve_memory_budget`)."""
    budget = resolve_memory_budget(memory_budget_bytes)
    ids = library.store.all_ids()
    index = None if rebuild else _load_or_none(library)
    if len(ids) == 0 and index is None:
        return None
    if index is None or index.needs_rebuild(len(ids), budget, policy):
        index = build_index(library, ids, text_encoder, progress, memory_budget_bytes=budget, policy=policy)
    else:
        index.limit_memory(budget)
        if not sync_index(index, ids):
            return index
    save_index(library, index)
    return index


def save_index(library: Library, index: VectorIndex) -> None:
    """Save atomically; on failure (a full disk) the previous index file is untouched and still used."""
    try:
        index.save(library.index_dir)
    except OSError as exc:
        raise IndexFileError(
            f"Could not save the index ({exc.strerror or exc}); the previous index is still in place, "
            "free some disk space and run `clipsearch reindex`."
        ) from exc


def build_index(
    library: Library,
    ids: np.ndarray,
    text_encoder: Callable[[list[str]], np.ndarray] | None,
    progress: Progress | None = None,
    *,
    memory_budget_bytes: int | None = None,
    policy: IndexPolicy = DEFAULT_POLICY,
) -> VectorIndex:
    """Build a fresh index from the stored vectors, with text-like tuning queries when the index is approximate.

    An index over the memory budget is built on disk: its .ivfdata goes to the library's index folder under a
    fresh name, so the saved index (which a reader may be using) is untouched until `save_index` swaps it.
    """
    vectors = library.vectors()
    budget = resolve_memory_budget(memory_budget_bytes)
    plan = choose_index(len(ids), vectors.dim, budget, policy)
    text_queries = None
    if plan.kind != "flat" and text_encoder is not None:
        text_queries = _caption_embeddings(text_encoder, progress)
    return BuildJob(vectors, ids, text_queries=text_queries, plan=plan, progress=progress,
                    memory_budget_bytes=budget, folder=library.index_dir, policy=policy).run()


def _caption_embeddings(text_encoder: Callable[[list[str]], np.ndarray],
                        progress: Progress | None) -> np.ndarray | None:
    """The built-in captions through the library's text encoder; None (synthetic text-like queries are used for
    tuning instead) when the model cannot be loaded, so an index can always be rebuilt without the weights."""
    try:
        return text_encoder(builtin_captions())
    except ModelError as error:
        if progress:
            progress(f"tuning with synthetic text-like queries: {error}")
        return None


def _load_or_none(library: Library) -> VectorIndex | None:
    """The saved index, or None when there is none or it cannot be read (it is rebuilt from vectors)."""
    if library.dim() is None:  # nothing was ever encoded, so no index can have been built
        return None
    try:
        return VectorIndex.load(library.index_dir, library.vectors())
    except IndexFileError:
        return None
