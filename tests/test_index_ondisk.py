"""Indexes larger than the memory budget: planned by a pure function, built in shards into an on-disk .ivfdata,
saved and loaded atomically, changed without touching a file a reader may have mapped.

Small real indexes (32-d, a few thousand vectors) whose memory budget is capped so that the sharded path is
taken; every answer is checked against an in-RAM index built with the same plan and seed, or against brute force.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_index import add_photos, make_library

import clipsearch.index as index_module
from clipsearch.errors import IndexFileError, SettingError
from clipsearch.index import (
    LIST_SLACK,
    PARAMS_FILE,
    TARGET_RECALL,
    BuildJob,
    IndexPolicy,
    VectorIndex,
    choose_index,
    escalate,
    exact_search,
    flat_plan,
    ivfpq_plan,
    plan_build_memory,
    recall_at,
    text_like_queries,
)
from clipsearch.index import build as build_module
from clipsearch.index.budget import MEMORY_ENV, default_memory_budget, machine_memory, parse_size, resolve_memory_budget
from clipsearch.library import Library
from clipsearch.sync import refresh_index
from clipsearch.vectors import VectorStore

DIM = 32
N = 4000
K = 10
BUDGET = 350_000  # bytes: the lists of N 32-d vectors (and the build's fixed costs) do not fit; two shards do


# ------------------------------------------------------------------------------------------------ test data


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


CENTRES = unit_rows(np.random.default_rng(42).standard_normal((64, DIM)) * np.r_[np.ones(DIM - 2), 0, 0])
GAP = np.eye(DIM, dtype=np.float32)[-1]  # the modality gap: a direction no photo uses


def photos(n: int, seed: int) -> np.ndarray:
    """Clustered unit vectors in the first DIM-2 coordinates, like image embeddings."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, DIM)) * np.r_[np.ones(DIM - 2), 0, 0]
    return unit_rows(CENTRES[rng.integers(len(CENTRES), size=n)] + 0.5 * unit_rows(noise))


def texts(n: int, seed: int) -> np.ndarray:
    return text_like_queries(photos(n, seed), np.random.default_rng(seed + 1), offset=GAP)


def make_store(folder: Path, vectors: np.ndarray) -> tuple[VectorStore, np.ndarray]:
    store = VectorStore(folder / "vectors.f32", DIM)
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    store.write(ids, vectors)
    return store, ids


def build(store: VectorStore, ids: np.ndarray, folder: Path | None = None, budget: int | None = BUDGET,
          **options: object) -> VectorIndex:
    plan = ivfpq_plan(len(ids), DIM)
    return BuildJob(store, ids, text_queries=texts(390, seed=99), plan=plan,  # type: ignore[arg-type]
                    memory_budget_bytes=budget, folder=folder, **options).run()


def same_answers(a: VectorIndex, b: VectorIndex, allowed: np.ndarray | None = None) -> bool:
    queries = np.concatenate([photos(40, seed=5), texts(40, seed=6)])
    return all(np.array_equal(a.search(queries, K, kind=kind, allowed_ids=allowed)[1],
                              b.search(queries, K, kind=kind, allowed_ids=allowed)[1])
               for kind in ("image", "text"))


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[VectorStore, np.ndarray]:
    """N photo vectors with ids 1..N (read-only)."""
    return make_store(tmp_path_factory.mktemp("vectors"), photos(N, seed=0))


@pytest.fixture(scope="module")
def in_ram(data: tuple[VectorStore, np.ndarray]) -> VectorIndex:
    store, ids = data
    return build(store, ids, budget=None)


# -------------------------------------------------------------------------------------------- the planner


@pytest.mark.parametrize(("n", "budget"), [(10_000, 2**28), (1_000_000, 160 * 2**20), (1_000_000, 2**28),
                                         (1_000_000, 2**30), (100_000_000, 2**33), (100_000_000, 2**35)])
