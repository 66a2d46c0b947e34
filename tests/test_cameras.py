"""Real camera files: every orientation upright once (model pixels, stored size, thumbnail), dates from the right tag
with their offsets, clean camera strings, HEIC/.hif, RAW (DNG with and without a preview), 16-bit images, PNGs
with large metadata chunks; and exiftool, read independently, agreeing with what clipsearch stores."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from camera_files import (
    ORIENTATIONS,
    corner_of_red,
    dark_16bit,
    dng,
    exif_with,
    oriented_heic,
    oriented_jpeg,
    oriented_png,
    oriented_tiff,
    oriented_webp,
    png_16bit,
    png_with_large_icc_profile,
    png_with_large_xmp,
    stored_marked_image,
    tiff_16bit,
    with_iptc,
    xmp_packet,
)
from hostile import encode, jpeg_bytes, photo_like, write
from PIL import Image

from clipsearch.decode import Decoded, DecodeFailure, decode_bytes, decode_file, upright_image
from clipsearch.library import Library
from clipsearch.thumbs import thumbnail_path

WRITERS = {"jpg": oriented_jpeg, "tif": oriented_tiff, "png": oriented_png, "webp": oriented_webp,
           "heic": oriented_heic}


def decoded(result: Decoded | DecodeFailure) -> Decoded:
    assert isinstance(result, Decoded), result
    return result


def oriented_dng(orientation: int, preview: bool = True) -> bytes:
    return dng(stored_marked_image(128, 64, orientation), orientation=orientation, preview=preview)


# --- orientation: upright exactly once, everywhere ------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("suffix", [*WRITERS, "dng", "preview-less.dng"])
def test_every_orientation_is_upright_once_for_the_model_the_size_and_the_thumbnail(
    tmp_path: Path, suffix: str, orientation: int
) -> None:
    if suffix.endswith("dng"):
        data, upright_size = oriented_dng(orientation, preview=not suffix.startswith("preview-less")), (128, 64)
    else:
        data = WRITERS[suffix](orientation)
        upright_size = (128, 64) if suffix == "heic" else (96, 64)
    path = write(tmp_path / f"photo.{suffix}", data)
    result = decoded(decode_file(str(path), min_side=16))
    assert (result.width, result.height) == upright_size
    assert result.image.size[0] > result.image.size[1]  # the model's pixels are landscape, as the picture is
    assert corner_of_red(result.image) == "top-left"
    library = Library.create(tmp_path / "library")
    thumbnail = Image.open(thumbnail_path(library, {"id": 1, "path": str(path)}, size=64))
    assert thumbnail.size[0] > thumbnail.size[1] and corner_of_red(thumbnail) == "top-left"


def test_a_query_image_already_opened_by_pillow_is_upright_once() -> None:
    from clipsearch.decode import open_image_for_query

    for data in (oriented_tiff(6), oriented_jpeg(6)):
        pixels = open_image_for_query(Image.open(io.BytesIO(data)), min_side=16)
        assert pixels.size[0] > pixels.size[1] and corner_of_red(pixels) == "top-left"


# --- date taken, in order of preference ------------------------------------------------------------------------

MODIFIED = {0x0132: "2024:01:01 00:00:00"}  # an edit date, the last resort


@pytest.mark.parametrize(
    ("make_file", "expected"),
    [
        pytest.param(lambda: jpeg_bytes(exif=exif_with(MODIFIED, {0x9003: "2019:07:14 18:03:22", 0x9011: "+02:00"})),
                     ("2019-07-14T18:03:22", "+02:00", "EXIF DateTimeOriginal"), id="exif-ifd-with-offset"),
        pytest.param(lambda: jpeg_bytes(exif=exif_with({**MODIFIED, 0x9003: "2018:03:04 05:06:07"})),
                     ("2018-03-04T05:06:07", None, "EXIF IFD0 DateTimeOriginal"), id="only-in-ifd0"),
        pytest.param(lambda: encode(photo_like(64, 48), "JPEG", exif=exif_with(MODIFIED).tobytes(),
                                    xmp=xmp_packet(exif_DateTimeOriginal="2017-01-02T03:04:05.25-05:00")),
                     ("2017-01-02T03:04:05", "-05:00", "XMP exif:DateTimeOriginal"), id="xmp-exif"),
        pytest.param(lambda: encode(photo_like(64, 48), "JPEG", exif=exif_with(MODIFIED).tobytes(),
                                    xmp=xmp_packet(photoshop_DateCreated="2016-05-06", xmp_CreateDate="2016-05-07")),
                     ("2016-05-06", None, "XMP photoshop:DateCreated"), id="xmp-photoshop-date-only"),
        pytest.param(lambda: encode(photo_like(64, 48), "WEBP", exif=exif_with(MODIFIED).tobytes(),
                                    xmp=xmp_packet(xmp_CreateDate="2015-08-09T10:11:12Z")),
                     ("2015-08-09T10:11:12", "+00:00", "XMP xmp:CreateDate"), id="xmp-createdate-webp"),
        pytest.param(lambda: with_iptc(jpeg_bytes(exif=exif_with(MODIFIED)), "20140203", "040506+0530"),
                     ("2014-02-03T04:05:06", "+05:30", "IPTC DateCreated"), id="only-iptc"),
        pytest.param(lambda: jpeg_bytes(exif=exif_with(MODIFIED, {0x9004: "2013:01:01 12:00:00", 0x9012: "-03:00"})),
                     ("2013-01-01T12:00:00", "-03:00", "EXIF CreateDate"), id="digitized"),
        pytest.param(lambda: jpeg_bytes(exif=exif_with({**MODIFIED, 0x9010: "+01:00"})),
                     ("2024-01-01T00:00:00", "+01:00", "EXIF ModifyDate"), id="modify-date-last"),
        pytest.param(lambda: jpeg_bytes(exif=exif_with({0x9003: "0000:00:00 00:00:00"})), (None, None, None),
                     id="blank"),
    ],
)
def test_date_taken_comes_from_the_preferred_tag(make_file: Any, expected: tuple[Any, ...]) -> None:
    result = decoded(decode_bytes(make_file()))
    assert (result.taken_at, result.taken_at_offset, result.taken_at_source) == expected


def test_camera_strings_end_at_their_first_nul() -> None:
    exif = exif_with({0x010F: "ION\x00F", 0x0110: "  ION230\x00F  "}, {0xA434: "EF 50mm f/1.8\x00\x00\x00"})
    result = decoded(decode_bytes(jpeg_bytes(exif=exif)))
    assert (result.camera_make, result.camera_model, result.lens) == ("ION", "ION230", "EF 50mm f/1.8")


def test_heic_dates_and_raw_metadata() -> None:
    heic = encode(photo_like(64, 64), "HEIF", exif=exif_with({0x010F: "Apple"}, {0x9003: "2023:05:06 07:08:09",
                                                                             0x9011: "+09:00"}).tobytes())
    result = decoded(decode_bytes(heic))
    assert (result.camera_make, result.taken_at, result.taken_at_offset) == ("Apple", "2023-05-06T07:08:09", "+09:00")
    raw = dng(photo_like(64, 48), preview=False, make="Canon", model="EOS R5", taken="2022:02:03 04:05:06",
              offset="-07:00", lens="RF 24-70mm", gps=(35.6586, 139.7454))
    result = decoded(decode_bytes(raw, name="IMG_0001.DNG"))
    assert (result.format, result.camera_make, result.camera_model, result.lens) == ("DNG", "Canon", "EOS R5",
                                                                                     "RF 24-70mm")
    assert (result.taken_at, result.taken_at_offset) == ("2022-02-03T04:05:06", "-07:00")
    assert result.gps_lat == pytest.approx(35.6586, abs=1e-4) and result.gps_lon == pytest.approx(139.7454, abs=1e-4)


# --- formats ---------------------------------------------------------------------------------------------------


def test_hif_files_are_crawled_and_decoded(tmp_path: Path) -> None:
    from clipsearch.indexer.crawl import FoundFile, crawl

    path = write(tmp_path / "A001.HIF", oriented_heic(6))
    assert [item for item in crawl([tmp_path]) if isinstance(item, FoundFile)][0].path == str(path)
    assert decoded(decode_file(str(path))).format == "HEIF"


def test_without_pillow_heif_a_heic_file_is_recorded_with_a_reason(tmp_path: Path) -> None:
    write(tmp_path / "IMG_0001.HEIC", oriented_heic(1))
    code = ("import sys; sys.modules['pillow_heif'] = None\n"
            "from clipsearch.indexer.crawl import crawl\n"
            "from clipsearch.decode import decode_file\n"
            "(found,) = crawl([sys.argv[1]])\n"
            "print(decode_file(found.path).reason)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert "pillow-heif is not installed" in done.stdout


def test_a_png_with_a_large_icc_profile_or_xmp_packet_is_read() -> None:
    assert decoded(decode_bytes(png_with_large_icc_profile())).size > 3 << 20
    result = decoded(decode_bytes(png_with_large_xmp()))
    assert (result.taken_at, result.taken_at_source) == ("2018-05-06T07:08:09", "XMP photoshop:DateCreated")


def test_a_png_past_even_the_raised_limits_is_read_without_its_metadata_chunks(monkeypatch) -> None:
    from PIL import PngImagePlugin

    decode_bytes(b"")  # the decoder raises Pillow's limits once; lower them again, below this file's profile
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_CHUNK", 1 << 20)
    result = decoded(decode_bytes(png_with_large_icc_profile(), min_side=0))
    assert result.image.size == (64, 48)


def test_failure_reasons_never_quote_library_internals() -> None:
    from camera_files import _chunk

    header = encode(photo_like(64, 48), "PNG")[:33]  # the signature and IHDR
    broken = header + _chunk(b"IDAT", b"this is not deflate data" * 20) + _chunk(b"IEND", b"")
    failure = decode_bytes(broken)
    assert isinstance(failure, DecodeFailure)
    assert "PNG" in failure.reason and "Error" not in failure.reason and "(" not in failure.reason
    raw = decode_bytes(b"II*\x00" + b"\x00" * 64, name="broken.NEF")
    assert isinstance(raw, DecodeFailure) and "RAW" in raw.reason and "Error" not in raw.reason


# --- 16 bits: one tone mapping for the model and the thumbnail -------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("writer", [tiff_16bit, png_16bit], ids=["tiff", "png"])
def test_a_dark_16_bit_image_is_dark_but_visible_in_the_model_and_the_thumbnail(
    tmp_path: Path, writer: Any, channels: int
) -> None:
    samples = dark_16bit(channels)  # 12-bit data: brightest 3000 of 4095
    path = write(tmp_path / f"dark.{'tif' if writer is tiff_16bit else 'png'}", writer(samples))
    pixels = np.asarray(decoded(decode_file(str(path), min_side=0)).image, dtype=np.int32)
    expected = np.rint(samples.astype(np.float64) * 255 / 4095)  # the white point of 12-bit data
    expected = np.repeat(expected[..., None], 3, axis=-1) if channels == 1 else expected
    assert np.abs(pixels - expected).max() <= 1  # not black (a /257 would give at most 12), not stretched to 255
    thumbnail = upright_image(str(path), min_side=0)
    assert isinstance(thumbnail, Image.Image) and np.array_equal(np.asarray(thumbnail), pixels)


def test_a_black_16_bit_image_stays_black_and_full_range_data_maps_as_a_plain_division() -> None:
    black = decoded(decode_bytes(png_16bit(np.zeros((8, 8), np.uint16)), min_side=0))
    assert np.asarray(black.image).max() == 0
    full = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    pixels = np.asarray(decoded(decode_bytes(png_16bit(full), min_side=0)).image)[0, :, 0]
    assert np.abs(pixels.astype(int) - np.rint(full[0] / 257)).max() <= 1


# --- RAW ---------------------------------------------------------------------------------------------------------


def test_raw_is_read_from_its_preview_when_large_enough_else_demosaiced(tmp_path: Path) -> None:
    picture = photo_like(256, 192, seed=3)
    with_preview = decoded(decode_bytes(dng(picture), name="a.dng", min_side=64))
    without = decoded(decode_bytes(dng(picture, preview=False), name="b.dng", min_side=64))
    assert (with_preview.width, with_preview.height) == (without.width, without.height) == (256, 192)
    # Both show the picture: the JPEG preview and LibRaw's development of the same sensor data agree roughly.
    small = [np.asarray(r.image.resize((32, 24)), dtype=np.float32) for r in (with_preview, without)]
    reference = np.asarray(picture.resize((32, 24)), dtype=np.float32)
    assert np.abs(small[0] - reference).mean() < 12
    assert np.corrcoef(small[1].ravel(), reference.ravel())[0, 1] > 0.8
    too_small_preview = decoded(decode_bytes(dng(picture), name="c.dng", min_side=150))
    assert min(too_small_preview.image.size) >= 150 or too_small_preview.image.size == (256, 192)


def test_a_raw_and_its_jpeg_are_one_result_unless_kept_apart(tmp_path: Path, library_dir: Path, run_cli,
                                                             random_model: str) -> None:
    from clipsearch.indexer.pipeline import index_folders

    from clipsearch.model import ModelSpec
    from clipsearch.searcher import Searcher

    folder = tmp_path / "shots"
    for stem, seed in (("IMG_0001", 1), ("IMG_0002", 2)):
        picture = photo_like(96, 64, seed=seed)
        write(folder / f"{stem}.JPG", encode(picture, "JPEG", quality=90))
        write(folder / f"{stem}.DNG", dng(picture))
    write(folder / "other.png", encode(photo_like(96, 64, seed=9), "PNG"))
    report = index_folders(Library.create(library_dir), [folder], model=ModelSpec.parse(random_model))
    assert report.encoded == 5 and not report.failures
    searcher = Searcher(library_dir)
    jpeg = searcher.library.store.image_by_path(str(folder / "IMG_0001.JPG"))
    assert jpeg is not None
    merged = searcher.similar(jpeg["id"], k=3)
    assert (merged[0].path, merged[0].other_paths) == (str(folder / "IMG_0001.JPG"), (str(folder / "IMG_0001.DNG"),))
    assert len({Path(r.path).stem for r in merged}) == 3  # three shots, none twice
    apart = searcher.similar(jpeg["id"], k=5, separate_raw=True)
    assert sorted(Path(r.path).name for r in apart[:2]) == ["IMG_0001.DNG", "IMG_0001.JPG"]
    assert all(r.other_paths == () for r in apart)
    shown = run_cli("search", "--image", str(folder / "IMG_0001.DNG"), "-k", "1").stdout  # a RAW as the query
    assert "IMG_0001.JPG" in shown and "also IMG_0001.DNG" in shown


# --- the exiftool oracle -----------------------------------------------------------------------------------------


def oracle_corpus(folder: Path) -> list[Path]:
    """Files carrying every case: orientations, each date source with offsets, NUL strings, GPS, HEIC, DNG."""
    files = {f"o{o}.{suffix}": WRITERS[suffix](o) for o in (1, 3, 6, 8) for suffix in ("jpg", "tif", "heic")}
    files |= {f"o{o}.dng": oriented_dng(o) for o in (1, 6)}
    files["plain-raw.dng"] = dng(photo_like(64, 48), preview=False, make="Canon", model="EOS R5\x00junk",
                                 taken="2022:02:03 04:05:06", offset="-07:00", gps=(35.6586, 139.7454))
    files["exif-offset.jpg"] = jpeg_bytes(exif=exif_with(MODIFIED, {0x9003: "2019:07:14 18:03:22",
                                                                    0x9011: "+02:00"}, gps=(-33.8568, 151.2153)))
    files["ifd0-original.jpg"] = jpeg_bytes(exif=exif_with({**MODIFIED, 0x9003: "2018:03:04 05:06:07"}))
    files["xmp-only.jpg"] = encode(photo_like(64, 48), "JPEG", exif=exif_with(MODIFIED).tobytes(),
                                   xmp=xmp_packet(photoshop_DateCreated="2016-05-06T07:08:09+01:00"))
    files["iptc-only.jpg"] = with_iptc(jpeg_bytes(exif=exif_with(MODIFIED)), "20140203", "040506+0530")
    files["nul-strings.jpg"] = jpeg_bytes(exif=exif_with({0x010F: "ION\x00F", 0x0110: "ION230\x00F "}))
    files["modify-only.jpg"] = jpeg_bytes(exif=exif_with(MODIFIED))
    return [write(folder / name, data) for name, data in files.items()]


EXIFTOOL_DATES = [  # exiftool's tag for each of our sources, in the same order of preference
    ("ExifIFD:DateTimeOriginal", "ExifIFD:OffsetTimeOriginal"), ("IFD0:DateTimeOriginal", None),
    ("XMP-exif:DateTimeOriginal", None), ("XMP-photoshop:DateCreated", None), ("XMP-xmp:CreateDate", None),
    ("IPTC:DateCreated", None), ("ExifIFD:CreateDate", "ExifIFD:OffsetTimeDigitized"),
    ("IFD0:ModifyDate", "ExifIFD:OffsetTime"),
]


def exiftool_expectation(tags: dict[str, Any]) -> dict[str, Any]:
    """What clipsearch must store, worked out from exiftool's reading alone."""
    width, height = (int(v) for v in str(tags["Composite:ImageSize"]).split())
    quarter_turn = tags.get("IFD0:Orientation", 1) in (5, 6, 7, 8)
    if tags.get("File:FileType") == "HEIC":  # HEIF turns pictures with its own transform (irot)
        quarter_turn = tags.get("QuickTime:Rotation", 0) in (90, 270)
    return {"size": (height, width) if quarter_turn else (width, height), "taken": _exiftool_date(tags),
            "make": tags.get("IFD0:Make"), "model": tags.get("IFD0:Model"),
            "gps": (tags.get("Composite:GPSLatitude"), tags.get("Composite:GPSLongitude"))}


