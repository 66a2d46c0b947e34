"""``Searcher`` and ``Result``: the one entry point every front end (CLI, UI, scripts) uses to search."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.errors import QueryError
from clipsearch.library import Library
from clipsearch.model import ModelSpec
from clipsearch.photo import ImageRecord
from clipsearch.query import Term, combine, parse_query
from clipsearch.raw import is_raw_name
from clipsearch.store import Filters

if TYPE_CHECKING:

    from clipsearch.index import VectorIndex
    from clipsearch.inference.encoders import ImageEncoder, TextEncoder

ImageInput = "str | os.PathLike[str] | bytes | Image.Image"
MAX_K = 10_000


@dataclass(frozen=True, kw_only=True)
class Result(ImageRecord):
    """One photo found by a query, with its exact cosine score and stored metadata (`ImageRecord`'s fields).

    A RAW file and the JPEG (or HEIC ...) the camera wrote beside it, with the same name in the same folder, are
    one shot and come back as one result: ``path`` is the file a viewer shows (the JPEG), ``other_paths`` the
    shot's other files. ``separate_raw=True`` on a search keeps them apart.
    """

    id: int
    score: float
    other_paths: tuple[str, ...] = ()

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
        backend: str | None = None,
        precision: str | None = None,
    ) -> None:
        self.library = Library.open(library)
        requested = ModelSpec.parse(model, pretrained) if model else None
        self.spec = self.library.resolve_model(requested)
        self.device = device
        self.backend, self.precision = backend, precision
        self._text_encoder: TextEncoder | None = None
        self._image_encoder: ImageEncoder | None = None
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
        separate_raw: bool = False,
    ) -> list[Result]:
        """The ``k`` best photos for a text and/or image query (``image``: a path, bytes, a PIL image, or a
        list of them), best first, after ``offset`` results, meeting every filter given. A RAW file and its
        JPEG are one result unless ``separate_raw``."""
        _check_k(k, offset)
        vector, kind = self.query_vector(text, image, image_weight=image_weight)
        filters = _make_filters(folder, after, before, camera, formats)
        return self.search_vector(vector, k, kind=kind, offset=offset, min_score=min_score, filters=filters,
                                  separate_raw=separate_raw)

    def similar(self, image_id: int, k: int = 10, **filters: Any) -> list[Result]:
        """"More like this": photos nearest to an indexed photo, from its stored vector (nothing re-encoded)."""
        _check_k(k, filters.get("offset", 0))
        vector = self.library.vectors().get(np.asarray([image_id]))[0]
        offset = filters.pop("offset", 0)
        min_score = filters.pop("min_score", None)
        separate_raw = filters.pop("separate_raw", False)
        return self.search_vector(vector, k, kind="image", offset=offset, min_score=min_score,
                                  filters=_make_filters(**filters), separate_raw=separate_raw)

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
        separate_raw: bool = False,
    ) -> list[Result]:
        """Nearest photos to a unit vector in the library's embedding space (a RAW and its JPEG as one result
        unless ``separate_raw``)."""
        allowed = None if filters is None or filters.is_empty() else self.library.store.filter_ids(filters)
        if allowed is not None and len(allowed) == 0:
            return []
        index = self.index()
        if index is None:
            return []
        wanted, fetch = k + offset, k + offset
        while True:  # shots merge results, so fetch more until there are enough or no more
            found, exhausted = self._nearest(index, vector, fetch, kind, allowed, min_score)
            results = self._results(found)
            results = results if separate_raw else self._one_per_shot(results, filtered=allowed is not None)
            if len(results) >= wanted or exhausted or fetch >= MAX_K * 2:
                return results[offset:wanted]
            fetch *= 2

    def get(self, image_id: int) -> Result | None:
        """The stored record of one indexed photo (score 1.0), with its shot's other files, or None."""
        row = self.library.store.images_by_ids([image_id]).get(image_id)
        return self._one_per_shot([_result_from_row(row, 1.0)], filtered=True)[0] if row else None

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
    def text_encoder(self) -> TextEncoder:
        """The text encoder, loaded on first use: the exported text tower without torch when this machine has the
        model's export cached (`clipsearch.inference`), else torch. Searches by stored vectors never load it."""
        if self._text_encoder is None:
            from clipsearch.inference import load_text_encoder

            self._text_encoder = load_text_encoder(self.spec, backend=self.backend, device=self.device)
        return self._text_encoder

    @property
    def model(self) -> _Encoders:
        """Both encoders behind the calls the torch model used to offer (``encode_texts``, ``encode_images``,
        ``image_size``, ``dim``), each loaded on first use; `text_encoder` and `image_encoder` say which is which."""
        return _Encoders(self)

    @property
    def image_encoder(self) -> ImageEncoder:
        """The image encoder for image queries: the backend this machine's probe chose for the model (or the one
        asked for), else torch."""
        if self._image_encoder is None:
            from clipsearch.inference import load_image_encoder

            self._image_encoder = load_image_encoder(self.spec, backend=self.backend, precision=self.precision,
                                                     device=self.device)
        return self._image_encoder

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
            parts.append(self.text_encoder.encode_texts([t.text for t in terms]))
            weights += [t.weight for t in terms]
        if images:
            min_side = self.image_encoder.image_size
            pictures = [open_image_for_query(source, min_side=min_side) for source in images]
            parts.append(self.image_encoder.encode_images(pictures))
            weights += [image_weight] * len(pictures)
        return np.concatenate(parts), weights

    def _results(self, found: list[tuple[int, float]]) -> list[Result]:
        rows = self.library.store.images_by_ids([i for i, _ in found])
        # An id can be missing when a file was deleted after the index was loaded: skip it.
        return [_result_from_row(rows[i], s) for i, s in found if i in rows]

    def _nearest(self, index: VectorIndex, vector: np.ndarray, n: int, kind: str, allowed: np.ndarray | None,
                 min_score: float | None) -> tuple[list[tuple[int, float]], bool]:
        """(id, score) of the ``n`` nearest, best first, and whether there are no more to find."""
        queries = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        scores, ids = index.search(queries, n, kind=kind, allowed_ids=allowed)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        exhausted = len(found) < n
        if min_score is not None:
            exhausted = exhausted or (bool(found) and found[-1][1] < min_score)
            found = [(i, s) for i, s in found if s >= min_score]
        return found, exhausted

    def _one_per_shot(self, results: list[Result], filtered: bool) -> list[Result]:
        """One result per shot: a RAW file and the files beside it with the same name are shown once, at the
        rank and score of the best of them, as the file a viewer shows (the JPEG; with filters in force, the
        best file that meets them), with the others in ``other_paths``."""
        hits: dict[str, list[Result]] = {}
        for result in results:
            hits.setdefault(_shot_key(result.path), []).append(result)
        merged = []
        shots = self.library.store.shot_paths(list(hits))
        for key, members in hits.items():
            siblings = shots[key]
            if len(siblings) < 2 or not any(is_raw_name(path) for path in siblings):
                merged += members
                continue
            shown = self._shown_member(members, [] if filtered else siblings)
            others = tuple(path for path in siblings if path != shown.path)
            merged.append(replace(shown, score=max(m.score for m in members), other_paths=others))
        return sorted(merged, key=lambda result: -result.score)

    def _shown_member(self, hits: list[Result], siblings: list[str]) -> Result:
        viewable = next((m for m in hits if not is_raw_name(m.path)), None)
        if viewable is not None:
            return viewable
        path = next((p for p in siblings if not is_raw_name(p)), None)
        row = self.library.store.image_by_path(path) if path is not None else None
        return _result_from_row(row, hits[0].score) if row is not None else hits[0]


class _Encoders:
    def __init__(self, searcher: Searcher) -> None:
        self._searcher = searcher

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self._searcher.text_encoder.encode_texts(texts)

    def encode_images(self, images: list[Any]) -> np.ndarray:
        return self._searcher.image_encoder.encode_images(images)

    @property
    def image_size(self) -> int:
        return self._searcher.image_encoder.image_size

    @property
    def dim(self) -> int:
        return self._searcher.text_encoder.dim


def _result_from_row(row: dict[str, Any], score: float) -> Result:
    fields: dict[str, Any] = {name: row.get(name) for name in Result.__dataclass_fields__
                              if name not in ("score", "other_paths")}
    return Result(score=score, **fields)


def _shot_key(path: str) -> str:
    """Files of one shot share their folder and name: "/photos/IMG_0001" for IMG_0001.CR2 and IMG_0001.JPG."""
    return os.path.splitext(path)[0]


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