def test_the_shards_the_planner_chooses_respect_the_budget(n, budget):
    plan = choose_index(n, 512, budget)
    memory = plan_build_memory(plan, n, 512, budget)
    assert memory.fits
    assert memory.peak_estimate(plan, n, 512) <= budget
    lists_per_shard = memory.shard_rows * plan.bytes_per_vector(512) * LIST_SLACK
    assert memory.working_bytes + lists_per_shard <= budget
    assert memory.training_bytes <= budget
    assert memory.read_rows * 512 * 4 * 2 <= memory.buffer_bytes, "a read and faiss's copy of it fit"
    assert memory.on_disk == (memory.shard_rows < n)


def test_an_index_that_fits_is_built_in_ram_and_one_that_does_not_goes_to_disk():
    plan = choose_index(1_000_000, 512)
    assert not plan_build_memory(plan, 1_000_000, 512, 2**30).on_disk  # 72 MB of lists in a 1 GiB budget
    tight = plan_build_memory(plan, 1_000_000, 512, 2**27)
    assert tight.on_disk and 1 < 1_000_000 / tight.shard_rows < 100
    assert not tight.sample_in_ram, "the 327 MB k-means sample is read through a memory-mapped file"
    assert tight.pq_points_per_centroid < 256, "the PQ training sample shrinks to the working memory"


def test_a_budget_below_the_smallest_buffers_and_shards_is_reported_as_not_fitting():
    plan = choose_index(100_000_000, 512)
    memory = plan_build_memory(plan, 100_000_000, 512, 2**20)
    assert memory.on_disk and not memory.fits and memory.shard_rows == index_module.MIN_SHARD_ROWS
    assert not plan_build_memory(choose_index(10**6, 512), 10**6, 512, 2**26).fits, "BLAS buffers alone take more"


def test_escalation_skips_an_exact_index_that_would_not_fit_the_budget():
    bigger = escalate(choose_index(1_000_000, 512), 1_000_000, 512)
    assert bigger is not None and bigger.m == 128
    assert escalate(bigger, 1_000_000, 512, memory_budget_bytes=2**30) is None  # 2 GB of floats
    assert escalate(bigger, 1_000_000, 512, memory_budget_bytes=2**34) == flat_plan()


# ------------------------------------------------------------------------------------------ budget setting


@pytest.mark.parametrize(("text", "size"), [("1048576", 1048576), ("512MB", 512 * 10**6), ("2GiB", 2 * 2**30),
                                            ("2 gib", 2 * 2**30), ("1.5G", 3 * 2**29), ("64k", 65536),
                                            ("300kB", 300_000), ("7B", 7)])
def test_sizes_are_read_as_people_write_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-5MB", "0", "MB", "1e9"])
def test_a_size_that_is_not_one_says_so_in_one_sentence(text):
    with pytest.raises(ValueError) as raised:
        parse_size(text)
    message = str(raised.value)
    assert repr(text) in message and message.count(". ") == 0 and message.endswith(".")


def test_the_budget_comes_from_the_argument_then_the_environment_then_half_the_memory(monkeypatch):
    assert resolve_memory_budget() == default_memory_budget() == machine_memory() // 2
    monkeypatch.setenv(MEMORY_ENV, "3GiB")
    assert resolve_memory_budget() == 3 * 2**30
    assert resolve_memory_budget(12345) == 12345
    monkeypatch.setenv(MEMORY_ENV, "plenty")
    with pytest.raises(SettingError, match=f"{MEMORY_ENV} is set to 'plenty'"):
        resolve_memory_budget()


# ------------------------------------------------------------------------------------- building on disk


def test_the_sharded_build_gives_the_answers_of_an_in_ram_build(tmp_path, data, in_ram):
    store, ids = data
    said: list[str] = []
    on_disk = build(store, ids, tmp_path / "index", progress=said.append)
    assert on_disk.on_disk and not in_ram.on_disk
    assert sum("adding shard" in line for line in said) >= 2
    assert on_disk.params.query == in_ram.params.query, "tuning measured the same index"
    assert same_answers(on_disk, in_ram)
    assert same_answers(on_disk, in_ram, allowed=np.arange(1, N + 1, 3))
    (ivfdata,) = (tmp_path / "index").glob("lists-*.ivfdata")
    assert files_in(tmp_path / "index") == [ivfdata.name], "the build's scratch files are gone"
    assert on_disk.ivfdata_bytes() == ivfdata.stat().st_size == N * on_disk.describe()["bytes_per_vector"]


