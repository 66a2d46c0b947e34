"""decode_file() and friends: right pixels, right metadata, and for bad files a reason, never an exception."""

from __future__ import annotations

import io
import os
import resource
import threading
from pathlib import Path

import numpy as np
import pytest
from clipsearch.indexer.crawl import FoundFile, crawl, heif_available
from hostile import (
    OK,
    PATH_MAX,
    SKIPPED,
    animated_gif_bytes,
    animated_webp_bytes,
    call_unprivileged,
    cmyk_jpeg_bytes,
    encode,
    grey16_png_bytes,
    html_bytes,
    jpeg_bytes,
    make_deep_file,
    make_exif,
    make_hostile_corpus,
    marked_image,
    one_by_one_png_bytes,
    palette_png_with_transparency_bytes,
    photo_like,
    png_declaring,
    restore_permissions,
    text_bytes,
    traversable_tmpdir,
    truncated_jpeg_bytes,
    truncated_png_bytes,
    write,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipsearch.decode import (
    VANISHED,
    Decoded,
    DecodeFailure,
    content_hash,
    decode_bytes,
    decode_file,
    hash_bytes,
    open_image_for_query,
    reduce_for_model,
    to_rgb,
)
from clipsearch.errors import QueryError

RED = (255, 0, 0)


def decoded(result: Decoded | DecodeFailure) -> Decoded:
    assert isinstance(result, Decoded), result
    return result


def failure(result: Decoded | DecodeFailure) -> str:
    assert isinstance(result, DecodeFailure), result
    assert "\n" not in result.reason and len(result.reason) < 300  # one short sentence
    return result.reason


def is_close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 MP photo-like JPEG, as a phone takes them."""
    return write(tmp_path_factory.mktemp("large") / "12mp.jpg", jpeg_bytes(photo_like(4000, 3000, seed=7)))


# --- an ordinary photo --------------------------------------------------------------------------------------


def test_decodes_a_jpeg_with_what_the_library_stores(tmp_path: Path) -> None:
    data = jpeg_bytes(photo_like(640, 480))
    path = write(tmp_path / "photo.jpg", data)
    result = decoded(decode_file(str(path)))
    assert (result.path, result.format, result.width, result.height) == (str(path), "JPEG", 640, 480)
    assert result.image.mode == "RGB" and min(result.image.size) >= 224
    assert result.size == len(data) and result.mtime_ns == path.stat().st_mtime_ns
    assert result.content_hash == hash_bytes(data) == content_hash(str(path))
    assert len(result.content_hash) == 32  # 16-byte BLAKE2b, as hex
    assert (result.taken_at, result.camera_make, result.gps_lat) == (None, None, None)


def test_a_one_by_one_image_is_valid() -> None:
    result = decoded(decode_bytes(one_by_one_png_bytes()))
    assert (result.width, result.height, result.image.size) == (1, 1, (1, 1))
    assert result.image.getpixel((0, 0)) == (10, 200, 30)


def test_decode_bytes_names_the_upload_and_has_no_mtime() -> None:
    result = decoded(decode_bytes(jpeg_bytes(), name="query.jpg"))
    assert (result.path, result.mtime_ns) == ("query.jpg", 0)


# --- speed: draft mode and reduction ------------------------------------------------------------------------


def test_draft_mode_decodes_a_large_jpeg_at_reduced_scale(large_jpeg: Path) -> None:
    result = decoded(decode_file(str(large_jpeg), min_side=224))
    assert (result.width, result.height) == (4000, 3000)  # the original's size is still what is stored
    assert 224 <= min(result.image.size) < 448  # 1/8 scale: 500 × 375
    assert result.image.size == (500, 375)


def test_min_side_zero_decodes_at_full_size(large_jpeg: Path) -> None:
    assert decoded(decode_file(str(large_jpeg), min_side=0)).image.size == (4000, 3000)


def test_a_large_png_is_box_reduced_but_never_below_min_side() -> None:
    result = decoded(decode_bytes(encode(photo_like(1200, 1000), "PNG"), min_side=224))
    assert result.image.size == (300, 250)  # reduce(4): 1000 // 224 == 4
    assert (result.width, result.height) == (1200, 1000)


def test_reduce_for_model_keeps_small_images_as_they_are() -> None:
    small = Image.new("RGB", (300, 400))
    assert reduce_for_model(small, 224) is small
    assert reduce_for_model(Image.new("RGB", (2000, 449)), 224).size == (1000, 224)  # whole 2 x 2 boxes only
    assert reduce_for_model(small, 0) is small


# --- orientation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "size", "marker_corner"),
    [
        (1, (80, 40), "top-left"),
        (3, (80, 40), "bottom-right"),
        (6, (40, 80), "top-right"),  # the camera was turned clockwise: the viewer turns it back
        (8, (40, 80), "bottom-left"),
    ],
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int], marker_corner: str) -> None:
    data = jpeg_bytes(marked_image(80, 40), make_exif(orientation=orientation), quality=95)
    result = decoded(decode_bytes(data))
    assert (result.width, result.height) == size == result.image.size
    assert _red_corner(result.image) == marker_corner


def _red_corner(image: Image.Image) -> str:
    width, height = image.size
    corners = {
        "top-left": (2, 2),
        "top-right": (width - 3, 2),
        "bottom-left": (2, height - 3),
        "bottom-right": (width - 3, height - 3),
    }
    (red,) = [name for name, xy in corners.items() if is_close(image.getpixel(xy), RED)]
    return red


def test_orientation_swaps_the_stored_size_of_a_drafted_jpeg() -> None:
    data = jpeg_bytes(photo_like(2000, 1000), make_exif(orientation=6))
    result = decoded(decode_bytes(data, min_side=224))
    assert (result.width, result.height) == (1000, 2000)
    assert result.image.size == (250, 500)


# --- metadata -----------------------------------------------------------------------------------------------


def test_date_taken_and_camera_come_from_exif() -> None:
    exif = make_exif(make="Canon\x00\x00 ", model="  Canon EOS R5\x00", taken="2019:07:14 18:03:22")
    result = decoded(decode_bytes(jpeg_bytes(exif=exif)))
    assert result.taken_at == "2019-07-14T18:03:22"
    assert (result.camera_make, result.camera_model) == ("Canon", "Canon EOS R5")


def test_date_taken_falls_back_to_the_ifd0_datetime() -> None:
    exif = make_exif()
    exif[0x0132] = "2001:02:03 04:05:06"
    assert decoded(decode_bytes(jpeg_bytes(exif=exif))).taken_at == "2001-02-03T04:05:06"


@pytest.mark.parametrize("value", ["0000:00:00 00:00:00", "    ", "yesterday", "2019:13:45 99:00:00"])
def test_an_invalid_date_taken_is_none(value: str) -> None:
    assert decoded(decode_bytes(jpeg_bytes(exif=make_exif(taken=value)))).taken_at is None


@pytest.mark.parametrize(
    "position", [(48.8584, 2.2945), (-33.8568, 151.2153), (40.6892, -74.0445), (-22.9519, -43.2105)]
)
def test_gps_position_is_signed_by_hemisphere(position: tuple[float, float]) -> None:
    result = decoded(decode_bytes(jpeg_bytes(exif=make_exif(gps=position))))
    assert result.gps_lat == pytest.approx(position[0], abs=1e-4)
    assert result.gps_lon == pytest.approx(position[1], abs=1e-4)


def test_gps_with_zero_denominators_is_none() -> None:
    from PIL.TiffImagePlugin import IFDRational

    exif = make_exif()
    exif.get_ifd(0x8825).update({1: "N", 2: (IFDRational(1, 0), 0.0, 0.0), 3: "E", 4: (2.0, 0.0, 0.0)})
    result = decoded(decode_bytes(jpeg_bytes(exif=exif)))
    assert (result.gps_lat, result.gps_lon) == (None, None)


def test_metadata_survives_in_png_exif() -> None:
    exif = make_exif(make="Pixel", taken="2022:01:02 03:04:05")
    result = decoded(decode_bytes(encode(photo_like(64, 48), "PNG", exif=exif.tobytes())))
    assert (result.camera_make, result.taken_at) == ("Pixel", "2022-01-02T03:04:05")


# --- colour modes -------------------------------------------------------------------------------------------


def test_cmyk_becomes_the_right_rgb() -> None:
    result = decoded(decode_bytes(cmyk_jpeg_bytes()))
    assert result.image.mode == "RGB" and is_close(result.image.getpixel((10, 10)), (0, 255, 255))


def test_16_bit_grey_is_scaled_not_clipped_to_white() -> None:
    image = decoded(decode_bytes(grey16_png_bytes(), min_side=0)).image
    row = [image.getpixel((x, 5))[0] for x in (0, 128, 255)]
    assert row[0] <= 2 and 120 <= row[1] <= 135 and row[2] >= 253


def test_palette_transparency_is_flattened_on_white() -> None:
    image = decoded(decode_bytes(palette_png_with_transparency_bytes())).image
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 255, 255) and image.getpixel((50, 5)) == (0, 0, 255)


@pytest.mark.parametrize("make_bytes", [animated_gif_bytes, animated_webp_bytes], ids=["gif", "webp"])
def test_animations_give_their_first_frame(make_bytes) -> None:  # type: ignore[no-untyped-def]
    result = decoded(decode_bytes(make_bytes()))
    assert result.format in ("GIF", "WEBP") and is_close(result.image.getpixel((5, 5)), (220, 20, 20))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),  # fully transparent black: white
        (Image.new("RGBA", (4, 4), (0, 0, 255, 128)), (127, 127, 255)),  # half-transparent blue
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), (128, 128, 128)),  # "F" in 0..1
        (Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)), (255, 255, 255)),  # "I" holding 16 bit
    ],
    ids=["LA", "RGBA", "1", "L", "F", "I"],
)
def test_to_rgb_handles_every_mode(image: Image.Image, expected: tuple[int, int, int]) -> None:
    converted = to_rgb(image)
    assert converted.mode == "RGB" and is_close(converted.getpixel((1, 1)), expected, tolerance=2)


# --- files that cannot be decoded ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "keyword"),
    [
        (b"", "empty file"),
        (truncated_jpeg_bytes(), "truncated JPEG"),
        (truncated_png_bytes(), "truncated PNG"),
        (jpeg_bytes()[:200], "JPEG"),  # cut inside the header
        (html_bytes(), "not an image (looks like HTML text)"),
        (text_bytes(), "not an image (looks like text)"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG is not supported"),
        (os.urandom(2048), "not an image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
    ],
    ids=[
        "empty",
        "truncated-jpeg",
        "truncated-png",
        "jpeg-header",
        "html",
        "text",
        "svg",
        "random",
        "png-magic",
    ],
)
def test_undecodable_data_gets_a_reason(data: bytes, keyword: str) -> None:
    assert keyword in failure(decode_bytes(data))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_html_saved_as_an_image_file(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"login{suffix}", html_bytes())
    assert failure(decode_file(str(path))) == "not an image (looks like HTML text)"


def test_a_decompression_bomb_fails_fast_without_allocating_pixels(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.png", png_declaring(50_000, 50_000))  # 7.5 GB of RGB, in a 100-byte file
    assert path.stat().st_size < 200
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reason = failure(decode_file(str(path)))
    peak_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert "too large" in reason and "2,500,000,000 pixels" in reason
    assert peak_growth_mb < 100


def test_max_pixels_is_checked_before_decoding() -> None:
    reason = failure(decode_bytes(png_declaring(12_000, 10_000), max_pixels=100_000_000))
    assert reason.startswith("image is too large (12,000×10,000 pixels; limit 100,000,000 pixels)")


def test_a_file_deleted_between_crawl_and_decode(tmp_path: Path) -> None:
    write(tmp_path / "soon gone.jpg", jpeg_bytes())
    (item,) = crawl([tmp_path])
    os.remove(item.path)
    assert failure(decode_file(item.path)) == VANISHED


def test_a_file_rewritten_between_crawl_and_decode_is_read_consistently(tmp_path: Path) -> None:
    path = write(tmp_path / "edited.jpg", jpeg_bytes(photo_like(64, 48)))
    (item,) = crawl([tmp_path])
    assert isinstance(item, FoundFile)
    new_data = jpeg_bytes(photo_like(300, 200, seed=9))
    path.write_bytes(new_data)
    os.utime(path, ns=(item.mtime_ns + 10**9, item.mtime_ns + 10**9))
    result = decoded(decode_file(item.path))
    assert (result.size, result.content_hash) == (len(new_data), hash_bytes(new_data))
    assert result.mtime_ns == item.mtime_ns + 10**9 and (result.width, result.height) == (300, 200)


def test_a_folder_named_like_an_image_is_not_decoded(tmp_path: Path) -> None:
    (tmp_path / "album.jpg").mkdir()
    assert "folder" in failure(decode_file(str(tmp_path / "album.jpg")))


def test_content_hash_raises_only_os_errors(tmp_path: Path) -> None:
    # The planner catches OSError around content_hash: nothing else may escape it.
    (tmp_path / "album.jpg").mkdir()
    for path in (tmp_path / "album.jpg", tmp_path / "missing.jpg"):
        with pytest.raises(OSError):
            content_hash(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
def test_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    outcome: list[Decoded | DecodeFailure] = []
    worker = threading.Thread(
        target=lambda: outcome.append(decode_file(str(tmp_path / "pipe.jpg"))), daemon=True
    )
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "decode_file blocked on a named pipe"
    assert failure(outcome[0]) == "not a regular file"


def _decode_reason(path: str) -> str:
    result = decode_file(path)
    return result.reason if isinstance(result, DecodeFailure) else "decoded"


def test_a_file_without_read_permission() -> None:
    with traversable_tmpdir() as folder:
        path = write(folder / "private.jpg", jpeg_bytes())
        path.chmod(0o000)
        assert call_unprivileged(_decode_reason, str(path)) == "permission denied"


def test_a_path_at_the_length_limit_decodes(tmp_path: Path) -> None:
    relative = make_deep_file(tmp_path, PATH_MAX - 1, "deep.png", one_by_one_png_bytes())
    path = f"{tmp_path}/{relative}"
    assert len(os.fsencode(path)) == PATH_MAX - 1
    assert decoded(decode_file(path)).size > 0


@settings(max_examples=60, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=4000),
    flips=st.lists(st.tuples(st.integers(0, 3999), st.integers(0, 255)), max_size=8),
    image_format=st.sampled_from(["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"]),
)
def test_damaged_files_never_raise(cut: int, flips: list[tuple[int, int]], image_format: str) -> None:
    data = bytearray(encode(photo_like(48, 32, seed=1).convert("RGB"), image_format))
    for position, value in flips:
        if position < len(data):
            data[position] = value
    result = decode_bytes(bytes(data[:cut] if cut < len(data) else data))
    assert isinstance(result, (Decoded, DecodeFailure))
    if isinstance(result, DecodeFailure):
        assert result.reason and "\n" not in result.reason


# --- HEIC and AVIF ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not heif_available(), reason="pillow-heif (the heif extra) is not installed")
@pytest.mark.parametrize("image_format", ["HEIF", "AVIF"])
def test_heif_and_avif_decode_with_orientation_and_exif(image_format: str) -> None:
    decode_bytes(b"")  # registers pillow-heif's opener, which is also what lets Pillow write HEIF
    exif = make_exif(orientation=6, make="Apple", taken="2023:05:06 07:08:09")
    data = encode(marked_image(80, 40), image_format, exif=exif.tobytes(), quality=90)
    result = decoded(decode_bytes(data))
    assert (result.format, result.width, result.height) == (image_format, 40, 80)
    assert (result.camera_make, result.taken_at) == ("Apple", "2023-05-06T07:08:09")
    assert _red_corner(result.image) == "top-right"


# --- query images -------------------------------------------------------------------------------------------


def test_query_image_from_a_path_bytes_or_pil_image(tmp_path: Path) -> None:
    data = jpeg_bytes(marked_image(80, 40), make_exif(orientation=6), quality=95)
    path = write(tmp_path / "query.jpg", data)
    from_path = open_image_for_query(path)
    from_bytes = open_image_for_query(data)
    from_pil = open_image_for_query(Image.open(io.BytesIO(data)))
    for image in (from_path, from_bytes, from_pil):
        assert image.mode == "RGB" and image.size == (40, 80) and _red_corner(image) == "top-right"


def test_a_pil_query_image_in_any_mode_becomes_rgb() -> None:
    image = open_image_for_query(Image.new("P", (2000, 1000)), min_side=224)
    assert image.mode == "RGB" and image.size == (500, 250)


def test_query_image_errors_are_one_clear_sentence(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match=r"^The query image .*missing\.jpg does not exist\.$"):
        open_image_for_query(tmp_path / "missing.jpg")
    with pytest.raises(QueryError, match=r"cannot be used: not an image \(looks like HTML text\)\.$"):
        open_image_for_query(write(tmp_path / "page.jpg", html_bytes()))
    with pytest.raises(QueryError, match="empty file"):
        open_image_for_query(b"")
    with pytest.raises(QueryError, match="must be a path, bytes or a PIL image, not int"):
        open_image_for_query(42)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="truncated JPEG"):
        open_image_for_query(Image.open(io.BytesIO(truncated_jpeg_bytes())))


# --- the shared hostile corpus, crawled and decoded ---------------------------------------------------------


def _index_corpus(root: Path) -> dict[str, str]:
    """What a minimal indexer would record: OK or the reason, per relative path."""
    outcome = {}
    for item in crawl([root]):
        relative = os.path.relpath(item.path, root)
        if isinstance(item, FoundFile):
            result = decode_file(item.path)
            outcome[relative] = result.reason if isinstance(result, DecodeFailure) else OK
        else:
            outcome[relative] = item.reason
    return outcome


def test_every_hostile_file_gets_its_reason(tmp_path: Path) -> None:
    expected = make_hostile_corpus(tmp_path / "corpus")
    try:
        outcome = _index_corpus(tmp_path / "corpus")
    finally:
        restore_permissions(tmp_path / "corpus")
    assert_matches_corpus(outcome, expected)


def test_every_hostile_file_gets_its_reason_as_an_ordinary_user() -> None:
    # As root the permission cases are ordinary photos; here they must say "permission denied".
    with traversable_tmpdir() as folder:
        expected_as_root = make_hostile_corpus(folder / "corpus")
        outcome = call_unprivileged(_index_corpus, folder / "corpus")
    expected = {key: value for key, value in expected_as_root.items() if not key.startswith("locked/")}
    expected.update(
        {"locked/no read permission.jpg": "permission denied", "locked/sealed folder": "permission"}
    )
    assert_matches_corpus(outcome, expected)


def assert_matches_corpus(outcome: dict[str, str], expected: dict[str, str]) -> None:
    for relative, keyword in expected.items():
        if keyword == SKIPPED:
            assert relative not in outcome, relative
        elif keyword == OK:
            assert outcome.get(relative) == OK, (relative, outcome.get(relative))
        else:
            assert keyword.lower() in outcome.get(relative, "").lower(), (relative, outcome.get(relative))
    assert set(outcome) <= set(expected), set(outcome) - set(expected)
    assert all("\n" not in reason for reason in outcome.values())
