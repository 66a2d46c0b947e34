"""How close does `clipsearch index` come to the model's own forward-pass speed?

    python benchmarks/index_throughput.py --images 300 --megapixels 12 --model ViT-B-32 --out results/tp.json

Creates N photo-like JPEGs of M megapixels (seeded: smooth textured content with noise, camera-like EXIF,
quality 90), then in one run measures
  1. model_only_ips: the encoder on already-preprocessed pixels, same batch size, all cores;
  2. decode_only_ips: the pipeline's loader (decode workers, draft-mode JPEG, resize + crop) alone;
  3. end_to_end_ips: a whole `index_folders` run on the folder (crawl, plan, decode, encode, write, index);
and writes JSON with ratio = end_to_end_ips / model_only_ips, peak_rss_mb and the device.

A built-in open_clip name without a tag (e.g. ViT-B-32) is benchmarked with random weights: speed does not
depend on the weights, and no download is needed. The weights are written once as a local-dir model folder so
the run goes through the real loading path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from clipsearch.indexer.crawl import crawl
from clipsearch.indexer.pipeline import IndexOptions, default_batch_size, default_workers, index_folders
from clipsearch.indexer.workers import decode_stream
from PIL import Image

from clipsearch.library import Library
from clipsearch.model import ClipModel, ModelSpec


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipsearch-throughput-"))
    photos = make_photos(work / "photos", args.images, args.megapixels, args.seed)
    spec = model_spec(args.model, args.pretrained, work / "model")
    clip = ClipModel.load(spec, args.device)
    batch = args.batch_size or default_batch_size(clip.device)
    workers = args.workers if args.workers is not None else default_workers(clip.device, args.images)
    figures = {
        "images": args.images,
        "megapixels": args.megapixels,
        "model": args.model,
        "device": clip.device,
        "batch_size": batch,
        "workers": workers,
        "cores": os.cpu_count(),
        "model_only_ips": model_only(clip, batch, max(args.images // 2, batch * 3)),
        "decode_only_ips": decode_only(photos, clip, workers, batch),
    }
    del clip
    figures["end_to_end_ips"] = end_to_end(photos, work / "library", spec, args.device, batch, workers)
    figures["ratio"] = round(figures["end_to_end_ips"] / figures["model_only_ips"], 3)
    figures["peak_rss_mb"] = peak_rss_mb()
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


def model_only(clip: ClipModel, batch: int, images: int) -> float:
    """The encoder alone on ready pixels: the physical limit of indexing on this machine."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, clip.image_size, clip.image_size, 3), np.uint8)
    clip.encode_pixels(pixels)  # warm-up
    rounds = max(images // batch, 2)
    started = time.perf_counter()
    for _ in range(rounds):
        clip.encode_pixels(pixels)
    return round(rounds * batch / (time.perf_counter() - started), 2)


def decode_only(photos: Path, clip: ClipModel, workers: int, batch: int) -> float:
    files = [f for f in crawl([photos]) if hasattr(f, "size")]
    started = time.perf_counter()
    count = sum(1 for _ in decode_stream(files, clip.pixel_transform, clip.image_size, workers, 4 * batch))
    return round(count / (time.perf_counter() - started), 2)


def end_to_end(photos: Path, library_dir: Path, spec: ModelSpec, device: str | None, batch: int,
               workers: int) -> float:
    library = Library.create(library_dir)
    options = IndexOptions(batch_size=batch, workers=workers, device=device)
    started = time.perf_counter()
    report = index_folders(library, [photos], model=spec, options=options)
    elapsed = time.perf_counter() - started
    return round(report.encoded / elapsed, 2)


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def write_json(path: str, figures: dict[str, object]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