@pytest.mark.parametrize("kind", ["image", "text"])
def test_the_on_disk_index_reaches_its_target_recall_against_brute_force(tmp_path, data, kind):
    store, ids = data
    index = build(store, ids, tmp_path / "index")
    queries = photos(300, seed=11) if kind == "image" else texts(300, seed=12)
    truth = exact_search(queries, K, store, ids)[1]
    assert recall_at(index.search(queries, K, kind=kind)[1], truth) >= TARGET_RECALL[kind]


def test_without_a_folder_the_lists_live_in_a_private_folder_until_saved(tmp_path, data, in_ram):
    store, ids = data
    index = build(store, ids, folder=None)
    private = index.disk.ivfdata.parent  # type: ignore[union-attr]
    index.save(tmp_path / "index")
    assert not private.exists(), "saving copied the lists next to the index and let the private copy go"
    assert same_answers(VectorIndex.load(tmp_path / "index", store), in_ram)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ files on disk


def saved_on_disk(tmp_path: Path, data: tuple[VectorStore, np.ndarray]) -> tuple[VectorIndex, Path]:
    store, ids = data
    folder = tmp_path / "library" / "index"
    index = build(store, ids, folder)
    index.save(folder)
    return index, folder


def test_save_and_load_round_trip_on_disk(tmp_path, data, in_ram):
    store, _ = data
    index, folder = saved_on_disk(tmp_path, data)
    saved = json.loads((folder / PARAMS_FILE).read_text())
    assert files_in(folder) == sorted([PARAMS_FILE, saved["index_file"], saved["ivfdata_file"]])
    loaded = VectorIndex.load(folder, store)
    assert loaded is not None and loaded.on_disk and loaded.ntotal == N
    assert same_answers(loaded, in_ram)
    facts = loaded.describe()
    assert facts["on_disk"] is True and facts["ivfdata_bytes"] == saved["ivfdata_bytes"] > 0


def test_a_moved_library_folder_still_loads(tmp_path, data, in_ram):
    store, _ = data
    _, folder = saved_on_disk(tmp_path, data)
    moved = tmp_path / "elsewhere" / "library"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "library"), str(moved))
    loaded = VectorIndex.load(moved / "index", store)
    assert loaded is not None and loaded.on_disk
    assert same_answers(loaded, in_ram)


