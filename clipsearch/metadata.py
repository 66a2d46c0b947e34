"""Reading what a photo file says about the photo: date taken (with its source and UTC offset), camera, lens, GPS.

The date taken is the first usable one of `DATE_SOURCES`, in that order: the capture time first, wherever a
camera or an editor put it, and a file's modification date only when nothing else is recorded (an edit date is
not when the photo was taken). A date's UTC offset comes from EXIF's OffsetTime* tags, or from the XMP or IPTC
value itself. Strings end at their first NUL and lose surrounding blanks, as exiftool prints them.

Everything here is best effort: a broken tag costs that value, never the image.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from PIL import Image
from PIL.ExifTags import GPS, IFD, Base

from clipsearch.photo import PhotoMetadata

# Where the date taken comes from, in order of preference (the names are stored as `taken_at_source`).
DATE_SOURCES = (
    "EXIF DateTimeOriginal",  # the Exif IFD, where the standard puts it
    "EXIF IFD0 DateTimeOriginal",  # some writers put it in IFD0 instead
    "XMP exif:DateTimeOriginal",
    "XMP photoshop:DateCreated",
    "XMP xmp:CreateDate",
    "IPTC DateCreated",  # with TimeCreated when present
    "EXIF CreateDate",  # DateTimeDigitized: when the picture was digitised, a scan's date
    "EXIF ModifyDate",  # IFD0 DateTime: when the file was last changed
)
_XMP_DATES = (
    ("XMP exif:DateTimeOriginal", "http://ns.adobe.com/exif/1.0/", "DateTimeOriginal"),
    ("XMP photoshop:DateCreated", "http://ns.adobe.com/photoshop/1.0/", "DateCreated"),
    ("XMP xmp:CreateDate", "http://ns.adobe.com/xap/1.0/", "CreateDate"),
)
_OFFSET_TIME, _OFFSET_TIME_ORIGINAL, _OFFSET_TIME_DIGITIZED = 0x9010, 0x9011, 0x9012
_LENS_MODEL = 0xA434
MAX_XMP_BYTES = 4 << 20  # a real packet is a few KB; a larger one is read only this far

Dated = tuple[str, str | None]  # (local ISO date or datetime, UTC offset "+02:00" or None)


def read_metadata(image: Image.Image) -> PhotoMetadata:
    """Everything `PhotoMetadata` holds, from an opened Pillow image's EXIF, XMP and IPTC."""
    exif = exif_or_none(image)
    return metadata_from(exif, xmp=image.info.get("xmp"), iptc=lambda: _iptc(image))


def metadata_from(
    exif: Image.Exif | None,
    *,
    xmp: object = None,
    iptc: Callable[[], dict[Any, Any]] | None = None,
    exif_ifd: dict[int, Any] | None = None,
    gps_ifd: dict[int, Any] | None = None,
) -> PhotoMetadata:
    """`PhotoMetadata` from an EXIF block (IFD0 with its sub-IFDs, unless they are given apart, as CR3 files
    store them), an XMP packet and IPTC records (read only when no better date was found)."""
    exif = exif if exif is not None else Image.Exif()
    details = exif_ifd if exif_ifd is not None else ifd_or_empty(exif, IFD.Exif)
    taken = _date_taken(exif, details, xmp, iptc)
    latitude, longitude = _gps_position(gps_ifd if gps_ifd is not None else ifd_or_empty(exif, IFD.GPSInfo))
    return PhotoMetadata(
        taken_at=taken[0][0] if taken else None,
        taken_at_offset=taken[0][1] if taken else None,
        taken_at_source=taken[1] if taken else None,
        camera_make=clean_text(exif.get(Base.Make)),
        camera_model=clean_text(exif.get(Base.Model)),
        lens=clean_text(details.get(_LENS_MODEL)),
        gps_lat=latitude,
        gps_lon=longitude,
    )


def exif_or_none(image: Image.Image) -> Image.Exif | None:
    try:
        return image.getexif()
    except Exception:  # Pillow's EXIF parser raises many types on malformed data; metadata is optional
        return None


def exif_from_tiff_bytes(data: bytes) -> Image.Exif | None:
    """EXIF from a bare TIFF structure ("II*\\0..." or "MM\\0*..."), as RAW files and HEIF boxes hold it."""
    exif = Image.Exif()
    try:
        exif.load(data)
    except Exception:  # as above
        return None
    return exif


def ifd_or_empty(exif: Image.Exif, tag: int) -> dict[int, Any]:
    try:
        return dict(exif.get_ifd(tag))
    except Exception:  # as above: a broken sub-IFD costs that metadata, never the image
        return {}


