"""FAISS inverted lists kept in a file (``.ivfdata``) instead of RAM: the plumbing behind on-disk indexes.

`clipsearch.index` decides when an index goes to disk and what the files mean (see its module docstring); this
module only speaks to faiss: writing shards, merging them into an `OnDiskInvertedLists` file (what
``faiss.contrib.ondisk.merge_ondisk`` does, but releasing each shard's memory map when done instead of leaking
it), mapping a saved file read-only, and making an empty in-RAM twin of an index for vectors added later.

faiss's `OnDiskInvertedLists` prints a line on the C stdout every time it resizes a file; `quiet_c_stdout`
keeps those lines out of our own output (such as ``--json``). Its prefetch threads are turned off (see
`_without_prefetch_threads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch import durable
from clipsearch.vectors import VectorStore

Progress = Callable[[str], None]


def _faiss() -> Any:
    # Callers reach this module through clipsearch.index, which has already imported and configured faiss.
    import faiss

    return faiss


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


# ------------------------------------------------------------------------------------------------- building


def write_shards(trained_path: Path, store: VectorStore, ids: np.ndarray, shard_rows: int, read_rows: int,
                 folder: Path, report: Progress) -> list[Path]:
    """Add `ids` in shards of `shard_rows` vectors, each into a fresh copy of the trained index read from
    `trained_path`, written to `folder` and freed before the next one starts."""
    faiss = _faiss()
    paths = []
    count = -(-len(ids) // shard_rows)
    for number, start in enumerate(range(0, len(ids), shard_rows)):
        report(f"adding shard {number + 1} of {count} ({min(shard_rows, len(ids) - start):,} vectors)")
        shard = faiss.read_index(str(trained_path))
        for chunk_ids, vectors in store.iter_chunks(ids[start : start + shard_rows], read_rows):
            shard.add_with_ids(vectors, chunk_ids)
        path = folder / f"shard-{number:05d}.faiss"
        faiss.write_index(shard, str(path))
        del shard  # its lists are on disk now; free them before the next shard
        paths.append(path)
    return paths


def merge_shards(index: Any, shard_paths: list[Path], ivfdata: Path) -> None:
    """Give the trained, empty `index` inverted lists in the new file `ivfdata` holding every shard's entries.

    The shards are memory-mapped (``IO_FLAG_MMAP``) rather than read, so the merge needs no RAM for them.
    """
    faiss = _faiss()
    shards = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in shard_paths]
    merge_into_file(index, [faiss.extract_index_ivf(shard).invlists for shard in shards], ivfdata)
    del shards  # unmaps the shard files


def merge_into_file(index: Any, sources: list[Any], ivfdata: Path) -> None:
    """Replace `index`'s inverted lists by the entries of `sources` (inverted lists of the same trained index),
    written compactly into the new file `ivfdata`, flushed to disk."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    if sum(source.compute_ntotal() for source in sources) == 0:
        _replace_lists(index, faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size), 0)  # faiss cannot map 0 bytes
        return
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    _without_prefetch_threads(lists)
    pointers = faiss.InvertedListsPtrVector()
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
            index.remove_ids(_faiss().IDSelectorBatch(np.asarray(ids, dtype=np.int64)))


def freeze(index: Any) -> None:
    """Make faiss refuse any change to the index's lists file from now on (it is about to be shared)."""
    lists = ivfdata_lists(index)
    if lists is not None:
        lists.read_only = True


# ------------------------------------------------------------------------------------------------- reading


def open_index(data: np.ndarray, ivfdata: Path) -> Any:
    """The index serialised in `data`, its inverted lists mapped read-only from `ivfdata`.

    The serialised index names the file it was written with; the lists are mapped from `ivfdata` instead, so a
    library folder that was moved or copied still finds them (what ``IO_FLAG_ONDISK_SAME_DIR`` does for
    `read_index`, without its message on stdout). The caller checks the file's size first: mapping a shorter
    file would crash on the first read past its end.
    """
    faiss = _faiss()
    index = faiss.deserialize_index(data, faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
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
    faiss = _faiss()
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def empty_twin(index: Any) -> Any:
    """An in-RAM index with the same trained coarse quantiser and codebooks as `index`, holding no vectors.

    Vectors added to it get exactly the codes and lists they would get in `index`, so searching both and
    merging the candidates is the same as searching one index that holds everything.
    """
    faiss = _faiss()
    twin = faiss.deserialize_index(faiss.serialize_index(index), faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = faiss.extract_index_ivf(twin)
    _replace_lists(twin, faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size), 0)
    return twin


def copy_with_lists(index: Any, sources: list[Any], ivfdata: Path) -> Any:
    """A new index with `index`'s trained quantiser and codebooks and the entries of `sources` in `ivfdata`."""
    copy = empty_twin(index)
    merge_into_file(copy, sources, ivfdata)
    return copy


def _replace_lists(index: Any, lists: Any, total: int) -> None:
    ivf = _faiss().extract_index_ivf(index)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and frees) them now
    index.ntotal = ivf.ntotal = total
