"""Indexes whose inverted lists live in a file (``.ivfdata``) rather than in RAM, and the changes made to such an
index until its next save.

The FAISS side: lists merged compactly into an `OnDiskInvertedLists` file, mapped read-only when loaded (from the
file found beside the index, not the path it was written at), and an empty in-RAM *twin* of an index for vectors
added later. The state side (`DiskState`): a lists file is never changed once written, because a reader may have
it mapped, so added vectors go into the twin, removed ids are hidden by a selector, every search runs on both,
and a save writes the changes as a fresh file (`settle`). Why, and what it costs: docs/index.md, "Indexes on
disk".

faiss's `OnDiskInvertedLists` prints a line on the C stdout every time it resizes a file; `quiet_c_stdout`
keeps those lines out of our own output (such as ``--json``). Its prefetch threads are turned off (see
`_without_prefetch_threads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch import durable
from clipsearch.index.ids import grown, lookup
from clipsearch.index.runtime import faiss
from clipsearch.index.search import bitmap_selector


def fresh_ivfdata_name() -> str:
    """A name no lists file has had: every .ivfdata is written once under a fresh name and never changed."""
    return f"lists-{secrets.token_hex(6)}.ivfdata"


@contextlib.contextmanager
def quiet_c_stdout() -> Iterator[None]:
    """Send what C code prints on stdout to /dev/null for the duration of the block.

    The redirection is process-wide (file descriptor 1), so it is only used around the short faiss calls that
    print, in the process that builds or saves the index.
    """
    libc = _libc()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to protect
        yield
        return
    sys.stdout.flush()
    if libc is not None:
        libc.fflush(None)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        if libc is not None:
            libc.fflush(None)  # what faiss printed is still in the C buffer: flush it to /dev/null
        os.dup2(saved, 1)
        os.close(saved)


def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return None


# ------------------------------------------------------------------------------------------------- FAISS side


def merge_into_file(index: Any, sources: list[Any], ivfdata: Path) -> None:
    """Replace `index`'s inverted lists by the entries of `sources` (inverted lists of the same trained index),
    written compactly into the new file `ivfdata`, flushed to disk."""
    module = faiss()
    ivf = module.extract_index_ivf(index)
    if sum(source.compute_ntotal() for source in sources) == 0:
        _replace_lists(index, module.ArrayInvertedLists(ivf.nlist, ivf.code_size), 0)  # faiss cannot map 0 bytes
        return
    lists = module.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    _without_prefetch_threads(lists)
    pointers = module.InvertedListsPtrVector()
    for source in sources:
        pointers.push_back(source)
    with quiet_c_stdout():
        total = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    _replace_lists(index, lists, total)
    durable.fsync_path(ivfdata)


def remove_ids(index: Any, ids: np.ndarray) -> None:
    """Remove `ids` from an index whose lists file nobody else uses yet (a file just written by this process)."""
    if len(ids):
        with quiet_c_stdout():
            index.remove_ids(faiss().IDSelectorBatch(np.asarray(ids, dtype=np.int64)))


def freeze(index: Any) -> None:
    """Make faiss refuse any change to the index's lists file from now on (it is about to be shared)."""
    lists = ivfdata_lists(index)
    if lists is not None:
        lists.read_only = True


def open_index(data: np.ndarray, ivfdata: Path) -> Any:
    """The index serialised in `data`, its inverted lists mapped read-only from `ivfdata`.

    The serialised index names the file it was written with; the lists are mapped from `ivfdata` instead, so a
    library folder that was moved or copied still finds them (what ``IO_FLAG_ONDISK_SAME_DIR`` does for
    `read_index`, without its message on stdout). The caller checks the file's size first: mapping a shorter
    file would crash on the first read past its end.
    """
    module = faiss()
    index = module.deserialize_index(data, module.IO_FLAG_SKIP_IVF_DATA | module.IO_FLAG_READ_ONLY)
    lists = ivfdata_lists(index)
    if lists is None:
        raise ValueError("the index file does not describe on-disk inverted lists")
    lists.filename = str(ivfdata)
    lists.do_mmap()
    _without_prefetch_threads(lists)
    return index


def _without_prefetch_threads(lists: Any) -> None:
    # Before each search faiss starts up to 32 threads that read the lists about to be scanned, so that a cold
    # disk serves them in parallel. The lists are memory-mapped and usually in the page cache, where starting
    # those threads costs more than the scan they are meant to speed up.
    lists.prefetch_nthread = 0


def mapped_bytes(index: Any) -> int:
    """Bytes of the lists file the index maps (0 when its lists are in RAM)."""
    lists = ivfdata_lists(index)
    return int(lists.totsize) if lists is not None else 0


def ivfdata_lists(index: Any) -> Any:
    """The index's `OnDiskInvertedLists`, or None when its lists are in RAM."""
    module = faiss()
    lists = module.downcast_InvertedLists(module.extract_index_ivf(index).invlists)
    return lists if isinstance(lists, module.OnDiskInvertedLists) else None


def empty_twin(index: Any) -> Any:
    """An in-RAM index with the same trained coarse quantiser and codebooks as `index`, holding no vectors.

    Vectors added to it get exactly the codes and lists they would get in `index`, so searching both and
    merging the candidates is the same as searching one index that holds everything.
    """
    module = faiss()
    twin = module.deserialize_index(module.serialize_index(index), module.IO_FLAG_SKIP_IVF_DATA)
    ivf = module.extract_index_ivf(twin)
    _replace_lists(twin, module.ArrayInvertedLists(ivf.nlist, ivf.code_size), 0)
    return twin


