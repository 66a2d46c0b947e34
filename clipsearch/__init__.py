"""clipsearch: local semantic image search with CLIP, FAISS and SQLite.

    from clipsearch import Searcher
    for result in Searcher().query("a red car in the rain", k=10):
        print(result.path, result.score)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "ClipsearchError",
    "Filters",
    "Library",
    "LibraryError",
    "ModelError",
    "ModelSpec",
    "QueryError",
    "Result",
    "Searcher",
    "__version__",
    "index_folders",
]

if TYPE_CHECKING:
    from clipsearch.errors import ClipsearchError, LibraryError, ModelError, QueryError
    from clipsearch.indexer.pipeline import index_folders
    from clipsearch.library import Library
    from clipsearch.model import ModelSpec
    from clipsearch.searcher import Result, Searcher
    from clipsearch.store import Filters

_LAZY = {
    "ClipsearchError": "clipsearch.errors",
    "LibraryError": "clipsearch.errors",
    "ModelError": "clipsearch.errors",
    "QueryError": "clipsearch.errors",
    "Filters": "clipsearch.store",
    "Library": "clipsearch.library",
    "ModelSpec": "clipsearch.model",
    "Result": "clipsearch.searcher",
    "Searcher": "clipsearch.searcher",
    "index_folders": "clipsearch.indexer.pipeline",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import clipsearch` (and `clipsearch --help`) never pays for SQLAlchemy, numpy or torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipsearch' has no attribute {name!r}")
