"""The library's storage: the vector file, SQLite store, migrations, the writer lock."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from clipsearch.errors import LibraryError, LibraryLockedError
from clipsearch.library import Library
from clipsearch.model import ModelSpec
from clipsearch.store import SCHEMA_VERSION, Filters
from clipsearch.vectors import VectorStore


def test_vector_rows_are_addressed_by_id(tmp_path):
    store = VectorStore(tmp_path / "v.f32", dim=4)
    store.write(np.array([3, 4, 9]), np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(store.get(np.array([9, 3]))[:, 0], [8.0, 0.0])
    assert store.rows == 10
    with pytest.raises(KeyError):
        store.get(np.array([10]))


def test_vector_reader_sees_rows_appended_later(tmp_path):
    reader = VectorStore(tmp_path / "v.f32", dim=2)
    writer = VectorStore(tmp_path / "v.f32", dim=2)
    writer.write(np.array([1]), np.ones((1, 2)))
    assert reader.get(np.array([1])).tolist() == [[1.0, 1.0]]
    writer.write(np.array([2]), np.full((1, 2), 2.0))
    assert reader.get(np.array([2])).tolist() == [[2.0, 2.0]]


def test_schema_is_migrated_and_versioned(tmp_path):
    library = Library.create(tmp_path / "lib")
    assert library.store.schema_version() == SCHEMA_VERSION
    assert Library.open(tmp_path / "lib").store.schema_version() == SCHEMA_VERSION


def test_missing_and_corrupt_libraries_are_explained(tmp_path):
    with pytest.raises(LibraryError, match="no clipsearch library"):
        Library.open(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "library.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LibraryError, match="not a readable SQLite database"):
        Library.open(tmp_path / "bad")


def test_model_is_bound_once(tmp_path):
    library = Library.create(tmp_path / "lib")
    spec = ModelSpec.parse("local-dir:/models/a")
    library.bind_model(spec, 64)
    assert library.resolve_model(None) == spec
    with pytest.raises(LibraryError, match="built with model"):
        library.bind_model(ModelSpec.parse("local-dir:/models/b"), 64)


def test_ids_are_never_reused(tmp_path):
    library = Library.create(tmp_path / "lib")
    store = library.store
    with store.transaction() as conn:
        first = store.reserve_ids(3, conn)
        store.insert_images([_row(i, f"/p/{i}.jpg") for i in first], conn)
    with store.transaction() as conn:
        store.delete_images(first, conn)
    with store.transaction() as conn:
        assert store.reserve_ids(1, conn) == [4]


def test_rolled_back_ids_are_handed_out_again(tmp_path):
    store = Library.create(tmp_path / "lib").store
    with pytest.raises(RuntimeError), store.transaction() as conn:
        store.reserve_ids(5, conn)
        raise RuntimeError("killed before commit")
    with store.transaction() as conn:
        assert store.reserve_ids(1, conn) == [1]


def test_filters(tmp_path):
    store = Library.create(tmp_path / "lib").store
    rows = [
        _row(1, "/photos/2023/a.jpg", taken_at="2023-06-01T10:00:00", camera_make="Canon", fmt="JPEG"),
        _row(2, "/photos/2023/sub/b.png", taken_at="2023-06-30T23:59:00", fmt="PNG"),
        _row(3, "/photos/2023x/c.jpg", taken_at="2024-01-01T00:00:00", camera_model="Pixel 7", fmt="JPEG"),
    ]
    with store.transaction() as conn:
        store.insert_images(rows, conn)
    assert store.filter_ids(Filters(folder="/photos/2023")).tolist() == [1, 2]
    assert store.filter_ids(Filters(after="2023-06-02", before="2023-06-30")).tolist() == [2]
    assert store.filter_ids(Filters(camera="pixel")).tolist() == [3]
    assert store.filter_ids(Filters(formats=("png",))).tolist() == [2]
    assert store.filter_ids(Filters(camera="100%_")).tolist() == []


def test_second_writer_is_told_clearly(tmp_path):
    library = Library.create(tmp_path / "lib")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from clipsearch.library import Library;"
         "lock = Library.open(sys.argv[1]).writer_lock(); lock.__enter__(); print('held', flush=True);"
         "time.sleep(60)", str(tmp_path / "lib")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LibraryLockedError, match="writing to the library"), library.writer_lock(wait=0.3):
            pass
    finally:
        holder.kill()
        holder.wait()
    with library.writer_lock(wait=5):  # released by the kernel when the holder died
        pass


FILE_SIZE_LIMIT = 256 * 1024

WRITE_PAST_THE_LIMIT = """
import json, sys
import numpy as np
from clipsearch.errors import LibraryError
from clipsearch.library import Library

