"""The library folder: where it is, what is inside, which model it belongs to, and the one-writer lock.

    LIBRARY/
      library.db     SQLite (WAL): images, errors, roots, settings — the source of truth
      vectors.f32    exact embeddings, row = image id (vectors.py)
      index/         the FAISS index and its parameters: a cache, rebuilt from vectors.f32 when missing
      thumbs/        thumbnails for the UI
      writer.lock    held (flock) by the one process that writes
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import sqlalchemy.exc

from clipsearch.errors import LibraryError, LibraryLockedError, ModelMismatchError, StoreWriteError
from clipsearch.model import ModelSpec
from clipsearch.store import SCHEMA_VERSION, Store
from clipsearch.vectors import VectorStore

LIBRARY_ENV = "CLIPSEARCH_LIBRARY"
DB_NAME = "library.db"


def default_library_path() -> Path:
    """``$CLIPSEARCH_LIBRARY`` if set, else the platform's user data folder."""
    configured = os.environ.get(LIBRARY_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("clipsearch", appauthor=False))


class Library:
    """An open library folder. Use ``Library.open`` (read or write) or ``Library.create``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = _open_store(path / DB_NAME)
        self._vectors: VectorStore | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Library:
        """Open an existing library; a clear error when there is none."""
        folder = (Path(path).expanduser() if path else default_library_path()).absolute()
        if not (folder / DB_NAME).is_file():
            raise LibraryError(f"There is no clipsearch library at {folder}; run `clipsearch index FOLDER` first.")
        library = cls(folder)
        library._check_schema()
        return library

    @classmethod
    def create(cls, path: str | os.PathLike[str] | None = None) -> Library:
        """Open the library at ``path``, creating the folder and database when needed."""
        folder = (Path(path).expanduser() if path else default_library_path()).absolute()
        if folder.exists() and not folder.is_dir():
            raise LibraryError(f"The library path {folder} is a file, not a folder.")
        folder.mkdir(parents=True, exist_ok=True)
        library = cls(folder)
        if library.store.schema_version() < SCHEMA_VERSION:
            with library.writer_lock(wait=60):  # two first runs at once must not both create the tables
                library.store.migrate()
        return library

    def close(self) -> None:
        self.store.close()

    # --- paths --------------------------------------------------------------------------------------------

    @property
    def vectors_path(self) -> Path:
        return self.path / "vectors.f32"

    @property
    def index_dir(self) -> Path:
        return self.path / "index"

    @property
    def thumbs_dir(self) -> Path:
        return self.path / "thumbs"

    @property
    def lock_path(self) -> Path:
        return self.path / "writer.lock"

    # --- model identity -----------------------------------------------------------------------------------

    def model_spec(self) -> ModelSpec | None:
        data = self.store.get_setting("model")
        return ModelSpec.from_dict(data) if data else None

    def dim(self) -> int | None:
        value = self.store.get_setting("dim")
        return int(value) if value else None

    def resolve_model(self, requested: ModelSpec | None) -> ModelSpec:
        """The model to use: the library's own, unless another was requested (which must match)."""
        stored = self.model_spec()
        if stored is None:
            return requested or ModelSpec.parse(None)
        if requested is not None and requested != stored:
            raise ModelMismatchError(
                f"This library was built with model {stored}, not {requested}; leave out --model to use "
                "the library's model, or choose another --library for a different model."
            )
        return stored

    def bind_model(self, spec: ModelSpec, dim: int) -> None:
        """Record the model on first use; afterwards insist on the same model and dimension."""
        self.resolve_model(spec)
        stored_dim = self.dim()
        if stored_dim is not None and stored_dim != dim:
            raise ModelMismatchError(f"This library holds {stored_dim}-d vectors but the model gives {dim}-d ones.")
        if stored_dim is None:
            self.store.set_setting("model", spec.to_dict())
            self.store.set_setting("dim", dim)

    def vectors(self) -> VectorStore:
        dim = self.dim()
        if dim is None:
            raise LibraryError(f"The library at {self.path} has no images yet; run `clipsearch index FOLDER` first.")
        if self._vectors is None:
            self._vectors = VectorStore(self.vectors_path, dim)
        return self._vectors

    # --- writing -----------------------------------------------------------------------------------------

    def write_batch(self, records: list[dict[str, Any]], vectors: np.ndarray | None,
                    failures: list[dict[str, Any]]) -> list[int]:
        """Commit one batch: image rows with their vectors (a row each, in order), and files that failed.

        The write order that survives a kill at any instant: the vectors are written and fsynced first, then the
        rows pointing at them are committed in one transaction. A kill loses nothing committed and leaves at
        worst vector rows nothing points at, which later writes reuse. Returns the ids given to `records`.
        """
        store = self.store
        try:
            with store.transaction() as conn:
                ids = store.reserve_ids(len(records), conn)
                if records and vectors is not None:
                    self.vectors().write(np.asarray(ids), vectors)
                    store.insert_images([{**r, "id": i} for r, i in zip(records, ids, strict=True)], conn)
                store.record_errors(failures, conn)
        except (OSError, StoreWriteError) as exc:
            reason = exc.reason if isinstance(exc, StoreWriteError) else exc.strerror or str(exc)
            raise LibraryError(
                f"Could not write to the library at {self.path} ({reason}); nothing committed was lost, "
                "free some disk space and run the same command again."
            ) from exc
        return ids

    # --- the writer lock ----------------------------------------------------------------------------------

    @contextmanager
    def writer_lock(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the one-writer lock; wait up to ``wait`` seconds for it. The kernel drops it if we die."""
        with open(self.lock_path, "a+") as handle:
            _acquire(handle, wait, self.path)
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _check_schema(self) -> None:
        version = self.store.schema_version()
        if version == 0:  # the file exists but its first migration has not committed: a writer is creating it
            raise LibraryError(
                f"The library at {self.path} is not set up yet (an index run may be creating it right now); "
                "wait for it, or run `clipsearch index FOLDER`."
            )
        if version > SCHEMA_VERSION:
            raise LibraryError(
                f"The library at {self.path} was written by a newer clipsearch (schema {version}); upgrade clipsearch."
            )
        if version < SCHEMA_VERSION:
            with self.writer_lock(wait=60):  # one migrator at a time; a second finds nothing left to do
                self.store.migrate()


def _open_store(db_path: Path) -> Store:
    store = Store(db_path)
    try:
        store.schema_version()
    except sqlalchemy.exc.DatabaseError as exc:
        raise LibraryError(
            f"{db_path} is not a readable SQLite database (it may be corrupted); move it away and run "
            "`clipsearch index` again to rebuild the library."
        ) from exc
    return store


def _acquire(handle: IO[str], wait: float, folder: Path) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise LibraryLockedError(
                    f"Another clipsearch process (pid {holder}) is writing to the library at {folder}; "
                    "wait for it to finish, or pass --wait SECONDS to wait for it."
                ) from None
            time.sleep(0.2)
