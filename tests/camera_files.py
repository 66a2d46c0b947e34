"""Files as real cameras and editors write them, made here: every EXIF orientation, dates in each place a date can
be (EXIF IFD0 or Exif IFD, XMP, IPTC) with UTC offsets, NUL-padded camera strings, 16-bit TIFFs and PNGs, a PNG
with an ICC profile past Pillow's text-chunk limit, HEIC and `.hif`, and DNGs with and without a JPEG preview.

`camera_corpus(folder)` writes them all and returns {file name: what clipsearch must store}; the exiftool oracle
(`test_cameras.py`) reads the same files independently.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hostile import encode, make_exif, marked_image, photo_like
from PIL import Image, PngImagePlugin, TiffImagePlugin

ORIENTATIONS = range(1, 9)
# Where the red top-left quarter of `marked_image` must be once the picture stands upright.
UPRIGHT_CORNER = {1: "top-left", 2: "top-right", 3: "bottom-right", 4: "bottom-left",
                  5: "top-left", 6: "top-right", 7: "bottom-right", 8: "bottom-left"}


def stored_marked_image(width: int, height: int, orientation: int) -> Image.Image:
    """The pixels a camera stores for `marked_image(width, height)` seen upright through ``orientation``: the
    inverse of the viewer's transform, so that applying the orientation gives the marked image back."""
    upright = marked_image(width, height)
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}.get(orientation)
    return upright.transpose(inverse) if inverse is not None else upright


def corner_of_red(image: Image.Image) -> str:
    width, height = image.size
    corners = {"top-left": (2, 2), "top-right": (width - 3, 2), "bottom-left": (2, height - 3),
               "bottom-right": (width - 3, height - 3)}
    rgb = image.convert("RGB")
    reds = [name for name, xy in corners.items() if _is_red(rgb.getpixel(xy))]
    return reds[0] if len(reds) == 1 else f"unclear: {reds}"


def _is_red(pixel: Any) -> bool:
    red, green, blue = pixel[:3]
    return red > 180 and green < 90 and blue < 90


# --- orientation in each format ------------------------------------------------------------------------------


def oriented_jpeg(orientation: int, width: int = 96, height: int = 64) -> bytes:
    stored = stored_marked_image(width, height, orientation)
    return encode(stored, "JPEG", quality=95, exif=make_exif(orientation=orientation).tobytes())


def oriented_tiff(orientation: int, width: int = 96, height: int = 64) -> bytes:
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[274] = orientation
    return encode(stored_marked_image(width, height, orientation), "TIFF", tiffinfo=info)


def oriented_png(orientation: int, width: int = 96, height: int = 64) -> bytes:
    return encode(stored_marked_image(width, height, orientation), "PNG",
                  exif=make_exif(orientation=orientation).tobytes())


def oriented_webp(orientation: int, width: int = 96, height: int = 64) -> bytes:
    return encode(stored_marked_image(width, height, orientation), "WEBP", lossless=True,
                  exif=make_exif(orientation=orientation).tobytes())


def oriented_heic(orientation: int, width: int = 128, height: int = 64) -> bytes:
    """pillow-heif writes the orientation as the HEIF transforms (irot, imir) that phones use, and keeps the EXIF
    tag too. Sizes are multiples of 64 so that the coded size is the picture's size."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    return encode(stored_marked_image(width, height, orientation), "HEIF", quality=95,
                  exif=make_exif(orientation=orientation).tobytes())


# --- dates, strings, GPS -------------------------------------------------------------------------------------

XMP_NAMESPACES = {"exif": "http://ns.adobe.com/exif/1.0/", "photoshop": "http://ns.adobe.com/photoshop/1.0/",
                  "xmp": "http://ns.adobe.com/xap/1.0/"}


def xmp_packet(**properties: str) -> bytes:
    """An XMP packet with ``prefix_Name="value"`` properties, e.g. xmp_packet(photoshop_DateCreated="2019-07-14")."""
    declarations = " ".join(f'xmlns:{prefix}="{uri}"' for prefix, uri in XMP_NAMESPACES.items())
    attributes = " ".join(f'{key.replace("_", ":", 1)}="{value}"' for key, value in properties.items())
    return (f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            f'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
            f'{declarations} {attributes}/></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()


def exif_with(ifd0: dict[int, Any] | None = None, exif_ifd: dict[int, Any] | None = None,
              gps: tuple[float, float] | None = None) -> Image.Exif:
    exif = make_exif(gps=gps)
    for tag, value in (ifd0 or {}).items():
        exif[tag] = value
    if exif_ifd:
        exif.get_ifd(0x8769).update(exif_ifd)
    return exif


def with_iptc(jpeg: bytes, date: str, time: str | None = None) -> bytes:
    """The JPEG with an APP13 Photoshop IRB holding IPTC DateCreated (2:55) and TimeCreated (2:60)."""
    records = _iim(55, date.encode()) + (_iim(60, time.encode()) if time else b"")
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(records)) + records
    if len(resource) % 2:
        resource += b"\x00"
    payload = b"Photoshop 3.0\x00" + resource
    return jpeg[:2] + b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _iim(dataset: int, value: bytes) -> bytes:
    return bytes((0x1C, 2, dataset)) + struct.pack(">H", len(value)) + value


def png_with_large_icc_profile(megabytes: float = 3) -> bytes:
    """A valid PNG whose (random, so incompressible) ICC profile inflates past Pillow's 1 MiB text-chunk limit."""
    profile = np.random.default_rng(5).integers(0, 256, int(megabytes * (1 << 20)), dtype=np.uint8).tobytes()
    return encode(photo_like(64, 48), "PNG", icc_profile=profile)


