"""How close does `clipsearch index` come to the model's own forward-pass speed?

    python benchmarks/index_throughput.py --images 300 --megapixels 12 --model ViT-B-32 --out results/tp.json

Creates N photo-like JPEGs of M megapixels (seeded: smooth textured content with noise, camera-like EXIF,
quality 90), then in one run measures
  1. model_only_ips: the encoder on already-preprocessed pixels, same batch size, all cores, for at least
     --min-seconds;
  2. decode_only_ips: the pipeline's loader alone (its decode pool as `index` would choose it: draft-mode JPEG,
     EXIF orientation, hash, metadata, resize + crop), and the CPU time one image costs it;
  3. end_to_end_ips: the real `clipsearch index --json` command on the folder, in a subprocess: images encoded
     divided by the run time it reports (crawl, plan, importing torch and open_clip, model loading, decode,
     encode, write, index update); end_to_end_wall_ips divides by the whole process wall time instead (Python
     start-up and exit included), encoding_phase_ips by the time from the first decode to the last batch
     written (what a long run tends to), and fixed_s is the rest of the run;
and writes JSON with ratio = end_to_end_ips / model_only_ips, peak_rss_mb (the `index` process at its largest,
decode workers included) and the device.

On a CPU the encoder needs every core, so whatever decoding costs comes out of the encoder's time: with M the
model's CPU milliseconds per image and D the decoder's, no schedule can beat ceiling_ratio = M / (M + D). The JSON
gives M, D and that ceiling, so a ratio can be read against what the machine allows.

A built-in open_clip name without a tag (e.g. ViT-B-32) is benchmarked with random weights: speed does not
depend on the weights, and no download is needed. The weights are written once as a local-dir model folder so
the run goes through the real loading path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from clipsearch.indexer.crawl import FoundFile, crawl
from clipsearch.indexer.pipeline import decode_plan, default_batch_size
from clipsearch.indexer.workers import decode_stream
from PIL import Image

from clipsearch.model import ClipModel, ModelSpec


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipsearch-throughput-"))
    photos = make_photos(work / "photos", args.images, args.megapixels, args.seed)
    spec = model_spec(args.model, args.pretrained, work / "model")
    clip = ClipModel.load(spec, args.device)
    batch = args.batch_size or default_batch_size(clip.device)
    plan = decode_plan(clip.device, args.images, args.workers)
    figures: dict[str, Any] = {
        "images": args.images,
        "megapixels": args.megapixels,
        "model": args.model,
        "device": clip.device,
        "cores": os.cpu_count(),
        "batch_size": batch,
        "workers": plan.workers,
        "decode_pool": plan.kind if plan.workers else "in-process",
        "torch": _version("torch"),
        "pillow": Image.__version__,
    }
    with Others(figures, "model_only"):
        figures.update(model_only(clip, batch, args.images, args.min_seconds))
    with Others(figures, "decode_only"):
        figures.update(decode_only(photos, clip, plan, batch))
    del clip
    library = Path(tempfile.mkdtemp(prefix="library-", dir=work))  # fresh each run: everything is new to it
    with Others(figures, "end_to_end"):
        figures.update(end_to_end(photos, library, spec, args))
    shutil.rmtree(library)
    figures.update(summary(figures))
    figures["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    write_json(args.out, figures)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--megapixels", type=float, default=2.0)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="Tag for real weights (default: random weights).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=20.0, help="Shortest model-only measurement.")
    parser.add_argument("--workdir", default=None, help="Keep generated photos here (default: a temp folder).")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def make_photos(folder: Path, count: int, megapixels: float, seed: int) -> Path:
    """Seeded photo-like JPEGs: smooth colour fields + fine noise (so JPEG has real work), camera EXIF."""
    folder.mkdir(parents=True, exist_ok=True)
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    rng = np.random.default_rng(seed)
    base = [photo_like(width, height, rng) for _ in range(8)]
    for n in range(count):
        path = folder / f"IMG_{n:05d}.jpg"
        if not path.exists():
            shifted = np.roll(base[n % len(base)], shift=(n * 37) % width, axis=1)
            Image.fromarray(shifted).save(path, quality=90, exif=camera_exif(n))
    return folder


def photo_like(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    small = rng.integers(0, 256, size=(max(height // 200, 2), max(width // 200, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def camera_exif(n: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "EOS R6"
    exif[0x0132] = f"2023:07:{1 + n % 28:02d} 12:00:00"
    return exif


def model_spec(name: str, pretrained: str | None, folder: Path) -> ModelSpec:
    if name.startswith(("local-dir:", "hf-hub:")) or pretrained:
        return ModelSpec.parse(name, pretrained)
    return ModelSpec.parse(f"local-dir:{random_weights_folder(name, folder)}")


def random_weights_folder(name: str, folder: Path) -> Path:
    import open_clip

    from clipsearch.tinyclip import save_local_dir

    if not (folder / "open_clip_model.safetensors").exists():
        model = open_clip.create_model(name, pretrained=None)
        save_local_dir(model, folder, open_clip.get_model_config(name))
    return folder


def model_only(clip: ClipModel, batch: int, images: int, min_seconds: float) -> dict[str, Any]:
    """The encoder alone on ready pixels, all cores: the physical limit of indexing on this machine."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, clip.image_size, clip.image_size, 3), np.uint8)
    clip.encode_pixels(pixels)  # warm-up
    done, started = 0, time.perf_counter()
    while done < images or time.perf_counter() - started < min_seconds:
        clip.encode_pixels(pixels)
        done += batch
    seconds = time.perf_counter() - started
    return {"model_only_ips": round(done / seconds, 2), "model_only_images": done,
            "model_only_s": round(seconds, 1)}


