"""Camera RAW files (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2, PEF, SRW and the like): pixels and metadata.

Pixels come from the full-size JPEG preview that almost every camera embeds, when it is large enough for what
is asked (decoding it costs what any JPEG costs); otherwise LibRaw (through rawpy) demosaics the sensor data,
at half size when that is still large enough. The preview is stored as the sensor reads it, so the RAW's own
orientation is applied to it; LibRaw's demosaiced output is upright already.

Metadata (date taken, camera, lens, GPS) comes from the RAW's own EXIF: the TIFF structure at the start of most
RAW formats (ORF and RW2 only change its magic number), CR3's CMT boxes, and RAF's embedded JPEG; failing those,
from the preview's EXIF. The stored size is the picture's full upright size, as LibRaw develops it.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from PIL.ExifTags import IFD

from clipsearch.metadata import exif_from_tiff_bytes, ifd_or_empty, metadata_from
from clipsearch.photo import PhotoMetadata

RAW_EXTENSIONS = frozenset({
    ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2", ".rwl",
    ".pef", ".srw", ".3fr", ".fff", ".iiq", ".erf", ".kdc", ".dcr", ".mef", ".mos", ".mrw", ".x3f",
})  # fmt: skip
# LibRaw's `flip` (bit 0: mirror left-right, bit 1: mirror top-bottom, bit 2: transpose) as an EXIF orientation.
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 3: 3, 2: 4, 4: 5, 6: 6, 7: 7, 5: 8}
_TIFF_MAGIC = {b"II*\x00": b"II*\x00", b"MM\x00*": b"MM\x00*", b"IIRO": b"II*\x00", b"IIRS": b"II*\x00",
               b"IIU\x00": b"II*\x00", b"MMOR": b"MM\x00*"}  # standard TIFF, Olympus ORF, Panasonic RW2
_CANON_METADATA_UUID = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")


class RawError(Exception):
    """A RAW file that cannot be used; the message is the reason, one sentence for a person."""


@dataclass
class RawContents:
    """What a RAW file gives the decoder: either a preview JPEG to decode and orient, or upright pixels."""

    format: str  # "DNG", "CR3" ... (from the extension: the container says little a person would recognise)
    width: int  # the full picture, upright
    height: int
    orientation: int  # EXIF orientation of the sensor data, to apply to `preview`
    metadata: PhotoMetadata
    preview: bytes | None = None  # an embedded JPEG, stored as the sensor reads it
    pixels: np.ndarray | None = None  # demosaiced 8-bit RGB, already upright


def is_raw_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in RAW_EXTENSIONS


def read_raw(data: bytes, name: str, min_side: int, max_pixels: int) -> RawContents:
    """Open a RAW file held in memory; raises RawError with the reason."""
    rawpy = _rawpy()
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            return _contents(raw, data, name, min_side, max_pixels)
    except rawpy.LibRawFileUnsupportedError:
        raise RawError("not a RAW file that LibRaw can read (a camera it does not know, or a damaged file)") from None
    except (rawpy.LibRawIOError, rawpy.LibRawDataError, rawpy.LibRawTooBigError):
        raise RawError("truncated or corrupt RAW file") from None
    except rawpy.LibRawError:
        raise RawError("damaged RAW file: LibRaw could not decode it") from None


def _rawpy() -> Any:
    try:
        import rawpy
    except ImportError:
        raise RawError("RAW file, but rawpy (LibRaw) is not installed: pip install rawpy") from None
    return rawpy


def _contents(raw: Any, data: bytes, name: str, min_side: int, max_pixels: int) -> RawContents:
    sizes = raw.sizes
    if sizes.width * sizes.height > max_pixels:
        raise RawError(f"image is too large ({sizes.width:,}×{sizes.height:,} pixels; limit {max_pixels:,} "
                       "pixels), possibly a decompression bomb")
    orientation = _FLIP_TO_ORIENTATION.get(sizes.flip, 1)
    width, height = (sizes.height, sizes.width) if orientation >= 5 else (sizes.width, sizes.height)
    preview = _usable_preview(raw, min(sizes.width, sizes.height), min_side)
    contents = RawContents(os.path.splitext(name)[1][1:].upper() or "RAW", width, height, orientation,
                           _raw_metadata(data, preview))
    if preview is not None:
        contents.preview = preview
    else:
        contents.pixels = _demosaic(raw, min(sizes.width, sizes.height), min_side)
    return contents


def _usable_preview(raw: Any, raw_short_side: int, min_side: int) -> bytes | None:
    """The embedded JPEG when it is big enough: at least ``min_side`` on its short side, or (for a full-size
    decode, ``min_side`` 0) at least half the sensor's."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError, rawpy.LibRawError):
        return None
    if thumb.format != rawpy.ThumbFormat.JPEG:
        return None  # a bitmap thumbnail is small; LibRaw's own pixels are better
    needed = min_side if min_side > 0 else raw_short_side // 2
    return thumb.data if _jpeg_short_side(thumb.data) >= needed else None


