"""How long does `clipsearch index` take on a tree where nothing changed?

    python benchmarks/rescan_bench.py --files 100000 --out benchmarks/results/rescan_100k.json

Builds a tree of N small real JPEGs (seeded, 64×48 px, each file different, 250 to a folder in a
year/month/batch layout), indexes it once with the project's tiny random-weight 64 px model
(`python -m clipsearch.tinyclip random`), then times more runs of the same `clipsearch index` command on the
unchanged tree. Every run is the real command in a subprocess, so a re-scan's time is its whole wall clock:
Python start-up, imports, crawl (one stat per file), plan against the library, and the index check.
Target: a re-scan of 100,000 unchanged files in <= 20 s on 2 cores.

The files stay in the page cache between runs (as they do for a person who re-runs the command); the first
run's figures are written too, since they say how long the initial indexing of such a tree takes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SIZE = (64, 48)


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipsearch-rescan-"))
    tree = make_tree(work / "photos", args.files, args.per_folder, args.seed)
    model = make_model(work / "model")
    library = Path(tempfile.mkdtemp(prefix="library-", dir=work))  # fresh: the first run indexes everything
    first = run_index(tree, library, model)
    rescans = [run_index(tree, library, model) for _ in range(args.rescans)]
    shutil.rmtree(library)
    walls = [run["wall_s"] for run in rescans]
    figures = {
        "files": args.files,
        "cores": os.cpu_count(),
        "first_run_s": first["wall_s"],
        "first_run": first["report"],
        "rescan_s": round(statistics.median(walls), 2),
        "rescan_runs_s": walls,
        "rescan_elapsed_s": [run["report"]["elapsed"] for run in rescans],
        "rescan_unchanged": rescans[-1]["report"]["unchanged"],
        "rescan_encoded": rescans[-1]["report"]["encoded"],
        "first_run_peak_rss_mb": first["peak_rss_mb"],
        "rescan_peak_rss_mb": max(run["peak_rss_mb"] for run in rescans),
        "target_s": 20,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--per-folder", type=int, default=250)
    parser.add_argument("--rescans", type=int, default=3, help="Timed re-scans; the median is reported.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="Keep the tree, model and library here (default: temp).")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def make_tree(root: Path, count: int, per_folder: int, seed: int) -> Path:
    """``count`` distinct small JPEGs: smooth colour fields, each marked with its own number in a pixel block."""
    rng = np.random.default_rng(seed)
    bases = [smooth_image(rng) for _ in range(16)]
    for number in range(count):
        path = root / folder_of(number, per_folder) / f"IMG_{number:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = bases[number % len(bases)].copy()
        pixels[:4, :6] = np.frombuffer(number.to_bytes(18, "little"), np.uint8).reshape(1, 6, 3)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def folder_of(number: int, per_folder: int) -> str:
    batch = number // per_folder
    return f"{2000 + batch // 120}/{1 + batch // 10 % 12:02d}/batch-{batch % 10}"


def smooth_image(rng: np.random.Generator) -> np.ndarray:
    corners = rng.integers(0, 256, size=(2, 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(corners).resize(SIZE, Image.Resampling.BILINEAR), dtype=np.uint8).copy()


def make_model(folder: Path) -> str:
    if not (folder / "open_clip_config.json").exists():
        subprocess.run([sys.executable, "-m", "clipsearch.tinyclip", "random", "--out", str(folder)], check=True)
    return f"local-dir:{folder}"


def run_index(tree: Path, library: Path, model: str) -> dict[str, Any]:
    """One `clipsearch index --json` in a subprocess: its wall time and its report."""
    command = [sys.executable, "-m", "clipsearch", "index", str(tree), "--library", str(library),
               "--model", model, "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert process.stdout is not None
    output = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)  # this process's own peak memory, not the earlier runs'
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"clipsearch index failed (status {status}): {' '.join(command)}")
    report = json.loads(output)
    keep = ("found", "encoded", "unchanged", "elapsed", "encode_ips", "decode_ips", "workers", "decode_pool")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "report": {key: report.get(key) for key in keep}}


if __name__ == "__main__":
    main()
