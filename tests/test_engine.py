"""The engine end to end through the Python API: index real files, search them, re-run incrementally."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clipsearch.indexer.pipeline import IndexOptions, index_folders

from clipsearch import Searcher
from clipsearch.errors import ModelMismatchError, QueryError
from clipsearch.library import Library
from clipsearch.model import ModelSpec
from clipsearch.tinyclip import draw_shape


def index(library_dir: Path, roots: list[Path], model: str | None, **options: object):
    library = Library.create(library_dir)
    try:
        spec = ModelSpec.parse(model) if model else None
        return index_folders(library, roots, model=spec, options=IndexOptions(**options))  # type: ignore[arg-type]
    finally:
        library.close()


def names(results) -> list[str]:
    return [Path(r.path).name for r in results]


# --- meaningful results with the trained tiny model ---------------------------------------------------------


def test_text_query_returns_red_circles_first(library_dir, shapes_folder, trained_model):
    index(library_dir, [shapes_folder], trained_model)
    results = Searcher(library_dir).query("a red circle", k=3)
    assert [n.startswith("red-circle") for n in names(results)][:2] == [True, True]
    assert results[0].score >= results[1].score >= results[2].score


def test_image_query_finds_same_shape_and_colour(library_dir, shapes_folder, trained_model, tmp_path):
    index(library_dir, [shapes_folder], trained_model)
    query = tmp_path / "query.png"
    draw_shape("triangle", "blue", size=120, rng=np.random.default_rng(99)).save(query)
    results = Searcher(library_dir).query(image=query, k=2)
    assert all(n.startswith("blue-triangle") for n in names(results))


def test_image_query_accepts_bytes_and_pil(library_dir, shapes_folder, trained_model):
    index(library_dir, [shapes_folder], trained_model)
    picture = draw_shape("square", "green", size=120, rng=np.random.default_rng(5))
    searcher = Searcher(library_dir)
    from io import BytesIO

    buffer = BytesIO()
    picture.save(buffer, format="PNG")
    by_pil = searcher.query(image=picture, k=3)
    by_bytes = searcher.query(image=buffer.getvalue(), k=3)
    assert names(by_pil) == names(by_bytes)
    assert names(by_pil)[0].startswith("green-square")


def test_negative_term_pushes_results_away(library_dir, shapes_folder, trained_model):
    index(library_dir, [shapes_folder], trained_model)
    searcher = Searcher(library_dir)
    plain = searcher.query("a circle", k=18)
    minus_red = searcher.query('a circle -"a red circle"', k=18)
    rank = {n: i for i, n in enumerate(names(minus_red))}
    red_before = np.mean([i for i, n in enumerate(names(plain)) if n.startswith("red-circle")])
    red_after = np.mean([rank[n] for n in rank if n.startswith("red-circle")])
    assert red_after > red_before
    assert not names(minus_red)[0].startswith("red")


def test_combined_text_and_image_query_lands_between(library_dir, shapes_folder, trained_model, tmp_path):
    index(library_dir, [shapes_folder], trained_model)
    query_image = tmp_path / "blue-circle.png"
    draw_shape("circle", "blue", size=120, rng=np.random.default_rng(7)).save(query_image)
    top = names(Searcher(library_dir).query("a red circle", image=query_image, k=4))
    assert {n.split("-")[0] for n in top} >= {"red", "blue"}
    assert all("circle" in n for n in top)


def test_weights_change_the_balance(library_dir, shapes_folder, trained_model):
    index(library_dir, [shapes_folder], trained_model)
    searcher = Searcher(library_dir)
    assert names(searcher.query("3:\"a green square\" a red circle", k=1))[0].startswith("green-square")
    assert names(searcher.query("\"a green square\" 3:\"a red circle\"", k=1))[0].startswith("red-circle")


# --- mechanics with a random model --------------------------------------------------------------------------


def test_second_run_encodes_nothing(library_dir, shapes_folder, random_model):
    first = index(library_dir, [shapes_folder], random_model)
    second = index(library_dir, [shapes_folder], random_model)
    assert first.encoded == 18 and first.new == 18
    assert second.encoded == 0 and second.unchanged == 18 and second.new == 0


def test_changed_file_is_reencoded(library_dir, shapes_folder, random_model):
    index(library_dir, [shapes_folder], random_model)
    target = shapes_folder / "set0" / "red-circle-0.jpg"
    before = Library.open(library_dir).store.image_by_path(str(target))
    draw_shape("star", "yellow", size=96, rng=np.random.default_rng(1)).save(target)
    os.utime(target, ns=(before["mtime_ns"] + 5_000_000_000,) * 2)
    report = index(library_dir, [shapes_folder], random_model)
    after = Library.open(library_dir).store.image_by_path(str(target))
    assert report.changed == 1 and report.encoded == 1
    assert after["content_hash"] != before["content_hash"] and after["id"] != before["id"]


def test_deleted_file_disappears_from_results(library_dir, shapes_folder, random_model):
    index(library_dir, [shapes_folder], random_model)
    victim = shapes_folder / "set1" / "blue-square-1.jpg"
    victim.unlink()
    report = index(library_dir, [shapes_folder], random_model)
    results = Searcher(library_dir).query("a blue square", k=50)
    assert report.deleted == 1
    assert str(victim) not in {r.path for r in results}
    assert len(results) == 17


def test_renamed_and_moved_files_keep_their_vectors(library_dir, shapes_folder, random_model):
    index(library_dir, [shapes_folder], random_model)
    library = Library.open(library_dir)
    old = shapes_folder / "set0" / "green-triangle-0.jpg"
    row = library.store.image_by_path(str(old))
    vector = library.vectors().get(np.array([row["id"]]))
    new = shapes_folder / "moved here" / "renamed ü.jpg"
    new.parent.mkdir()
    shutil.move(old, new)
    report = index(library_dir, [shapes_folder], random_model)
    moved_row = Library.open(library_dir).store.image_by_path(str(new))
    assert report.moved == 1 and report.encoded == 0 and report.deleted == 0
    assert moved_row["id"] == row["id"]
    np.testing.assert_array_equal(Library.open(library_dir).vectors().get(np.array([row["id"]])), vector)


def test_bad_files_are_recorded_and_indexing_goes_on(library_dir, shapes_folder, random_model):
    (shapes_folder / "empty.jpg").write_bytes(b"")
    (shapes_folder / "page.png").write_text("<html><body>not a picture</body></html>")
    good = (shapes_folder / "set0" / "red-circle-0.jpg").read_bytes()
    (shapes_folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    report = index(library_dir, [shapes_folder], random_model)
    stats = Searcher(library_dir).stats()
    reasons = {Path(e["path"]).name: e["reason"] for e in stats["error_list"]}
    assert report.encoded == 18 and stats["indexed"] == 18
    assert set(reasons) == {"empty.jpg", "page.png", "cut.jpg"}
    assert all(reason for reason in reasons.values())
    again = index(library_dir, [shapes_folder], random_model)
    assert again.known_errors == 3 and again.encoded == 0


def test_ids_are_faiss_ids_and_vectors_are_unit(library_dir, shapes_folder, random_model):
    index(library_dir, [shapes_folder], random_model)
    searcher = Searcher(library_dir)
    ids = searcher.library.store.all_ids()
    vectors = searcher.library.vectors().get(ids)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.sort(searcher.index().ids()), ids)
    result = searcher.similar(int(ids[3]), k=1)[0]
    assert result.id == ids[3] and result.score == pytest.approx(1.0, abs=1e-5)


def test_scores_are_exact_cosines(library_dir, shapes_folder, random_model):
    index(library_dir, [shapes_folder], random_model)
    searcher = Searcher(library_dir)
    query, _ = searcher.query_vector("a blue star")
    for result in searcher.query("a blue star", k=5):
        stored = searcher.library.vectors().get(np.array([result.id]))[0]
        assert result.score == pytest.approx(float(stored @ query), abs=1e-5)


def test_each_query_says_its_kind_for_the_tuned_parameters(library_dir, shapes_folder, random_model):
    index(library_dir, [shapes_folder], random_model)
    searcher = Searcher(library_dir)
    photo = next(shapes_folder.rglob("*.jpg"))
    assert searcher.query_vector("a blue star")[1] == "text"
    assert searcher.query_vector(image=photo)[1] == "image"
    assert searcher.query_vector("a blue star", image=photo)[1] == "combined"


def test_other_model_is_refused(library_dir, shapes_folder, random_model, other_model):
    index(library_dir, [shapes_folder], random_model)
    with pytest.raises(ModelMismatchError, match="built with model"):
        index(library_dir, [shapes_folder], other_model)
    with pytest.raises(ModelMismatchError):
        Searcher(library_dir, model=other_model)
    assert Searcher(library_dir).stats()["indexed"] == 18


def test_metadata_is_stored(library_dir, shapes_folder, random_model):
    index(library_dir, [shapes_folder], random_model)
    result = Searcher(library_dir).query("anything", k=1)[0]
    assert (result.width, result.height, result.format) == (96, 96, "JPEG")
    assert Path(result.path).is_absolute()


def test_filters_restrict_results(library_dir, shapes_folder, random_model, make_shape):
    make_shape("photos/extra/odd.png", "circle", "red", fmt="PNG")
    index(library_dir, [shapes_folder], random_model)
    searcher = Searcher(library_dir)
    in_set1 = searcher.query("a red circle", k=50, folder=shapes_folder / "set1")
    pngs = searcher.query("a red circle", k=50, formats=["png"])
    assert len(in_set1) == 9 and all("/set1/" in r.path for r in in_set1)
    assert names(pngs) == ["odd.png"]
    assert searcher.query("a red circle", k=5, camera="no such camera") == []


def test_bad_queries_raise_query_errors(library_dir, shapes_folder, random_model):
    index(library_dir, [shapes_folder], random_model)
    searcher = Searcher(library_dir)
    for bad in ({"text": "   "}, {"text": "dog", "k": 0}, {"text": "-dog"}, {"image": "/no/such/file.jpg"},
                {"text": "dog", "after": "last tuesday"}):
        with pytest.raises(QueryError):
            searcher.query(**bad)
