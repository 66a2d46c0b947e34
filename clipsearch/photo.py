"""What the library knows about one photo, declared once.

`PhotoMetadata` is what a file says about the photo (when, with which camera and lens, where); `ImageRecord` adds
what the library measures of the file itself. Everything else is derived from these two declarations: the
decoder's `Decoded` and the searcher's `Result` extend them, the indexer's record is `record_fields()`, and the
store's `images` table takes a column for every field (`field_columns`), with the SQL details kept here in each
field's metadata. A new piece of metadata is one line here (and a migration that adds its column).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Per-field SQL details, read by the store: NOT NULL, UNIQUE, indexed.
_REQUIRED = {"nullable": False}
_INDEXED = {"index": True}


@dataclass(frozen=True, kw_only=True)
class PhotoMetadata:
    """What a photo's EXIF, XMP or IPTC says; every field is None when absent or unusable.

    ``taken_at`` is the local time the camera recorded, ISO 8601 ("2019-07-14T18:03:22"; a date alone when only
    a date is recorded), so "taken on 14 July" means the photographer's day wherever it was. Its UTC offset, when
    the file records one, is ``taken_at_offset`` ("+02:00"); ``taken_at_source`` names the tag it came from
    (see `clipsearch.metadata.DATE_SOURCES`).
    """

    taken_at: str | None = field(default=None, metadata=_INDEXED)
    taken_at_offset: str | None = None
    taken_at_source: str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None


@dataclass(frozen=True, kw_only=True)
class ImageRecord(PhotoMetadata):
    """What the library stores about one indexed file: where it is, which version of it, and how it looks."""

    path: str = field(metadata={"nullable": False, "unique": True})
    size: int | None = field(default=None, metadata=_REQUIRED)  # bytes, as read and hashed
    mtime_ns: int | None = field(default=None, metadata=_REQUIRED)
    content_hash: str | None = field(default=None, metadata={**_REQUIRED, **_INDEXED})
    width: int | None = None  # as a viewer shows the photo (after EXIF orientation)
    height: int | None = None
    format: str | None = field(default=None, metadata=_INDEXED)  # "JPEG", "PNG", "HEIF", "DNG", "CR3" ...


def record_fields() -> tuple[str, ...]:
    """The names of everything stored per image, in declaration order."""
    return tuple(item.name for item in dataclasses.fields(ImageRecord))


def photo_fields() -> tuple[str, ...]:
    return tuple(item.name for item in dataclasses.fields(PhotoMetadata))


def field_columns() -> list[tuple[str, type, dict[str, Any]]]:
    """(name, Python type, SQL options) for every stored field: the store makes its columns from these."""
    hints = {"str": str, "int": int, "float": float}
    columns = []
    for item in dataclasses.fields(ImageRecord):
        base = str(item.type).split("|")[0].strip()
        options = {"nullable": True, "unique": False, "index": False, **item.metadata}
        columns.append((item.name, hints[base], options))
    return columns
