"""The exact embeddings: one fixed-width float32 row per image, row number = image id.

The file is the ground truth for scores (the FAISS index may hold compressed codes) and the source every index
rebuild reads from, so nothing ever needs re-encoding. Row ``i`` belongs to the image whose SQLite primary key
is ``i``; row 0 is unused. Rows are written *before* the SQLite transaction that points at them commits, so a
kill leaves at worst some rows that nothing points at, which the next write overwrites.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from clipsearch import durable

DTYPE = np.dtype("<f4")


class VectorStore:
    """Row-addressed float32 matrix on disk, memory-mapped for reads."""

    def __init__(self, path: Path | str, dim: int) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self.row_bytes = self.dim * DTYPE.itemsize
        self._map: np.memmap | None = None
        self._mapped_size = -1
        self.path.touch(exist_ok=True)

    @property
    def rows(self) -> int:
        """Number of rows the file can hold (including unused ones)."""
        return self.path.stat().st_size // self.row_bytes

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors[j]`` at row ``ids[j]`` and make it durable before returning."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=DTYPE)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"expected {len(ids)} vectors of dimension {self.dim}, got {vectors.shape}")
        if len(ids) == 0:
            return
        with open(self.path, "r+b") as f:
            for start, stop in _consecutive_runs(ids):
                f.seek(int(ids[start]) * self.row_bytes)
                f.write(vectors[start:stop].tobytes())
            durable.flush_to_disk(f)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` as a new (len(ids), dim) float32 array."""
        ids = np.asarray(ids, dtype=np.int64)
        matrix = self._matrix()
        if len(ids) and (ids.min() < 0 or ids.max() >= len(matrix)):
            raise KeyError("asked for a vector row that was never written")
        return np.asarray(matrix[ids], dtype=np.float32)  # fancy indexing already copied the rows

    def iter_chunks(self, ids: np.ndarray, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, vectors) in chunks, in the order given; bounded memory for index builds."""
        ids = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            yield part, self.get(part)

    def truncate(self, rows: int) -> None:
        """Drop rows past ``rows`` (used to discard rows no committed image points at)."""
        with open(self.path, "r+b") as f:
            f.truncate(rows * self.row_bytes)
        self._map = None

    def _matrix(self) -> np.ndarray:
        size = self.path.stat().st_size
        if size < self.row_bytes:
            return np.zeros((0, self.dim), dtype=DTYPE)
        if self._map is None or size != self._mapped_size:
            rows = size // self.row_bytes
            self._map = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(rows, self.dim))
            self._mapped_size = size
        return self._map


def _consecutive_runs(ids: np.ndarray) -> Iterator[tuple[int, int]]:
    """Split ``ids`` into [start, stop) runs of consecutive values, so each run is one write."""
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    bounds = [0, *breaks.tolist(), len(ids)]
    yield from zip(bounds[:-1], bounds[1:], strict=True)
