"""The indexing pipeline's speed path: draft-mode decode, the decode pool and its crash recovery, how threads are
shared with the encoder, batched writes, progress with a rate, and the GPU scheduling run on the CPU."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from clipsearch.indexer.crawl import FoundFile
from clipsearch.indexer.pipeline import IndexOptions, decode_plan, index_folders
from clipsearch.indexer.workers import CRASHED, decode_one, decode_stream
from hostile import jpeg_bytes, make_exif, photo_like, write
from PIL import Image, ImageDraw, ImageOps

from clipsearch.decode import decode_file
from clipsearch.library import Library
from clipsearch.model import ClipModel, ModelSpec
from clipsearch.vectors import VectorStore


@pytest.fixture(scope="module")
def clip(random_model: str) -> ClipModel:
    return ClipModel.load(ModelSpec.parse(random_model), "cpu")


def found(path: Path) -> FoundFile:
    info = path.stat()
    return FoundFile(str(path), info.st_size, info.st_mtime_ns)


def marked_photo(width: int, height: int) -> Image.Image:
    """Photo-like texture with a red block in the top-left corner, so a wrong rotation cannot go unnoticed."""
    image = photo_like(width, height, seed=3)
    ImageDraw.Draw(image).rectangle((0, 0, width // 3, height // 3), fill=(230, 20, 20))
    return image


# --- draft-mode decode --------------------------------------------------------------------------------------


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    path = write(tmp_path / "12mp.jpg", jpeg_bytes(photo_like(4000, 3000)))
    image = decode_file(str(path), min_side=224).image
    assert image.size == (500, 375)  # libjpeg's 1/8 scale: never below what the model needs, never much above


def test_model_gets_the_pixels_of_a_full_decode_upright(tmp_path: Path, clip: ClipModel) -> None:
    """A drafted (1/8 scale), EXIF-rotated decode gives the model what open_clip's own preprocessing of the
    full-resolution upright photo gives, to within resampling noise."""
    original = marked_photo(1600, 1000)
    path = write(tmp_path / "turned.jpg", jpeg_bytes(original, make_exif(orientation=6), quality=95))
    assert decode_file(str(path), min_side=clip.image_size).image.size == (125, 200)  # drafted, then turned
    item = decode_one(found(path), clip.pixel_transform, clip.image_size)
    assert item.pixels is not None and item.record is not None
    assert item.pixels.shape == (clip.image_size, clip.image_size, 3) and item.pixels.dtype == np.uint8
    assert (item.record["width"], item.record["height"]) == (1000, 1600)
    with Image.open(path) as full:
        upright = ImageOps.exif_transpose(full)
        reference = clip.pixel_transform(upright)
    difference = np.abs(item.pixels.astype(int) - reference.astype(int))
    assert difference.mean() < 1.5, difference.mean()
    assert item.pixels[:8, -8:, 0].mean() > 180  # the red corner is now top-right, as a viewer shows it


# --- how the cores are shared -------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [10, 100_000])
def test_cpu_plan_leaves_the_cores_to_the_encoder(files: int) -> None:
    cores = os.cpu_count() or 1
    plan = decode_plan("cpu", files)
    assert plan.torch_threads == cores  # at normal priority only the encoder's threads compete
    assert plan.kind == "threads" and plan.niceness > 0 and 1 <= plan.workers <= cores


def test_gpu_plan_decodes_on_every_core_but_one() -> None:
    cores = os.cpu_count() or 1
    big, small = decode_plan("cuda", 100_000), decode_plan("cuda", 10)
    assert big.kind == "processes" and big.workers == max(1, cores - 1) and big.torch_threads is None
    assert small.kind == "threads"


def test_workers_option_overrides_the_count() -> None:
    assert decode_plan("cpu", 1000, workers=0).workers == 0
    assert decode_plan("cuda", 1000, workers=3).workers == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_decode_threads_run_at_lower_priority(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jpg", jpeg_bytes(photo_like(64, 48)))
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    items = list(decode_stream([found(path)] * 4, NiceRecorder(), 16, workers=2, window=4, kind="threads",
                               niceness=5))
    assert {int(item.pixels[0, 0, 0]) for item in items if item.pixels is not None} == {min(19, own + 5)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # the caller is untouched


class NiceRecorder:
    """A pixel transform whose pixels hold the nice value of the thread that ran it."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return np.full((2, 2, 3), nice, dtype=np.uint8)


