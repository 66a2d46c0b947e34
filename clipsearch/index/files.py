"""Saving and loading: the FAISS file and its JSON (`params`), written atomically, and opened again.

`save` writes the FAISS file under a fresh name and then the JSON naming it, each to a temporary file that is
fsynced and renamed (`clipsearch.durable`): the JSON's rename is the commit point, so a crash at any moment leaves
either the old pair or the new pair, never a mix. Only then are files that no saved index names deleted. An
on-disk index first writes its changes to a fresh lists file (`ondisk.settle`). `load` checks the FAISS file's
size and checksum and the lists file's size before using them (docs/index.md, "Files").
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch import durable
from clipsearch.errors import IndexFileError
from clipsearch.index import ondisk
from clipsearch.index.ids import grown, mask_of
from clipsearch.index.params import FORMAT_VERSION, PARAMS_FILE, IndexParams
from clipsearch.index.runtime import faiss

if TYPE_CHECKING:
    from clipsearch.index.core import VectorIndex

LOAD_ATTEMPTS = 3  # reading the JSON again when a writer swapped the index while we opened it


@dataclass
class OpenedIndex:
    """What a saved index is made of, read back: the FAISS index, its parameters, its ids, its lists file."""

    faiss_index: Any
    params: IndexParams
    present: np.ndarray  # bool per id: in the index
    disk: ondisk.DiskState | None  # None: the lists are in RAM


def save(index: VectorIndex, folder: Path) -> None:
    """Write `index` to `folder` atomically (module docstring); on failure the previous index stays in use."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if index.disk is not None:
        index.faiss_index, index.disk = ondisk.settle(index.faiss_index, index.disk, folder)
    data = faiss().serialize_index(index.faiss_index).tobytes()
    name = f"index-{secrets.token_hex(6)}.faiss"
    params = replace(index.params, index_file=name, index_bytes=len(data), index_crc32=zlib.crc32(data),
                     ivfdata_file=index.disk.ivfdata.name if index.disk is not None else "",
                     ivfdata_bytes=index.ivfdata_bytes())
    try:
        durable.write_atomically(folder / name, data, folder / "index.faiss.tmp")
        durable.write_atomically(folder / PARAMS_FILE, params.to_json().encode(), folder / f"{PARAMS_FILE}.tmp")
    except BaseException:
        (folder / name).unlink(missing_ok=True)  # the old JSON still names the old files, which stay
        raise
    index.params = params
    if index.disk is not None:
        index.disk.saved = True
    _remove_other_index_files(folder, keep={name, params.ivfdata_file})


def load(folder: Path) -> OpenedIndex | None:
    """The index saved in `folder`, or None when none was saved; IndexFileError when it cannot be read.

    A writer may swap in a new index between our reading the JSON and opening the files it names (and
    then delete them): when the JSON changed meanwhile, the new one is read instead.
    """
    params_path = Path(folder) / PARAMS_FILE
    for attempt in range(LOAD_ATTEMPTS):
        if not params_path.exists():
            return None
        params = _read_params(params_path)
        try:
            return _open(Path(folder), params)
        except IndexFileError:
            if attempt + 1 == LOAD_ATTEMPTS or _read_params_or_none(params_path) == params:
                raise
    return None


def _open(folder: Path, params: IndexParams) -> OpenedIndex:
    data = _read_faiss_bytes(folder / params.index_file, params)
    if not params.ivfdata_file:
        index = _deserialize(data, folder / params.index_file)
        return OpenedIndex(index, params, _present_mask(index), None)
    ivfdata = folder / params.ivfdata_file
    index = _open_on_disk(data, ivfdata, params)
    return OpenedIndex(index, params, _present_mask(index), ondisk.DiskState(ivfdata, saved=True))


def _remove_other_index_files(folder: Path, keep: set[str]) -> None:
    """Delete index files no saved index names, and scratch left by builds or saves that were killed.

    The new index is already committed: a file that cannot be deleted now (a system that refuses to delete a
    file another process has open) is left for the next save to try again.
    """
    for pattern in ("index-*.faiss", "*.ivfdata", "*.ivfdata.tmp"):
        for old in folder.glob(pattern):
            if old.name not in keep:
                with contextlib.suppress(OSError):
                    old.unlink(missing_ok=True)
    for scratch in folder.glob("build-*"):
        shutil.rmtree(scratch, ignore_errors=True)


def _read_params(path: Path) -> IndexParams:
    try:
        params = IndexParams.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise IndexFileError(f"The index parameters in {path} cannot be read ({error}); rebuild the index.") from error
    if params.format_version > FORMAT_VERSION:
        raise IndexFileError(f"The index in {path.parent} was written by a newer clipsearch; rebuild the index.")
    return params


def _read_params_or_none(path: Path) -> IndexParams | None:
    try:
        return _read_params(path)
    except IndexFileError:
        return None


def _read_faiss_bytes(path: Path, params: IndexParams) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise IndexFileError(f"The index file {path} cannot be read ({error}); rebuild the index.") from error
    if len(data) != params.index_bytes or zlib.crc32(data) != params.index_crc32:
        raise IndexFileError(f"The index file {path} is damaged (size or checksum differs); rebuild the index.")
    return np.frombuffer(data, dtype=np.uint8)


def _deserialize(data: np.ndarray, path: Path) -> Any:
    try:
        return faiss().deserialize_index(data)
    except RuntimeError as error:
        raise IndexFileError(f"The index file {path} is not a FAISS index ({error}); rebuild the index.") from error


def _open_on_disk(data: np.ndarray, ivfdata: Path, params: IndexParams) -> Any:
    """The index in `data` with its lists mapped from `ivfdata`, whose size is checked first (mapping a shorter
    file would crash on the first read past its end; checksumming gigabytes on every open would be too slow)."""
    try:
        size = ivfdata.stat().st_size
    except OSError as error:
        raise IndexFileError(f"The index lists file {ivfdata} cannot be read ({error}); rebuild the index.") from error
    if size != params.ivfdata_bytes:
        raise IndexFileError(f"The index lists file {ivfdata} is damaged (its size differs); rebuild the index.")
    try:
        index = ondisk.open_index(data, ivfdata)
    except (RuntimeError, ValueError) as error:
        raise IndexFileError(f"The index in {ivfdata.parent} is not a FAISS on-disk index ({error}); "
                             "rebuild the index.") from error
    if ondisk.mapped_bytes(index) > size:
        raise IndexFileError(f"The index lists file {ivfdata} is shorter than its index says; rebuild the index.")
    return index


def _present_mask(index: Any) -> np.ndarray:
    """Which ids the loaded index holds, read from its id map or inverted lists (list by list, so an on-disk
    index's ids are never all copied into RAM at once)."""
    module = faiss()
    if isinstance(index, module.IndexIDMap2):
        return mask_of(module.vector_to_array(index.id_map).astype(np.int64))
    invlists = module.extract_index_ivf(index).invlists
    present = np.zeros(0, dtype=bool)
    for number in range(invlists.nlist):
        size = invlists.list_size(number)
        if size:
            ids = module.rev_swig_ptr(invlists.get_ids(number), size)
            present = grown(present, int(ids.max()) + 1)
            present[ids] = True
    return present
