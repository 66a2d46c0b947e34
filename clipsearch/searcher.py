"""``Searcher`` and ``Result``: the one entry point every front end (CLI, UI, scripts) uses to search."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.errors import QueryError
from clipsearch.library import Library
from clipsearch.model import ClipModel, ModelSpec
from clipsearch.query import Term, combine, parse_query
from clipsearch.store import Filters

if TYPE_CHECKING:

    from clipsearch.index import VectorIndex

ImageInput = "str | os.PathLike[str] | bytes | Image.Image"
MAX_K = 10_000


@dataclass(frozen=True)
class Result:
    """One photo found by a query, with its exact cosine score and stored metadata."""

    id: int
    path: str
    score: float
    width: int | None = None
    height: int | None = None
    format: str | None = None
    size: int | None = None
    taken_at: str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None

    @property
    def folder(self) -> str:
        return str(Path(self.path).parent)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Searcher:
    """Search one library by text, image, both, with weights, negatives and metadata filters.

    >>> s = Searcher()                      # the default library ($CLIPSEARCH_LIBRARY or the user data dir)
    >>> s.query("a red car in the rain", k=10)
    """

    def __init__(
        self,
        library: str | os.PathLike[str] | None = None,
        *,
        model: str | None = None,
        pretrained: str | None = None,
        device: str | None = None,
    ) -> None:
        self.library = Library.open(library)
        requested = ModelSpec.parse(model, pretrained) if model else None
        self.spec = self.library.resolve_model(requested)
        self.device = device
        self._model: ClipModel | None = None
        self._index: VectorIndex | None = None
        self._stamp: tuple[Any, Any] = (None, None)

    # --- public API ---------------------------------------------------------------------------------------

    def query(
        self,
        text: str | None = None,
        image: Any = None,
        k: int = 10,
        *,
        image_weight: float = 1.0,
        offset: int = 0,
        min_score: float | None = None,
        folder: str | os.PathLike[str] | None = None,
        after: str | None = None,
        before: str | None = None,
        camera: str | None = None,
        formats: tuple[str, ...] | list[str] = (),
    ) -> list[Result]:
        """The ``k`` best photos for a text and/or image query (``image``: a path, bytes, a PIL image, or a
        list of them), best first, after ``offset`` results, meeting every filter given."""
        _check_k(k, offset)
        vector, kind = self.query_vector(text, image, image_weight=image_weight)
        filters = _make_filters(folder, after, before, camera, formats)
        return self.search_vector(vector, k, kind=kind, offset=offset, min_score=min_score, filters=filters)

    def similar(self, image_id: int, k: int = 10, **filters: Any) -> list[Result]:
        """"More like this": photos nearest to an indexed photo, from its stored vector (nothing re-encoded)."""
        _check_k(k, filters.get("offset", 0))
        vector = self.library.vectors().get(np.asarray([image_id]))[0]
        offset = filters.pop("offset", 0)
        min_score = filters.pop("min_score", None)
        return self.search_vector(
            vector, k, kind="image", offset=offset, min_score=min_score, filters=_make_filters(**filters)
        )

    def query_vector(self, text: str | None = None, image: Any = None, *, image_weight: float = 1.0) -> tuple[
        np.ndarray, str
    ]:
        """The unit query vector for text and/or images, and its kind ("text", "image" or "combined"), which
        picks the index parameters tuned for such queries."""
        terms = parse_query(text) if text and text.strip() else []
        images = _as_list(image)
        if not terms and not images:
            raise QueryError("The query is empty: give some text, an image, or both.")
        vectors, weights = self._embed(terms, images, image_weight)
        kind = "combined" if terms and images else "text" if terms else "image"
        return combine(vectors, weights), kind

    def search_vector(
        self,
        vector: np.ndarray,
        k: int = 10,
        *,
        kind: str = "image",
        offset: int = 0,
        min_score: float | None = None,
        filters: Filters | None = None,
    ) -> list[Result]:
        """Nearest photos to a unit vector in the library's embedding space."""
        allowed = None if filters is None or filters.is_empty() else self.library.store.filter_ids(filters)
        if allowed is not None and len(allowed) == 0:
            return []
        index = self.index()
        if index is None:
            return []
        queries = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        scores, ids = index.search(queries, k + offset, kind=kind, allowed_ids=allowed)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        if min_score is not None:
            found = [(i, s) for i, s in found if s >= min_score]
        return self._results(found[offset:])

    def get(self, image_id: int) -> Result | None:
        """The stored record of one indexed photo (score 1.0), or None."""
        row = self.library.store.images_by_ids([image_id]).get(image_id)
        return _result_from_row(row, 1.0) if row else None

    def facets(self) -> dict[str, Any]:
        """What the filters can choose from: indexed roots, formats, cameras and the date-taken range."""
        store = self.library.store
        first, last = store.taken_range()
        return {
            "roots": store.roots(),
            "formats": store.distinct("format"),
            "cameras": sorted({c for c in store.distinct("camera_model")} | {c for c in store.distinct("camera_make")}),
            "taken_from": first,
            "taken_to": last,
        }

    def stats(self) -> dict[str, Any]:
        """Counts, model and index facts about the library (what `clipsearch stats` prints)."""
        from clipsearch.stats import library_stats

        return library_stats(self.library, self.index())

    @property
    def model(self) -> ClipModel:
        """The CLIP model, loaded on first use (searches by stored vectors never load it)."""
        if self._model is None:
            self._model = ClipModel.load(self.spec, self.device)
        return self._model

    def index(self) -> VectorIndex | None:
        """The library's index, reloaded when the writer swapped in a new one and kept in step with SQLite, so
        photos committed since the index was last saved are found too."""
        from clipsearch.sync import index_stamp, load_synced_index

        stamp = (index_stamp(self.library), self.library.store.change_stamp())
        if self._index is None or stamp != self._stamp:
            self._index = load_synced_index(self.library, self._index, reload=stamp[0] != self._stamp[0])
            self._stamp = stamp
        return self._index

    def close(self) -> None:
        self.library.close()

    # --- helpers ------------------------------------------------------------------------------------------

    def _embed(self, terms: list[Term], images: list[Any], image_weight: float) -> tuple[np.ndarray, list[float]]:
        from clipsearch.decode import open_image_for_query

        parts: list[np.ndarray] = []
        weights: list[float] = []
        if terms:
            parts.append(self.model.encode_texts([t.text for t in terms]))
            weights += [t.weight for t in terms]
        if images:
            min_side = self.model.image_size
            pictures = [open_image_for_query(source, min_side=min_side) for source in images]
            parts.append(self.model.encode_images(pictures))
            weights += [image_weight] * len(pictures)
        return np.concatenate(parts), weights

    def _results(self, found: list[tuple[int, float]]) -> list[Result]:
        rows = self.library.store.images_by_ids([i for i, _ in found])
        # An id can be missing when a file was deleted after the index was loaded: skip it.
        return [_result_from_row(rows[i], s) for i, s in found if i in rows]


