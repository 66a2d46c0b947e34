"""clipsearch and rclip side by side: indexing speed, fixed cost, memory and cold text queries.

    flock /tmp/clipsearch-bench.lock python benchmarks/rclip_side_by_side.py --images 300 --rounds 3
    flock /tmp/clipsearch-bench.lock python benchmarks/rclip_side_by_side.py --quick

rclip (https://github.com/yurijmikhalevich/rclip) is the closest peer: a CLI that runs the same ViT-B-32-256
through ONNX Runtime. This script measures both CLIs as a person runs them, on the same photos, with the same
weights, alternately, in one run:

- Setup, cached under --cache-dir (default ~/.cache/clipsearch-bench/rclip-side-by-side) and reused by later runs:
  rclip from the package registry in its own virtual environment (rclip 4 needs Python >= 3.12; it is not a
  dependency of clipsearch); open_clip's ViT-B-32-256 with random weights (seeded; no download), rounded to fp16
  once so that both tools hold exactly the same numbers, saved as a `local-dir:` folder for clipsearch and
  exported to ONNX for rclip the way rclip's own conversion script exports its files (fp32, opset 18, TorchScript
  exporter, input "input", output "output", dynamic batch axis), checked against torch through rclip's own
  ONNX Runtime; and N seeded camera-like 2 MP JPEGs from `index_throughput.make_photos`.
- rclip reads its model from its data folder ($RCLIP_DATADIR) and downloads only what is missing there; given the
  files it expects it never touches the network. Each rclip run gets a fresh data folder holding symlinks to the
  model files (so its database starts empty); HF_HUB_OFFLINE=1 is set for both tools as a guard.
- Indexing, --rounds rounds, each tool from an empty library every time, the tools' order rotating each round:
  `clipsearch index PHOTOS --library NEW --model local-dir:... --json` and, since rclip indexes the current
  folder before it searches and has no index-only command, `rclip -f -t 1 /abs/query.jpg` run in the photo folder
  (an image query reuses the image tower already loaded for indexing: the lightest rclip run that indexes).
  Per tool: images/s of the whole command (N / wall time from start to exit), the fixed part (wall time of the
  same command over a folder of 1 photo), the steady rate ((N - 1) / (wall N - wall 1)) and peak RSS.
- Cold text queries, --queries fresh processes per tool, alternating, on the libraries just built:
  `rclip -n -t 10 "a red car"` and `clipsearch search "a red car" -k 10 --json`, wall time and peak RSS, with
  `python -c "import torch"` (clipsearch's environment) and `python -c "import onnxruntime"` (rclip's) as
  reference lines. One unmeasured warm-up run of every command first (page cache, bytecode, first-use caches).
- Peak RSS is the larger of the kernel's maximum for the process (wait4) and the largest sum of VmRSS over the
  process and all its descendants, sampled every 50 ms.

`--clipsearch-config` (repeatable) benchmarks clipsearch once per configuration: `auto` (no option: what the
installed clipsearch chooses) or `BACKEND[:PRECISION]` (e.g. `onnx:int8`), passed as `--backend/--precision` to
`index` and `search` where the installed clipsearch has those options; each configuration is one more tool in the
rotation. The script runs against whatever clipsearch is installed in the environment that runs it.

Writes JSON (--out) and prints a short table. --quick (24 photos, 1 round, 3 queries) checks the mechanics.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_throughput import Others, make_photos  # noqa: E402  (a sibling script, not a package)

MODEL_NAME = "ViT-B-32-256"
RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # rclip.model_download.MODEL_SUBDIR
RCLIP_TOKENIZER = "tokenizer/bpe_simple_vocab_16e6.txt.gz"  # rclip.model_download.TOKENIZER_VOCAB
# rclip.model_download.MODEL_LEGAL_FILES: rclip calls the hub unless these exist beside the model.
RCLIP_LEGAL_FILES = ("LICENSE", "OPENAI-CLIP-MIT.txt", "README.md", "THIRD_PARTY_NOTICES.md")
QUERY = "a red car"
RSS_POLL_S = 0.05
REPORTED_KEYS = ("elapsed", "encoding_elapsed", "encode_ips", "decode_ips")  # from `clipsearch index --json`
BUSY = 0.05  # a run whose cores were busier than this with other work is flagged
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rclip_side_by_side.json"


def main() -> None:
    args = parse_args()
    if args.command == "export":
        export_weights(Path(args.folder), args.seed)
        return
    # A stopped run still removes its scratch libraries (SIGTERM otherwise skips the `with` block's cleanup).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    rclip = ensure_rclip(cache, args.rclip_version, args.rclip_python)
    weights = ensure_weights(cache, args.seed, rclip)
    photos = make_photos(cache / f"photos-{args.images}x2mp-seed{args.seed}", args.images, 2.0, args.seed)
    one_photo = single_photo_folder(photos, cache / f"photos-1x2mp-seed{args.seed}")
    with tempfile.TemporaryDirectory(prefix="side-by-side-", dir=cache) as scratch:
        tools = make_tools(args, rclip, weights, Path(scratch))
        figures = measure_all(tools, photos, one_photo, args)
    figures.update(describe(args, rclip, weights))
    write_json(Path(args.out), figures)
    print_table(figures)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "export"],
                        help="run (default); export is used internally to build the weights in another environment")
    parser.add_argument("--folder", help="(export) where to write the weights")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=10, help="Fresh query processes per tool.")
    parser.add_argument("--quick", action="store_true", help="24 photos, 1 round, 3 queries: checks the mechanics.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clipsearch-config", action="append", default=None, metavar="auto|BACKEND[:PRECISION]")
    parser.add_argument("--rclip-version", default="4.0.8")
    parser.add_argument("--rclip-python", default=None, help="Python >= 3.12 for rclip's environment.")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds, args.queries = 24, 1, 3
    args.clipsearch_config = args.clipsearch_config or ["auto"]
    return args


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clipsearch-bench" / "rclip-side-by-side"


# ------------------------------------------------------------------------------------------------------------------
# Setup: rclip's environment, the shared random weights, the photos
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Rclip:
    venv: Path
    version: str

    @property
    def bin(self) -> Path:
        return self.venv / "bin" / "rclip"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def ensure_rclip(cache: Path, version: str, python: str | None) -> Rclip:
    """rclip from the package registry, in a virtual environment of its own (created once)."""
    rclip = Rclip(cache / f"rclip-{version}-venv", version)
    if not rclip.bin.exists():
        interpreter = python or find_python_312()
        print(f"installing rclip {version} into {rclip.venv} ({interpreter})", file=sys.stderr)
        subprocess.run([interpreter, "-m", "venv", str(rclip.venv)], check=True)
        subprocess.run([str(rclip.python), "-m", "pip", "install", "-q", f"rclip=={version}"], check=True)
    return rclip


def find_python_312() -> str:
    candidates = [shutil.which(name) for name in ("python3.12", "python3.13", "python3.14")]
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.1[2-9]*/bin/python")))
    for candidate in filter(None, candidates):
        check = [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 12))"]
        if subprocess.run(check, capture_output=True).returncode == 0:
            return candidate
    raise SystemExit("rclip 4 needs Python 3.12 or newer: pass one with --rclip-python.")


@dataclass
class Weights:
    folder: Path  # holds local-dir/ (clipsearch) and rclip/ (rclip's data folder layout), export.json

    @property
    def local_dir(self) -> Path:
        return self.folder / "local-dir"

    @property
    def rclip_files(self) -> Path:
        return self.folder / "rclip"

    @property
    def facts(self) -> dict[str, Any]:
        return json.loads((self.folder / "export.json").read_text())


def ensure_weights(cache: Path, seed: int, rclip: Rclip) -> Weights:
    """The same random weights for both tools, built once per seed and torch/open_clip version."""
    from importlib.metadata import version

    key = f"{MODEL_NAME}-seed{seed}-torch{version('torch')}-open_clip{version('open_clip_torch')}"
    weights = Weights(cache / "weights" / key)
    if not (weights.folder / "export.json").exists():
        print(f"building random-weight {MODEL_NAME} in {weights.folder}", file=sys.stderr)
        here = Path(__file__).resolve()
        subprocess.run([exporter_python(cache), str(here), "export", "--folder", str(weights.folder),
                        "--seed", str(seed)], check=True)
        check_onnx_in_rclip_env(weights, rclip)
    return weights


def exporter_python(cache: Path) -> str:
    """torch's ONNX exporter needs the `onnx` package. Where this environment lacks it, a small environment in the
    cache layers it over this one: a .pth file adds this environment's site folders, with their own .pth files
    (an editable clipsearch install is one), behind its own."""
    if subprocess.run([sys.executable, "-c", "import onnx"], capture_output=True).returncode == 0:
        return sys.executable
    venv = cache / f"onnx-export-py{sys.version_info.major}.{sys.version_info.minor}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    import site

    site_packages = Path(subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                                 text=True).strip())
    folders = ", ".join(repr(folder) for folder in site.getsitepackages())
    (site_packages / "base_environment.pth").write_text(f"import site; list(map(site.addsitedir, ({folders},)))\n")
    if subprocess.run([str(python), "-c", "import onnx"], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "onnx"], check=True)
    return str(python)


def export_weights(folder: Path, seed: int) -> None:
    """(Runs in the exporter environment.) Seeded random ViT-B-32-256, rounded to fp16 once (clipsearch's local-dir
    stores fp16, so both tools then hold identical values), saved for clipsearch and exported for rclip."""
    import numpy as np
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None).half().float().eval()
    save_clipsearch_folder(model, folder / "local-dir")
    model_dir = folder / "rclip" / RCLIP_MODEL_SUBDIR
    model_dir.mkdir(parents=True, exist_ok=True)
    visual, text = tower_modules(model)
    export_onnx(visual, torch.randn(1, 3, 256, 256), model_dir / "visual.onnx")
    export_onnx(text, torch.zeros(1, 77, dtype=torch.long), model_dir / "textual.onnx")
    write_rclip_extras(folder / "rclip")
    # Reference outputs from torch, for the check in rclip's own ONNX Runtime.
    images = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, 3, 256, 256), dtype=np.float32))
    tokens = open_clip.get_tokenizer(MODEL_NAME)(["a red car", "a photo of a dog"])
    with torch.no_grad():
        np.savez(folder / "reference.npz", images=images.numpy(), image_out=model.visual(images).numpy(),
                 tokens=tokens.numpy(), text_out=model.encode_text(tokens).numpy())


def save_clipsearch_folder(model: Any, folder: Path) -> None:
    import open_clip

    from clipsearch.tinyclip import CONFIG_FILENAME, save_local_dir

    save_local_dir(model, folder, open_clip.get_model_config(MODEL_NAME))
    # The preprocessing of ViT-B-32-256's released weights, which rclip hard-codes (OpenAI mean and std, resize
    # the shortest side bicubically, centre crop), instead of the tiny model's that save_local_dir writes.
    config = {"model_cfg": open_clip.get_model_config(MODEL_NAME),
              "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")


def tower_modules(model: Any) -> tuple[Any, Any]:
    """The image and text towers as modules of one input each, as rclip's conversion script wraps them."""
    import torch

    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = model.visual

        def forward(self, inputs: Any) -> Any:
            return self.visual(inputs)

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip_model = model

        def forward(self, inputs: Any) -> Any:
            return self.clip_model.encode_text(inputs)

    return Visual(), Text()