def test_a_truncated_or_missing_lists_file_raises_index_file_error(tmp_path, data):
    _, folder = saved_on_disk(tmp_path, data)
    (ivfdata,) = folder.glob("*.ivfdata")
    with open(ivfdata, "r+b") as f:
        f.truncate(ivfdata.stat().st_size // 2)
    with pytest.raises(IndexFileError, match="damaged"):
        VectorIndex.load(folder, data[0])
    ivfdata.unlink()
    with pytest.raises(IndexFileError, match="cannot be read"):
        VectorIndex.load(folder, data[0])


# ------------------------------------------------------------------------------- changes to an on-disk index


def change(index: VectorIndex, store: VectorStore, new_ids: np.ndarray, gone: np.ndarray) -> None:
    index.add(new_ids)
    index.remove(gone)


@pytest.fixture
def growing(tmp_path: Path) -> tuple[VectorStore, np.ndarray, np.ndarray]:
    """A store with N photos indexed and 300 more written but not yet indexed (a test may change it)."""
    store, ids = make_store(tmp_path, photos(N + 300, seed=0))
    return store, ids[:N], ids[N:]


def test_added_and_removed_vectors_on_disk_match_an_in_ram_index_before_and_after_a_reload(tmp_path, growing):
    store, ids, new_ids = growing
    gone = np.concatenate([ids[:150], new_ids[:20]])
    in_ram, on_disk = build(store, ids, budget=None), build(store, ids, tmp_path / "index")
    on_disk.save(tmp_path / "index")
    for index in (in_ram, on_disk):
        change(index, store, new_ids, gone)
    assert on_disk.ntotal == in_ram.ntotal == N + 300 - 170
    assert same_answers(on_disk, in_ram)
    _, found = on_disk.search(store.get(gone), K)
    assert not np.isin(found, gone).any()

    on_disk.save(tmp_path / "index")
    reloaded = VectorIndex.load(tmp_path / "index", store)
    assert reloaded is not None and reloaded.on_disk
    np.testing.assert_array_equal(reloaded.ids(), in_ram.ids())
    assert same_answers(reloaded, in_ram)
    assert len(list((tmp_path / "index").glob("*.ivfdata"))) == 1, "the replaced lists file was deleted"


def test_a_vector_added_again_replaces_its_entry_in_the_file(tmp_path, growing):
    store, ids, _ = growing
    index = build(store, ids, tmp_path / "index")
    index.save(tmp_path / "index")
    replacement = photos(1, seed=77)
    store.write(np.array([7]), replacement)
    index.add(np.array([7]))
    index.save(tmp_path / "index")
    reloaded = VectorIndex.load(tmp_path / "index", store)
    assert reloaded is not None and reloaded.ntotal == N
    scores, found = reloaded.search(replacement, 1)
    assert found[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_a_reader_keeps_its_lists_file_while_the_writer_saves_a_new_one(tmp_path, growing):
    store, ids, new_ids = growing
    writer = build(store, ids, tmp_path / "index")
    writer.save(tmp_path / "index")
    reader = VectorIndex.load(tmp_path / "index", store)
    assert reader is not None
    before = reader.search(texts(30, seed=3), K, kind="text")[1]
    (old_file,) = (tmp_path / "index").glob("*.ivfdata")
    os.link(old_file, tmp_path / "kept.ivfdata")  # a second name, to look at the file after the writer deletes it
    stat_before, content_before = old_file.stat(), old_file.read_bytes()

    change(writer, store, new_ids, ids[:100])
    writer.save(tmp_path / "index")

    assert not old_file.exists()
    kept = tmp_path / "kept.ivfdata"
    assert kept.read_bytes() == content_before and kept.stat().st_mtime_ns == stat_before.st_mtime_ns
    np.testing.assert_array_equal(reader.search(texts(30, seed=3), K, kind="text")[1], before)


def test_a_reader_brings_an_on_disk_index_in_step_without_writing_anything(tmp_path, growing):
    store, ids, new_ids = growing
    index = build(store, ids, tmp_path / "index")
    index.save(tmp_path / "index")
    listing = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "index").iterdir()}
    reader = VectorIndex.load(tmp_path / "index", store)
    assert reader is not None
    change(reader, store, new_ids, ids[:50])
    _, found = reader.search(store.get(new_ids), K)
    assert (found[:, 0] == new_ids).mean() >= 0.99
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "index").iterdir()} == listing


# ------------------------------------------------------------------------------------------ the library


def caption_encoder(captions: list[str]) -> np.ndarray:
    return texts(len(captions), seed=len(captions))


def test_the_library_index_goes_to_disk_under_a_budget_and_follows_new_photos(tmp_path):
    library = make_library(tmp_path / "lib", photos(N, seed=0))
    index = refresh_index(library, caption_encoder, memory_budget_bytes=BUDGET)
    assert index is not None and index.on_disk and index.params.kind == "ivfpq"
    first = set(files_in(library.index_dir))

    new_ids = add_photos(library, photos(200, seed=1))
    kept = refresh_index(library, caption_encoder, memory_budget_bytes=BUDGET)
    assert kept is not None and kept.on_disk and kept.params.trained_on == N, "added, not retrained"
    assert set(files_in(library.index_dir)).isdisjoint(first - {PARAMS_FILE}), "fresh files, old ones gone"
    saved = VectorIndex.load(library.index_dir, library.vectors())
    assert saved is not None and saved.on_disk
    np.testing.assert_array_equal(saved.ids(), library.store.all_ids())
    _, found = saved.search(library.vectors().get(new_ids), K)
    assert (found[:, 0] == new_ids).mean() >= 0.99