def _result_from_row(row: dict[str, Any], score: float) -> Result:
    fields: dict[str, Any] = {name: row.get(name) for name in Result.__dataclass_fields__ if name != "score"}
    return Result(score=score, **fields)


def _as_list(image: Any) -> list[Any]:
    if image is None:
        return []
    if isinstance(image, list | tuple):
        return list(image)
    return [image]


def _check_k(k: int, offset: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise QueryError(f"The number of results must be at least 1, not {k!r}.")
    if k + offset > MAX_K:
        raise QueryError(f"At most {MAX_K} results can be asked for at once; use a smaller -k or offset.")
    if offset < 0:
        raise QueryError(f"The offset must not be negative, not {offset}.")


def _make_filters(
    folder: str | os.PathLike[str] | None = None,
    after: str | None = None,
    before: str | None = None,
    camera: str | None = None,
    formats: tuple[str, ...] | list[str] = (),
) -> Filters:
    from clipsearch.store import parse_when

    for name, value in (("after", after), ("before", before)):
        if value:
            try:
                parse_when(value)
            except ValueError:
                raise QueryError(f"--{name} {value!r} is not a date; use YYYY-MM-DD.") from None
    folder_text = str(Path(folder).expanduser().resolve()) if folder else None
    return Filters(folder_text, after, before, camera, tuple(formats))
