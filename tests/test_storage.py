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


# The images table as the first schema made it: a library written before photo metadata gained offsets.
SCHEMA_1_IMAGES = """CREATE TABLE images (id INTEGER NOT NULL, path TEXT NOT NULL, folder TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, content_hash TEXT NOT NULL, width INTEGER, height INTEGER,
    format TEXT, taken_at TEXT, camera_make TEXT, camera_model TEXT, gps_lat FLOAT, gps_lon FLOAT,
    indexed_at FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (path))"""


def test_a_library_from_the_first_schema_gains_the_new_photo_columns(tmp_path):
    import sqlite3

    from clipsearch.store import images

    folder = tmp_path / "old"
    folder.mkdir()
    with sqlite3.connect(folder / "library.db") as db:
        db.execute(SCHEMA_1_IMAGES)
        for table in ("errors (path TEXT PRIMARY KEY, reason TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, "
                      "recorded_at FLOAT NOT NULL)", "roots (path TEXT PRIMARY KEY, added_at FLOAT NOT NULL)",
                      "settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                      "id_counter (name TEXT PRIMARY KEY, last_id INTEGER NOT NULL)"):
            db.execute(f"CREATE TABLE {table}")
        db.execute("INSERT INTO images VALUES (1, '/p/a.jpg', '/p', 1, 1, 'h', 4, 3, 'JPEG', '2019-07-14T18:03:22', "
                   "'Canon', 'EOS', NULL, NULL, 0)")
        db.execute("PRAGMA user_version = 1")
    store = Library.open(folder).store
    assert store.schema_version() == SCHEMA_VERSION
    row = store.image_by_path("/p/a.jpg")
    assert set(row) == {column.name for column in images.columns}
    assert (row["taken_at"], row["taken_at_offset"], row["lens"]) == ("2019-07-14T18:03:22", None, None)


def test_date_bounds_are_local_days_unless_they_carry_an_offset(tmp_path):
    library = Library.create(tmp_path / "lib")
    store = library.store
    rows = [_row(1, "/p/tokyo.jpg", taken_at="2019-07-14T08:00:00", taken_at_offset="+09:00"),  # 23:00 UTC, 13th
            _row(2, "/p/paris.jpg", taken_at="2019-07-14T23:30:00", taken_at_offset="+02:00"),  # 21:30 UTC, 14th
            _row(3, "/p/unknown.jpg", taken_at="2019-07-14T12:00:00"),  # no offset: its local time is all we know
            _row(4, "/p/day.jpg", taken_at="2019-07-14")]  # a date alone
    with store.transaction() as conn:
        store.insert_images(rows, conn)
    # Plain dates mean the photographer's own day, wherever that was.
    assert store.filter_ids(Filters(after="2019-07-14", before="2019-07-14")).tolist() == [1, 2, 3, 4]
    # An instant compares with each photo's instant where the photo records its offset.
    utc_day = Filters(after="2019-07-14T00:00:00+00:00", before="2019-07-15T00:00:00+00:00")
    assert store.filter_ids(utc_day).tolist() == [2, 3, 4]
    assert store.filter_ids(Filters(before="2019-07-14T00:00:00Z")).tolist() == [1]