def test_a_searcher_finds_photos_committed_after_the_on_disk_index_was_saved(tmp_path):
    from clipsearch.searcher import Searcher

    library = make_library(tmp_path / "lib", photos(N, seed=0))
    refresh_index(library, caption_encoder, memory_budget_bytes=BUDGET)
    saved = files_in(library.index_dir)
    new_ids = add_photos(library, photos(20, seed=5))
    searcher = Searcher(tmp_path / "lib")
    best = [searcher.similar(int(image_id), k=K)[0].id for image_id in new_ids]
    assert np.mean(np.array(best) == new_ids) >= 0.95
    assert files_in(library.index_dir) == saved, "a reader writes nothing"


def test_the_environment_variable_sets_the_budget_of_library_builds(tmp_path, monkeypatch):
    library = make_library(tmp_path / "lib", photos(N, seed=0))
    monkeypatch.setenv(MEMORY_ENV, f"{BUDGET}B")
    index = refresh_index(library, caption_encoder)
    assert index is not None and index.on_disk


def test_an_in_ram_index_that_outgrows_the_budget_is_rebuilt_on_disk(tmp_path):
    library = make_library(tmp_path / "lib", photos(N, seed=0))
    roomier = 600_000  # too small for the flat index, big enough for IVF-PQ in RAM
    index = refresh_index(library, caption_encoder, memory_budget_bytes=roomier)
    assert index is not None and index.params.kind == "ivfpq" and not index.on_disk
    assert not index.needs_rebuild(N, memory_budget_bytes=roomier)
    assert index.needs_rebuild(N, memory_budget_bytes=BUDGET)
    smaller = refresh_index(library, caption_encoder, memory_budget_bytes=BUDGET)
    assert smaller is not None and smaller.on_disk


def test_a_failure_in_the_middle_of_a_build_leaves_the_saved_index_in_use(tmp_path, monkeypatch):
    library = make_library(tmp_path / "lib", photos(N, seed=0))
    refresh_index(library, caption_encoder, memory_budget_bytes=BUDGET)
    before = files_in(library.index_dir)
    add_photos(library, photos(300, seed=2))
    real_write_shards = build_module.write_shards

    def disk_unplugged(*args: object, **kwargs: object) -> list[Path]:
        real_write_shards(*args, **kwargs)  # type: ignore[arg-type]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(build_module, "write_shards", disk_unplugged)
    with pytest.raises(OSError):
        refresh_index(library, caption_encoder, rebuild=True, memory_budget_bytes=BUDGET)
    assert files_in(library.index_dir) == before, "no shard, scratch folder or half-built lists file is left"
    kept = VectorIndex.load(library.index_dir, library.vectors())
    assert kept is not None and kept.on_disk and kept.ntotal == N
    _, found = kept.search(photos(5, seed=3), K)
    assert (found >= 0).all()


def test_leftovers_of_a_killed_build_are_cleared_by_the_next_save(tmp_path):
    library = make_library(tmp_path / "lib", photos(N, seed=0))
    refresh_index(library, caption_encoder, memory_budget_bytes=BUDGET)
    (library.index_dir / "build-x1y2z3").mkdir()
    (library.index_dir / "build-x1y2z3" / "shard-00000.faiss").write_bytes(b"half")
    (library.index_dir / "lists-0123456789ab.ivfdata").write_bytes(b"half")
    add_photos(library, photos(10, seed=4))
    refresh_index(library, caption_encoder, memory_budget_bytes=BUDGET)
    names = files_in(library.index_dir)
    assert len(names) == 3 and not any(name.startswith("build-") or "0123456789ab" in name for name in names)