def test_encoding_gets_every_core_and_gives_torch_threads_back(
    library_dir: Path, tmp_path: Path, random_model: str
) -> None:
    import torch

    folder = tmp_path / "photos"
    for n in range(3):
        write(folder / f"{n}.jpg", jpeg_bytes(photo_like(80, 60, seed=n)))
    seen: dict[str, int] = {}
    library = Library.create(library_dir)
    torch.set_num_threads(1)
    try:
        index_folders(library, [folder], model=ModelSpec.parse(random_model),
                      options=IndexOptions(backend="torch"),
                      progress=lambda event, _info: seen.setdefault(event, torch.get_num_threads()))
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert seen["batch"] == (os.cpu_count() or 1)
    assert seen["index"] == 1  # encoding is over: the caller's setting is back


# --- surviving a crashing decoder ---------------------------------------------------------------------------


class CrashOnWideImages:
    """A pixel transform that kills its process on one image (as a decoder crash on a hostile file would)."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        if image.width > 2 * image.height:
            os.kill(os.getpid(), signal.SIGSEGV)
        return np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.uint8)


def test_worker_crash_costs_one_file_not_the_run(tmp_path: Path) -> None:
    paths = [write(tmp_path / f"{n}.jpg", jpeg_bytes(photo_like(64, 48, seed=n))) for n in range(6)]
    paths.insert(2, write(tmp_path / "killer.jpg", jpeg_bytes(photo_like(160, 48))))
    items = list(decode_stream([found(p) for p in paths], CrashOnWideImages(), 16, workers=2, window=4,
                               kind="processes"))
    assert [item.path for item in items] == [str(p) for p in paths]  # in order, nothing lost
    assert [item.reason for item in items if item.pixels is None] == [CRASHED]
    assert items[2].path.endswith("killer.jpg") and items[2].reason == CRASHED


def test_a_transform_error_in_a_thread_is_a_recorded_failure(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jpg", jpeg_bytes(photo_like(64, 48)))
    (item,) = decode_stream([found(path)], RaisingTransform(), 16, workers=1, window=1, kind="threads")
    assert item.pixels is None and item.reason is not None and "ZeroDivisionError" in item.reason


class RaisingTransform:
    def __call__(self, image: Image.Image) -> np.ndarray:
        raise ZeroDivisionError("no")


# --- batched writes, progress -------------------------------------------------------------------------------


def test_each_batch_is_one_transaction_and_one_vector_write(
    library_dir: Path, tmp_path: Path, random_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    for n in range(10):
        write(folder / f"{n:02d}.jpg", jpeg_bytes(photo_like(80, 60, seed=n)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    vector_writes: list[int] = []
    real_write = VectorStore.write

    def counting_write(self: VectorStore, ids: np.ndarray, vectors: np.ndarray) -> None:
        vector_writes.append(len(ids))
        real_write(self, ids, vectors)

    monkeypatch.setattr(VectorStore, "write", counting_write)
    library = Library.create(library_dir)
    inserts_per_commit = _count_image_inserts_per_commit(library)
    index_folders(library, [folder], model=ModelSpec.parse(random_model),
                  options=IndexOptions(batch_size=4, workers=1))
    batches = [n for n in inserts_per_commit if n]
    # 11 files in batches of 4, 4 and 3; the last holds the bad one, whose error is committed with it
    assert batches == [4, 4, 2]
    assert vector_writes == [4, 4, 2]


def _count_image_inserts_per_commit(library: Library) -> list[int]:
    """Rows inserted into `images` by each committed transaction, in commit order."""
    commits: list[int] = []
    pending = {"rows": 0}

    def before_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO IMAGES"):
            pending["rows"] += len(parameters) if many else 1

    def on_commit(conn: Any) -> None:
        commits.append(pending["rows"])
        pending["rows"] = 0

    sa.event.listen(library.store.engine, "before_cursor_execute", before_execute)
    sa.event.listen(library.store.engine, "commit", on_commit)
    return commits


def test_progress_reports_rate_and_time_left(library_dir: Path, tmp_path: Path, random_model: str) -> None:
    folder = tmp_path / "photos"
    for n in range(9):
        write(folder / f"{n}.jpg", jpeg_bytes(photo_like(80, 60, seed=n)))
    events: list[tuple[str, dict[str, Any]]] = []
    library = Library.create(library_dir)
    index_folders(library, [folder], model=ModelSpec.parse(random_model), options=IndexOptions(batch_size=4),
                  progress=lambda event, info: events.append((event, dict(info))))
    batches = [info for event, info in events if event == "batch"]
    assert [info["size"] for info in batches] == [4, 4, 1]
    assert all(info["total"] == 9 and info["images_per_second"] > 0 for info in batches)
    assert batches[0]["eta_seconds"] > 0 and batches[-1]["eta_seconds"] == 0


def test_report_gives_decode_and_encode_rates(library_dir: Path, tmp_path: Path, random_model: str) -> None:
    folder = tmp_path / "photos"
    for n in range(5):
        write(folder / f"{n}.jpg", jpeg_bytes(photo_like(80, 60, seed=n)))
    report = index(library_dir, folder, random_model)
    assert report.encoded == report.decoded == 5
    assert report.decode_ips > 0 and report.encode_ips > 0 and report.decode_pool
    assert {"decode_ips", "encode_ips"} <= set(report.to_dict())


# --- the GPU's code paths, run on the CPU -------------------------------------------------------------------


def test_batches_queued_ahead_keep_vectors_with_their_files(
    library_dir: Path, tmp_path: Path, random_model: str, clip: ClipModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an asynchronous encoder (CUDA) batch n+1 is queued before batch n is written; every stored vector
    must still belong to its own file."""
    monkeypatch.setattr(ClipModel, "encodes_asynchronously", property(lambda self: True))
    folder = tmp_path / "photos"
    paths = [write(folder / f"{n:02d}.jpg", jpeg_bytes(photo_like(80, 60, seed=n))) for n in range(7)]
    index(library_dir, folder, random_model, batch_size=3, backend="torch")  # the queue-ahead schedule is torch's
    library = Library.open(library_dir)
    for path in paths:
        row = library.store.image_by_path(str(path))
        assert row is not None
        with Image.open(path) as image:
            expected = clip.encode_images([image])[0]
        np.testing.assert_allclose(library.vectors().get(np.array([row["id"]]))[0], expected, atol=1e-5)


