"""Thumbnails: real image files in, real cached JPEGs out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from clipsearch.library import Library
from clipsearch.thumbs import thumbnail_path

ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF: the stored pixels must be turned 90° clockwise to stand upright


@pytest.fixture
def library(library_dir: Path) -> Library:
    return Library.create(library_dir)


def save_picture(path: Path, size: tuple[int, int], colour: str = "red", **save_options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save_options)
    return path


def row(path: Path, image_id: int = 1) -> dict[str, object]:
    return {"id": image_id, "path": str(path)}


def test_thumbnail_is_made_once_and_reused(library: Library, tmp_path: Path):
    original = save_picture(tmp_path / "photos" / "wide.jpg", (800, 400))
    first = thumbnail_path(library, row(original))
    assert first is not None and first.parent == library.thumbs_dir
    made_at = first.stat().st_mtime_ns
    second = thumbnail_path(library, row(original))
    assert second == first and second.stat().st_mtime_ns == made_at
    with Image.open(first) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (256, 128)
    assert not list(library.thumbs_dir.glob(".tmp-*")), "no temporary file is left behind"


def test_thumbnail_is_refreshed_when_the_file_changes(library: Library, tmp_path: Path):
    original = save_picture(tmp_path / "photos" / "photo.png", (300, 300), "red", format="PNG")
    old = thumbnail_path(library, row(original))
    save_picture(original, (300, 300), "blue", format="PNG")
    stat = original.stat()
    os.utime(original, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # a later edit, surely
    new = thumbnail_path(library, row(original))
    assert new is not None and old is not None and new != old
    assert not old.exists(), "the outdated thumbnail is removed"
    with Image.open(new) as thumb:
        red, _green, blue = thumb.convert("RGB").getpixel((10, 10))
    assert blue > 200 and red < 50


def test_exif_orientation_is_applied(library: Library, tmp_path: Path):
    exif = Image.Exif()
    exif[ORIENTATION] = ROTATE_90_CW
    original = save_picture(tmp_path / "photos" / "sideways.jpg", (600, 300), exif=exif.tobytes())
    thumb_path = thumbnail_path(library, row(original))
    assert thumb_path is not None
    with Image.open(thumb_path) as thumb:
        assert thumb.size == (128, 256), "stored landscape, shown portrait"


def test_twenty_megapixel_jpeg_gives_a_small_thumbnail(library: Library, tmp_path: Path):
    original = tmp_path / "photos" / "big.jpg"
    original.parent.mkdir(parents=True)
    Image.linear_gradient("L").convert("RGB").resize((5472, 3648)).save(original, quality=90)
    thumb_path = thumbnail_path(library, row(original))
    assert thumb_path is not None
    with Image.open(thumb_path) as thumb:
        assert max(thumb.size) == 256
    assert thumb_path.stat().st_size < 40_000


def test_transparent_png_is_flattened_on_white(library: Library, tmp_path: Path):
    original = tmp_path / "photos" / "clear.png"
    original.parent.mkdir(parents=True)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(original)
    thumb_path = thumbnail_path(library, row(original))
    assert thumb_path is not None
    with Image.open(thumb_path) as thumb:
        assert min(thumb.getpixel((5, 5))) > 240


def test_larger_previews_are_separate_files(library: Library, tmp_path: Path):
    original = save_picture(tmp_path / "photos" / "wide.jpg", (2000, 1000))
    small = thumbnail_path(library, row(original))
    large = thumbnail_path(library, row(original), size=1024)
    assert small is not None and large is not None and small != large
    assert small.exists(), "making a preview keeps the grid thumbnail"
    with Image.open(large) as preview:
        assert preview.size == (1024, 512)


def test_missing_or_unreadable_file_gives_none(library: Library, tmp_path: Path):
    assert thumbnail_path(library, row(tmp_path / "photos" / "gone.jpg")) is None
    broken = tmp_path / "photos" / "broken.jpg"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    assert thumbnail_path(library, row(broken, image_id=2)) is None
    text = tmp_path / "photos" / "notes.png"
    text.write_text("hello")
    assert thumbnail_path(library, row(text, image_id=3)) is None
