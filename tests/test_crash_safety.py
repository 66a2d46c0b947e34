"""Never lose work: kills at random instants, hostile files, a second writer, searching while indexing,
damaged files and a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import clipsearch_command
from hostile import OK, SKIPPED, make_hostile_corpus, photo_like, restore_permissions

from clipsearch import LibraryError, Searcher
from clipsearch.library import Library


def library_content(library_dir: Path) -> dict[str, np.ndarray]:
    """path -> stored vector, for every indexed image."""
    library = Library.open(library_dir)
    rows = library.store.images_by_ids(library.store.all_ids().tolist())
    vectors = library.vectors()
    return {row["path"]: vectors.get(np.array([image_id]))[0] for image_id, row in rows.items()}


def start_index(library_dir: Path, folder: Path, model: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CLIPSEARCH_LIBRARY": str(library_dir), "CLIPSEARCH_MODEL": model}
    # torch: its vectors do not depend on which photos share a batch, so a resumed run's equal the reference's
    return subprocess.Popen([*clipsearch_command(), "index", str(folder), "--batch-size", "4", "--backend", "torch",
                             *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def corpus(make_shape, tmp_path) -> Path:
    shapes = ("circle", "square", "triangle", "star")
    colours = ("red", "green", "blue", "yellow")
    for n in range(3):
        for shape in shapes:
            for colour in colours:
                make_shape(f"corpus/{n}/{colour}-{shape}-{n}.png", shape, colour, size=64)
    return tmp_path / "corpus"


def kill_and_resume(library_dir: Path, corpus: Path, model: str, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    for attempt in range(kills):
        workers = ("--workers", "1") if attempt % 2 else ("--workers", "0")
        process = start_index(library_dir, corpus, model, *workers)
        time.sleep(rng.uniform(1.0, 6.0))
        process.send_signal(signal.SIGKILL)
        process.communicate()
    final = start_index(library_dir, corpus, model)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err


@pytest.mark.parametrize("kills", [pytest.param(4, id="4-kills"),
                                   pytest.param(24, id="24-kills", marks=pytest.mark.slow)])
def test_sigkill_at_random_points_loses_nothing(tmp_path, corpus, random_model, run_cli, kills):
    reference = tmp_path / "reference"
    run_cli("index", str(corpus), "--library", str(reference), "--batch-size", "4", "--backend", "torch",
            model=random_model)
    killed = tmp_path / "killed"
    kill_and_resume(killed, corpus, random_model, kills, seed=kills)

    expected, actual = library_content(reference), library_content(killed)
    assert sorted(actual) == sorted(expected) and len(actual) == 48
    for path, vector in expected.items():
        np.testing.assert_allclose(actual[path], vector, atol=1e-5)
    doctor = json.loads(run_cli("doctor", "--json", "--library", str(killed), check=False).stdout)
    assert doctor["ok"], doctor["problems"]


def test_ctrl_c_stops_after_the_batch_in_hand_and_the_next_run_resumes(tmp_path, random_model, run_cli, library_dir):
    photos = tmp_path / "many"
    photos.mkdir()
    for n in range(120):
        photo_like(512, 384, seed=n).save(photos / f"{n:03}.png")
    process = start_index(library_dir, photos, random_model, "--batch-size", "1", "--workers", "0")
    committed = _wait_for_committed_rows(library_dir, process)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    stopped_at = Library.open(library_dir).store.count_images()
    assert committed <= stopped_at < 120
    resumed = json.loads(run_cli("index", str(photos), "--json", model=random_model).stdout)
    assert resumed["encoded"] == 120 - stopped_at and resumed["unchanged"] == stopped_at


def _wait_for_committed_rows(library_dir: Path, process: subprocess.Popen[str], timeout: float = 120) -> int:
    """Poll the database (as any reader may, WAL mode) until the running index has committed a batch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(LibraryError):  # the writer may still be creating the database
            count = Library.open(library_dir).store.count_images()
            if count:
                return count
        time.sleep(0.01)
    raise AssertionError(f"no batch was committed (exit code {process.poll()})")


def test_hostile_files_are_recorded_and_indexing_goes_on(tmp_path, run_cli, random_model):
    root = tmp_path / "hostile"
    root.mkdir()
    expected = make_hostile_corpus(root)
    try:
        result = run_cli("index", str(root), "--json", model=random_model, timeout=300)
    finally:
        restore_permissions(root)
    report = json.loads(result.stdout)
    stats = json.loads(run_cli("stats", "--json").stdout)
    reasons = {_relative(e["path"], root): e["reason"] for e in stats["error_list"]}
    summary = {_relative(e["path"], root): e["reason"] for e in report["errors"]}
    indexed = {_relative(r["path"], root) for r in json.loads(run_cli("search", "x", "-k", "500", "--json").stdout)}
    for path, expectation in expected.items():
        if expectation == OK:
            assert path in indexed, f"{path} should be indexed; recorded: {reasons.get(path)}"
        elif expectation == SKIPPED:
            assert path not in indexed and path not in reasons, path
        else:
            assert expectation.lower() in reasons.get(path, "").lower(), (path, reasons.get(path))
            assert path in summary, path


