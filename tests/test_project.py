"""Rules the project keeps about itself: import direction, a curated public API, documented commands."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import clipsearch

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "clipsearch"
FRONT_ENDS = {"cli.py", "cli_progress.py", "__main__.py", "__init__.py"}  # at the top of the package


def core_modules() -> list[Path]:
    """Every module of the core, sub-packages (such as `clipsearch.index`) included, but the front ends."""
    return [path for path in CORE.rglob("*.py") if path.relative_to(CORE).as_posix() not in FRONT_ENDS]
HEAVY = {"torch", "open_clip", "faiss", "torchvision", "onnxruntime", "openvino", "onnx", "tokenizers"}


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_core_never_imports_front_ends_or_the_indexer():
    assert CORE / "index" / "core.py" in core_modules()
    for path in core_modules():
        for module in imported_modules(path):
            assert not module.startswith(("click", "streamlit", "clipsearch.indexer", "clipsearch.ui",
                                          "clipsearch.cli")), f"{path.name} imports {module}"


def test_indexer_never_imports_front_ends():
    for path in (REPO / "indexer").glob("*.py"):
        for module in imported_modules(path):
            assert not module.startswith(("click", "streamlit", "clipsearch.ui", "clipsearch.cli")), path.name


def test_heavy_libraries_are_imported_inside_functions():
    for folder in (CORE, REPO / "indexer", REPO / "ui"):
        for path in folder.rglob("*.py"):
            top = {m.split(".")[0] for m in imported_modules(path, top_level_only=True)}
            assert not top & HEAVY, f"{path} imports {top & HEAVY} at module level"


def test_help_answers_without_loading_heavy_libraries():
    code = (
        "import sys; from clipsearch.cli import cli; "
        "print(sorted(m for m in ('torch', 'faiss', 'open_clip', 'onnxruntime', 'openvino') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_is_curated():
    # Submodules appear as attributes once imported; they are not part of the curated names.
    exported = {name for name, value in vars(clipsearch).items()
                if not name.startswith("_") and not isinstance(value, ModuleType)} | {"__version__"}
    for name in clipsearch.__all__:
        assert getattr(clipsearch, name) is not None
    assert {"Searcher", "Result", "ClipsearchError", "index_folders"} <= set(clipsearch.__all__)
    assert set(clipsearch.__all__) >= exported - {"annotations", "TYPE_CHECKING", "Any"}


def test_every_cli_command_is_in_the_readme():
    from clipsearch.cli import cli

    readme = (REPO / "README.md").read_text()
    for name, command in cli.commands.items():
        assert re.search(rf"clipsearch( --\S+ \S+)* {name}\b", readme), f"README does not show `clipsearch {name}`"
        assert command.help, f"`clipsearch {name}` has no help text"


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    install = re.search(r"^(pip install .*)$", readme, re.MULTILINE)
    test = re.search(r"^(python -m pytest.*)$", readme, re.MULTILINE)
    assert install and test
    assert install.group(1) in ci and test.group(1) in ci
