"""Indexing throughput on a Ray cluster of 1 and then 2 worker nodes, started on this machine.

    python benchmarks/distributed_bench.py --images 600 --megapixels 2 --model ViT-B-32 --out results/dist.json

Creates N photo-like JPEGs (the same generator as `index_throughput.py`), then for 1 and 2 nodes starts a Ray
cluster on 127.0.0.1 (each node given --cpus-per-node CPUs, and --gpus-per-node GPUs when asked), indexes the
folder into a fresh library through `index_folders(..., IndexOptions(ray=address))` and stops the cluster. For
reference the same folder is also indexed locally (local_ips), with every core of this machine.

Each run's images/s is measured in steady state: from the first batch written to the last, which leaves out the
actors' start-up (importing torch, loading the model, starting decode processes); `*_run_ips` divides by the
whole encoding phase instead. The JSON has ips_1, ips_2, scaling = ips_2 / ips_1, local_ips and both runs'
details. A built-in model name without --pretrained gets random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clipsearch.indexer.pipeline import IndexOptions, index_folders  # noqa: E402
from index_throughput import make_photos, model_spec, write_json  # noqa: E402

from clipsearch.library import Library  # noqa: E402
from clipsearch.model import ModelSpec  # noqa: E402


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipsearch-distributed-"))
    photos = make_photos(work / "photos", args.images, args.megapixels, args.seed)
    spec = model_spec(args.model, args.pretrained, work / "model")
    figures: dict[str, Any] = {"images": args.images, "megapixels": args.megapixels, "model": args.model,
                               "cpus_per_node": args.cpus_per_node, "gpus_per_node": args.gpus_per_node,
                               "batch_size": args.batch_size, "machine_cores": os.cpu_count()}
    for nodes in (1, 2):
        with ray_cluster(nodes, args.cpus_per_node, args.gpus_per_node) as address:
            figures[f"run_{nodes}"] = index_run(photos, work / f"library-{nodes}", spec, args, ray=address)
        figures[f"ips_{nodes}"] = figures[f"run_{nodes}"]["steady_ips"]
        figures[f"run_ips_{nodes}"] = figures[f"run_{nodes}"]["run_ips"]
    figures["scaling"] = round(figures["ips_2"] / figures["ips_1"], 3) if figures["ips_1"] else None
    figures["local"] = index_run(photos, work / "library-local", spec, args, ray=None)
    figures["local_ips"] = figures["local"]["steady_ips"]
    write_json(args.out, figures)
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, dict)}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--megapixels", type=float, default=2.0)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="Tag for real weights (default: random weights).")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs each node offers (its GPU actor).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="Keep photos and libraries here (default: a temp folder).")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


@contextmanager
def ray_cluster(nodes: int, cpus: int, gpus: int) -> Iterator[str]:
    """A head and ``nodes - 1`` more nodes on 127.0.0.1; the head also works (it has CPUs like the others)."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    common = [f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              "--object-store-memory=500000000"]
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                        *common], check=True, capture_output=True)
        for _ in range(nodes - 1):
            subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def index_run(photos: Path, library_dir: Path, spec: ModelSpec, args: argparse.Namespace,
              ray: str | None) -> dict[str, Any]:
    """Index ``photos`` into a fresh library (on the cluster at ``ray``, or locally) and time its batches."""
    batches: list[tuple[float, int]] = []

    def progress(event: str, info: dict[str, Any]) -> None:
        if event == "batch":
            batches.append((time.perf_counter(), int(info["done"])))

    library = Library.create(library_dir)
    options = IndexOptions(batch_size=args.batch_size, ray=ray)
    report = index_folders(library, [photos], model=spec, options=options, progress=progress)
    library.close()
    return {"encoded": report.encoded, "errors": len(report.failures), "decode_pool": report.decode_pool,
            "encoding_elapsed_s": round(report.encoding_elapsed, 2), "elapsed_s": round(report.elapsed, 2),
            "run_ips": round(report.encoded / report.encoding_elapsed, 2) if report.encoding_elapsed else 0.0,
            "steady_ips": _steady_ips(batches)}


def _steady_ips(batches: list[tuple[float, int]]) -> float:
    """Images per second from the first batch written to the last (the first batch's images not counted)."""
    if len(batches) < 2:
        return 0.0
    (first_t, first_done), (last_t, last_done) = batches[0], batches[-1]
    return round((last_done - first_done) / (last_t - first_t), 2) if last_t > first_t else 0.0


if __name__ == "__main__":
    main()
