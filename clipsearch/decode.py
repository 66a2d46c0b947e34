"""Opening one image safely: the pixels the model needs, the metadata a person searches by, or a reason.

`decode_file()` reads a file once, hashes exactly those bytes and decodes them from memory, so a file
rewritten between crawl and decode is still hashed, measured and decoded consistently. It never raises:
every problem (empty, truncated, not an image, a decompression bomb, permission denied, vanished ...)
becomes a `DecodeFailure` whose reason is one short sentence, and indexing goes on.

Speed: a JPEG is decoded at reduced scale (libjpeg's DCT scaling through `Image.draft`), so a 12 MP photo
costs about as much as a 0.2 MP one, and anything still far larger than the model needs is box-reduced by an
integer factor before orientation and colour conversion. See `benchmarks/README.md` for measured figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.ExifTags import GPS, IFD, Base

from clipsearch.errors import QueryError

DEFAULT_MIN_SIDE = 224
# Pillow's own hard limit (2 × Image.MAX_IMAGE_PIXELS): we refuse nothing Pillow would open by itself, and a
# limit above it would not help, since Pillow then refuses in Image.open before we can look.
DEFAULT_MAX_PIXELS = 178_956_970
MAX_FILE_BYTES = 1 << 30  # a photo is at most a few hundred MB; anything larger is not worth holding in RAM
VANISHED = "file vanished before it could be read"

# Only formats the crawler looks for: Image.open would otherwise also try e.g. EPS, which runs Ghostscript.
_SAFE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# ImageOps.exif_transpose's table, applied by hand: the stored width/height and the rotation then come from
# one reading of the tag (they can never disagree), and the rotation runs on the small, reduced image.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@functools.cache
def heif_available() -> bool:
    """True when pillow-heif (the optional `heif` extra) can be imported, so HEIC/HEIF/AVIF can be decoded."""
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Decoded:
    """One decoded image: model-ready pixels plus what gets stored about the file."""

    path: str
    image: Image.Image  # RGB, upright, reduced; shortest side >= min_side unless the original is smaller
    width: int  # of the original, as a viewer shows it (after EXIF orientation)
    height: int
    format: str  # Pillow's format name: "JPEG", "PNG", "HEIF" ...
    content_hash: str
    size: int  # of the bytes actually read and hashed
    mtime_ns: int  # from fstat of the descriptor those bytes came from; 0 for uploads
    taken_at: str | None = None  # ISO 8601 local time, as the camera recorded it
    camera_make: str | None = None
    camera_model: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None


@dataclass
class DecodeFailure:
    """A file that could not be decoded, with one short sentence saying why."""

    path: str
    reason: str


@dataclass(frozen=True)
class PhotoMetadata:
    """What EXIF says about a photo; every field is None when absent or unusable."""

    taken_at: str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None


class _Undecodable(Exception):
    """Raised inside this module for an expected bad file; its message is the failure's reason."""


class NotARegularFile(OSError):
    """The path is a folder, a named pipe or a device: there are no image bytes to read."""


