"""The real `clipsearch` command in subprocesses, against real files in temp folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clipsearch.tinyclip import draw_shape


def test_index_search_stats_round_trip(run_cli, shapes_folder, trained_model):
    first = run_cli("index", str(shapes_folder), model=trained_model)
    assert "18 encoded" in first.stdout
    assert "Traceback" not in first.stderr

    results = json.loads(run_cli("search", "a red circle", "-k", "5", "--json").stdout)
    assert len(results) == 5
    assert Path(results[0]["path"]).is_absolute() and Path(results[0]["path"]).name.startswith("red-circle")
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)

    stats = json.loads(run_cli("stats", "--json").stdout)
    assert stats["indexed"] == 18 and stats["errors"] == 0 and stats["index_kind"] == "flat"

    second = run_cli("index", str(shapes_folder))
    assert "Nothing to encode" in second.stdout


def test_image_and_combined_search(run_cli, shapes_folder, trained_model, tmp_path):
    run_cli("index", str(shapes_folder), model=trained_model)
    query = tmp_path / "query image.png"
    draw_shape("square", "red", size=100, rng=np.random.default_rng(3)).save(query)
    by_image = json.loads(run_cli("search", "--image", str(query), "-k", "2", "--json").stdout)
    combined = run_cli("search", "a square", "--image", str(query), "-k", "3").stdout.splitlines()
    assert all(Path(r["path"]).name.startswith("red-square") for r in by_image)
    assert len(combined) == 3 and all("square" in line for line in combined)


def test_plain_output_is_score_and_path(run_cli, shapes_folder, random_model):
    run_cli("index", str(shapes_folder), model=random_model)
    lines = run_cli("search", "dog -leash", "-k", "3").stdout.splitlines()
    assert len(lines) == 3
    score, path = lines[0].split("  ", 1)
    assert -1.0 <= float(score) <= 1.0 and Path(path).is_file()


def test_options_work_after_the_command_too(run_cli, shapes_folder, random_model, tmp_path):
    other = tmp_path / "elsewhere"
    run_cli("index", str(shapes_folder), "--library", str(other), "--model", random_model)
    assert json.loads(run_cli("--library", str(other), "stats", "--json").stdout)["indexed"] == 18


def test_bad_files_are_listed_in_summary_and_stats(run_cli, shapes_folder, random_model):
    (shapes_folder / "notes.jpg").write_text("shopping list: eggs, milk")
    report = run_cli("index", str(shapes_folder), "--json", model=random_model)
    errors = json.loads(report.stdout)["errors"]
    stats = json.loads(run_cli("stats", "--json").stdout)
    assert [Path(e["path"]).name for e in errors] == ["notes.jpg"]
    assert stats["errors"] == 1 and stats["error_list"][0]["reason"]


def test_missing_weights_give_one_clear_paragraph(run_cli, shapes_folder):
    result = run_cli("index", str(shapes_folder), "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k",
                     check=False)
    assert result.returncode != 0
    assert "could not be loaded" in result.stderr and "local-dir:" in result.stderr
    assert "Traceback" not in result.stderr


def test_errors_are_one_sentence_without_traceback(run_cli, shapes_folder, random_model, tmp_path):
    no_library = run_cli("search", "a cat", "--library", str(tmp_path / "nothing"), check=False)
    assert no_library.returncode != 0 and "no clipsearch library" in no_library.stderr
    run_cli("index", str(shapes_folder), model=random_model)
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not a picture")
    for args in (["search"], ["search", "cat", "-k", "0"], ["search", "cat", "-k", "100000000"],
                 ["search", "--image", str(tmp_path / "nope.jpg")], ["search", "--image", str(text_file)],
                 ["search", "--image", str(tmp_path)], ["search", "cat", "--after", "yesterday"],
                 ["search", "cat", "--model", f"local-dir:{tmp_path}"], ["index", str(tmp_path / "typo")]):
        result = run_cli(*args, check=False)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr and result.stderr.strip(), args
    assert run_cli("stats", "--json").stdout.count('"indexed": 18'), "nothing stored was lost"


def test_every_command_has_help(run_cli):
    top = run_cli("--help").stdout
    for command in ("index", "search", "stats", "reindex", "doctor", "ui"):
        assert command in top
        assert "Usage:" in run_cli(command, "--help").stdout
