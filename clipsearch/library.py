"""The library folder: where it is, what is inside, which model it belongs to, and the one-writer lock.

    LIBRARY/
      library.db     SQLite (WAL): images, errors, roots, settings — the source of truth
      vectors.f32    exact embeddings, row = image id (vectors.py)
      index/         the FAISS index and its parameters: a cache, rebuilt from vectors.f32 when missing
      thumbs/        thumbnails for the UI
      writer.lock    held by the one process that writes (an OS file lock, through filelock)
      writer.pid     the pid of the last process that took it, so others can say who writes and see it dying
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy.exc

from clipsearch.errors import LibraryError, LibraryLockedError, ModelMismatchError, StoreWriteError
from clipsearch.model import ModelSpec
from clipsearch.store import SCHEMA_VERSION, Store
from clipsearch.vectors import VectorStore

if TYPE_CHECKING:
    import filelock

LIBRARY_ENV = "CLIPSEARCH_LIBRARY"
DB_NAME = "library.db"
# How long a run waits for a writer that is already dying (killed, or gone with its lock not yet released).
# Such a writer can no longer write, so waiting is safe; the kernel frees its lock only once its last thread
# has exited, and under load its nice-19 decoding threads can take 10 s and more to be scheduled to die.
# The wait ends the moment the lock is free; the limit only matters when an exit hangs (a dead network disk).
DYING_WRITER_WAIT = 90.0
_POLL_SECONDS = 0.05


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

    @property
    def pid_path(self) -> Path:
        return self.path / "writer.pid"

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
        """Hold the one-writer lock; wait up to ``wait`` seconds for a live writer, and (longer, see
        ``DYING_WRITER_WAIT``) for one that is exiting. The operating system drops the lock if we die."""
        import filelock

        lock = filelock.FileLock(str(self.lock_path))
        _acquire(lock, wait, self)
        try:
            _record_pid(self.pid_path)
            yield
        finally:
            lock.release()

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


def _acquire(lock: filelock.BaseFileLock, wait: float, library: Library) -> None:
    import filelock

    started = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=0)
            return
        except filelock.Timeout:
            pass
        holder = _read_pid(library.pid_path)
        waited = time.monotonic() - started
        exiting = holder is not None and writer_is_exiting(holder)
        if waited >= (max(wait, DYING_WRITER_WAIT) if exiting else wait):
            raise LibraryLockedError(_locked_message(holder, exiting, library.path)) from None
        time.sleep(_POLL_SECONDS)


def _locked_message(holder: int | None, exiting: bool, folder: Path) -> str:
    who = f"Another clipsearch process (pid {holder})" if holder else "Another clipsearch process"
    if exiting:
        return (f"{who} was writing to the library at {folder} and is still exiting after {DYING_WRITER_WAIT:.0f} s; "
                "wait for it to end, or pass --wait SECONDS to wait longer.")
    return (f"{who} is writing to the library at {folder}; wait for it to finish, or pass --wait SECONDS to wait "
            "for it.")


def _record_pid(path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(str(os.getpid()))
    os.replace(temporary, path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def writer_is_exiting(pid: int) -> bool:
    """True when process ``pid`` is gone or on its way out: killed (SIGKILL pending), or a zombie whose other
    threads are still being torn down. Such a writer can never write again, so it is safe to wait for its lock.

    Known only where the system says (Linux's /proc; elsewhere: gone or not). On Windows a lock is freed as the
    process ends, so there is nothing to wait for."""
    if pid == os.getpid() or sys.platform == "win32":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process, alive
        pass
    return _proc_says_exiting(pid)


_SIGKILL_BIT = 1 << 8  # signal 9, in /proc's pending-signal masks


def _proc_says_exiting(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip()[:1] in ("Z", "X"):
        return True
    pending = (fields.get(name, "0").strip() for name in ("SigPnd", "ShdPnd"))
    return any(int(mask or "0", 16) & _SIGKILL_BIT for mask in pending)