def hash_bytes(data: bytes) -> str:
    """The content hash stored per image: BLAKE2b with a 16-byte digest, as hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def content_hash(path: str | os.PathLike[str]) -> str:
    """`hash_bytes` of a file's contents, streamed (the planner uses it to recognise moved files).

    Raises OSError (NotARegularFile included) when the file cannot be read.
    """
    with _open_regular_file(path) as stream:
        return hashlib.file_digest(stream, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def decode_file(
    path: str, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Decoded | DecodeFailure:
    """Read, hash and decode one file; never raises."""
    try:
        data, mtime_ns = _read_file(path)
    except _Undecodable as problem:
        return DecodeFailure(path, str(problem))
    except OSError as error:
        return DecodeFailure(path, _read_error_reason(error))
    return _decode_guarded(data, path, min_side, max_pixels, mtime_ns)


def decode_bytes(
    data: bytes,
    *,
    name: str = "<upload>",
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded | DecodeFailure:
    """Decode an image held in memory (a query image, an upload); `mtime_ns` is 0 since there is no file."""
    return _decode_guarded(bytes(data), name, min_side, max_pixels, mtime_ns=0)


def open_image_for_query(
    source: str | os.PathLike[str] | bytes | Image.Image, min_side: int = DEFAULT_MIN_SIDE
) -> Image.Image:
    """The same RGB, upright, reduced image indexing would produce; raises QueryError with one sentence."""
    if isinstance(source, Image.Image):
        return _prepare_query_image(source, min_side)
    if isinstance(source, (bytes, bytearray, memoryview)):
        result = decode_bytes(bytes(source), name="the uploaded image", min_side=min_side)
    elif isinstance(source, (str, os.PathLike)):
        result = decode_file(os.path.expanduser(os.fsdecode(source)), min_side=min_side)
    else:
        raise QueryError(f"An image query must be a path, bytes or a PIL image, not {type(source).__name__}.")
    if isinstance(result, DecodeFailure):
        raise QueryError(_query_failure_message(result))
    return result.image


def reduce_for_model(image: Image.Image, min_side: int) -> Image.Image:
    """Box-reduce by the largest integer factor that keeps the shortest side >= min_side.

    Draft mode only exists for JPEG and only scales by 1/2, 1/4 or 1/8; this catches every other format and
    the remainder. A box filter averages, so nothing aliases, and the model's own bicubic resize afterwards
    shrinks by less than 2×.
    """
    factor = min(image.size) // min_side if min_side > 0 else 0
    if factor < 2:
        return image
    # Whole boxes only: a size that does not divide by the factor would end in a partial box, one output pixel
    # made from a sliver, which stretches the picture slightly. Dropping the last few source pixels does not.
    width, height = image.size
    return image.reduce(factor, box=(0, 0, width - width % factor, height - height % factor))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: high bit depths scaled (not clipped), transparency flattened on white."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _to_8bit_grey(image)
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _flatten_on_white(image.convert("RGBA"))
    return image.convert("RGB")


def read_metadata(image: Image.Image) -> PhotoMetadata:
    """Date taken, camera and GPS from EXIF (IFD0, the Exif IFD and the GPS IFD)."""
    exif = _exif_or_none(image)
    if exif is None:
        return PhotoMetadata()
    details = _ifd_or_empty(exif, IFD.Exif)
    latitude, longitude = _gps_position(_ifd_or_empty(exif, IFD.GPSInfo))
    return PhotoMetadata(
        taken_at=_first_datetime(
            details.get(Base.DateTimeOriginal), details.get(Base.DateTimeDigitized), exif.get(Base.DateTime)
        ),
        camera_make=_clean_text(exif.get(Base.Make)),
        camera_model=_clean_text(exif.get(Base.Model)),
        gps_lat=latitude,
        gps_lon=longitude,
    )


# --- reading the bytes -------------------------------------------------------------------------------------


def _open_regular_file(path: str | os.PathLike[str]) -> io.BufferedReader:
    # O_NONBLOCK: opening a named pipe called "x.jpg" must not wait for a writer that never comes.
    stream = open(os.open(path, _READ_FLAGS), "rb")
    mode = os.fstat(stream.fileno()).st_mode
    if not stat.S_ISREG(mode):
        stream.close()
        is_folder = stat.S_ISDIR(mode)
        raise NotARegularFile("is a folder, not an image file" if is_folder else "not a regular file")
    return stream


def _read_file(path: str) -> tuple[bytes, int]:
    """The whole file and its mtime, both from the same open descriptor."""
    with _open_regular_file(path) as stream:
        info = os.fstat(stream.fileno())
        if info.st_size > MAX_FILE_BYTES:
            raise _Undecodable(f"file is too large ({info.st_size:,} bytes; limit {MAX_FILE_BYTES:,})")
        return stream.read(MAX_FILE_BYTES), info.st_mtime_ns


def _read_error_reason(error: OSError) -> str:
    if isinstance(error, NotARegularFile):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return VANISHED
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file"
    if error.errno == errno.ENAMETOOLONG:
        return "the path is too long for the operating system; move the file to a shorter path"
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    return f"the file could not be read ({error.strerror or _one_line(error)})"


# --- decoding ----------------------------------------------------------------------------------------------


def _decode_guarded(
    data: bytes, path: str, min_side: int, max_pixels: int, mtime_ns: int
) -> Decoded | DecodeFailure:
    try:
        with _pillow_warnings_silenced():
            return _decode(data, path, min_side, max_pixels, mtime_ns)
    except _Undecodable as problem:
        return DecodeFailure(path, str(problem))
    except Exception as error:  # the outer boundary: one strange file must never stop an indexing run
        return DecodeFailure(path, f"could not be decoded ({type(error).__name__}: {_one_line(error)})")


def _decode(data: bytes, path: str, min_side: int, max_pixels: int, mtime_ns: int) -> Decoded:
    if not data:
        raise _Undecodable("empty file")
    image = _open_image(data, max_pixels)
    width, height = image.size  # before draft, which shrinks image.size
    if min_side > 0:  # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale, never below min_side
        image.draft("RGB", (min_side, min_side))
    orientation = _orientation(image)
    if orientation in (5, 6, 7, 8):  # a quarter turn: a viewer shows it the other way round
        width, height = height, width
    metadata = read_metadata(image)
    pixels = _model_pixels(image, min_side, orientation)
    return Decoded(
        path=path,
        image=pixels,
        width=width,
        height=height,
        format=image.format or "unknown",
        content_hash=hash_bytes(data),
        size=len(data),
        mtime_ns=mtime_ns,
        **dataclasses.asdict(metadata),
    )


def _open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and check the declared size; no pixel is decoded yet."""
    try:
        image = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as error:
        raise _Undecodable(_pillow_bomb_reason(error)) from None
    except UnidentifiedImageError:
        raise _Undecodable(_unidentified_reason(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # a recognised header that breaks off
        raise _Undecodable(_broken_data_reason(_sniff_format(data) or "image", error)) from None
    _check_pixel_count(image.size, max_pixels)
    return image


def _model_pixels(image: Image.Image, min_side: int, orientation: int) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise _Undecodable(_broken_data_reason(image.format or "image", error)) from None
    # Colour first (reduce() does not take every mode), then reduce, then rotate the small image.
    pixels = reduce_for_model(to_rgb(image), min_side)
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    return pixels.transpose(transpose) if transpose is not None else pixels


def _prepare_query_image(image: Image.Image, min_side: int) -> Image.Image:
    try:
        _check_pixel_count(image.size, DEFAULT_MAX_PIXELS)
        return _model_pixels(image, min_side, _orientation(image))
    except _Undecodable as problem:
        raise QueryError(f"The query image cannot be used: {problem}.") from None


@contextlib.contextmanager
def _pillow_warnings_silenced() -> Iterator[None]:
    """Hide Pillow's warnings while decoding: they would clutter progress output and ask nothing of anyone.

    Its DecompressionBombWarning included: our own pixel limit decides, and says so in the failure's reason.
    (`catch_warnings` swaps a global filter list: fine in worker processes, racy but harmless in threads.)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(PIL|pillow_heif)(\.|$)")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


@functools.cache
def _allowed_formats() -> tuple[str, ...]:
    if heif_available():
        import pillow_heif

        pillow_heif.register_heif_opener()
    Image.init()  # register every plugin now, so the list below is complete
    return tuple(name for name in _SAFE_FORMATS if name in Image.OPEN)


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise _Undecodable(
            f"image is too large ({width:,}×{height:,} pixels; limit {max_pixels:,} pixels), "
            "possibly a decompression bomb"
        )


def _orientation(image: Image.Image) -> int:
    exif = _exif_or_none(image)
    value = exif.get(Base.Orientation) if exif is not None else None
    return value if isinstance(value, int) else 1


# --- colour modes ------------------------------------------------------------------------------------------


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float32)
    scaled = _scale_to_8bit(values, image.mode)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _scale_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit data maps 0..65535 onto 0..255 (Pillow's own convert clips, turning most photos white)."""
    if mode.startswith("I;16"):
        return values / 257
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and low >= 0 and high <= 1:
        return values * 255
    if mode == "I" and low >= 0 and high <= 255:
        return values
    if mode == "I" and low >= 0 and high <= 65535:  # 16-bit data that an older Pillow opened as "I"
        return values / 257
    return (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)


def _flatten_on_white(image: Image.Image) -> Image.Image:
    # White, not black: transparent logos and scans are drawn to be seen on a light page.
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


# --- reasons -----------------------------------------------------------------------------------------------

_MAGIC_NUMBERS = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff_format(data: bytes) -> str | None:
    for magic, name in _MAGIC_NUMBERS:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return None


def _unidentified_reason(data: bytes) -> str:
    sniffed = _sniff_format(data)
    if sniffed == "HEIF/AVIF" and not heif_available():
        return "HEIF/AVIF image, but pillow-heif is not installed (pip install 'clipsearch[heif]')"
    if sniffed is not None:
        return f"truncated or corrupt {sniffed} file (its header cannot be read)"
    return f"not an image ({_describe_content(data)})"


def _describe_content(data: bytes) -> str:
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<body" in head:
        return "looks like HTML text"
    if head.startswith(b"<?xml") or b"<svg" in head:
        return "looks like XML or SVG text; SVG is not supported"
    if head and all(byte >= 32 or byte in b"\t\n\r\f" for byte in head):
        return "looks like text"
    return "unrecognised file format"


def _broken_data_reason(image_format: str, error: BaseException) -> str:
    message = _one_line(error)
    if "truncat" in message.lower():
        return f"truncated {image_format} file"
    return f"corrupt {image_format} data ({message})"


def _pillow_bomb_reason(error: Image.DecompressionBombError) -> str:
    # Pillow refuses inside Image.open, before we see the image, so the numbers are only in its message.
    numbers = [f"{int(number):,}" for number in re.findall(r"(\d+) pixels", str(error))]
    if len(numbers) != 2:
        return "image is too large, possibly a decompression bomb"
    return f"image is too large ({numbers[0]} pixels; limit {numbers[1]}), possibly a decompression bomb"


def _query_failure_message(failure: DecodeFailure) -> str:
    if failure.reason == VANISHED:
        return f"The query image {failure.path} does not exist."
    return f"The query image {failure.path} cannot be used: {failure.reason}."


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__


# --- EXIF --------------------------------------------------------------------------------------------------


def _exif_or_none(image: Image.Image) -> Image.Exif | None:
    try:
        return image.getexif()
    except Exception:  # Pillow's EXIF parser raises many types on malformed data; metadata is optional
        return None


def _ifd_or_empty(exif: Image.Exif, tag: int) -> dict[int, Any]:
    try:
        return dict(exif.get_ifd(tag))
    except Exception:  # as above: a broken sub-IFD costs that metadata, never the image
        return {}


def _clean_text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    return value.replace("\x00", " ").strip() or None


_EXIF_DATETIME_FORMATS = ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M", "%Y-%m-%dT%H:%M:%S")


def _first_datetime(*values: object) -> str | None:
    for value in values:
        parsed = _parse_exif_datetime(value)
        if parsed is not None:
            return parsed
    return None


def _parse_exif_datetime(value: object) -> str | None:
    """EXIF's "2019:07:14 18:03:22" as ISO 8601; blanks and "0000:00:00 00:00:00" are None."""
    text = _clean_text(value)
    if text is None:
        return None
    for pattern in _EXIF_DATETIME_FORMATS:
        try:
            return datetime.strptime(text[:19], pattern).isoformat()
        except ValueError:
            continue
    return None


def _gps_position(gps: dict[int, Any]) -> tuple[float | None, float | None]:
    latitude = _gps_coordinate(gps.get(GPS.GPSLatitude), gps.get(GPS.GPSLatitudeRef), "S", 90)
    longitude = _gps_coordinate(gps.get(GPS.GPSLongitude), gps.get(GPS.GPSLongitudeRef), "W", 180)
    if latitude is None or longitude is None:  # half a position is no position
        return None, None
    return latitude, longitude


def _gps_coordinate(value: object, ref: object, negative_ref: str, limit: float) -> float | None:
    """Degrees, minutes, seconds (rationals) as signed decimal degrees; None when unusable."""
    parts = _rationals(value)
    degrees = sum(part / 60**index for index, part in enumerate(parts[:3]))
    if not parts or not math.isfinite(degrees) or not 0 <= degrees <= limit:
        return None
    sign = -1 if (_clean_text(ref) or "").upper().startswith(negative_ref) else 1
    return sign * degrees


def _rationals(value: object) -> list[float]:
    """EXIF rationals as floats (Pillow gives NaN for a zero denominator); [] when not numbers at all."""
    items: list[Any] = list(value) if isinstance(value, (tuple, list)) else [value]
    try:
        return [float(item) for item in items]
    except (TypeError, ValueError, ZeroDivisionError):
        return []
