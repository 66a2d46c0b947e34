"""Thumbnails for the UI: made once per file version with Pillow, cached in the library's ``thumbs/`` folder.

A thumbnail's file name carries the image id, its size and a key made from the original's path, size and
mtime, so an edited or replaced photo gets a fresh thumbnail on its next view and an unchanged one is never
decoded twice. Files are written to a temporary name and renamed into place, so two page views making the same
thumbnail at once, or a kill mid-write, never leave a half-written JPEG behind.

Pixels come from the decoder the model uses (`decode.upright_image`), so a thumbnail shows exactly what was
indexed: upright, with the same colour and 16-bit conversion, from a RAW file's preview. JPEGs are decoded at
reduced scale (libjpeg's DCT scaling by 1/2, 1/4 or 1/8), so a 20 MP original costs about as much as a 0.3 MP one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from clipsearch.library import Library

DEFAULT_SIZE = 256
JPEG_QUALITY = 85


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
    """The same upright RGB pixels the model sees (`decode.upright_image`: orientation, colour, 16-bit tone
    mapping, RAW previews), at least ``size`` on the short side, then shrunk to fit ``size``."""
    from clipsearch.decode import DecodeFailure, upright_image

    image = upright_image(str(original), min_side=size)
    if isinstance(image, DecodeFailure):
        return None
    image.thumbnail((size, size))
    return image


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