# ------------------------------------------------------------------------------------------------- the CLI


def test_reindex_with_a_memory_budget_builds_on_disk_and_search_and_stats_use_it(run_cli, shapes_folder,
                                                                                trained_model, library_dir):
    run_cli("index", str(shapes_folder), model=trained_model)
    library = Library.open(library_dir)
    dim = library.dim()
    assert dim is not None
    add_photos(library, unit_rows(np.random.default_rng(8).standard_normal((3000, dim))))
    library.close()

    rebuilt = run_cli("reindex", "--memory-budget", "400KB")
    assert "'on_disk': True" in rebuilt.stdout and "resizing" not in rebuilt.stdout
    facts = json.loads(run_cli("stats", "--json").stdout)
    assert facts["indexed"] == 3018 and facts["index"]["on_disk"] is True and facts["index"]["ivfdata_bytes"] > 0
    assert "on disk: lists in lists-" in run_cli("stats").stdout

    query = shapes_folder / "set0" / "red-circle-0.jpg"
    by_image = json.loads(run_cli("search", "--image", str(query), "-k", "3", "--json").stdout)
    assert Path(by_image[0]["path"]).name == query.name and by_image[0]["score"] == pytest.approx(1.0, abs=1e-3)
    by_text = json.loads(run_cli("search", "a red circle", "-k", "5", "--json").stdout)
    scores = [result["score"] for result in by_text]
    assert len(by_text) == 5 and scores == sorted(scores, reverse=True)


def test_a_bad_memory_budget_is_one_sentence_and_a_failure(run_cli, shapes_folder, random_model):
    option = run_cli("reindex", "--memory-budget", "lots", check=False)
    assert option.returncode != 0 and "Traceback" not in option.stderr
    assert "'lots' is not a size" in option.stderr and "512MB or 2GiB" in option.stderr

    run_cli("index", str(shapes_folder), model=random_model)
    variable = run_cli("reindex", check=False, env={MEMORY_ENV: "a lot"})
    assert variable.returncode != 0 and "Traceback" not in variable.stderr
    assert variable.stderr.strip() == (f"Error: {MEMORY_ENV} is set to 'a lot', which is not a usable size; set it "
                                       "to a size such as 512MB or 2GiB, or unset it.")


def test_index_takes_a_memory_budget_and_refuses_a_bad_one_before_any_work(run_cli, shapes_folder, random_model,
                                                                             library_dir):
    variable = run_cli("index", str(shapes_folder), check=False, model=random_model, env={MEMORY_ENV: "a lot"})
    assert variable.returncode != 0 and "Traceback" not in variable.stderr
    assert variable.stderr.strip().splitlines()[-1].startswith(f"Error: {MEMORY_ENV} is set to 'a lot'")
    assert "encoding" not in variable.stderr  # said before crawling and encoding, not after

    option = run_cli("index", str(shapes_folder), "--memory-budget", "lots", check=False, model=random_model)
    assert option.returncode != 0 and "'lots' is not a size" in option.stderr

    run_cli("index", str(shapes_folder), "--memory-budget", "64MB", model=random_model)
    assert json.loads(run_cli("stats", "--json").stdout)["indexed"] == 18


def test_a_reader_without_a_saved_index_searches_exactly_at_once(tmp_path):
    from clipsearch.sync import load_synced_index

    library = make_library(tmp_path / "lib", photos(N, seed=0))
    assert choose_index(N, DIM, policy=IndexPolicy(flat_max_bytes=1024)).kind == "ivfpq", "a writer would train"

    index = load_synced_index(library, None)
    assert index is not None and index.params.kind == "flat", "exact, not trained and tuned in the reader"
    assert VectorIndex.load(library.index_dir, library.vectors()) is None, "a reader saves nothing"
    queries, store, ids = photos(20, seed=9), library.vectors(), library.store.all_ids()
    np.testing.assert_array_equal(index.search(queries, K)[1], exact_search(queries, K, store, ids)[1])