def test_half_precision_encoder_matches_full_precision(clip: ClipModel, random_model: str) -> None:
    """The fp16 model that CUDA runs takes uint8 pixels normalised in float32 and cast to fp16."""
    import torch
    from open_clip.model import convert_weights_to_lp

    pixels = np.random.default_rng(0).integers(0, 256, (3, clip.image_size, clip.image_size, 3), dtype=np.uint8)
    full = clip.encode_pixels(pixels)
    half = ClipModel.load(ModelSpec.parse(random_model), "cpu")
    convert_weights_to_lp(half._model, torch.float16)
    half.dtype = torch.float16
    vectors = half.encode_pixels(list(pixels))
    assert vectors.dtype == np.float32 and vectors.shape == full.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.min(np.sum(vectors * full, axis=1)) > 0.99


def test_encoding_started_then_collected_gives_the_same_vectors(clip: ClipModel) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (4, clip.image_size, clip.image_size, 3), dtype=np.uint8)
    pending = [clip.start_encoding(list(pixels[:2])), clip.start_encoding(pixels[2:])]
    vectors = np.concatenate([p.result() for p in pending])
    np.testing.assert_allclose(vectors, clip.encode_pixels(pixels), atol=1e-5)
    assert all(p.seconds > 0 for p in pending)


# --- helpers ------------------------------------------------------------------------------------------------


def index(library_dir: Path, folder: Path, model: str, **options: Any) -> Any:
    library = Library.create(library_dir)
    try:
        return index_folders(library, [folder], model=ModelSpec.parse(model), options=IndexOptions(**options))
    finally:
        library.close()



def test_progress_bar_shows_rate_and_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    from clipsearch.cli_progress import IndexProgress

    with IndexProgress() as progress:
        progress("encoding", {"total": 10, "workers": 2, "batch_size": 5})
        progress("batch", {"done": 5, "errors": 0, "size": 5, "total": 10, "images_per_second": 5.0,
                           "eta_seconds": 1.0})
    drawn = capsys.readouterr()
    assert "img/s" in drawn.err and "ETA" in drawn.err and drawn.out == ""
