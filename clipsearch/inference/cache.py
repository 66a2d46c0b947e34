"""Where exported models and probe results live, and the memoised digest of a weights file.

One folder per user (the platform's user cache folder, ``~/.cache/clipsearch`` on Linux), relocated by
``$CLIPSEARCH_CACHE``. Everything in it can be deleted at any time: it is rebuilt on the next run. Files are
written to a temporary name and renamed, so a process that reads while another writes sees the old file or the
new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "CLIPSEARCH_CACHE"
DIGESTS_FILE = "digests.json"


def cache_dir() -> Path:
    """The cache folder: ``$CLIPSEARCH_CACHE``, else the platform's user cache folder for clipsearch."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("clipsearch", appauthor=False))


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a cache entry is then rebuilt)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a temporary file in the same folder, renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=2, sort_keys=True)
    os.replace(temporary, path)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, memoised by (path, size, mtime_ns): hashing 600 MB of weights costs about a second,
    a stat costs microseconds, and a changed file changes its size or mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_path = cache_dir() / DIGESTS_FILE
    memo = read_json(memo_path) or {}
    known = memo.get(str(path))
    if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
        return str(known[2])
    with open(path, "rb") as source:
        digest = hashlib.file_digest(source, "sha256").hexdigest()
    memo = read_json(memo_path) or {}  # re-read: another process may have added entries meanwhile
    memo[str(path)] = [stat.st_size, stat.st_mtime_ns, digest]
    try:
        write_json(memo_path, memo)
    except OSError:  # a read-only cache only costs the hash next time
        pass
    return digest


def machine_id() -> str:
    """What makes probe timings valid: this host, its processor and its core count. A cache folder shared by
    several machines (a home folder on NFS) keeps one choice per machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{platform.node()}|{cpu}|{os.cpu_count()}|{platform.system()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