def _exiftool_date(tags: dict[str, Any]) -> tuple[str, str | None] | None:
    for tag, offset_tag in EXIFTOOL_DATES:
        value = tags.get(tag)
        if value is None:
            continue
        text = str(value)
        if tag == "IPTC:DateCreated" and "IPTC:TimeCreated" in tags:
            text += " " + str(tags["IPTC:TimeCreated"])
        date, _, rest = text.partition(" ")
        clock, offset = rest[:8], rest[8:] or (tags.get(offset_tag) if offset_tag else None)
        iso = date.replace(":", "-") + (f"T{clock}" if clock else "")
        return iso, offset or None
    return None


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool (libimage-exiftool-perl) is not installed")
def test_what_is_stored_agrees_with_exiftool(tmp_path: Path) -> None:
    files = oracle_corpus(tmp_path / "corpus")
    listing = subprocess.run(["exiftool", "-j", "-n", "-G1", "-a", *map(str, files)], capture_output=True, text=True,
                             check=True).stdout
    readings = {entry["SourceFile"]: entry for entry in json.loads(listing)}
    for path in files:
        stored = decoded(decode_file(str(path)))
        expected = exiftool_expectation(readings[str(path)])
        assert (stored.width, stored.height) == expected["size"], path.name
        taken = (stored.taken_at, stored.taken_at_offset) if stored.taken_at else None
        assert taken == expected["taken"], path.name
        assert (stored.camera_make, stored.camera_model) == (expected["make"], expected["model"]), path.name
        latitude, longitude = expected["gps"]
        assert (stored.gps_lat is None) == (latitude is None), path.name
        if latitude is not None:
            assert (stored.gps_lat, stored.gps_lon) == pytest.approx((latitude, longitude), abs=1e-6), path.name