def png_with_large_xmp(megabytes: float = 2) -> bytes:
    info = PngImagePlugin.PngInfo()
    padding = "x" * int(megabytes * (1 << 20))
    info.add_itxt("XML:com.adobe.xmp", xmp_packet(photoshop_DateCreated="2018-05-06T07:08:09").decode()
                  .replace("</x:xmpmeta>", f"<!-- {padding} --></x:xmpmeta>"), zip=True)
    return encode(photo_like(64, 48), "PNG", pnginfo=info)


# --- 16 bits ---------------------------------------------------------------------------------------------------


def dark_16bit(channels: int, brightest: int = 3000) -> np.ndarray:
    """A dark 16-bit ramp (a 12-bit sensor's values in a 16-bit file), brightest at the right."""
    ramp = np.linspace(0, brightest, 64).astype(np.uint16)
    grey = np.tile(ramp, (32, 1))
    return grey if channels == 1 else np.stack([grey, grey // 2, grey // 4], axis=-1)


def tiff_16bit(samples: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, samples, photometric="rgb" if samples.ndim == 3 else "minisblack")
    return buffer.getvalue()


def png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grey but not 16-bit RGB)."""
    height, width = samples.shape[:2]
    colour_type = 2 if samples.ndim == 3 else 0
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# --- DNG -------------------------------------------------------------------------------------------------------

BYTE, ASCII, SHORT, LONG, RATIONAL, UNDEFINED, SRATIONAL = 1, 2, 3, 4, 5, 7, 10
_TYPE_FORMAT = {BYTE: "B", ASCII: "B", SHORT: "H", LONG: "I", RATIONAL: "II", UNDEFINED: "B", SRATIONAL: "ii"}


@dataclass
class Ifd:
    """One TIFF IFD: tag -> (type, values); ``strip`` is its image data; ``links`` point tags at other IFDs."""

    entries: dict[int, tuple[int, Sequence[Any] | bytes | str]]
    strip: bytes = b""
    links: dict[int, list[Ifd]] = field(default_factory=dict)


def tiff_file(first: Ifd) -> bytes:
    """A little-endian TIFF holding ``first`` and every IFD it links to (SubIFDs, the Exif and GPS IFDs)."""
    order = _walk(first)
    offsets, position = {}, 8
    for ifd in order:
        offsets[id(ifd)] = position
        position += _block_size(ifd)
    return b"II*\x00" + struct.pack("<I", 8) + b"".join(_block(ifd, offsets) for ifd in order)


def _walk(ifd: Ifd) -> list[Ifd]:
    return [ifd] + [inner for children in ifd.links.values() for child in children for inner in _walk(child)]


def _entries(ifd: Ifd, offsets: dict[int, int]) -> dict[int, tuple[int, Any]]:
    entries = dict(ifd.entries)
    for tag, children in ifd.links.items():
        entries[tag] = (LONG, [offsets[id(child)] for child in children])
    if ifd.strip:
        entries[273] = (LONG, [0])  # StripOffsets, filled in by _block
        entries[279] = (LONG, [len(ifd.strip)])
    return dict(sorted(entries.items()))


def _payload(kind: int, values: Any) -> bytes:
    if isinstance(values, str):
        values = values.encode("latin-1") + b"\x00"
    if isinstance(values, bytes):
        return values
    flat = [part for value in values for part in (value if isinstance(value, tuple) else (value,))]
    return struct.pack("<" + _TYPE_FORMAT[kind][0] * len(flat), *flat)


def _count(kind: int, values: Any, payload: bytes) -> int:
    return len(payload) // struct.calcsize("<" + _TYPE_FORMAT[kind])


def _block_size(ifd: Ifd) -> int:
    entries = _entries(ifd, {id(child): 0 for children in ifd.links.values() for child in children})
    extra = sum(_padded(len(_payload(k, v))) for k, v in entries.values() if len(_payload(k, v)) > 4)
    return 2 + 12 * len(entries) + 4 + extra + _padded(len(ifd.strip))


def _padded(size: int) -> int:
    return size + size % 2


def _block(ifd: Ifd, offsets: dict[int, int]) -> bytes:
    start = offsets[id(ifd)]
    entries = _entries(ifd, offsets)
    table_end = start + 2 + 12 * len(entries) + 4
    extra, records = b"", []
    payloads = {tag: _payload(kind, values) for tag, (kind, values) in entries.items()}
    strip_at = table_end + sum(_padded(len(p)) for p in payloads.values() if len(p) > 4)
    if ifd.strip:
        payloads[273] = struct.pack("<I", strip_at)
    for tag, (kind, values) in entries.items():
        payload = payloads[tag]
        count = _count(kind, values, payload)
        if len(payload) <= 4:
            records.append(struct.pack("<HHI", tag, kind, count) + payload.ljust(4, b"\x00"))
        else:
            records.append(struct.pack("<HHII", tag, kind, count, table_end + len(extra)))
            extra += payload + b"\x00" * (len(payload) % 2)
    table = struct.pack("<H", len(entries)) + b"".join(records) + struct.pack("<I", 0)
    return table + extra + ifd.strip + b"\x00" * (len(ifd.strip) % 2)


def bayer_mosaic(picture: Image.Image) -> np.ndarray:
    """An RGGB sensor's 16-bit readout of ``picture`` (12-bit values, as most sensors give)."""
    rgb = np.asarray(picture.convert("RGB"), dtype=np.uint16) * 16
    mosaic = np.empty(rgb.shape[:2], dtype=np.uint16)
    mosaic[0::2, 0::2] = rgb[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = rgb[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = rgb[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return mosaic


def dng(picture: Image.Image, *, orientation: int = 1, preview: bool = True, make: str = "Clipsearch",
        model: str = "Test Camera", taken: str | None = None, offset: str | None = None,
        lens: str | None = None, gps: tuple[float, float] | None = None) -> bytes:
    """A DNG of ``picture`` (stored as the sensor reads it, seen upright through ``orientation``): IFD0 holds a
    full-size JPEG preview and the metadata, a SubIFD the RGGB sensor data; without ``preview`` IFD0 is the
    sensor data itself, as in DNGs that drop their preview."""
    stored = picture
    width, height = stored.size
    sensor = Ifd({254: (LONG, [0]), 256: (LONG, [width]), 257: (LONG, [height]), 258: (SHORT, [16]),
                  259: (SHORT, [1]), 262: (SHORT, [32803]), 277: (SHORT, [1]), 278: (LONG, [height]),
                  284: (SHORT, [1]), 33421: (SHORT, [2, 2]), 33422: (BYTE, [0, 1, 1, 2]),
                  50714: (LONG, [0]), 50717: (LONG, [4095]), 50721: (SRATIONAL, [(1, 1), (0, 1), (0, 1),
                                                                                (0, 1), (1, 1), (0, 1),
                                                                                (0, 1), (0, 1), (1, 1)]),
                  50728: (RATIONAL, [(1, 1), (1, 1), (1, 1)]), 50778: (SHORT, [21])},
                 strip=bayer_mosaic(stored).astype("<u2").tobytes())
    described: dict[int, tuple[int, Any]] = {271: (ASCII, make), 272: (ASCII, model), 274: (SHORT, [orientation]),
                                             50706: (BYTE, [1, 4, 0, 0]), 50708: (ASCII, f"{make} {model}")}
    details: dict[int, tuple[int, Any]] = {}
    if taken:
        details[0x9003] = (ASCII, taken)
    if offset:
        details[0x9011] = (ASCII, offset)
    if lens:
        details[0xA434] = (ASCII, lens)
    links: dict[int, list[Ifd]] = {34665: [Ifd(details)]} if details else {}
    if gps:
        links[34853] = [Ifd(_gps_entries(*gps))]
    if not preview:
        sensor.entries.update(described)
        sensor.links.update(links)
        return tiff_file(sensor)
    jpeg = encode(stored, "JPEG", quality=92)
    first = Ifd({254: (LONG, [1]), 256: (LONG, [width]), 257: (LONG, [height]), 258: (SHORT, [8, 8, 8]),
                 259: (SHORT, [7]), 262: (SHORT, [6]), 277: (SHORT, [3]), 278: (LONG, [height]), **described},
                strip=jpeg, links={330: [sensor], **links})
    return tiff_file(first)


def _gps_entries(latitude: float, longitude: float) -> dict[int, tuple[int, Any]]:
    def dms(value: float) -> list[tuple[int, int]]:
        degrees = int(value)
        minutes = int((value - degrees) * 60)
        seconds = round((value - degrees - minutes / 60) * 3600 * 1000)
        return [(degrees, 1), (minutes, 1), (seconds, 1000)]

    return {0: (BYTE, [2, 3, 0, 0]), 1: (ASCII, "N" if latitude >= 0 else "S"), 2: (RATIONAL, dms(abs(latitude))),
            3: (ASCII, "E" if longitude >= 0 else "W"), 4: (RATIONAL, dms(abs(longitude)))}
