"""Every inference backend and precision, model-only and end to end, in one run.

    python benchmarks/index_throughput.py --images 300 --megapixels 2 12 --out benchmarks/results/throughput.json

Writes a random-weight ViT-B-32-256 (open_clip's architecture, nothing downloaded; speed does not depend on the
weights) as a `local-dir:` model, exports it once into a cache folder of its own (timed), runs the first real
`clipsearch index` (export found, probe on the run's first photos: the choice this machine makes), then for each
backend and precision this machine can run (`clipsearch.inference.probe.CPU_CANDIDATES`) measures

  1. model_only_ips: the encoder on already-preprocessed pixels, same batch size, all cores, >= --min-seconds;
  2. per photo size (--megapixels, e.g. 2 and 12): the real `clipsearch index --backend B --precision P --json`
     command in a subprocess on N seeded photo-like JPEGs, into a fresh library: end_to_end_ips (images encoded
     / the run time it reports), encoding_phase_ips (first decode to last batch written), end_to_end_wall_ips
     (whole process: Python start-up, imports, exit), peak_rss_mb (wait4's maximum resident set);
  3. fixed_s: the wall time of `clipsearch index` on a folder of one photo with the export and the probe record
     in the cache (start-up, imports, crawl, model load, one photo, index update, exit);

and, once per photo size, decode_only_ips and the decoder's CPU time per photo, D. With M the model's CPU time per
image (cores / model-only rate), no schedule on a CPU beats ceiling_ratio = M / (M + D): the encoder needs every
core, so decoding comes out of its time. `ratio` = end_to_end_ips / model_only_ips is read against it.
`*_others_busy` says how busy the cores were with other work meanwhile (a shared machine: above ~0.05 a phase was
disturbed).
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

from clipsearch.model import ModelSpec


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipsearch-throughput-"))
    os.environ["CLIPSEARCH_CACHE"] = str(work / "cache")  # this process and every `clipsearch index` it runs
    shutil.rmtree(work / "cache", ignore_errors=True)  # the export and the probe are measured from scratch
    spec = model_spec(args.model, args.pretrained, work / "model")
    folders = {mp: make_photos(work / f"photos-{mp:g}mp", args.images, mp, args.seed) for mp in args.megapixels}
    figures: dict[str, Any] = {"images": args.images, "megapixels": args.megapixels, "model": args.model,
                               "cores": os.cpu_count(), "versions": versions(), "pillow": Image.__version__}
    figures["export_s"] = export_seconds(spec)
    with Others(figures, "first_run"):
        figures["first_run"] = first_run(folders[args.megapixels[0]], work, spec, args)
    figures["decode"] = {f"{mp:g}mp": decode_only(folder, spec, args) for mp, folder in folders.items()}
    figures["backends"] = {}
    for backend, precision in candidates(args):
        figures["backends"][f"{backend} {precision}"] = measure_backend(backend, precision, spec, folders, work,
                                                                        args, figures["decode"])
        write_json(args.out, figures, quiet=True)
    if args.sweep_workers:
        figures["workers_sweep"] = sweep_workers(figures["first_run"]["probe"]["chosen"], spec, folders, work, args)
    figures["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    write_json(args.out, figures)


def sweep_workers(chosen: str, spec: ModelSpec, folders: dict[float, Path], work: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    """The split of the cores between decoding and the runtime: the chosen backend end to end with each number
    of decode threads (at the lowest priority; the runtime always gets every core)."""
    backend, precision = chosen.split(" ", 1)
    result: dict[str, Any] = {}
    for workers in args.sweep_workers:
        for mp, photos in folders.items():
            extra = ("--backend", backend, "--precision", precision, "--workers", str(workers))
            run = run_index(photos, work, spec, argparse.Namespace(**{**vars(args), "workers": None}), extra)
            result[f"{workers} workers, {mp:g}mp"] = {k: run[k] for k in ("end_to_end_ips", "encoding_phase_ips")}
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--megapixels", type=float, nargs="+", default=[2.0, 12.0])
    parser.add_argument("--model", default="ViT-B-32-256")
    parser.add_argument("--pretrained", default=None, help="Tag for real weights (default: random weights).")
    parser.add_argument("--only", nargs="*", default=None, help="Backends to measure, e.g. 'onnxruntime int8'.")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--sweep-workers", type=int, nargs="*", default=[],
                        help="Also run the chosen backend with each of these numbers of decode threads.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=10.0, help="Shortest model-only measurement.")
    parser.add_argument("--workdir", default=None, help="Keep generated photos here (default: a temp folder).")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def candidates(args: argparse.Namespace) -> list[tuple[str, str]]:
    from clipsearch.inference.loader import available
    from clipsearch.inference.probe import CPU_CANDIDATES

    found = available(list(CPU_CANDIDATES))
    return [c for c in found if args.only is None or " ".join(c) in args.only]


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    result: dict[str, str | None] = {}
    for package in ("torch", "open_clip_torch", "onnxruntime", "openvino"):
        try:
            result[package] = version(package)
        except PackageNotFoundError:
            result[package] = None
    return result


def export_seconds(spec: ModelSpec) -> float:
    """Exporting both towers (and the int8 image tower) in a fresh process, as a first run does."""
    script = ("from clipsearch.inference.loader import ensure_export; from clipsearch.model import ModelSpec; "
              f"ensure_export(ModelSpec.parse({spec.name!r}))")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True)
    return round(time.perf_counter() - started, 1)


def first_run(photos: Path, work: Path, spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The first `clipsearch index` on this machine and model: the probe runs on its first photos."""
    from clipsearch.inference.export import find_export
    from clipsearch.inference.probe import load_record

    result = run_index(photos, work, spec, args, ())
    export = find_export(spec)
    assert export is not None
    record = load_record(export.key)
    result["probe"] = {"chosen": record.chosen, "candidates": record.candidates}
    return result


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
    if not (folder / "open_clip_model.safetensors").exists():
        from clipsearch.tinyclip import random_builtin_dir

        random_builtin_dir(folder, name)
    return ModelSpec.parse(f"local-dir:{folder}")


