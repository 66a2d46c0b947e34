"""The clipsearch search page. Started by `clipsearch ui`, which sets $CLIPSEARCH_LIBRARY, $CLIPSEARCH_MODEL,
$CLIPSEARCH_PRETRAINED and $CLIPSEARCH_MAX_UPLOAD_MB.

The page holds no search logic: every result comes from `clipsearch.Searcher`, and every image shown is found by
its id in the library (`Searcher.get` or a search result), never by a path taken from the browser. Uploads stay
in memory (Streamlit keeps them there); the bytes go straight to the searcher, which decodes them with the same
guarded Pillow code as indexing.

Streamlit reruns this whole script on every interaction, so the results of a search are kept in
`st.session_state` and only fetched again when the search itself changes (or "Load more" asks for the next page).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import astuple, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import streamlit as st

from clipsearch.errors import ClipsearchError, LibraryError, ModelError
from clipsearch.library import default_library_path
from clipsearch.searcher import Result, Searcher
from clipsearch.thumbs import thumbnail_path

log = logging.getLogger("clipsearch.ui")

DEFAULT_MAX_UPLOAD_MB = 20
GRID_COLUMNS = 5
PREVIEW_SIZE = 1024
ALL_FOLDERS = "All folders"
ANY_CAMERA = "Any camera"
INDEX_HINT = "Index your photos first: `clipsearch index ~/Pictures` (add `--library {path}` for this library)."


# --- what the person asked for ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The sidebar's choices, passed as they are to `Searcher.query` / `Searcher.similar`."""

    folder: str | None = None
    after: str | None = None
    before: str | None = None
    camera: str | None = None
    formats: tuple[str, ...] = ()
    min_score: float | None = None
    per_page: int = 20

    def query_arguments(self) -> dict[str, Any]:
        return {"folder": self.folder, "after": self.after, "before": self.before, "camera": self.camera,
                "formats": self.formats, "min_score": self.min_score}


@dataclass(frozen=True)
class Search:
    """One search: text and/or uploaded image, or "more like this" for an indexed photo, with its filters."""

    text: str
    image: bytes | None
    similar_to: int | None
    filters: Filters

    @property
    def signature(self) -> tuple[Any, ...]:
        """Equal for the same search, so results already shown are kept across reruns. Plain values only:
        Streamlit re-executes this module on every rerun, and instances of the old classes never compare equal."""
        digest = hashlib.blake2b(self.image).hexdigest() if self.image else None
        return (self.text, digest, self.similar_to, astuple(self.filters))


# --- settings from the environment (set by `clipsearch ui`) -------------------------------------------------


def library_location() -> str:
    return str(default_library_path())