def _jpeg_short_side(data: bytes) -> int:
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as preview:
            return min(preview.size)
    except Exception:  # a broken preview is no preview; the sensor data may still be fine
        return 0


def _demosaic(raw: Any, raw_short_side: int, min_side: int) -> np.ndarray:
    # Half size skips the interpolation (one pixel per 2×2 sensor block): four times fewer pixels, no artefacts.
    half = min_side > 0 and raw_short_side // 2 >= min_side
    pixels: np.ndarray = raw.postprocess(half_size=half, use_camera_wb=True, output_bps=8)
    return pixels


# --- metadata --------------------------------------------------------------------------------------------------


def _raw_metadata(data: bytes, preview: bytes | None) -> PhotoMetadata:
    found = _container_metadata(data)
    if found is None or found == PhotoMetadata():
        from_preview = _preview_metadata(preview)
        if from_preview is not None:
            return from_preview
    return found or PhotoMetadata()


def _container_metadata(data: bytes) -> PhotoMetadata | None:
    magic = _TIFF_MAGIC.get(data[:4])
    if magic is not None:
        exif = exif_from_tiff_bytes(magic + data[4:])
        return metadata_from(exif, xmp=exif.get(700)) if exif is not None else None
    if data[4:12] == b"ftypcrx ":
        return _cr3_metadata(data)
    if data.startswith(b"FUJIFILMCCD-RAW "):
        return _preview_metadata(_raf_jpeg(data))
    return None


def _preview_metadata(jpeg: bytes | None) -> PhotoMetadata | None:
    if not jpeg:
        return None
    from clipsearch.metadata import read_metadata

    try:
        with Image.open(io.BytesIO(jpeg), formats=("JPEG",)) as image:
            return read_metadata(image)
    except Exception:  # as above
        return None


def _raf_jpeg(data: bytes) -> bytes | None:
    """Fujifilm RAF: the offset and length of its embedded JPEG (with the full EXIF) sit at bytes 84 and 88."""
    if len(data) < 92:
        return None
    offset, length = struct.unpack(">II", data[84:92])
    return data[offset : offset + length] or None


def _cr3_metadata(data: bytes) -> PhotoMetadata | None:
    """Canon CR3 (ISO base media): IFD0, the Exif IFD and the GPS IFD are TIFF blobs in moov/uuid CMT1, 2, 4."""
    tables: dict[bytes, bytes] = {}
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind == b"moov":
            for inner, inner_start, inner_end in _boxes(data, start, end):
                if inner == b"uuid" and data[inner_start : inner_start + 16] == _CANON_METADATA_UUID:
                    tables = {k: data[s:e] for k, s, e in _boxes(data, inner_start + 16, inner_end)}
    ifd0 = exif_from_tiff_bytes(tables.get(b"CMT1", b""))
    if ifd0 is None:
        return None
    details = exif_from_tiff_bytes(tables.get(b"CMT2", b""))
    gps = exif_from_tiff_bytes(tables.get(b"CMT4", b""))
    return metadata_from(ifd0, exif_ifd=dict(details or {}), gps_ifd=_gps_tags(gps))


def _gps_tags(gps: Image.Exif | None) -> dict[int, Any]:
    if gps is None:
        return {}
    return ifd_or_empty(gps, IFD.GPSInfo) or dict(gps)


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each ISO base media box between start and end."""
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        header = 8
        if size == 1 and position + 16 <= end:
            size, header = struct.unpack(">Q", data[position + 8 : position + 16])[0], 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            return
        yield kind, position + header, position + size
        position += size