def measure_backend(backend: str, precision: str, spec: ModelSpec, folders: dict[float, Path], work: Path,
                    args: argparse.Namespace, decode: dict[str, Any]) -> dict[str, Any]:
    force = ("--backend", backend, "--precision", precision)
    figures: dict[str, Any] = {}
    with Others(figures, "model_only"):
        figures.update(model_only(backend, precision, spec, args))
    for mp, photos in folders.items():
        size = f"{mp:g}mp"
        with Others(figures, f"end_to_end_{size}"):
            run = run_index(photos, work, spec, args, force)
        model_ms = 1000 * (os.cpu_count() or 1) / figures["model_only_ips"]
        run["ratio"] = round(run["end_to_end_ips"] / figures["model_only_ips"], 3)
        run["ceiling_ratio"] = round(model_ms / (model_ms + decode[size]["decode_cpu_ms_per_image"]), 3)
        figures[size] = run
    one = work / "one-photo"
    if not one.exists():
        one.mkdir()
        shutil.copy(next(iter(sorted(next(iter(folders.values())).glob("*.jpg")))), one / "IMG_00000.jpg")
    with Others(figures, "fixed"):
        figures["fixed_s"] = run_index(one, work, spec, args, force)["end_to_end_wall_s"]
    print(f"{backend} {precision}: {json.dumps(figures)}", file=sys.stderr)
    return figures


def model_only(backend: str, precision: str, spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The encoder alone on ready pixels, all cores: the physical limit of indexing on this machine."""
    from clipsearch.inference.loader import build_image_encoder, ensure_export

    export, _ = ensure_export(spec)
    started = time.perf_counter()
    encoder = build_image_encoder(export, backend, precision)
    load_s = time.perf_counter() - started
    if backend == "torch":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    batch = args.batch_size or default_batch_size("cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *export.geometry.size, 3), np.uint8)
    encoder.encode_pixels(pixels)  # warm-up
    done, started = 0, time.perf_counter()
    while done < args.images or time.perf_counter() - started < args.min_seconds:
        encoder.encode_pixels(pixels)
        done += batch
    seconds = time.perf_counter() - started
    return {"model_only_ips": round(done / seconds, 2), "model_only_images": done, "model_load_s": round(load_s, 2)}


def decode_only(photos: Path, spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's loader alone, as `index` would run it; and the CPU time one image costs it."""
    from clipsearch.inference.loader import ensure_export

    transform = ensure_export(spec)[0].pixel_transform
    plan = decode_plan("cpu", args.images, args.workers)
    files = [f for f in crawl([photos]) if isinstance(f, FoundFile)]
    batch = args.batch_size or default_batch_size("cpu")
    started = time.perf_counter()
    items = list(decode_stream(files, transform, transform.size, plan.workers, 4 * batch, kind=plan.kind,
                               niceness=plan.niceness))
    seconds = time.perf_counter() - started
    cpu_ms = 1000 * sum(item.decode_seconds for item in items) / len(items)
    return {"decode_only_ips": round(len(items) / seconds, 2), "decode_cpu_ms_per_image": round(cpu_ms, 2),
            "decode_failures": sum(1 for item in items if item.pixels is None), "workers": plan.workers}


def run_index(photos: Path, work: Path, spec: ModelSpec, args: argparse.Namespace,
              extra: tuple[str, ...]) -> dict[str, Any]:
    """The real `clipsearch index` command, in a subprocess, into a fresh library; its peak RSS comes from
    wait4 on that process."""
    library = Path(tempfile.mkdtemp(prefix="library-", dir=work))
    status_file = library.with_suffix(".status")
    command = [sys.executable, "-c", PEAK_RSS_WRAPPER, str(status_file), "index", str(photos), "--library",
               str(library), "--model", spec.name, "--json", *extra]
    for option, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value is not None:
            command += [option, str(value)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    output = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    Others.child_cpu_s += usage.ru_utime + usage.ru_stime
    shutil.rmtree(library)
    peak_kb = int(status_file.read_text().split("VmHWM:")[1].split()[0])
    status_file.unlink()
    if status != 0:
        raise SystemExit(f"clipsearch index failed (status {status}): {' '.join(command)}")
    report = json.loads(output)
    return {
        "backend": f"{report['backend']} {report['precision']}",
        "end_to_end_ips": round(report["encoded"] / report["elapsed"], 2),
        "encoding_phase_ips": round(report["encoded"] / report["encoding_elapsed"], 2),
        "end_to_end_wall_ips": round(report["encoded"] / wall, 2),
        "end_to_end_s": round(report["elapsed"], 2),
        "end_to_end_wall_s": round(wall, 2),
        "encoded": report["encoded"],
        "errors": len(report["errors"]),
        "report_encode_ips": report["encode_ips"],
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }


# `clipsearch` itself, which writes its /proc/self/status at exit: VmHWM there is the peak resident set of this
# process since it started. (wait4's ru_maxrss would also count the benchmark's own pages, which the child
# shares from the fork until its exec.)
PEAK_RSS_WRAPPER = """
import atexit, sys
target = sys.argv.pop(1)
atexit.register(lambda: open(target, "w").write(open("/proc/self/status").read()))
sys.argv[0] = "clipsearch"
from clipsearch.cli import main
main()
"""


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


def write_json(path: str, figures: dict[str, object], quiet: bool = False) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
    if not quiet:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