def copy_with_lists(index: Any, sources: list[Any], ivfdata: Path) -> Any:
    """A new index with `index`'s trained quantiser and codebooks and the entries of `sources` in `ivfdata`."""
    copy = empty_twin(index)
    merge_into_file(copy, sources, ivfdata)
    return copy


def _replace_lists(index: Any, lists: Any, total: int) -> None:
    ivf = faiss().extract_index_ivf(index)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and frees) them now
    index.ntotal = ivf.ntotal = total


# ------------------------------------------------------------------------------------- changes until a save


class DiskState:
    """An on-disk index's .ivfdata file and the changes held in memory until the next save."""

    def __init__(self, ivfdata: Path, *, saved: bool, owned_folder: Path | None = None) -> None:
        self.ivfdata = ivfdata
        self.saved = saved  # some saved index names the file: it must never be changed or deleted by this one
        self.twin: Any = None  # in-RAM index holding the vectors added since the file was written
        self.in_twin = np.zeros(0, dtype=bool)  # per id: held by the twin
        self.hidden = np.zeros(0, dtype=bool)  # per id: the file's entry was removed or replaced since
        self.hidden_count = 0
        self._not_hidden: Any = None  # cached selector of the file's entries that still count
        # A build without a library folder keeps its file in a private temporary folder, deleted with the index.
        self._cleanup = weakref.finalize(self, shutil.rmtree, owned_folder, True) if owned_folder else None

    @property
    def changed(self) -> bool:
        return self.hidden_count > 0 or self.twin_count > 0

    @property
    def twin_count(self) -> int:
        return int(self.twin.ntotal) if self.twin is not None else 0

    def twin_for_adding(self, base: Any) -> Any:
        if self.twin is None:
            self.twin = empty_twin(base)
        return self.twin

    def added(self, ids: np.ndarray) -> None:
        self.in_twin = grown(self.in_twin, int(ids[-1]) + 1)
        self.in_twin[ids] = True

    def remove(self, ids: np.ndarray) -> None:
        """Remove present `ids`: from the twin when it holds them, else hide the file's entries."""
        in_twin = lookup(self.in_twin, ids)
        if in_twin.any():
            self.twin.remove_ids(faiss().IDSelectorBatch(ids[in_twin]))
            self.in_twin[ids[in_twin]] = False
        from_file = ids[~in_twin]
        if len(from_file):
            self.hidden = grown(self.hidden, int(from_file[-1]) + 1)
            self.hidden[from_file] = True
            self.hidden_count += len(from_file)
            self._not_hidden = None

    def file_selector(self, allowed: np.ndarray | None) -> Any:
        """The selector for searching the file: `allowed` (or everything) minus the hidden entries."""
        if allowed is not None:
            return bitmap_selector(allowed[~lookup(self.hidden, allowed)] if self.hidden_count else allowed)
        if not self.hidden_count:
            return None
        if self._not_hidden is None:
            hidden = bitmap_selector(np.flatnonzero(self.hidden))
            self._not_hidden = (faiss().IDSelectorNot(hidden), hidden)  # the Not selector does not keep its input
        return self._not_hidden[0]

    def discard(self) -> None:
        """Delete the file if no saved index names it (a build that was not kept)."""
        if not self.saved:
            self.ivfdata.unlink(missing_ok=True)
        if self._cleanup is not None:
            self._cleanup()


def settle(index: Any, disk: DiskState, folder: Path) -> tuple[Any, DiskState | None]:
    """The index and state to save in `folder`: as they are when the file is there and nothing changed, else a
    copy whose fresh lists file holds the file's entries minus the hidden ones plus the twin's (None: no lists
    left to keep in a file). Either way the lists file is frozen: it is about to be shared."""
    if not disk.changed and disk.ivfdata.parent.resolve() == folder.resolve():
        freeze(index)
        return index, disk
    fresh = folder / fresh_ivfdata_name()
    merged = _merged_lists(index, disk, fresh)
    disk.discard()  # the previous file, unless a saved index names it
    freeze(merged)
    return merged, DiskState(fresh, saved=False) if ivfdata_lists(merged) is not None else None


def _merged_lists(index: Any, disk: DiskState, fresh: Path) -> Any:
    """A copy of `index` whose lists, written to `fresh`, are the file's minus the hidden entries plus the twin's.
    An id hidden in the file but held by the twin (replaced) has two entries with the same id, so then the
    file's lists are copied and cleaned first and the twin's merged in a second step."""
    module = faiss()
    file_lists = [module.extract_index_ivf(index).invlists]
    twin_lists = [module.extract_index_ivf(disk.twin).invlists] if disk.twin_count else []
    hidden = np.flatnonzero(disk.hidden)
    cleaning = fresh.with_name(fresh.name + ".tmp")
    try:
        if not lookup(disk.in_twin, hidden).any():
            merged = copy_with_lists(index, file_lists + twin_lists, fresh)
            remove_ids(merged, hidden)
            return merged
        cleaned = copy_with_lists(index, file_lists, cleaning)
        remove_ids(cleaned, hidden)
        return copy_with_lists(index, [module.extract_index_ivf(cleaned).invlists] + twin_lists, fresh)
    except BaseException:
        fresh.unlink(missing_ok=True)
        raise
    finally:
        cleaning.unlink(missing_ok=True)  # a mapped file lives on until `cleaned` is freed
