"""The exceptions clipsearch raises.

Every message is one sentence a person can act on; the CLI and the UI print it as it is, never a traceback.

    ClipsearchError
    ├── LibraryError          the library folder is missing, locked, corrupt or from another model
    │   ├── ModelMismatchError
    │   ├── LibraryLockedError
    │   └── StoreWriteError   SQLite could not finish a write (a full disk, an I/O error)
    ├── ModelError            the model spec is unknown or its weights cannot be found
    │   └── BackendError      an inference backend is missing, fails, or is not faithful to the model
    ├── QueryError            a query is empty, malformed, or names an image that cannot be read
    ├── SettingError          a setting (an option or environment variable) has a value that cannot be used
    ├── ClusterError          `index --ray`: Ray is not installed, no cluster answers, or the cluster failed
    └── IndexFileError        the FAISS index file is unreadable (it can always be rebuilt)
"""

from __future__ import annotations


class ClipsearchError(Exception):
    """Base class: anything clipsearch raises on purpose."""


class LibraryError(ClipsearchError):
    """The library folder cannot be used as asked."""


class ModelMismatchError(LibraryError):
    """The library was built with a different model than the one requested."""


class LibraryLockedError(LibraryError):
    """Another process is writing to the library."""


class StoreWriteError(LibraryError):
    """SQLite could not finish a write; the transaction was rolled back. `reason` is SQLite's own words."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelError(ClipsearchError):
    """The model cannot be loaded."""


class BackendError(ModelError):
    """An inference backend or precision cannot be used: its package is missing, it fails on this machine, or its
    vectors are not faithful enough to the model's."""


class QueryError(ClipsearchError):
    """The query cannot be run."""


class SettingError(ClipsearchError):
    """A setting, such as the index memory budget, has a value that cannot be used."""


class ClusterError(ClipsearchError):
    """Indexing on a Ray cluster cannot start or go on; what was written so far is kept."""


class IndexFileError(ClipsearchError):
    """The FAISS index file cannot be read; `clipsearch doctor --repair` rebuilds it from stored vectors."""