def _relative(path: str, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def test_a_second_writer_is_refused_clearly(tmp_path, run_cli, shapes_folder, random_model, library_dir):
    run_cli("index", str(shapes_folder), model=random_model)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from clipsearch.library import Library;"
         "lock = Library.open(sys.argv[1]).writer_lock(); lock.__enter__(); print('held', flush=True); "
         "time.sleep(60)",
         str(library_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_cli("index", str(shapes_folder), check=False)
        assert refused.returncode == 1 and "is writing to the library" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert run_cli("search", "a red circle", "-k", "1").stdout.strip()  # readers are not blocked
    finally:
        holder.kill()
        holder.wait()


def test_search_while_indexing_sees_results_only_grow(library_dir, corpus, random_model, run_cli):
    first = corpus / "0"
    run_cli("index", str(first), model=random_model)
    searcher = Searcher(library_dir)
    process = start_index(library_dir, corpus, random_model, "--workers", "0")
    counts = []
    while process.poll() is None:
        counts.append(len(searcher.query("a shape", k=100)))
    _out, err = process.communicate()
    counts.append(len(searcher.query("a shape", k=100)))
    assert process.returncode == 0, err
    assert counts[0] >= 16 and counts[-1] == 48
    assert counts == sorted(counts), counts


def test_corrupt_index_file_is_explained_and_repaired(library_dir, shapes_folder, random_model, run_cli):
    run_cli("index", str(shapes_folder), model=random_model)
    for index_file in (library_dir / "index").glob("*.faiss"):
        index_file.write_bytes(b"\x00garbage" * 100)
    assert len(json.loads(run_cli("search", "a red circle", "--json").stdout)) == 10  # rebuilt in memory
    sick = json.loads(run_cli("doctor", "--json", check=False).stdout)
    assert not sick["ok"] and any(p["kind"] == "index" for p in sick["problems"])
    healed = json.loads(run_cli("doctor", "--json", "--repair").stdout)
    assert healed["ok"] and healed["repaired"]


def test_doctor_finds_vanished_files_and_forgets_them(library_dir, shapes_folder, random_model, run_cli):
    run_cli("index", str(shapes_folder), model=random_model)
    (shapes_folder / "set0" / "red-circle-0.jpg").unlink()
    sick = json.loads(run_cli("doctor", "--json", check=False).stdout)
    assert [p["kind"] for p in sick["problems"]] == ["missing-file"]
    assert json.loads(run_cli("doctor", "--json", "--repair").stdout)["ok"]
    assert json.loads(run_cli("stats", "--json").stdout)["indexed"] == 17


def test_corrupt_database_is_explained(library_dir, shapes_folder, random_model, run_cli):
    run_cli("index", str(shapes_folder), model=random_model)
    (library_dir / "library.db").write_bytes(b"not a database" * 1000)
    for args in (["search", "a cat"], ["stats"], ["doctor"]):
        result = run_cli(*args, check=False)
        assert result.returncode == 1 and "not a readable SQLite database" in result.stderr
        assert "Traceback" not in result.stderr


FILE_SIZE_LIMIT = 96 * 1024  # above SQLite's 32 KiB WAL index, below the index file of the wide model


def _limit_file_size() -> None:
    """Writes past FILE_SIZE_LIMIT fail as on a full disk (EFBIG instead of ENOSPC), for this process only."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    """1024-d embeddings, so 48 photos make an index file of ~200 KiB that cannot be written under the limit."""
    from clipsearch.tinyclip import random_init_dir

    return f"local-dir:{random_init_dir(tmp_path_factory.mktemp('wide-model'), seed=2, embed_dim=1024)}"


def test_disk_full_while_writing_the_index_keeps_the_old_one(library_dir, corpus, wide_model, run_cli):
    run_cli("index", str(corpus), model=wide_model)
    before = {p.name: p.read_bytes() for p in (library_dir / "index").iterdir()}
    assert sum(len(data) for data in before.values()) > FILE_SIZE_LIMIT
    env = {**os.environ, "CLIPSEARCH_LIBRARY": str(library_dir)}
    result = subprocess.run([*clipsearch_command(), "reindex"], env=env, capture_output=True, text=True,
                            preexec_fn=_limit_file_size, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "could not save the index" in result.stderr.lower()
    after = {p.name: p.read_bytes() for p in (library_dir / "index").iterdir()}
    assert after == before
    assert len(json.loads(run_cli("search", "a star", "-k", "48", "--json").stdout)) == 48
