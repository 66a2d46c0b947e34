"""Checking a library for damage, and repairing it without re-encoding anything that is stored.

Checks, cheapest first: SQLite's own integrity check; the recorded model; a finite unit vector for every indexed
row; the index file readable and holding exactly the indexed ids, each found by its own stored vector; files
that vanished from disk. ``repair`` rebuilds the index from the stored vectors, forgets vanished files and rows
whose vectors are unusable (the next `clipsearch index` re-encodes just those), and trims unreferenced vector
rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.errors import IndexFileError
from clipsearch.library import Library

SAMPLE = 200


@dataclass
class Problem:
    kind: str
    message: str
    ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "count": len(self.ids)}


@dataclass
class Checkup:
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [p.to_dict() for p in self.problems], "repaired": self.repaired}


def check(library: Library) -> Checkup:
    """Everything that is wrong with ``library``; nothing is changed."""
    checkup = Checkup()
    for step in (_check_sqlite, _check_model, _check_vectors, _check_index, _check_files):
        checkup.problems += step(library)
        if any(p.kind == "sqlite" for p in checkup.problems):
            break  # nothing else can be trusted
    return checkup


def repair(library: Library, text_encoder: Callable[[list[str]], np.ndarray] | None = None) -> Checkup:
    """Fix what ``check`` finds, then check again; returns the second checkup with what was done.

    ``text_encoder`` (the library's model) tunes a rebuilt approximate index for text queries; without it the
    tuning uses synthetic text-like queries.
    """
    from clipsearch.sync import refresh_index

    found = check(library)
    done: list[str] = []
    with library.writer_lock():
        doomed = sorted({i for p in found.problems if p.kind in ("vector", "missing-file") for i in p.ids})
        if doomed:
            with library.store.transaction() as conn:
                library.store.delete_images(doomed, conn)
            done.append(f"forgot {len(doomed)} images whose files are gone or whose vectors are unusable")
        if _trim_vectors(library):
            done.append("trimmed vector rows that no image points at")
        if library.dim() is not None:
            refresh_index(library, text_encoder, rebuild=True)
            done.append("rebuilt the index from the stored vectors")
    after = check(library)
    after.repaired = done
    return after


def _check_sqlite(library: Library) -> list[Problem]:
    damage = library.store.integrity_problem()
    if damage is None:
        return []
    return [Problem("sqlite", f"SQLite reports damage in library.db: {damage}.")]


def _check_model(library: Library) -> list[Problem]:
    if library.store.count_images() and (library.model_spec() is None or library.dim() is None):
        return [Problem("model", "The library has images but no recorded model or dimension.")]
    return []


def _check_vectors(library: Library) -> list[Problem]:
    ids = library.store.all_ids()
    if len(ids) == 0 or library.dim() is None:
        return []
    vectors = library.vectors()
    readable = ids[ids < vectors.rows]
    bad = [int(i) for i in ids[ids >= vectors.rows]]
    for chunk_ids, chunk in vectors.iter_chunks(readable):
        norms = np.linalg.norm(chunk, axis=1)
        bad += chunk_ids[~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-3)].tolist()
    if not bad:
        return []
    return [Problem("vector", f"{len(bad)} indexed images have a missing or invalid stored vector.", bad)]


def _check_index(library: Library) -> list[Problem]:
    from clipsearch.index import VectorIndex

    ids = library.store.all_ids()
    if library.dim() is None:  # no vectors to check an index against; `_check_model` reports such a library
        return []
    try:
        index = VectorIndex.load(library.index_dir, library.vectors())
    except IndexFileError as exc:
        return [Problem("index", f"The index file cannot be read ({exc}); --repair rebuilds it from vectors.")]
    if index is None:
        return [] if len(ids) == 0 else [Problem("index", "There is no index file; --repair builds it.")]
    return _compare_index(index, library, ids)


def _compare_index(index: Any, library: Library, ids: np.ndarray) -> list[Problem]:
    present = index.ids()
    missing = np.setdiff1d(ids, present)
    extra = np.setdiff1d(present, ids)
    problems = []
    if len(missing):
        problems.append(Problem("index", f"{len(missing)} indexed images are missing from the index."))
    if len(extra):
        problems.append(Problem("index", f"The index holds {len(extra)} ids that are not in the library."))
    if not problems and len(ids) and library.dim() is not None:
        problems += _sample_self_search(index, library, ids)
    return problems


def _sample_self_search(index: Any, library: Library, ids: np.ndarray) -> list[Problem]:
    """Each sampled image, searched by its own stored vector, must come back with a score of 1."""
    sample = np.random.default_rng(0).choice(ids, size=min(SAMPLE, len(ids)), replace=False)
    scores, found = index.search(library.vectors().get(sample), 1, kind="image")
    lost = sample[(scores[:, 0] < 0.999) | (found[:, 0] < 0)]
    if len(lost) == 0:
        return []
    return [Problem("index", f"{len(lost)} of {len(sample)} sampled images are not found by their own vector.")]


def _check_files(library: Library) -> list[Problem]:
    gone = [image_id for image_id, path in library.store.id_paths() if not os.path.exists(path)]
    if not gone:
        return []
    return [Problem("missing-file", f"{len(gone)} indexed files no longer exist on disk.", gone)]


def _trim_vectors(library: Library) -> bool:
    if library.dim() is None:
        return False
    vectors = library.vectors()
    keep = library.store.max_id() + 1
    if vectors.rows <= keep:
        return False
    vectors.truncate(keep)
    return True
