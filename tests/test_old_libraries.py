"""Libraries written by an earlier clipsearch open and search as they did: the on-disk format is kept.

The folders under tests/data/old-libraries/ were written once by clipsearch 0.1.0 (see tests/data/README.md), with
the query vectors they were searched with and the answers they gave. Each test works on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipsearch import Library, Searcher
from clipsearch.store import Filters

OLD = Path(__file__).parent / "data" / "old-libraries"


def old_library(name: str, tmp_path: Path) -> tuple[Path, dict[str, Any], np.ndarray]:
    folder = shutil.copytree(OLD / name, tmp_path / name)
    return folder, json.loads((folder / "expected.json").read_text()), np.load(folder / "queries.npy")


def listing(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


def assert_same_results(found: list[Any], expected: list[dict[str, Any]]) -> None:
    assert [(r.id, r.path) for r in found] == [(e["id"], e["path"]) for e in expected]
    np.testing.assert_allclose([r.score for r in found], [e["score"] for e in expected], rtol=0, atol=1e-5)


def test_an_old_library_of_photos_searches_as_it_did(tmp_path):
    folder, expected, queries = old_library("photos", tmp_path)
    before = listing(folder / "index")
    searcher = Searcher(folder)
    red = Filters(folder="/tmp/clipsearch-old/photos/red")
    for query, text, in_red in zip(queries, expected["text"], expected["red_folder"], strict=True):
        assert_same_results(searcher.search_vector(query, 5, kind="text"), text)
        assert_same_results(searcher.search_vector(query, 5, kind="text", filters=red), in_red)
    for image_id, similar in expected["similar"].items():
        assert_same_results(searcher.similar(int(image_id), k=5), similar)
    index = searcher.index()
    assert index is not None and json.loads(index.params.to_json()) == expected["index"], "the saved index, as saved"
    searcher.close()
    assert listing(folder / "index") == before, "a reader writes nothing"


def test_an_old_on_disk_index_searches_as_it_did_and_takes_new_photos(tmp_path):
    from clipsearch.sync import refresh_index

    folder, expected, queries = old_library("ondisk", tmp_path)
    searcher = Searcher(folder)
    assert searcher.index().on_disk  # type: ignore[union-attr]
    for query, image in zip(queries[:20], expected["image"], strict=True):
        assert_same_results(searcher.search_vector(query, 10, kind="image"), image)
    for query, text, in_folder in zip(queries[20:], expected["text"], expected["folder_3"], strict=True):
        assert_same_results(searcher.search_vector(query, 10, kind="text"), text)
        assert_same_results(searcher.search_vector(query, 10, kind="text", filters=Filters(folder="/photos/3")),
                            in_folder)
    searcher.close()

    library = Library.open(folder)
    added = np.random.default_rng(5).standard_normal((10, 32)).astype(np.float32)
    added /= np.linalg.norm(added, axis=1, keepdims=True)
    with library.store.transaction() as conn:
        ids = library.store.reserve_ids(len(added), conn)
        library.vectors().write(np.array(ids), added)
        library.store.insert_images([{"id": i, "path": f"/new/{i}.jpg", "size": 1, "mtime_ns": 1,
                                      "content_hash": f"new{i}"} for i in ids], conn)
    index = refresh_index(library, memory_budget_bytes=300_000)
    assert index is not None and index.on_disk and index.params.trained_on == 3000, "grown, not rebuilt"
    library.close()
    searcher = Searcher(folder)
    assert [searcher.similar(i, k=1)[0].id for i in ids] == ids
    searcher.close()


@pytest.mark.parametrize("name", ["photos", "ondisk"])
def test_the_old_libraries_are_committed_as_written(name):
    """Nothing may rewrite them (a test that opened the originals instead of a copy would)."""
    index_json = json.loads((OLD / name / "index" / "index.json").read_text())
    assert (OLD / name / "index" / index_json["index_file"]).stat().st_size == index_json["index_bytes"]
    assert not (OLD / name / "writer.lock").exists()