def decode_only(photos: Path, clip: ClipModel, plan: Any, batch: int) -> dict[str, Any]:
    """The pipeline's loader alone, as `index` would run it; and the CPU time one image costs it."""
    files = [f for f in crawl([photos]) if isinstance(f, FoundFile)]
    started = time.perf_counter()
    items = list(decode_stream(files, clip.pixel_transform, clip.image_size, plan.workers, 4 * batch,
                               kind=plan.kind, niceness=plan.niceness))
    seconds = time.perf_counter() - started
    cpu_ms = 1000 * sum(item.decode_seconds for item in items) / len(items)
    failed = sum(1 for item in items if item.pixels is None)
    return {"decode_only_ips": round(len(items) / seconds, 2), "decode_cpu_ms_per_image": round(cpu_ms, 2),
            "decode_failures": failed}


def end_to_end(photos: Path, library_dir: Path, spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The real `clipsearch index` command, in a subprocess; its peak RSS comes from wait4 on that process."""
    command = [sys.executable, "-m", "clipsearch", "index", str(photos), "--library", str(library_dir),
               "--model", spec.name, "--json"]
    if spec.pretrained:
        command += ["--pretrained", spec.pretrained]
    for option, value in (("--batch-size", args.batch_size), ("--workers", args.workers), ("--device", args.device)):
        if value is not None:
            command += [option, str(value)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    output = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    Others.child_cpu_s += usage.ru_utime + usage.ru_stime
    if status != 0:
        raise SystemExit(f"clipsearch index failed (status {status}): {' '.join(command)}")
    report = json.loads(output)
    return {
        "end_to_end_ips": round(report["encoded"] / report["elapsed"], 2),
        "encoding_phase_ips": round(report["encoded"] / report["encoding_elapsed"], 2),
        "fixed_s": round(report["elapsed"] - report["encoding_elapsed"], 2),
        "end_to_end_wall_ips": round(report["encoded"] / wall, 2),
        "end_to_end_s": round(report["elapsed"], 2),
        "end_to_end_wall_s": round(wall, 2),
        "encoded": report["encoded"],
        "errors": len(report["errors"]),
        "report_encode_ips": report["encode_ips"],
        "report_decode_ips": report["decode_ips"],
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


class Others:
    """How busy the cores were with other people's work during a phase: (all CPU time the machine spent, from
    /proc/stat, less this benchmark's own) / (wall time x cores). On a shared machine a phase above ~0.05 was
    disturbed and is worth measuring again; None where /proc/stat does not exist."""

    child_cpu_s = 0.0  # CPU seconds of subprocesses waited for with wait4 (their usage is not in RUSAGE_SELF)

    def __init__(self, figures: dict[str, Any], phase: str) -> None:
        self.figures, self.key = figures, f"{phase}_others_busy"

    def __enter__(self) -> Others:
        self.start = (_machine_busy_s(), _own_cpu_s(), time.perf_counter())
        return self

    def __exit__(self, *_exc: object) -> None:
        machine, own, started = self.start
        now = _machine_busy_s()
        if machine is None or now is None:
            self.figures[self.key] = None
            return
        wall = time.perf_counter() - started
        others = (now - machine) - (_own_cpu_s() - own)
        self.figures[self.key] = round(max(others, 0.0) / (wall * (os.cpu_count() or 1)), 3)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + Others.child_cpu_s


def _machine_busy_s() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def summary(figures: dict[str, Any]) -> dict[str, Any]:
    model = figures["model_only_ips"]
    result: dict[str, Any] = {
        "ratio": round(figures["end_to_end_ips"] / model, 3),
        "encoding_phase_ratio": round(figures["encoding_phase_ips"] / model, 3),
    }
    if figures["device"] == "cpu":
        model_ms = 1000 * (figures["cores"] or 1) / figures["model_only_ips"]
        decode_ms = figures["decode_cpu_ms_per_image"]
        result["model_cpu_ms_per_image"] = round(model_ms, 1)
        result["ceiling_ratio"] = round(model_ms / (model_ms + decode_ms), 3)
    return result


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def write_json(path: str, figures: dict[str, object]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
