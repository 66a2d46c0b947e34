"""Generators of hostile (and of ordinary) image files, shared by the crawl, decode and end-to-end tests.

`make_hostile_corpus(root)` lays out one folder holding every hostile case of issue 6 and returns
`{relative path: expected}`, where `expected` is one of

- `OK`: the file must be indexed like any photo (1×1, CMYK, 16-bit, palette with transparency, animated ...);
- `SKIPPED`: neither indexed nor reported (a hidden file, a .txt file, a second path to an already indexed
  folder through a symbolic link);
- any other string: a keyword that the reason recorded for this path contains, compared case-insensitively
  ("empty", "truncated", "HTML", "too large", "loop", "UTF-8" ...). The reason comes from the crawler
  (`CrawlProblem`) or from the decoder (`DecodeFailure`); the tests do not care which.

Relative paths use "/" and are printable: a non-UTF-8 name appears as `CrawlProblem.path` shows it, with
`\\xNN` escapes (`os.fsencode(path).decode("utf-8", "backslashreplace")`).

Two cases depend on the machine: permissions do not stop root, so the unreadable file and folder are `OK`
when the tests run as root; and a named pipe is only made where `os.mkfifo` exists. A file deleted or
rewritten between crawl and decode cannot sit in a static folder: `test_decode.py` makes those on the fly.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

import numpy as np
from PIL import Image, ImageChops, ImageDraw

T = TypeVar("T")

OK = "ok"
SKIPPED = "skipped"
PATH_MAX = 4096  # Linux: the longest path a system call takes, counting the final NUL byte
NAME_MAX = 255


# --- ordinary images ----------------------------------------------------------------------------------------


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A textured RGB image that compresses like a photo (smooth colour fields plus a little sensor noise).

    Cheap enough for 12 MP in a test: the noise is one 256 × 256 tile, added by Pillow with saturation.
    """
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = coarse.resize((width, height), Image.Resampling.BILINEAR)
    tile = rng.integers(0, 15, (256, 256, 3), dtype=np.uint8)
    noise = np.tile(tile, (-(-height // 256), -(-width // 256), 1))[:height, :width]
    return ImageChops.add(smooth, Image.fromarray(noise), offset=-7)


def marked_image(width: int, height: int) -> Image.Image:
    """White, with a red 25% square in the top-left corner: shows where that corner ends up after rotation."""
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((0, 0, width // 4, height // 4), fill=(255, 0, 0))
    return image


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image | None = None, exif: Image.Exif | None = None, quality: int = 90) -> bytes:
    image = image if image is not None else photo_like(64, 48)
    options: dict[str, object] = {"quality": quality}
    if exif is not None:
        options["exif"] = exif.tobytes()
    return encode(image, "JPEG", **options)


def make_exif(
    *,
    orientation: int | None = None,
    make: str | None = None,
    model: str | None = None,
    taken: str | None = None,
    gps: tuple[float, float] | None = None,
) -> Image.Exif:
    """EXIF as cameras lay it out: Make, Model, Orientation in IFD0; DateTimeOriginal in the Exif IFD."""
    exif = Image.Exif()
    for tag, value in ((0x0112, orientation), (0x010F, make), (0x0110, model)):
        if value is not None:
            exif[tag] = value
    if taken is not None:
        exif.get_ifd(0x8769)[0x9003] = taken
    if gps is not None:
        exif.get_ifd(0x8825).update(_gps_ifd(*gps))
    return exif


def _gps_ifd(latitude: float, longitude: float) -> dict[int, object]:
    return {
        1: "N" if latitude >= 0 else "S",
        2: _degrees_minutes_seconds(abs(latitude)),
        3: "E" if longitude >= 0 else "W",
        4: _degrees_minutes_seconds(abs(longitude)),
    }


def _degrees_minutes_seconds(value: float) -> tuple[float, float, float]:
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = round((value - degrees - minutes / 60) * 3600, 4)
    return float(degrees), float(minutes), seconds


# --- hostile and unusual images -----------------------------------------------------------------------------


def truncated_jpeg_bytes() -> bytes:
    """A real JPEG cut in the middle of its entropy-coded data: the header still parses."""
    data = jpeg_bytes(photo_like(320, 240, seed=1))
    return data[: len(data) // 2]


def truncated_png_bytes() -> bytes:
    data = encode(photo_like(320, 240, seed=2), "PNG")
    return data[: len(data) // 2]


def html_bytes() -> bytes:
    """What a browser saves when "Save image as" hits a login page."""
    return b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"


def text_bytes() -> bytes:
    return b"shopping list: milk, eggs, a new camera\n"


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG header declaring width × height RGB pixels, with a few bytes of data: a bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    first_rows = zlib.compress(b"\x00" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", first_rows)
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    checksum = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", checksum)


def one_by_one_png_bytes() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")


def cmyk_jpeg_bytes() -> bytes:
    """Pure cyan in CMYK (as print workflows save it): must come out cyan in RGB, not inverted."""
    return encode(Image.new("CMYK", (64, 48), (255, 0, 0, 0)), "JPEG", quality=95)


def grey16_png_bytes() -> bytes:
    """A 16-bit greyscale ramp 0..65535 across the width; converting by clipping turns it nearly all white."""
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (32, 1))), "PNG")


def palette_png_with_transparency_bytes() -> bytes:
    """A palette image whose index 0 is fully transparent (the left half) and index 1 is blue."""
    image = Image.new("P", (64, 32), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    ImageDraw.Draw(image).rectangle((32, 0, 63, 31), fill=1)
    return encode(image, "PNG", transparency=0)


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", (48, 32), colour) for colour in ((220, 20, 20), (20, 220, 20), (20, 20, 220))]


def animated_gif_bytes() -> bytes:
    """Three frames, red then green then blue: the first frame (red) is the one to index."""
    first, *rest = _frames()
    return encode(first, "GIF", save_all=True, append_images=rest, duration=100, loop=0)


def animated_webp_bytes() -> bytes:
    first, *rest = _frames()
    return encode(first, "WEBP", save_all=True, append_images=rest, duration=100, loop=0, lossless=True)


# --- hostile file-system entries ----------------------------------------------------------------------------


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_non_utf8_file(folder: Path, data: bytes) -> str:
    """Create `bad\\xff name.jpg` (the byte 0xFF is never valid UTF-8); return the name as printed."""
    os.makedirs(folder, exist_ok=True)
    with open(os.fsencode(folder) + b"/bad\xff name.jpg", "wb") as stream:
        stream.write(data)
    return "bad\\xff name.jpg"


@contextmanager
def _open_folder(path: str | bytes, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def make_deep_file(root: Path, total_length: int, file_name: str, data: bytes) -> str:
    """Create a file whose absolute path is exactly `total_length` bytes, through folders of <= 200 bytes.

    Built with directory descriptors (mkdir and open relative to the parent), because the full path may be
    longer than the system accepts, which is the point. Returns the path relative to `root`.
    """
    root.mkdir(parents=True, exist_ok=True)
    top = os.path.abspath(root)  # the path as the crawler will spell it, symlinks and all
    components = _deep_components(len(os.fsencode(top)), total_length, file_name)
    with _open_folder(top) as root_fd:
        fd = os.dup(root_fd)
        try:
            for component in components:
                _mkdir_at(component, fd)
                fd = _descend(component, fd)
            _write_at(file_name, fd, data)
        finally:
            os.close(fd)
    return "/".join([*components, file_name])


def _mkdir_at(name: str, dir_fd: int) -> None:
    try:
        os.mkdir(name, dir_fd=dir_fd)
    except FileExistsError:
        pass


def _descend(name: str, dir_fd: int) -> int:
    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
    os.close(dir_fd)
    return child


def _write_at(name: str, dir_fd: int, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _deep_components(root_length: int, total_length: int, file_name: str) -> list[str]:
    """Folder names of 3..200 bytes such that root/<names>/file_name is exactly total_length bytes long."""
    budget = total_length - root_length - len(file_name) - 1  # bytes for "name/" per folder
    count = -(-budget // 201)  # fewest folders that fit: each costs at most 200 + 1 bytes
    name_bytes = budget - count  # one "/" per folder
    if count < 1 or name_bytes < 3 * count:
        raise ValueError(f"cannot make a {total_length}-byte path under a {root_length}-byte root")
    sizes = [name_bytes // count + (1 if index < name_bytes % count else 0) for index in range(count)]
    return ["d" * size for size in sizes]


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --- the corpus ---------------------------------------------------------------------------------------------


def make_hostile_corpus(root: Path) -> dict[str, str]:
    """Fill `root` with every hostile case of issue 6 and a few ordinary photos; return what each should give.

    See the module docstring for the meaning of the values. `root` must be a short path (under ~3,500
    bytes), since two files are placed at the very edge of the system's path length limit.
    """
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    for builder in (_ordinary_files, _undecodable_files, _unusual_images, _file_system_oddities, _long_paths):
        expected.update(builder(root))
    expected.update(_permission_cases(root))
    return expected


def _ordinary_files(root: Path) -> dict[str, str]:
    write(root / "holiday" / "beach.jpg", jpeg_bytes(photo_like(320, 240, seed=3)))
    write(root / "holiday" / "UPPER CASE.JPG", jpeg_bytes(photo_like(200, 150, seed=4)))
    write(root / "holiday" / "crème brûlée 写真.png", encode(photo_like(90, 60, seed=5), "PNG"))
    write(root / "holiday" / ".hidden.jpg", jpeg_bytes())
    write(root / "holiday" / "notes.txt", text_bytes())
    os.symlink("holiday", root / "link_to_holiday")  # a second path to folders already indexed
    return {
        "holiday/beach.jpg": OK,
        "holiday/UPPER CASE.JPG": OK,
        "holiday/crème brûlée 写真.png": OK,
        "holiday/.hidden.jpg": SKIPPED,
        "holiday/notes.txt": SKIPPED,
        "link_to_holiday/beach.jpg": SKIPPED,
    }


def _undecodable_files(root: Path) -> dict[str, str]:
    cases = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (truncated_jpeg_bytes(), "truncated"),
        "truncated.png": (truncated_png_bytes(), "truncated"),
        "login page.jpg": (html_bytes(), "HTML"),
        "login page.png": (html_bytes(), "HTML"),
        "notes.jpg": (text_bytes(), "not an image"),
        "bomb.png": (png_declaring(50_000, 50_000), "too large"),
    }
    for name, (data, _) in cases.items():
        write(root / "bad" / name, data)
    return {f"bad/{name}": keyword for name, (_, keyword) in cases.items()}


def _unusual_images(root: Path) -> dict[str, str]:
    cases = {
        "one pixel.png": one_by_one_png_bytes(),
        "cmyk.jpg": cmyk_jpeg_bytes(),
        "grey16.png": grey16_png_bytes(),
        "palette transparent.png": palette_png_with_transparency_bytes(),
        "animated.gif": animated_gif_bytes(),
        "animated.webp": animated_webp_bytes(),
        "rotated.jpg": jpeg_bytes(marked_image(80, 40), make_exif(orientation=6)),
    }
    for name, data in cases.items():
        write(root / "odd" / name, data)
    (root / "odd" / "album.jpg").mkdir()  # a folder named like an image: walked into, never decoded
    write(root / "odd" / "album.jpg" / "inside.png", one_by_one_png_bytes())
    expected = {f"odd/{name}": OK for name in cases}
    expected["odd/album.jpg/inside.png"] = OK
    return expected


def _file_system_oddities(root: Path) -> dict[str, str]:
    links = root / "links"
    links.mkdir()
    os.symlink("no such photo.jpg", links / "broken.jpg")
    os.symlink("self.jpg", links / "self.jpg")  # resolving it loops forever: ELOOP
    os.symlink("..", links / "up")  # a folder loop: links/up/links/up/...
    expected = {"links/broken.jpg": "broken", "links/self.jpg": "loop", "links/up": "loop"}
    printed = make_non_utf8_file(root / "names", jpeg_bytes())
    expected[f"names/{printed}"] = "UTF-8"
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "names" / "pipe.jpg")  # opening it for reading would block without O_NONBLOCK
        expected["names/pipe.jpg"] = "not a regular file"
    return expected


def _long_paths(root: Path) -> dict[str, str]:
    """One file whose absolute path is the longest the system accepts, and one a little past it."""
    longest = make_deep_file(root / "deep ok", PATH_MAX - 1, "longest.png", one_by_one_png_bytes())
    # The folder stays listable (its path is under the limit); only the file's own path is too long to stat.
    name = "too long " + "x" * 60 + ".png"
    too_long = make_deep_file(root / "deep too long", PATH_MAX + 20, name, one_by_one_png_bytes())
    return {f"deep ok/{longest}": OK, f"deep too long/{too_long}": "too long"}


def _permission_cases(root: Path) -> dict[str, str]:
    """Permissions do not stop root, so as root these are ordinary, readable photos."""
    unreadable = write(root / "locked" / "no read permission.jpg", jpeg_bytes())
    unreadable.chmod(0o000)
    write(root / "locked" / "sealed folder" / "inside.jpg", jpeg_bytes())
    (root / "locked" / "sealed folder").chmod(0o000)
    if running_as_root():
        return {"locked/no read permission.jpg": OK, "locked/sealed folder/inside.jpg": OK}
    return {"locked/no read permission.jpg": "permission denied", "locked/sealed folder": "permission denied"}


def restore_permissions(root: Path) -> None:
    """Make the corpus deletable again: pytest's cleanup must be able to enter every folder."""
    _make_removable(root)


# --- running as an ordinary user ----------------------------------------------------------------------------

NOBODY = 65534  # the conventional unprivileged uid and gid


def call_unprivileged(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` as a user whom file permissions apply to: as root, in a forked child that drops to
    uid/gid 65534 first (no mock: the kernel itself says "permission denied"); otherwise simply in-process.

    The child can only reach paths every user may traverse: see `traversable_tmpdir()`. The result must be
    picklable; an exception in the child is raised here as a RuntimeError carrying its repr.
    """
    if not running_as_root():
        return function(*args)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        os.close(read_end)
        _run_child(write_end, function, args)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        outcome, value = pickle.loads(stream.read() or pickle.dumps(("error", "the child wrote nothing")))
    os.waitpid(pid, 0)
    if outcome == "error":
        raise RuntimeError(f"in the unprivileged child: {value}")
    return value


def _run_child(write_end: int, function: Callable[..., object], args: tuple[object, ...]) -> NoReturn:
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        payload = pickle.dumps(("ok", function(*args)))
    except BaseException as error:  # everything must reach the parent, which reports it
        payload = pickle.dumps(("error", repr(error)))
    with os.fdopen(write_end, "wb") as stream:
        stream.write(payload)
    os._exit(0)


@contextmanager
def traversable_tmpdir() -> Iterator[Path]:
    """A temporary folder that every user can enter (pytest's own tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="clipsearch-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        _make_removable(folder)
        shutil.rmtree(folder)


def _make_removable(folder: Path) -> None:
    for parent, subfolders, _ in os.walk(folder):  # top-down: each folder is opened before walk enters it
        for name in subfolders:
            path = os.path.join(parent, name)
            if not os.path.islink(path):  # os.walk lists links to folders too; chmod would follow them
                os.chmod(path, 0o755)