def test_raw_metadata_is_read_from_each_kind_of_container() -> None:
    """LibRaw needs real sensor data to open CR3, RAF, ORF or RW2 files, which cannot be made here; their
    metadata containers can, and are read the same way as the DNG's TIFF structure."""
    import struct

    from clipsearch.raw import _container_metadata

    exif = exif_with({0x010F: "Canon", 0x0110: "EOS R6\x00"}, {0x9003: "2021:06:07 08:09:10", 0x9011: "+01:00"},
                     gps=(51.5, -0.1))
    def tiff(block: Image.Exif) -> bytes:  # a bare TIFF structure, as RAW containers hold EXIF
        data = block.tobytes()
        return data[6:] if data.startswith(b"Exif\x00\x00") else data

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    details = Image.Exif()
    details.update({0x9003: "2021:06:07 08:09:10", 0x9011: "+01:00", 0xA434: "RF 35mm"})
    uuid = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")
    cmt = box(b"CMT1", tiff(exif_with({0x010F: "Canon", 0x0110: "EOS R6"}))) + box(b"CMT2", tiff(details))
    cr3 = box(b"ftyp", b"crx \x00\x00\x00\x01crx isom") + box(b"moov", box(b"uuid", uuid + cmt))
    jpeg = jpeg_bytes(exif=exif)
    raf = b"FUJIFILMCCD-RAW 0201FF383501" + b"\x00" * 56 + struct.pack(">II", 100, len(jpeg)) + b"\x00" * 8 + jpeg
    big_endian = tiff(exif)
    assert big_endian.startswith(b"MM")
    orf = b"MMOR" + big_endian[4:]  # Olympus: a TIFF with its own magic number
    for name, data in (("cr3", cr3), ("raf", raf), ("orf", orf)):
        found = _container_metadata(data)
        assert found is not None, name
        assert (found.camera_make, found.camera_model, found.taken_at, found.taken_at_offset) == (
            "Canon", "EOS R6", "2021-06-07T08:09:10", "+01:00"), name
    assert _container_metadata(cr3).lens == "RF 35mm"
    assert _container_metadata(raf).gps_lat == pytest.approx(51.5, abs=1e-4)
