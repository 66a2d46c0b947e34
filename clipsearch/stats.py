"""What `clipsearch stats` reports about a library."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipsearch.library import Library

if TYPE_CHECKING:
    from clipsearch.index import VectorIndex


def library_stats(library: Library, index: VectorIndex | None) -> dict[str, Any]:
    """Counts, errors with their reasons, formats, model and index facts."""
    store = library.store
    spec = library.model_spec()
    failures = store.errors()
    return {
        "library": str(library.path),
        "indexed": store.count_images(),
        "errors": len(failures),
        "error_list": failures,
        "by_format": store.count_by("format"),
        "roots": store.roots(),
        "model": str(spec) if spec else None,
        "model_spec": spec.to_dict() if spec else None,
        "dim": library.dim(),
        "index": index.describe() if index is not None else None,
        "index_kind": index.params.kind if index is not None else None,
        "schema_version": store.schema_version(),
        "encoder": _encoder_choice(spec),
    }


def _encoder_choice(spec: Any) -> dict[str, Any] | None:
    """The backend and precision this machine's probe chose for the library's model (see
    `clipsearch.inference.probe`), with what it measured; None before the first index run here."""
    if spec is None:
        return None
    from clipsearch.inference import remembered_choice

    try:
        return remembered_choice(spec)
    except OSError:  # the weights file went away: nothing chosen for them here
        return None
