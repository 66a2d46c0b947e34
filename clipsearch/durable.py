"""Writing files so that they survive a crash: flushing data to the disk, and replacing a file atomically.

The library's write order (`Library.write_batch`) and the index's saves (`clipsearch.index.files`) are built on
these: data reach the disk (`flush_to_disk`, `fsync_path`) before anything that points at them is committed, and a
file is replaced by writing a temporary file, flushing it and renaming it over the old one (`write_atomically`),
so that a kill or a power cut at any instant leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO


def flush_to_disk(handle: IO[bytes]) -> None:
    """Push an open file's buffered writes through Python's and the kernel's buffers onto the disk."""
    handle.flush()
    os.fsync(handle.fileno())


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk by its path, including pages written through a memory map."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (the folder's entries are data of their own)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, temp: Path | None = None) -> None:
    """Replace `path` by `data`: written to `temp` (default: ``<path>.tmp``), flushed, renamed over `path`.

    A fixed temporary name, rather than a random one, means a temporary file left by a killed write is simply
    overwritten by the next one instead of piling up.
    """
    temp = temp if temp is not None else path.with_name(path.name + ".tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            flush_to_disk(f)
        os.replace(temp, path)
    finally:
        if temp.is_file():
            temp.unlink()
    fsync_folder(path.parent)
