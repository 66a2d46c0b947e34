"""Opening one image safely: the pixels the model needs, the metadata a person searches by, or a reason.

`decode_file()` reads a file once, hashes exactly those bytes and decodes them from memory, so a file
rewritten between crawl and decode is still hashed, measured and decoded consistently. It never raises:
every problem (empty, truncated, not an image, a decompression bomb, permission denied, vanished ...)
becomes a `DecodeFailure` whose reason is one short sentence, and indexing goes on.

Speed: a JPEG is decoded at reduced scale (libjpeg's DCT scaling through `Image.draft`), so a 12 MP photo
costs about as much as a 0.2 MP one, and anything still far larger than the model needs is box-reduced by an
integer factor before orientation and colour conversion. See `benchmarks/README.md` for measured figures.

Orientation is applied exactly once, whoever applies it: Pillow's TIFF reader and pillow-heif turn the picture
upright themselves (and then report the upright size and drop the EXIF tag); for every other format the EXIF
orientation left after loading is applied here. Camera RAW files go through `raw.py`; colour and bit depth
through `colour.py`; metadata through `metadata.py`. `upright_image` gives thumbnails the very same pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import os
import re
import stat
import struct
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.ExifTags import Base

from clipsearch.colour import rgb_from_16bit, to_rgb
from clipsearch.errors import QueryError
from clipsearch.metadata import exif_or_none, read_metadata
from clipsearch.photo import ImageRecord, PhotoMetadata

# PhotoMetadata, read_metadata and to_rgb are also this module's own API, as they were before they moved.

DEFAULT_MIN_SIDE = 224
# Pillow's own hard limit (2 × Image.MAX_IMAGE_PIXELS): we refuse nothing Pillow would open by itself, and a
# limit above it would not help, since Pillow then refuses in Image.open before we can look.
DEFAULT_MAX_PIXELS = 178_956_970
MAX_FILE_BYTES = 1 << 30  # a photo is at most a few hundred MB; anything larger is not worth holding in RAM
VANISHED = "file vanished before it could be read"

# Only formats the crawler looks for: Image.open would otherwise also try e.g. EPS, which runs Ghostscript.
_SAFE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
# Pillow refuses a PNG whose zTXt/iTXt/iCCP chunk inflates past 1 MiB: an ICC profile or XMP packet can. These
# limits keep the guard against inflation bombs; a PNG past even them is read again without those chunks.
PNG_TEXT_CHUNK_LIMIT = 64 << 20
PNG_TEXT_MEMORY_LIMIT = 256 << 20
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
    """True when pillow-heif (a dependency, yet possibly missing from an odd install) can decode HEIC/HEIF/AVIF."""
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True, kw_only=True)
class Decoded(ImageRecord):
    """One decoded image: model-ready pixels plus what gets stored about the file (`ImageRecord`'s fields)."""

    image: Image.Image  # RGB, upright, reduced; shortest side >= min_side unless the original is smaller


@dataclass
class DecodeFailure:
    """A file that could not be decoded, with one short sentence saying why."""

    path: str
    reason: str


@dataclass
class _Picture:
    """Upright 8-bit RGB pixels with the facts about the original that the library stores."""

    pixels: Image.Image
    width: int  # of the original, as a viewer shows it
    height: int
    format: str
    metadata: PhotoMetadata


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

UNEXPECTED = "could not be decoded: the image library failed on it (the file may be damaged)"


def upright_image(path: str, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | DecodeFailure:
    """The picture a viewer shows, as 8-bit RGB, reduced but never below ``min_side``: exactly the pixels the model
    is given, for thumbnails. Reads no metadata, hashes nothing; never raises."""
    try:
        data, _mtime_ns = _read_file(path)
    except _Undecodable as problem:
        return DecodeFailure(path, str(problem))
    except OSError as error:
        return DecodeFailure(path, _read_error_reason(error))
    try:
        with _pillow_warnings_silenced():
            return _picture(data, path, min_side, max_pixels, with_metadata=False).pixels
    except _Undecodable as problem:
        return DecodeFailure(path, str(problem))
    except Exception:  # the outer boundary, as in decode_file
        return DecodeFailure(path, UNEXPECTED)


def _decode_guarded(
    data: bytes, path: str, min_side: int, max_pixels: int, mtime_ns: int
) -> Decoded | DecodeFailure:
    try:
        with _pillow_warnings_silenced():
            return _decode(data, path, min_side, max_pixels, mtime_ns)
    except _Undecodable as problem:
        return DecodeFailure(path, str(problem))
    except Exception:  # the outer boundary: one strange file must never stop an indexing run
        return DecodeFailure(path, UNEXPECTED)


def _decode(data: bytes, path: str, min_side: int, max_pixels: int, mtime_ns: int) -> Decoded:
    picture = _picture(data, path, min_side, max_pixels, with_metadata=True)
    return Decoded(
        path=path,
        image=picture.pixels,
        width=picture.width,
        height=picture.height,
        format=picture.format,
        content_hash=hash_bytes(data),
        size=len(data),
        mtime_ns=mtime_ns,
        **dataclasses.asdict(picture.metadata),
    )


def _picture(data: bytes, name: str, min_side: int, max_pixels: int, *, with_metadata: bool) -> _Picture:
    if not data:
        raise _Undecodable("empty file")
    from clipsearch import raw

    if raw.is_raw_name(name):
        return _raw_picture(data, name, min_side, max_pixels)
    try:
        return _pillow_picture(data, min_side, max_pixels, with_metadata)
    except _Undecodable:
        lean = _without_ancillary_png_chunks(data)
        if lean is None:
            raise
        return _pillow_picture(lean, min_side, max_pixels, with_metadata)


def _pillow_picture(data: bytes, min_side: int, max_pixels: int, with_metadata: bool) -> _Picture:
    image = _open_image(data, max_pixels)
    declared = image.size  # before draft, which shrinks image.size
    if min_side > 0:  # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale, never below min_side
        image.draft("RGB", (min_side, min_side))
    pixels, applied = _upright_pixels(image, min_side, data)
    # After loading: reading a PNG's EXIF loads it, and would hide a decoding error from _upright_pixels.
    metadata = read_metadata(image) if with_metadata else PhotoMetadata()
    # A reader that turned the picture itself reported the upright size already, and left orientation 1.
    width, height = (declared[1], declared[0]) if applied >= 5 else declared
    return _Picture(pixels, width, height, image.format or "unknown", metadata)


def _raw_picture(data: bytes, name: str, min_side: int, max_pixels: int) -> _Picture:
    from clipsearch import raw

    try:
        contents = raw.read_raw(data, name, min_side, max_pixels)
    except raw.RawError as problem:
        raise _Undecodable(str(problem)) from None
    if contents.pixels is not None:
        pixels = reduce_for_model(Image.fromarray(contents.pixels, "RGB"), min_side)
    else:
        preview = _open_image(contents.preview or b"", max_pixels)
        if min_side > 0:
            preview.draft("RGB", (min_side, min_side))
        pixels, _applied = _upright_pixels(preview, min_side, None, orientation=contents.orientation)
    return _Picture(pixels, contents.width, contents.height, contents.format, contents.metadata)


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


def _upright_pixels(
    image: Image.Image, min_side: int, data: bytes | None, orientation: int | None = None
) -> tuple[Image.Image, int]:
    """Load, convert to RGB, reduce and turn upright; returns the pixels and the orientation applied here."""
    low_bytes = _low_bytes_twin(image, data)  # set up before loading: it swaps the still undecoded tiles
    _load(image)
    applied = orientation if orientation is not None else _orientation(image)  # after load: what is left to do
    rgb = _sixteen_bit_rgb(image, low_bytes) if low_bytes is not None else None
    # Colour first (reduce() does not take every mode), then reduce, then rotate the small image.
    pixels = reduce_for_model(rgb if rgb is not None else to_rgb(image), min_side)
    transpose = _ORIENTATION_TRANSPOSE.get(applied)
    return (pixels.transpose(transpose) if transpose is not None else pixels), applied


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise _Undecodable(_broken_data_reason(image.format or "image", error)) from None


def _prepare_query_image(image: Image.Image, min_side: int) -> Image.Image:
    try:
        _check_pixel_count(image.size, DEFAULT_MAX_PIXELS)
        return _upright_pixels(image, min_side, None)[0]
    except _Undecodable as problem:
        raise QueryError(f"The query image cannot be used: {problem}.") from None


@contextlib.contextmanager
def _pillow_warnings_silenced() -> Iterator[None]:
    """Hide Pillow's warnings while decoding: they would clutter progress output and ask nothing of anyone.

    Its DecompressionBombWarning included: our own pixel limit decides, and says so in the failure's reason.
    (`catch_warnings` swaps a global filter list: fine in worker processes, racy but harmless in threads.)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(PIL|pillow_heif|rawpy)(\.|$)")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


@functools.cache
def _allowed_formats() -> tuple[str, ...]:
    from PIL import PngImagePlugin

    if heif_available():
        import pillow_heif

        pillow_heif.register_heif_opener()
    Image.init()  # register every plugin now, so the list below is complete
    PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, PNG_TEXT_CHUNK_LIMIT)
    PngImagePlugin.MAX_TEXT_MEMORY = max(PngImagePlugin.MAX_TEXT_MEMORY, PNG_TEXT_MEMORY_LIMIT)
    return tuple(name for name in _SAFE_FORMATS if name in Image.OPEN)


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise _Undecodable(
            f"image is too large ({width:,}×{height:,} pixels; limit {max_pixels:,} pixels), "
            "possibly a decompression bomb"
        )


def _orientation(image: Image.Image) -> int:
    exif = exif_or_none(image)
    value = exif.get(Base.Orientation) if exif is not None else None
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# --- 16 bits per channel -------------------------------------------------------------------------------------

# Pillow reads 16-bit RGB(A) PNGs and TIFFs as 8-bit, keeping each sample's high byte, so a dark 16-bit photo
# comes out black. Decoding the same tiles again with the byte order swapped (Pillow's own unpackers) gives the
# low bytes; together they are the full 16-bit samples, tone-mapped by `colour.py` like 16-bit grey.
_NATIVE = "L" if sys.byteorder == "little" else "B"
_SWAPPED_RAWMODE = {
    f"{mode};16{order}": f"{mode};16{swapped}"
    for mode in ("RGB", "RGBA")
    for order, swapped in (("B", "L"), ("L", "B"), ("N", "B" if _NATIVE == "L" else "L"))
}


def _low_bytes_twin(image: Image.Image, data: bytes | None) -> Image.Image | None:
    """A second, unloaded opening of a 16-bit RGB(A) image whose tiles give the low bytes; None otherwise."""
    rawmodes = [_tile_rawmode(tile) for tile in getattr(image, "tile", [])] if data is not None else []
    if not rawmodes or not all(mode in _SWAPPED_RAWMODE for mode in rawmodes):
        return None
    twin = Image.open(io.BytesIO(data or b""), formats=(image.format or "",))
    if len(twin.tile) != len(rawmodes):
        return None
    twin.tile = [_with_rawmode(tile, _SWAPPED_RAWMODE[str(mode)]) for tile, mode in zip(twin.tile, rawmodes,
                                                                                         strict=True)]
    return twin


def _tile_rawmode(tile: Any) -> str | None:
    args = getattr(tile, "args", None)
    first = args[0] if isinstance(args, tuple) and args else args
    return first if isinstance(first, str) else None


def _with_rawmode(tile: Any, rawmode: str) -> Any:
    args = tile.args
    return tile._replace(args=(rawmode, *args[1:]) if isinstance(args, tuple) else rawmode)


def _sixteen_bit_rgb(image: Image.Image, low_bytes: Image.Image) -> Image.Image | None:
    try:
        low_bytes.load()
    except (OSError, SyntaxError, ValueError, EOFError):
        return None  # the 8-bit reading stands
    high, low = np.asarray(image, dtype=np.uint16), np.asarray(low_bytes, dtype=np.uint16)
    if high.shape != low.shape or high.ndim != 3:
        return None
    samples = (high << 8) | low
    return rgb_from_16bit(samples[..., :3], samples[..., 3] if samples.shape[2] == 4 else None)


# --- PNG metadata chunks -------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"acTL", b"fcTL", b"fdAT"})


def _without_ancillary_png_chunks(data: bytes) -> bytes | None:
    """The PNG with only the chunks that make up its pixels: what is left when a metadata chunk (an ICC profile,
    an XMP packet) is too large even for the raised limits. None when not a PNG, or nothing to drop."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    kept, position, dropped = [_PNG_SIGNATURE], len(_PNG_SIGNATURE), False
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 12 + length
        if kind in _PNG_PIXEL_CHUNKS:
            kept.append(data[position:end])
        else:
            dropped = True
        position = end
    return b"".join(kept) if dropped else None


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
        return "HEIF/AVIF image, but pillow-heif is not installed to read it (pip install pillow-heif)"
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
    if "truncat" in str(error).lower():
        return f"truncated {image_format} file"
    return f"corrupt {image_format} file: its image data cannot be decoded"


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