def clean_text(value: object) -> str | None:
    """A tag's text up to its first NUL, without surrounding blanks; None when nothing is left."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    return value.split("\x00", 1)[0].strip() or None


# --- date taken ----------------------------------------------------------------------------------------------


def _date_taken(
    exif: Image.Exif, details: dict[int, Any], xmp: object, iptc: Callable[[], dict[Any, Any]] | None
) -> tuple[Dated, str] | None:
    for source, value in _date_candidates(exif, details, xmp, iptc):
        if value is not None:
            return value, source
    return None


def _date_candidates(
    exif: Image.Exif, details: dict[int, Any], xmp: object, iptc: Callable[[], dict[Any, Any]] | None
) -> Iterator[tuple[str, Dated | None]]:
    """(source, parsed value) in the order of `DATE_SOURCES`, each read only when the ones before gave nothing."""
    original_offset = details.get(_OFFSET_TIME_ORIGINAL, exif.get(_OFFSET_TIME_ORIGINAL))
    yield DATE_SOURCES[0], _exif_date(details.get(Base.DateTimeOriginal), original_offset)
    yield DATE_SOURCES[1], _exif_date(exif.get(Base.DateTimeOriginal), original_offset)
    packet = _xmp_root(xmp)
    for source, namespace, name in _XMP_DATES:
        yield source, _xmp_date(packet, namespace, name)
    yield "IPTC DateCreated", _iptc_date(iptc() if iptc is not None else {})
    digitized_offset = details.get(_OFFSET_TIME_DIGITIZED)
    yield "EXIF CreateDate", _exif_date(details.get(Base.DateTimeDigitized), digitized_offset)
    yield "EXIF ModifyDate", _exif_date(exif.get(Base.DateTime), details.get(_OFFSET_TIME, exif.get(_OFFSET_TIME)))


_DATETIME = re.compile(
    r"(\d{4})[:-](\d{2})[:-](\d{2})"  # date, EXIF's colons or ISO's dashes
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?(?:[.,]\d+)?)?"  # time, seconds and fractions optional
    r"\s*(Z|[+-]\d{2}:?\d{2})?$"  # UTC offset
)


def parse_datetime(value: object) -> Dated | None:
    """EXIF's "2019:07:14 18:03:22", ISO's "2019-07-14T18:03:22.5+02:00" or a date alone, as (ISO local time,
    offset). Blanks, "0000:00:00 00:00:00" and impossible dates are None; a year or month alone is too vague."""
    text = clean_text(value)
    match = _DATETIME.match(text) if text else None
    if match is None:
        return None
    year, month, day, hour, minute, second, offset = match.groups()
    try:
        if hour is None:
            when = datetime(int(year), int(month), int(day)).date().isoformat()
        else:
            when = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0)).isoformat()
    except ValueError:
        return None
    return when, normalise_offset(offset)


def normalise_offset(value: object) -> str | None:
    """"+0200", "+02:00" or "Z" as "+02:00"; None when blank or impossible (beyond ±14:00)."""
    text = clean_text(value)
    match = re.fullmatch(r"(Z)|([+-])(\d{2}):?(\d{2})", text) if text else None
    if match is None:
        return None
    if match.group(1):
        return "+00:00"
    sign, hours, minutes = match.group(2), int(match.group(3)), int(match.group(4))
    if hours > 14 or minutes > 59:
        return None
    return f"{sign}{hours:02d}:{minutes:02d}"


def _exif_date(value: object, offset: object) -> Dated | None:
    parsed = parse_datetime(value)
    if parsed is None:
        return None
    return parsed[0], parsed[1] or normalise_offset(offset)


def _xmp_root(packet: object) -> ElementTree.Element | None:
    if isinstance(packet, str):
        packet = packet.encode("utf-8", "replace")
    if not isinstance(packet, bytes) or not packet:
        return None
    packet = packet[:MAX_XMP_BYTES]
    if b"<!DOCTYPE" in packet or b"<!ENTITY" in packet:  # XMP never needs a DTD; entity expansion is an attack
        return None
    try:
        return ElementTree.fromstring(packet.strip(b"\x00 \t\r\n"))
    except ElementTree.ParseError:
        return None


def _xmp_date(root: ElementTree.Element | None, namespace: str, name: str) -> Dated | None:
    """The property as an attribute of any rdf:Description, or as an element's text."""
    if root is None:
        return None
    key = f"{{{namespace}}}{name}"
    for element in root.iter():
        value = element.attrib.get(key) if element.tag != key else (element.text or "")
        parsed = parse_datetime(value) if value else None
        if parsed is not None:
            return parsed
    return None


def _iptc(image: Image.Image) -> dict[Any, Any]:
    from PIL import IptcImagePlugin

    try:
        return IptcImagePlugin.getiptcinfo(image) or {}  # type: ignore[arg-type]
    except Exception:  # malformed IPTC blocks raise all sorts; metadata is optional
        return {}


def _iptc_date(records: dict[Any, Any]) -> Dated | None:
    """IPTC DateCreated (2:55, "CCYYMMDD") with TimeCreated (2:60, "HHMMSS±HHMM") when present."""
    date = _first_text(records.get((2, 55)))
    if not date or not re.fullmatch(r"\d{8}", date):
        return None
    time_text = _first_text(records.get((2, 60))) or ""
    clock = re.fullmatch(r"(\d{2})(\d{2})(\d{2})([+-]\d{4})?", time_text)
    iso = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    if clock is None:
        return parse_datetime(iso)
    hours, minutes, seconds, offset = clock.groups()
    return parse_datetime(f"{iso}T{hours}:{minutes}:{seconds}{offset or ''}")


def _first_text(value: object) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return clean_text(value)


# --- GPS -----------------------------------------------------------------------------------------------------


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
    sign = -1 if (clean_text(ref) or "").upper().startswith(negative_ref) else 1
    return sign * degrees


def _rationals(value: object) -> list[float]:
    """EXIF rationals as floats (Pillow gives NaN for a zero denominator); [] when not numbers at all."""
    items: list[Any] = list(value) if isinstance(value, (tuple, list)) else [value]
    try:
        return [float(item) for item in items]
    except (TypeError, ValueError, ZeroDivisionError):
        return []
