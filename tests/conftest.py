"""Shared fixtures: every test gets its own library folder (via $CLIPSEARCH_LIBRARY), real image files, and one
of the project's tiny models (the trained one for meaningful results, a random one for mechanics)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Before anything imports huggingface_hub, which reads this once at import: no test may reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
# Exported models and probe records go to one folder for the whole test session (so tests reuse each other's
# exports, as the processes of one machine do), never to the user's cache; subprocesses inherit it.
TEST_CACHE = Path(tempfile.mkdtemp(prefix="clipsearch-test-cache-"))
os.environ["CLIPSEARCH_CACHE"] = str(TEST_CACHE)

REPO = Path(__file__).resolve().parents[1]
TRAINED_MODEL = REPO / "data" / "tiny-clip"
SAMPLE_PHOTOS = REPO / "data" / "photos"


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cache() -> Any:
    yield
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test touches the user's library or the network."""
    library = tmp_path / "library"
    monkeypatch.setenv("CLIPSEARCH_LIBRARY", str(library))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPSEARCH_MODEL", raising=False)
    monkeypatch.delenv("CLIPSEARCH_PRETRAINED", raising=False)
    monkeypatch.delenv("CLIPSEARCH_INDEX_MEMORY", raising=False)
    return library


@pytest.fixture
def library_dir(isolated_environment: Path) -> Path:
    return isolated_environment


@pytest.fixture(scope="session")
def trained_model() -> str:
    """The committed tiny CLIP trained on coloured shapes: "a red circle" finds red circles."""
    return f"local-dir:{TRAINED_MODEL}"


@pytest.fixture(scope="session")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init model of the same architecture: fast, for mechanics only."""
    from clipsearch.tinyclip import random_init_dir

    return f"local-dir:{random_init_dir(tmp_path_factory.mktemp('random-model'), seed=0)}"


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A different model (another embedding size), for model-mismatch tests."""
    from clipsearch.tinyclip import random_init_dir

    return f"local-dir:{random_init_dir(tmp_path_factory.mktemp('other-model'), seed=1, embed_dim=48)}"


ShapeMaker = Callable[..., Path]


@pytest.fixture
def make_shape(tmp_path: Path) -> ShapeMaker:
    """Write one shape picture: make_shape("photos/red-circle.jpg", "circle", "red")."""
    from clipsearch.tinyclip import draw_shape

    counter = iter(range(10_000))

    def make(relative: str, shape: str, colour: str, size: int = 96, fmt: str | None = None) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image = draw_shape(shape, colour, size=size, rng=np.random.default_rng(next(counter)))
        image.save(path, format=fmt)
        return path

    return make


@pytest.fixture
def shapes_folder(tmp_path: Path, make_shape: ShapeMaker) -> Path:
    """Photos of three shapes in three colours, two of each, in two sub-folders."""
    for n in range(2):
        for shape in ("circle", "square", "triangle"):
            for colour in ("red", "green", "blue"):
                make_shape(f"photos/set{n}/{colour}-{shape}-{n}.jpg", shape, colour)
    return tmp_path / "photos"


def clipsearch_command() -> list[str]:
    script = Path(sys.executable).with_name("clipsearch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clipsearch"]


@pytest.fixture
def run_cli(library_dir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real `clipsearch` command in a subprocess with this test's library."""

    def run(*args: str, model: str | None = None, check: bool = True, timeout: float = 240,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "CLIPSEARCH_LIBRARY": str(library_dir), **(env or {})}
        if model:
            full_env["CLIPSEARCH_MODEL"] = model
        result = subprocess.run([*clipsearch_command(), *args], capture_output=True, text=True,
                                env=full_env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"clipsearch {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return run


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