def export_onnx(module: Any, example: Any, path: Path) -> None:
    """As rclip's scripts/convert_model.py exports its files: TorchScript exporter, opset 18, fp32, the fused
    attention fast path off, one input "input" and one output "output" with a dynamic batch axis."""
    import warnings

    import torch

    torch.backends.mha.set_fastpath_enabled(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=18,
                          dynamo=False)


def write_rclip_extras(rclip_dir: Path) -> None:
    """The tokenizer vocabulary (open_clip's own copy, as rclip's conversion script takes it) and the notice files
    whose presence tells rclip its model is complete (placeholders: these weights are random)."""
    import open_clip

    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    (rclip_dir / RCLIP_TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(vocab, rclip_dir / RCLIP_TOKENIZER)
    for name in RCLIP_LEGAL_FILES:
        (rclip_dir / name).write_text("Random-weight ViT-B-32-256 made by clipsearch's benchmark; not a real model.\n")


CHECK_ONNX = """
import json, sys, numpy as np, onnxruntime as ort
from rclip.utils.tokenizer import SimpleTokenizer
folder, subdir, vocab = sys.argv[1:4]
ref = np.load(folder + "/reference.npz")
def run(name, x):
    session = ort.InferenceSession(f"{folder}/rclip/{subdir}/{name}.onnx", providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]
tokens = SimpleTokenizer(bpe_path=f"{folder}/rclip/{vocab}")(["a red car", "a photo of a dog"])
print(json.dumps({
    "visual_max_abs_diff": float(np.abs(run("visual", ref["images"]) - ref["image_out"]).max()),
    "textual_max_abs_diff": float(np.abs(run("textual", ref["tokens"]) - ref["text_out"]).max()),
    "tokenizers_agree": bool((tokens == ref["tokens"]).all()),
    "onnxruntime": ort.__version__}))
"""


def check_onnx_in_rclip_env(weights: Weights, rclip: Rclip) -> None:
    """The exported files, run by rclip's own ONNX Runtime and tokenizer, must give torch's outputs (rclip's
    conversion script allows 1e-4): then both tools really hold the same model."""
    output = subprocess.check_output([str(rclip.python), "-c", CHECK_ONNX, str(weights.folder), RCLIP_MODEL_SUBDIR,
                                      RCLIP_TOKENIZER], text=True)
    facts = json.loads(output)
    if max(facts["visual_max_abs_diff"], facts["textual_max_abs_diff"]) >= 1e-4 or not facts["tokenizers_agree"]:
        raise SystemExit(f"the ONNX export does not match torch: {facts}")
    (weights.folder / "reference.npz").unlink()
    (weights.folder / "export.json").write_text(json.dumps(facts, indent=2) + "\n")


def single_photo_folder(photos: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    first = sorted(photos.iterdir())[0]
    if not (folder / first.name).exists():
        shutil.copy2(first, folder / first.name)
    return folder


# ------------------------------------------------------------------------------------------------------------------
# The tools: how each one indexes a folder into a fresh library and answers a cold query
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Tool:
    label: str
    scratch: Path
    libraries: list[Path] = field(default_factory=list)

    def fresh_library(self, tag: str) -> Path:
        library = self.scratch / f"{self.label.replace(' ', '_').replace(':', '_')}-{tag}"
        self.libraries.append(library)
        return library

    def drop_old_libraries(self) -> None:
        """Keep only the newest library (the one the queries use): the scratch folder stays small."""
        for library in self.libraries[:-1]:
            shutil.rmtree(library, ignore_errors=True)
        self.libraries = self.libraries[-1:]

    def index_command(self, photos: Path, library: Path) -> tuple[list[str], Path, dict[str, str]]:
        raise NotImplementedError

    def query_command(self, library: Path, photos: Path) -> tuple[list[str], Path, dict[str, str]]:
        raise NotImplementedError

    def count_indexed(self, library: Path, output: bytes) -> int:
        raise NotImplementedError

    def parse_results(self, output: bytes) -> list[tuple[str, float]]:
        raise NotImplementedError

    def reported(self, output: bytes) -> dict[str, Any]:
        """What the tool itself says about an index run (its own timings, the backend it chose), if anything."""
        return {}


class RclipTool(Tool):
    def __init__(self, rclip: Rclip, weights: Weights, scratch: Path) -> None:
        super().__init__(f"rclip {rclip.version}", scratch)
        self.rclip, self.weights = rclip, weights
        self.query_image = scratch / "query.jpg"
        make_query_image(self.query_image)

    def data_folder(self, library: Path) -> Path:
        """A fresh rclip data folder: symlinks to the shared model files, and room for rclip's database."""
        library.mkdir(parents=True, exist_ok=True)
        for entry in self.weights.rclip_files.iterdir():
            link = library / entry.name
            if not link.exists():
                link.symlink_to(entry)
        return library

    def env(self, library: Path) -> dict[str, str]:
        return {"RCLIP_DATADIR": str(self.data_folder(library))}

    def index_command(self, photos: Path, library: Path) -> tuple[list[str], Path, dict[str, str]]:
        return [str(self.rclip.bin), "-f", "-t", "1", str(self.query_image)], photos, self.env(library)

    def query_command(self, library: Path, photos: Path) -> tuple[list[str], Path, dict[str, str]]:
        return [str(self.rclip.bin), "-n", "-t", "10", QUERY], photos, self.env(library)

    def count_indexed(self, library: Path, output: bytes) -> int:
        import sqlite3

        with sqlite3.connect(library / "db.sqlite3") as db:
            return int(db.execute("SELECT COUNT(*) FROM images WHERE deleted IS NULL").fetchone()[0])

    def parse_results(self, output: bytes) -> list[tuple[str, float]]:
        rows = [line.split("\t", 1) for line in output.decode().splitlines()[1:] if "\t" in line]
        return [(Path(path.strip('"')).name, float(score)) for score, path in rows]


class ClipsearchTool(Tool):
    def __init__(self, config: str, weights: Weights, scratch: Path, help_texts: dict[str, str]) -> None:
        super().__init__("clipsearch" if config == "auto" else f"clipsearch {config}", scratch)
        self.weights, self.config = weights, config
        self.index_options = backend_options(config, help_texts["index"], "index")
        self.search_options = backend_options(config, help_texts["search"], "search")
        if "--no-server" in help_texts["search"]:
            self.search_options.append("--no-server")  # a cold query: never a running server's warm answer

    def index_command(self, photos: Path, library: Path) -> tuple[list[str], Path, dict[str, str]]:
        command = [*clipsearch_cli(), "index", str(photos), "--library", str(library), "--model",
                   f"local-dir:{self.weights.local_dir}", "--json", *self.index_options]
        return command, self.scratch, {}

    def query_command(self, library: Path, photos: Path) -> tuple[list[str], Path, dict[str, str]]:
        command = [*clipsearch_cli(), "search", QUERY, "-k", "10", "--json", "--library", str(library),
                   *self.search_options]
        return command, self.scratch, {}

    def count_indexed(self, library: Path, output: bytes) -> int:
        report = json.loads(output)
        if report.get("errors"):
            raise SystemExit(f"clipsearch index reported errors: {report['errors'][:3]}")
        return int(report["encoded"])

    def parse_results(self, output: bytes) -> list[tuple[str, float]]:
        return [(Path(hit["path"]).name, float(hit["score"])) for hit in json.loads(output)]

    def reported(self, output: bytes) -> dict[str, Any]:
        report = json.loads(output)
        return {key: value for key, value in report.items() if key in REPORTED_KEYS or "backend" in key
                or "precision" in key}


def clipsearch_cli() -> list[str]:
    """The console script of the environment running this file, as a person would type it."""
    script = Path(sys.executable).parent / "clipsearch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "clipsearch"]


def backend_options(config: str, help_text: str, command: str) -> list[str]:
    if config == "auto":
        return []
    backend, _, precision = config.partition(":")
    options = [("--backend", backend)] + ([("--precision", precision)] if precision else [])
    missing = [name for name, _value in options if name not in help_text]
    if missing and command == "index":
        raise SystemExit(f"the installed clipsearch's index has no {' or '.join(missing)} option: "
                         f"--clipsearch-config {config} cannot be measured.")
    return [item for name, value in options if name in help_text for item in (name, value)]


def make_query_image(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (256, 256), (200, 30, 30)).save(path, quality=90)


def make_tools(args: argparse.Namespace, rclip: Rclip, weights: Weights, scratch: Path) -> list[Tool]:
    help_texts = {name: subprocess.check_output([*clipsearch_cli(), name, "--help"], text=True)
                  for name in ("index", "search")}
    tools: list[Tool] = [RclipTool(rclip, weights, scratch)]
    tools += [ClipsearchTool(config, weights, scratch, help_texts) for config in args.clipsearch_config]
    return tools


# ------------------------------------------------------------------------------------------------------------------
# Measuring one process: wall time and peak RSS of its whole tree
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float
    others_busy: float | None
    stdout: bytes


def measure(command: list[str], cwd: Path, extra_env: dict[str, str]) -> Run:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra_env}
    figures: dict[str, Any] = {}
    with tempfile.TemporaryFile() as stderr, Others(figures, "run"):
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr)
        poller = TreeRss(process.pid)
        try:
            stdout = process.stdout.read() if process.stdout else b""
            _pid, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # stopped meanwhile: the measured tool stops too
            process.kill()
            process.wait()
            raise
        finally:
            poller.stop()
        wall = time.perf_counter() - started
        Others.child_cpu_s += usage.ru_utime + usage.ru_stime
        if status != 0:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(command)} failed (status {status}) in {cwd}:\n{tail}")
    peak = max(usage.ru_maxrss / 1024, poller.peak_kb / 1024)
    return Run(round(wall, 3), round(peak, 1), figures["run_others_busy"], stdout)


