"""How much memory an index build may use: where the budget comes from, and sizes as people write them.

The budget, in bytes, is the first of:

1. an explicit value (``memory_budget_bytes=`` in the API, ``--memory-budget`` on `clipsearch reindex`);
2. the ``CLIPSEARCH_INDEX_MEMORY`` environment variable (same syntax, so `clipsearch index` honours it too);
3. half of the machine's memory: physical RAM, or the container's memory limit (cgroup) when that is lower.
   Half leaves the rest to the operating system, the page cache that serves the memory-mapped vectors and the
   on-disk index, and whatever else runs; a build that needs more goes to disk in shards instead
   (`clipsearch.index.build`; how a build splits its budget is `clipsearch.index.memory`).

Sizes: a number of bytes (``1073741824``), or a number with a unit, case-insensitive, with or without a space:
``kB MB GB TB`` are powers of 1000, ``KiB MiB GiB TiB`` powers of 1024, and the one-letter ``K M G T`` powers of
1024 as in ``ulimit`` or ``docker --memory``. ``B`` means bytes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from clipsearch.errors import SettingError

MEMORY_ENV = "CLIPSEARCH_INDEX_MEMORY"
DEFAULT_FRACTION = 0.5  # of physical memory (or the cgroup limit), see the module docstring

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def parse_size(text: str) -> int:
    """Bytes in a size such as ``512MB``, ``2GiB``, ``1.5G`` or ``1048576``; ValueError with one sentence if not."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write a number of bytes or a number with a unit, "
                         "such as 512MB or 2GiB.")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r} is not a usable size; it must be more than zero bytes.")
    return size


def format_size(size: int) -> str:
    """``268435456`` -> ``'256 MiB'``: for messages and reports."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


def resolve_memory_budget(explicit: int | None = None) -> int:
    """The build's memory budget in bytes: `explicit`, else ``$CLIPSEARCH_INDEX_MEMORY``, else the default."""
    if explicit is not None:
        if explicit <= 0:
            raise SettingError(f"The memory budget must be more than zero bytes, not {explicit}.")
        return int(explicit)
    configured = os.environ.get(MEMORY_ENV, "").strip()
    if configured:
        try:
            return parse_size(configured)
        except ValueError:
            raise SettingError(f"{MEMORY_ENV} is set to {configured!r}, which is not a usable size; set it to a "
                               "size such as 512MB or 2GiB, or unset it.") from None
    return default_memory_budget()


def default_memory_budget() -> int:
    """Half of the machine's memory (physical RAM, or the cgroup limit when lower)."""
    return int(DEFAULT_FRACTION * machine_memory())


def machine_memory() -> int:
    """Bytes of memory this process can have: physical RAM, capped by a cgroup limit when one is set."""
    physical = _physical_memory()
    limit = _cgroup_limit()
    return min(physical, limit) if limit else physical


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system: assume a modest machine
        return 8 * 1024**3


def _cgroup_limit() -> int | None:
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number mean no limit
            return int(text)
    return None
