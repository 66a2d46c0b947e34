"""Thumbnails for the UI: made once per file version with Pillow, cached in the library's ``thumbs/`` folder.

A thumbnail's file name carries the image id, its size and a key made from the original's path, size and
mtime, so an edited or replaced photo gets a fresh thumbnail on its next view and an unchanged one is never
decoded twice. Files are written to a temporary name and renamed into place, so two page views making the same
thumbnail at once, or a kill mid-write, never leave a half-written JPEG behind.

JPEGs are decoded at reduced scale (``Image.draft``: libjpeg's DCT scaling by 1/2, 1/4 or 1/8), so a 20 MP
original costs about as much as a 0.3 MP one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from clipsearch.library import Library

DEFAULT_SIZE = 256
JPEG_QUALITY = 85
# Only the formats the indexer reads: Image.open would otherwise also try e.g. EPS, which runs Ghostscript.
_SAFE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
# Anything that can go wrong reading a file that was fine when it was indexed: it vanished, lost its
# permissions, was truncated or replaced by something that is not an image, or is now a decompression bomb.
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError)


def thumbnail_path(library: Library, row: Mapping[str, Any], size: int = DEFAULT_SIZE) -> Path | None:
    """The cached JPEG thumbnail (longest side ``size`` px) of one indexed photo, made now if needed.

    ``row`` needs the photo's ``id`` and ``path`` (a store row or ``Result.to_dict()``). Returns None when the
    original is gone or can no longer be read.
    """
    original = Path(row["path"])
    try:
        stat = original.stat()
    except OSError:
        return None
    target = library.thumbs_dir / f"{int(row['id'])}-{size}-{_version_key(original, stat)}.jpg"
    if target.is_file():
        return target
    image = _load_thumbnail(original, size)
    if image is None:
        return None
    _write_atomically(image, target)
    _remove_older_versions(target, int(row["id"]), size)
    return target


def _version_key(original: Path, stat: os.stat_result) -> str:
    """Changes whenever the file is replaced or edited (a new mtime or size), or moved to another path."""
    text = f"{original}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def _load_thumbnail(original: Path, size: int) -> Image.Image | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # The indexer accepts anything below Pillow's hard limit (DecompressionBombError), so we do too.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(original, formats=_open_formats()) as image:
                return _shrink_upright(image, size)
    except (*_UNREADABLE, Image.DecompressionBombError):
        return None


def _shrink_upright(image: Image.Image, size: int) -> Image.Image:
    from PIL import ImageOps

    if image.format == "JPEG":
        # Draft keeps both sides >= the requested box, so orientation (applied below) cannot cost sharpness.
        image.draft("RGB", (size, size))
    upright = ImageOps.exif_transpose(image)
    rgb = _flatten_to_rgb(upright)
    rgb.thumbnail((size, size))
    return rgb


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    """RGB for JPEG; transparent areas become white rather than the black Pillow's convert() gives."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
        return _high_bit_depth_to_rgb(image)
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit values instead of scaling them, which turns most photos white.
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")


def _write_atomically(image: Image.Image, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".jpg")
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _remove_older_versions(current: Path, image_id: int, size: int) -> None:
    """Thumbnails of earlier versions of the same photo are dead weight once a new one exists."""
    for stale in current.parent.glob(f"{image_id}-{size}-*.jpg"):
        if stale != current:
            stale.unlink(missing_ok=True)


@functools.cache
def _open_formats() -> tuple[str, ...]:
    from PIL import Image

    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:  # the optional `heif` extra: without it HEIC photos were never indexed either
        pass
    Image.init()  # register every plugin now, so the list below is complete
    return tuple(name for name in _SAFE_FORMATS if name in Image.OPEN)