class TreeRss:
    """Samples the summed VmRSS of a process and its descendants until stopped; keeps the largest sum."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def _poll(self) -> None:
        while not self.done.wait(RSS_POLL_S):
            self.peak_kb = max(self.peak_kb, sum(_rss_kb(pid) for pid in _tree(self.pid)))


def _tree(root: int) -> list[int]:
    pids, index = [root], 0
    while index < len(pids):
        pids.extend(_children(pids[index]))
        index += 1
    return pids


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            children.extend(int(child) for child in Path(task).read_text().split())
        except OSError:
            pass
    return children


def _rss_kb(pid: int) -> int:
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


# ------------------------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------------------------


def measure_all(tools: list[Tool], photos: Path, one_photo: Path, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {tool.label: {"index_runs": [], "fixed_runs": []} for tool in tools}
    for tool in tools:  # unmeasured: bytecode, page cache, any first-use cache of either tool
        results[tool.label]["warmup_index_1_photo_s"] = index_once(tool, one_photo, "warmup", 1)[0].wall_s
    for round_number in range(args.rounds):
        order = tools[round_number % len(tools):] + tools[:round_number % len(tools)]
        for tool in order:
            results[tool.label]["index_runs"].append(run_record(index_once(tool, photos, f"r{round_number}",
                                                                           args.images), round_number))
            results[tool.label]["fixed_runs"].append(run_record(index_once(tool, one_photo, f"r{round_number}-one",
                                                                           1), round_number))
        print(f"round {round_number + 1}/{args.rounds}: "
              + ", ".join(f"{tool.label} {results[tool.label]['index_runs'][-1]['wall_s']:.1f} s" for tool in tools),
              file=sys.stderr)
    queries = measure_queries(tools, photos, args.queries)
    for tool in tools:
        results[tool.label]["summary"] = summarize(results[tool.label], args.images)
    return {"tools": results, **queries}


def index_once(tool: Tool, photos: Path, tag: str, expected: int) -> tuple[Run, dict[str, Any]]:
    library = tool.fresh_library(tag)
    command, cwd, env = tool.index_command(photos, library)
    run = measure(command, cwd, env)
    indexed = tool.count_indexed(library, run.stdout)
    if indexed != expected:
        raise SystemExit(f"{tool.label} indexed {indexed} photos of {expected}: {' '.join(command)}")
    if expected > 1:
        tool.drop_old_libraries()  # the newest full library stays, for the queries
    else:
        shutil.rmtree(tool.libraries.pop(), ignore_errors=True)
    return run, tool.reported(run.stdout)


def run_record(measured: tuple[Run, dict[str, Any]], round_number: int) -> dict[str, Any]:
    run, reported = measured
    record = {"round": round_number, "wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb,
              "others_busy": run.others_busy}
    return {**record, "reported": reported} if reported else record


def measure_queries(tools: list[Tool], photos: Path, count: int) -> dict[str, Any]:
    """Fresh processes, tools alternating, after one unmeasured warm-up of each command."""
    commands = {tool.label: tool.query_command(tool.libraries[-1], photos) for tool in tools}
    commands['python -c "import torch"'] = ([sys.executable, "-c", "import torch"], photos, {})
    rclip = next(tool for tool in tools if isinstance(tool, RclipTool))
    commands['python -c "import onnxruntime" (rclip\'s environment)'] = (
        [str(rclip.rclip.python), "-c", "import onnxruntime"], photos, {})
    runs: dict[str, list[Run]] = {label: [] for label in commands}
    warmups = {label: measure(*command).wall_s for label, command in commands.items()}
    for _ in range(count):
        for label, command in commands.items():
            runs[label].append(measure(*command))
    queries = {label: query_summary(runs[label], warmups[label]) for label in commands}
    return {"queries": queries, "query_agreement": agreement(tools, runs)}


def query_summary(runs: list[Run], warmup_s: float) -> dict[str, Any]:
    return {"median_s": round(statistics.median(run.wall_s for run in runs), 3),
            "median_peak_rss_mb": round(statistics.median(run.peak_rss_mb for run in runs), 1),
            "wall_s": [run.wall_s for run in runs], "peak_rss_mb": [run.peak_rss_mb for run in runs],
            "others_busy_max": max((run.others_busy or 0.0) for run in runs), "warmup_s": warmup_s}


def agreement(tools: list[Tool], runs: dict[str, list[Run]]) -> dict[str, Any]:
    """Both tools' top 10 for the query: with the same weights they should name much the same photos with nearly
    the same cosines (the two tools decode and resize photos slightly differently, so not exactly)."""
    answers = {tool.label: tool.parse_results(runs[tool.label][-1].stdout) for tool in tools}
    reference = dict(answers[tools[0].label])
    result: dict[str, Any] = {"top10": {label: answer for label, answer in answers.items()}}
    for label, answer in list(answers.items())[1:]:
        shared = [name for name, _score in answer if name in reference]
        diffs = [abs(score - reference[name]) for name, score in answer if name in reference]
        result[f"{label} vs {tools[0].label}"] = {"shared_in_top10": len(shared),
                                                  "max_score_diff": round(max(diffs), 4) if diffs else None}
    return result


def summarize(figures: dict[str, Any], images: int) -> dict[str, Any]:
    walls = [run["wall_s"] for run in figures["index_runs"]]
    fixed = [run["wall_s"] for run in figures["fixed_runs"]]
    steady = [(images - 1) / (wall - one) for wall, one in zip(walls, fixed, strict=True) if wall > one]
    return {
        "index_wall_s_median": round(statistics.median(walls), 2),
        "index_ips_median": round(images / statistics.median(walls), 2),
        "index_ips_per_round": [round(images / wall, 2) for wall in walls],
        "fixed_s_median": round(statistics.median(fixed), 2),
        "steady_ips_median": round(statistics.median(steady), 2) if steady else None,
        "index_peak_rss_mb_median": round(statistics.median(run["peak_rss_mb"] for run in figures["index_runs"]), 1),
        "index_peak_rss_mb_max": max(run["peak_rss_mb"] for run in figures["index_runs"]),
        "fixed_peak_rss_mb_median": round(statistics.median(run["peak_rss_mb"] for run in figures["fixed_runs"]), 1),
        "others_busy_max": max((run["others_busy"] or 0.0) for run in figures["index_runs"] + figures["fixed_runs"]),
    }


# ------------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------------


def describe(args: argparse.Namespace, rclip: Rclip, weights: Weights) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "images": args.images, "megapixels": 2.0, "rounds": args.rounds, "queries_per_tool": args.queries,
        "seed": args.seed, "query": QUERY,
        "model": f"{MODEL_NAME}, random weights (seed {args.seed}), the same values in both tools",
        "export_check": weights.facts,
        "versions": {"rclip": rclip.version, "clipsearch": version("clipsearch"), "torch": version("torch"),
                     "open_clip_torch": version("open_clip_torch"), "python": platform.python_version()},
        "machine": {"cores": os.cpu_count(), "cpu": _cpu_name(), "memory_gib": _memory_gib()},
    }


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def _memory_gib() -> float:
    return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)


def write_json(path: Path, figures: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def print_table(figures: dict[str, Any]) -> None:
    labels = list(figures["tools"])
    rows = [
        (f"index {figures['images']} photos, images/s", "index_ips_median", "{:.1f}"),
        ("steady images/s ((N-1)/(wall N - wall 1))", "steady_ips_median", "{:.1f}"),
        ("fixed part (index 1 photo), s", "fixed_s_median", "{:.2f}"),
        ("peak RSS of index, MB", "index_peak_rss_mb_median", "{:,.0f}"),
    ]
    width = max(len(label) for label in labels) + 2
    print(f"\n{'':44}" + "".join(f"{label:>{width}}" for label in labels))
    for title, key, fmt in rows:
        values = [figures["tools"][label]["summary"][key] for label in labels]
        print(f"{title:44}" + "".join(f"{_fmt(fmt, value):>{width}}" for value in values))
    for key, fmt, title in (("median_s", "{:.2f}", "s"), ("median_peak_rss_mb", "{:,.0f}", "MB")):
        values = [figures["queries"][label][key] for label in labels]
        print(f"{'cold text query, median ' + title:44}" + "".join(f"{_fmt(fmt, v):>{width}}" for v in values))
    for label, query in figures["queries"].items():
        if label not in labels:
            print(f"reference: {label}: {query['median_s']:.2f} s, {query['median_peak_rss_mb']:,.0f} MB")
    busy = max([tool["summary"]["others_busy_max"] for tool in figures["tools"].values()]
               + [query["others_busy_max"] for query in figures["queries"].values()])
    if busy > BUSY:
        print(f"note: other work used up to {busy:.0%} of the cores during some runs; those figures are slower "
              "than an idle machine's (see others_busy in the JSON)")


def _fmt(fmt: str, value: float | None) -> str:
    return "-" if value is None else fmt.format(value)


if __name__ == "__main__":
    main()
