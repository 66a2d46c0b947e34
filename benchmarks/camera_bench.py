"""Camera files: what decoding a RAW costs from its embedded preview and through LibRaw, next to a JPEG of the same
picture; and how long a killed writer keeps the library's lock on a loaded machine.

    python benchmarks/camera_bench.py --out benchmarks/results/camera.json

The RAW files are DNGs written by the test helpers (tests/camera_files.py): a `--megapixels` RGGB sensor readout
of a photo-like picture, with and without a full-size JPEG preview. Each decode is `decode_file` at the model's
size (min_side 224), median of `--repeats` runs, all in this one process.

The lock measurement starts `clipsearch index` (a random-weight tiny model, 24 JPEGs of 12 MP, decoding threads at nice
19), waits for its first committed batch, starts as many busy processes as there are cores times two, SIGKILLs
the index run, and times how long until the lock can be taken; `--kills` times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def decode_times(folder: Path, megapixels: float, repeats: int) -> dict[str, float]:
    from camera_files import dng
    from hostile import encode, photo_like

    from clipsearch.decode import Decoded, decode_file

    width = int((megapixels * 1e6 * 1.5) ** 0.5) // 2 * 2
    picture = photo_like(width, width * 2 // 3 // 2 * 2, seed=1)
    files = {"jpeg": ("photo.jpg", encode(picture, "JPEG", quality=92)), "dng_preview": ("preview.dng", dng(picture)),
             "dng_demosaic": ("sensor.dng", dng(picture, preview=False))}
    times = {}
    for kind, (name, data) in files.items():
        path = folder / name
        path.write_bytes(data)
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            assert isinstance(decode_file(str(path), min_side=224), Decoded)
            runs.append(time.perf_counter() - started)
        times[kind] = round(statistics.median(runs), 4)
    return times


def lock_release_times(folder: Path, kills: int) -> list[float]:
    import filelock
    from conftest import clipsearch_command
    from hostile import photo_like

    from clipsearch.tinyclip import random_init_dir

    if kills <= 0:
        return []
    model = f"local-dir:{random_init_dir(folder / 'model', seed=0)}"
    photos = folder / "photos"
    photos.mkdir()
    for n in range(24):
        photo_like(4000, 3000, seed=n).save(photos / f"{n:03}.jpg", quality=90)
    return [_one_kill(folder / f"library-{n}", photos, model, clipsearch_command(), filelock) for n in range(kills)]


def _one_kill(library: Path, photos: Path, model: str, command: list[str], filelock: object) -> float:
    env = {**os.environ, "CLIPSEARCH_LIBRARY": str(library), "CLIPSEARCH_MODEL": model}
    run = subprocess.Popen([*command, "index", str(photos), "--batch-size", "4"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_first_batch(library)
    burn = "import time\nend = time.time() + 120\nwhile time.time() < end: pass"
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        time.sleep(0.5)
        lock = filelock.FileLock(str(library / "writer.lock"))  # type: ignore[attr-defined]
        run.kill()
        killed = time.monotonic()
        lock.acquire(timeout=120, poll_interval=0.01)
        seconds = time.monotonic() - killed
        lock.release()
        return round(seconds, 2)
    finally:
        run.wait()
        for burner in burners:
            burner.kill()
            burner.wait()


def _wait_for_first_batch(library: Path) -> None:
    from clipsearch.errors import LibraryError
    from clipsearch.library import Library

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if Library.open(library).store.count_images():
                return
        except LibraryError:
            pass
        time.sleep(0.05)
    raise SystemExit("the index run committed nothing in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "camera.json")
    arguments = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        result = {"megapixels": arguments.megapixels, "decode_seconds": decode_times(folder, arguments.megapixels,
                                                                                     arguments.repeats),
                  "lock_free_after_kill_seconds": lock_release_times(folder, arguments.kills),
                  "cores": os.cpu_count()}
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