def max_upload_mb() -> int:
    try:
        value = int(os.environ.get("CLIPSEARCH_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB))
    except ValueError:
        return DEFAULT_MAX_UPLOAD_MB
    return value if value > 0 else DEFAULT_MAX_UPLOAD_MB


def upload_types() -> list[str]:
    types = ["jpg", "jpeg", "png", "webp"]
    if importlib.util.find_spec("pillow_heif") is not None:  # the optional `heif` extra decodes iPhone photos
        types += ["heic", "heif", "hif", "avif"]
    return types


# --- the searcher ---------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def open_searcher(library: str, model: str | None, pretrained: str | None) -> Searcher:
    """One Searcher per library for all sessions: its model and index load once. A failure is not cached, so
    the page works as soon as the library has been indexed."""
    return Searcher(library, model=model, pretrained=pretrained)


def searcher_or_explain() -> Searcher | None:
    location = library_location()
    try:
        return open_searcher(location, os.environ.get("CLIPSEARCH_MODEL") or None,
                             os.environ.get("CLIPSEARCH_PRETRAINED") or None)
    except LibraryError as problem:
        st.info(f"No photos to search yet. {problem}")
    except ClipsearchError as problem:
        st.warning(str(problem))
    return None


def show_status_line(searcher: Searcher) -> int:
    """The library size, model and index kind under the title; returns how many photos are indexed."""
    try:
        stats = searcher.stats()
    except ClipsearchError as problem:
        st.warning(str(problem))
        return 0
    unreadable = f" · {stats['errors']:,} files could not be read" if stats["errors"] else ""
    st.caption(f"{stats['indexed']:,} photos indexed · model {stats['model']} · "
               f"{stats['index_kind'] or 'no'} index{unreadable}")
    return int(stats["indexed"])


# --- sidebar filters ------------------------------------------------------------------------------------------


def sidebar_filters(searcher: Searcher) -> Filters:
    facets = searcher.facets()
    with st.sidebar:
        st.header("Filters")
        folder = folder_filter(facets["roots"], searcher.library.store.distinct("folder"))
        after, before = date_filter(facets["taken_from"], facets["taken_to"])
        camera = camera_filter(facets["cameras"])
        formats = st.multiselect("File format", facets["formats"], key="formats", placeholder="Any format")
        per_page = st.slider("Number of results", 5, 100, 20, step=5, key="per_page")
        min_score = st.slider("Minimum score", 0.0, 1.0, 0.0, step=0.01, key="min_score",
                              help="Cosine similarity; 0 shows everything.")
    return Filters(folder, after, before, camera, tuple(formats), min_score or None, per_page)


def folder_filter(roots: list[str], folders: list[str]) -> str | None:
    choice = st.selectbox("Folder", [ALL_FOLDERS, *folder_choices(roots, folders)], key="folder",
                          accept_new_options=True, help="Pick an indexed folder or type a path inside one.")
    if not choice or choice == ALL_FOLDERS:
        return None
    folder = folder_under_roots(choice, roots)
    if folder is None:
        st.warning(f"{choice} is not inside an indexed folder, so the folder filter is off.")
    return folder


def folder_choices(roots: list[str], folders: list[str]) -> list[str]:
    """The indexed roots and every folder below them that holds photos (and the folders between)."""
    choices = set(roots)
    for folder in folders:
        path = Path(folder)
        root = next((Path(r) for r in roots if path.is_relative_to(r)), None)
        while root is not None and path != root:
            choices.add(str(path))
            path = path.parent
    return sorted(choices)


def folder_under_roots(text: str, roots: list[str]) -> str | None:
    """The folder as an absolute path when it lies under an indexed root, else None (typed paths are checked)."""
    folder = Path(text.strip()).expanduser().resolve()
    return str(folder) if any(folder.is_relative_to(Path(root).resolve()) for root in roots) else None


def date_filter(taken_from: str | None, taken_to: str | None) -> tuple[str | None, str | None]:
    if not taken_from or not taken_to:
        st.caption("Date taken: no photo here records one.")
        return None, None
    low, high = date.fromisoformat(taken_from[:10]), date.fromisoformat(taken_to[:10])
    # An empty tuple starts the range picker with nothing chosen; Streamlit accepts it though its hints do not.
    chosen = st.date_input("Date taken", value=(), min_value=low,  # type: ignore[arg-type]
                           max_value=high, key="taken")
    days = list(chosen) if isinstance(chosen, tuple | list) else [chosen] if chosen else []
    after = days[0].isoformat() if days else None
    before = days[1].isoformat() if len(days) > 1 else None  # the searcher includes the whole end day
    return after, before


def camera_filter(cameras: list[str]) -> str | None:
    if not cameras:
        return None
    choice = st.selectbox("Camera", [ANY_CAMERA, *cameras], key="camera")
    return None if choice == ANY_CAMERA else choice


# --- the search controls -------------------------------------------------------------------------------------


def forget_similar() -> None:
    """A new text or image query replaces "more like this"."""
    st.session_state["similar_to"] = None


def start_similar(image_id: int) -> None:
    st.session_state["similar_to"] = image_id


def ask_for_more() -> None:
    st.session_state["load_more"] = True


def search_controls(filters: Filters) -> Search | None:
    """The search box and the upload; None when there is nothing to search for yet."""
    text = st.text_input("Search", key="query", placeholder="a red car in the rain", on_change=forget_similar,
                         help="Describe the photo and press Enter. `beach -dog`, `2:sunset beach` work too.")
    limit_mb = max_upload_mb()
    upload = st.file_uploader("…or find photos like this one (you can combine it with text)", type=upload_types(),
                              key="upload", on_change=forget_similar, max_upload_size=limit_mb)
    image = upload_bytes(upload, limit_mb)
    similar_to = st.session_state.get("similar_to")
    if similar_to is not None:
        return Search("", None, similar_to, filters)
    if not (text or "").strip() and image is None:
        return None
    return Search((text or "").strip(), image, None, filters)


def upload_bytes(upload: Any, limit_mb: int) -> bytes | None:
    """The uploaded file's bytes, or None (with a message) when there is none or it is over the size limit."""
    if upload is None:
        return None
    if upload.size > limit_mb * 1024 * 1024:
        st.warning(f"{upload.name} is larger than the {limit_mb} MB upload limit; choose a smaller image "
                   "(or start `clipsearch ui` with a higher --max-upload-mb).")
        return None
    return bytes(upload.getvalue())


def show_similar_banner(searcher: Searcher, image_id: int) -> None:
    source = searcher.get(image_id)
    name = source.name if source else f"photo #{image_id}"
    left, right = st.columns([4, 1])
    left.markdown(f"Photos like **{name}**")
    right.button("Back to search", on_click=forget_similar, key="leave-similar")


# --- results ------------------------------------------------------------------------------------------------


def fetch_page(searcher: Searcher, search: Search, offset: int) -> list[Result]:
    options = {"k": search.filters.per_page, "offset": offset, **search.filters.query_arguments()}
    if search.similar_to is not None:
        return searcher.similar(search.similar_to, **options)
    return searcher.query(search.text or None, image=search.image, **options)


def current_results(searcher: Searcher, search: Search) -> list[Result] | None:
    """The results to show: kept from earlier reruns of the same search, one more page after "Load more"."""
    state = st.session_state
    wants_more = state.pop("load_more", False)
    try:
        if state.get("signature") != search.signature:
            state["signature"], state["results"] = None, []  # a failed search must not show old results
            add_page(state, fetch_page(searcher, search, 0), search)
        elif wants_more and not state.get("exhausted"):
            add_page(state, fetch_page(searcher, search, len(state["results"])), search)
    except ClipsearchError as problem:
        explain_failed_search(problem)
        return None
    return list(state["results"])


def add_page(state: Any, page: list[Result], search: Search) -> None:
    state["results"] = [*state.get("results", []), *page]
    state["exhausted"] = len(page) < search.filters.per_page
    state["signature"] = search.signature


def explain_failed_search(problem: ClipsearchError) -> None:
    if isinstance(problem, ModelError):
        st.warning(f"The search model is not available, so text and image queries cannot run. {problem}")
    else:
        st.warning(str(problem))


def show_results(searcher: Searcher, results: list[Result]) -> None:
    if not results:
        st.info("No photos match. Try other words, fewer filters or a lower minimum score.")
        return
    thumbnails = [thumbnail_path(searcher.library, result.to_dict()) for result in results]
    missing = sum(thumb is None for thumb in thumbnails)
    if missing:
        st.warning(f"{missing} of these photos can no longer be read (deleted or moved since indexing); "
                   "run `clipsearch index` on their folder to bring the library up to date.")
    st.caption(f"{len(results)} photos, best first")
    show_grid(searcher, results, thumbnails)
    if not st.session_state.get("exhausted"):
        st.button("Load more", on_click=ask_for_more, key="load-more")


def show_grid(searcher: Searcher, results: list[Result], thumbnails: list[Path | None]) -> None:
    for start in range(0, len(results), GRID_COLUMNS):
        columns = st.columns(GRID_COLUMNS)
        for column, result, thumb in zip(columns, results[start:start + GRID_COLUMNS],
                                         thumbnails[start:start + GRID_COLUMNS], strict=False):
            with column:
                show_card(searcher, result, thumb)


def show_card(searcher: Searcher, result: Result, thumb: Path | None) -> None:
    if thumb is not None:
        st.image(str(thumb), width="stretch")
    else:
        st.markdown(f"🚫 *{result.name} is missing*")
    st.caption(card_caption(result))
    if st.button("Details", key=f"details-{result.id}"):
        show_details(searcher, result.id, result.score)
    st.button("More like this", key=f"similar-{result.id}", on_click=start_similar, args=(result.id,))


def card_caption(result: Result) -> str:
    kinds = ", ".join(Path(other).suffix.lstrip(".").upper() for other in result.other_paths)
    also = f" + {kinds}" if kinds else ""  # the same shot's RAW (or JPEG) file
    return f"**{result.name}**{also} · {result.score:.3f}  \n{taken_text(result.taken_at)}  \n{result.folder}"


def taken_text(taken_at: str | None, offset: str | None = None) -> str:
    """The photographer's local time, with its UTC offset when the file records one."""
    if not taken_at:
        return "date unknown"
    return taken_at[:16].replace("T", " ") + (f" (UTC{offset})" if offset and len(taken_at) > 10 else "")


# --- details of one photo ------------------------------------------------------------------------------------


@st.dialog("Photo", width="large")
def show_details(searcher: Searcher, image_id: int, score: float) -> None:
    result = searcher.get(image_id)  # looked up again: the page only ever shows files the library knows
    if result is None:
        st.warning("This photo is no longer in the library.")
        return
    preview = thumbnail_path(searcher.library, result.to_dict(), size=PREVIEW_SIZE)
    if preview is None:
        st.warning(f"{result.path} can no longer be read; it was deleted or moved since it was indexed.")
    else:
        st.image(str(preview), width="stretch")
    st.markdown(f"`{result.path}`")
    for other in result.other_paths:  # the same shot's other files: a RAW beside its JPEG
        st.markdown(f"also `{other}`")
    st.markdown(details_text(result, score))
    if st.button("More like this", key=f"dialog-similar-{image_id}"):
        start_similar(image_id)
        st.rerun()


def details_text(result: Result, score: float) -> str:
    taken = taken_text(result.taken_at, result.taken_at_offset)
    source = f", from {result.taken_at_source}" if result.taken_at_source else ""
    lines = [f"**Score** {score:.3f}", f"**Date taken** {taken}{source}"]
    if result.width and result.height:
        lines.append(f"**Size** {result.width} × {result.height} px, {result.format or 'unknown format'}"
                     + (f", {result.size / 1e6:.1f} MB" if result.size else ""))
    camera = " ".join(part for part in (result.camera_make, result.camera_model) if part)
    if camera:
        lines.append(f"**Camera** {camera}")
    if result.lens:
        lines.append(f"**Lens** {result.lens}")
    if result.gps_lat is not None and result.gps_lon is not None:
        lines.append(f"**Location** {result.gps_lat:.5f}, {result.gps_lon:.5f}")
    return "  \n".join(lines)


# --- the page -------------------------------------------------------------------------------------------------


def search_page() -> None:
    st.title("clipsearch")
    searcher = searcher_or_explain()
    if searcher is None:
        return
    if show_status_line(searcher) == 0:
        st.info(f"This library has no photos yet. {INDEX_HINT.format(path=searcher.library.path)}")
        return
    search = search_controls(sidebar_filters(searcher))
    if search is None:
        st.info("Type what you are looking for and press Enter, or upload a photo to find similar ones.")
        return
    if search.similar_to is not None:
        show_similar_banner(searcher, search.similar_to)
    results = current_results(searcher, search)
    if results is not None:
        show_results(searcher, results)


def main() -> None:
    st.set_page_config(page_title="clipsearch", page_icon="🔎", layout="wide")
    try:
        search_page()
    except Exception as problem:  # a bug must still read as one sentence on the page; details go to the log
        log.exception("The search page failed")
        st.error(f"Something went wrong: {type(problem).__name__}: {problem}. The server log has the details.")


if __name__ == "__main__":  # `streamlit run` runs this file as __main__; importing it (tests) shows nothing
    main()