library = Library.open(sys.argv[1])
said = []
for count, path_length in ((20_000, 10), (3_000, 400)):  # too many vectors; then too many rows for the WAL
    records = [{"path": f"/p/{n:0{path_length}d}.jpg", "size": 1, "mtime_ns": 1, "content_hash": str(n)}
               for n in range(count)]
    try:
        library.write_batch(records, np.ones((count, 4), dtype=np.float32), [])
    except LibraryError as error:
        said.append(str(error))
print(json.dumps(said))
"""


def _limit_file_size() -> None:
    """Writes past FILE_SIZE_LIMIT fail as on a full disk (EFBIG instead of ENOSPC), for this process only."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_a_batch_that_cannot_be_written_is_one_sentence_and_loses_nothing(tmp_path):
    library = Library.create(tmp_path / "lib")
    library.bind_model(ModelSpec.parse("local-dir:/models/a"), 4)
    vectors = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    ids = library.write_batch([_row(0, f"/kept/{n}.jpg") for n in range(10)], vectors,
                              [{"path": "/kept/bad.jpg", "reason": "truncated", "size": 1, "mtime_ns": 1}])
    library.close()
    child = subprocess.run([sys.executable, "-c", WRITE_PAST_THE_LIMIT, str(tmp_path / "lib")], text=True,
                           capture_output=True, preexec_fn=_limit_file_size, timeout=120)
    said = json.loads(child.stdout)
    assert len(said) == 2, child.stderr
    assert os.strerror(errno.EFBIG) in said[0] and os.strerror(errno.EFBIG) not in said[1], "the OS's, then SQLite's"
    for message in said:  # the vector file's write fails first, then SQLite's
        assert message.startswith(f"Could not write to the library at {tmp_path / 'lib'} (")
        assert message.endswith("); nothing committed was lost, free some disk space and run the same command again.")
    reopened = Library.open(tmp_path / "lib")
    assert reopened.store.all_ids().tolist() == ids
    np.testing.assert_array_equal(reopened.vectors().get(np.array(ids)), vectors)
    assert reopened.store.errors() == [{"path": "/kept/bad.jpg", "reason": "truncated"}]


def test_the_store_reports_damage_that_sqlite_finds(tmp_path):
    from clipsearch import doctor

    library = Library.create(tmp_path / "lib")
    with library.store.transaction() as conn:
        library.store.insert_images([_row(n, f"/photos/{n:0100d}.jpg") for n in range(1, 3000)], conn)
    assert library.store.integrity_problem() is None
    library.close()
    assert not (tmp_path / "lib" / "library.db-wal").exists(), "closing the last connection checkpointed the WAL"
    data = bytearray((tmp_path / "lib" / "library.db").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3 * 4096] = bytes(b ^ 0x55 for b in data[middle : middle + 3 * 4096])
    (tmp_path / "lib" / "library.db").write_bytes(bytes(data))
    damaged = Library.open(tmp_path / "lib")
    assert "malformed" in (damaged.store.integrity_problem() or "")
    problems = doctor.check(damaged).problems
    assert [p.kind for p in problems] == ["sqlite"] and "malformed" in problems[0].message


def _row(image_id: int, path: str, fmt: str = "JPEG", **extra: object) -> dict[str, object]:
    return {"id": image_id, "path": path, "size": 1, "mtime_ns": 1, "content_hash": str(image_id),
            "format": fmt, **extra}
