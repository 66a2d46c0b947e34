"""SQLite metadata through SQLAlchemy Core: images, errors, roots and settings. Nothing else talks SQL.

SQLite is the source of truth: a row in ``images`` exists only once its vector is on disk (see ``vectors.py``),
and its primary key is both its vector row and its FAISS id. The database runs in WAL mode so searches read a
consistent snapshot while one writer indexes. SQLAlchemy's errors stay in here too: a write SQLite cannot finish
(a full disk, an I/O error) leaves `transaction` as a `StoreWriteError`, and the doctor asks
`integrity_problem` rather than running SQL of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from clipsearch.errors import StoreWriteError
from clipsearch.photo import field_columns

metadata = sa.MetaData()

_SQL_TYPES: dict[type, Any] = {str: sa.Text, int: sa.Integer, float: sa.Float}


def _record_columns() -> list[sa.Column[Any]]:
    """A column per stored field, as `clipsearch.photo.ImageRecord` declares them."""
    return [sa.Column(name, _SQL_TYPES[kind], **options) for name, kind, options in field_columns()]


images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("folder", sa.Text, nullable=False, index=True),
    *_record_columns(),
    sa.Column("indexed_at", sa.Float, nullable=False),
)

errors = sa.Table(
    "errors",
    metadata,
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("size", sa.Integer),
    sa.Column("mtime_ns", sa.Integer),
    sa.Column("recorded_at", sa.Float, nullable=False),
)

roots = sa.Table(
    "roots",
    metadata,
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("added_at", sa.Float, nullable=False),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Ids are never reused, even after deletions, so a stale index entry can never name a different photo.
id_counter = sa.Table(
    "id_counter",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("last_id", sa.Integer, nullable=False),
)

IMAGE_COLUMNS = [c.name for c in images.columns]


def _initial_schema(conn: Connection) -> None:
    metadata.create_all(conn)


def _add_missing_image_columns(conn: Connection) -> None:
    """Columns declared since the library was made (each nullable: older rows simply do not know the value).
    A library created by this version already has them all from the initial schema, so nothing is added."""
    present = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(images)")}
    for column in images.columns:
        if column.name not in present:
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f'ALTER TABLE images ADD COLUMN "{column.name}" {kind}')


# Named, ordered migrations; PRAGMA user_version records how many have run.
MIGRATIONS: list[tuple[str, Callable[[Connection], None]]] = [
    ("initial schema: images, errors, roots, settings, id counter", _initial_schema),
    ("photo metadata: date-taken offset and source, lens", _add_missing_image_columns),
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class FileState:
    """What the library knows about one indexed file, for planning."""

    id: int
    size: int
    mtime_ns: int
    content_hash: str


@dataclass(frozen=True)
class Filters:
    """Metadata conditions a result must meet; ``None`` means no condition."""

    folder: str | None = None
    after: str | None = None  # ISO date or datetime, inclusive
    before: str | None = None  # ISO date (the whole day is included) or datetime, exclusive
    camera: str | None = None  # substring of make or model, any case
    formats: tuple[str, ...] = field(default_factory=tuple)

    def is_empty(self) -> bool:
        return not (self.folder or self.after or self.before or self.camera or self.formats)


class Store:
    """The library's SQLite database."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.engine = _make_engine(self.path)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back when it raises. A write SQLite cannot
        finish (a full disk, an I/O error, a lock held past the timeout) is raised as `StoreWriteError`."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig)
            raise StoreWriteError(f"SQLite could not write to {self.path} ({reason}).", reason) from exc

    def integrity_problem(self) -> str | None:
        """What SQLite's own integrity check finds wrong with the database file, or None when it finds nothing.

        A file damaged badly enough makes the check itself fail; what SQLite then says is the finding."""
        try:
            with self.engine.connect() as conn:
                verdict = conn.exec_driver_sql("PRAGMA integrity_check").scalar()
        except sa.exc.DatabaseError as exc:
            return str(exc.orig)
        return None if verdict == "ok" else str(verdict)

    # --- schema -------------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)

    def migrate(self) -> None:
        """Run the migrations this database has not seen yet, all in one transaction: a reader sees the schema
        as it was or as it is now, never half-way (it would try to finish the migration itself, and wait for the
        writer's lock). An explicit BEGIN, since Python's sqlite3 opens none before DDL by itself."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            current = int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
            for number, (_name, step) in enumerate(MIGRATIONS[current:], start=current + 1):
                step(conn)
                conn.exec_driver_sql(f"PRAGMA user_version = {number}")
            conn.commit()

    # --- settings -----------------------------------------------------------------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(settings.c.value).where(settings.c.key == key)).scalar()
        return default if value is None else json.loads(value)

    def set_setting(self, key: str, value: Any, conn: Connection | None = None) -> None:
        statement = _upsert(settings, {"key": key, "value": json.dumps(value)}, ["key"])
        if conn is not None:
            conn.execute(statement)
            return
        with self.transaction() as tx:
            tx.execute(statement)

    # --- roots --------------------------------------------------------------------------------------------

    def add_roots(self, paths: Iterable[str]) -> None:
        now = time.time()
        with self.transaction() as conn:
            for path in paths:
                conn.execute(_upsert(roots, {"path": path, "added_at": now}, ["path"], update=False))

    def roots(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(roots.c.path).order_by(roots.c.path)).scalars())

    # --- reads for planning -------------------------------------------------------------------------------

    def file_states(self) -> dict[str, FileState]:
        query = sa.select(images.c.path, images.c.id, images.c.size, images.c.mtime_ns, images.c.content_hash)
        with self.engine.connect() as conn:
            return {row[0]: FileState(*row[1:]) for row in conn.execute(query)}

    def error_states(self) -> dict[str, tuple[int | None, int | None]]:
        query = sa.select(errors.c.path, errors.c.size, errors.c.mtime_ns)
        with self.engine.connect() as conn:
            return {row[0]: (row[1], row[2]) for row in conn.execute(query)}

    # --- writes -------------------------------------------------------------------------------------------

    def reserve_ids(self, count: int, conn: Connection) -> list[int]:
        """Allocate ``count`` fresh ids inside the caller's transaction (rolled back with it)."""
        last = conn.execute(sa.select(id_counter.c.last_id).where(id_counter.c.name == "images")).scalar() or 0
        conn.execute(_upsert(id_counter, {"name": "images", "last_id": last + count}, ["name"]))
        return list(range(last + 1, last + count + 1))

    def insert_images(self, rows: Sequence[dict[str, Any]], conn: Connection) -> None:
        """Insert image rows (with ids), replacing any row at the same path, and clear their errors."""
        if not rows:
            return
        paths = [row["path"] for row in rows]
        conn.execute(sa.delete(images).where(images.c.path.in_(paths)))
        conn.execute(sa.delete(errors).where(errors.c.path.in_(paths)))
        conn.execute(sa.insert(images), [_complete_image_row(row) for row in rows])

    def record_errors(self, failures: Sequence[dict[str, Any]], conn: Connection) -> None:
        """Upsert (path, reason, size, mtime_ns) rows; a file that now fails is no longer indexed."""
        if not failures:
            return
        now = time.time()
        conn.execute(sa.delete(images).where(images.c.path.in_([f["path"] for f in failures])))
        for failure in failures:
            conn.execute(_upsert(errors, {**failure, "recorded_at": now}, ["path"]))

    def move_images(self, moves: Sequence[tuple[int, str, int, int]], conn: Connection) -> None:
        """Give existing rows (and so their vectors) new paths: renamed or moved files (id, path, size, mtime)."""
        for image_id, new_path, size, mtime_ns in moves:
            conn.execute(sa.delete(errors).where(errors.c.path == new_path))
            conn.execute(
                sa.update(images)
                .where(images.c.id == image_id)
                .values(path=new_path, folder=str(Path(new_path).parent), size=size, mtime_ns=mtime_ns)
            )

    def delete_images(self, ids: Sequence[int], conn: Connection) -> None:
        for chunk in _chunks(list(ids), 500):
            conn.execute(sa.delete(images).where(images.c.id.in_(chunk)))

    def delete_errors(self, paths: Sequence[str], conn: Connection) -> None:
        for chunk in _chunks(list(paths), 500):
            conn.execute(sa.delete(errors).where(errors.c.path.in_(chunk)))

    # --- reads for search and stats -----------------------------------------------------------------------

    def all_ids(self) -> np.ndarray:
        with self.engine.connect() as conn:
            ids = conn.execute(sa.select(images.c.id).order_by(images.c.id)).scalars().all()
        return np.asarray(ids, dtype=np.int64)

    def max_id(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(images.c.id))).scalar() or 0)

    def change_stamp(self) -> tuple[int, int, int]:
        """Changes whenever images are added, replaced or deleted: (count, max id, last id handed out)."""
        query = sa.select(
            sa.func.count(images.c.id),
            sa.func.coalesce(sa.func.max(images.c.id), 0),
            sa.select(id_counter.c.last_id).where(id_counter.c.name == "images").scalar_subquery(),
        )
        with self.engine.connect() as conn:
            count, top, last = conn.execute(query).one()
        return int(count), int(top), int(last or 0)

    def count_images(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(images)).scalar() or 0)

    def images_by_ids(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks([int(i) for i in ids], 500):
                for row in conn.execute(sa.select(images).where(images.c.id.in_(chunk))).mappings():
                    found[row["id"]] = dict(row)
        return found

    def id_paths(self) -> list[tuple[int, str]]:
        """(id, path) of every indexed image."""
        with self.engine.connect() as conn:
            return [(int(i), str(p)) for i, p in conn.execute(sa.select(images.c.id, images.c.path))]

    def image_by_path(self, path: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(images).where(images.c.path == path)).mappings().first()
        return dict(row) if row else None

    def shot_paths(self, stem_paths: Sequence[str]) -> dict[str, list[str]]:
        """For each ``stem_path``, the indexed files named it plus one extension ("/p/IMG_1" -> IMG_1.CR2,
        IMG_1.JPG), sorted; ranges over the unique path index, so each costs a lookup, not a scan."""
        found: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for stem_path in stem_paths:
                prefix = stem_path + "."  # "." + 1 is "/": the range holds exactly the paths starting with prefix
                query = sa.select(images.c.path).where(images.c.path >= prefix, images.c.path < stem_path + "/")
                paths = conn.execute(query.order_by(images.c.path)).scalars().all()
                found[stem_path] = [str(p) for p in paths if not set(p[len(prefix):]) & {".", "/"}]
        return found

    def filter_ids(self, filters: Filters) -> np.ndarray:
        """Sorted ids of the images that meet every condition in ``filters``."""
        query = sa.select(images.c.id).where(*_filter_conditions(filters)).order_by(images.c.id)
        with self.engine.connect() as conn:
            return np.asarray(conn.execute(query).scalars().all(), dtype=np.int64)

    def errors(self) -> list[dict[str, Any]]:
        query = sa.select(errors.c.path, errors.c.reason).order_by(errors.c.path)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def count_by(self, column: str) -> dict[str, int]:
        col = images.c[column]
        query = sa.select(col, sa.func.count()).group_by(col).order_by(sa.func.count().desc())
        with self.engine.connect() as conn:
            return {str(value): int(n) for value, n in conn.execute(query) if value is not None}

    def distinct(self, column: str) -> list[str]:
        col = images.c[column]
        query = sa.select(col).where(col.is_not(None)).distinct().order_by(col)
        with self.engine.connect() as conn:
            return [str(v) for v in conn.execute(query).scalars()]

    def taken_range(self) -> tuple[str | None, str | None]:
        query = sa.select(sa.func.min(images.c.taken_at), sa.func.max(images.c.taken_at))
        with self.engine.connect() as conn:
            low, high = conn.execute(query).one()
        return low, high


def _make_engine(path: Path) -> Engine:
    engine = sa.create_engine(f"sqlite:///{path}", future=True)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed batch survives power loss, not only a killed process; one fsync per batch is cheap.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


def _upsert(table: sa.Table, values: dict[str, Any], keys: list[str], update: bool = True) -> Any:
    from sqlalchemy.dialects.sqlite import insert

    statement = insert(table).values(**values)
    if not update:
        return statement.on_conflict_do_nothing(index_elements=keys)
    changes = {k: v for k, v in values.items() if k not in keys}
    return statement.on_conflict_do_update(index_elements=keys, set_=changes)


def _complete_image_row(row: dict[str, Any]) -> dict[str, Any]:
    full = {name: row.get(name) for name in IMAGE_COLUMNS}
    full["folder"] = str(Path(row["path"]).parent)
    full["indexed_at"] = row.get("indexed_at") or time.time()
    return full


def _filter_conditions(filters: Filters) -> list[Any]:
    conditions: list[Any] = []
    if filters.folder:
        # A range over the path is exact for "anything under this folder" and uses the unique index.
        prefix = filters.folder.rstrip("/") + "/"
        conditions += [images.c.path >= prefix, images.c.path < prefix[:-1] + "0"]
    if filters.after:
        conditions.append(_taken_at_for(filters.after) >= _iso_lower(filters.after))
    if filters.before:
        conditions.append(_taken_at_for(filters.before) < _iso_upper(filters.before))
    if filters.camera:
        camera = sa.func.coalesce(images.c.camera_make, "") + " " + sa.func.coalesce(images.c.camera_model, "")
        conditions.append(sa.func.lower(camera).contains(filters.camera.lower(), autoescape=True))
    if filters.formats:
        conditions.append(images.c.format.in_([f.upper() for f in filters.formats]))
    return conditions


def _taken_at_for(bound: str) -> Any:
    """What a date bound is compared with. A plain date or time is the photographer's local clock, which is what
    `taken_at` stores (and its index serves). A bound with a UTC offset is an instant: it is compared with each
    photo's instant, in UTC, where the photo records its offset, and with its local time where it does not."""
    when = parse_when(bound)
    if not isinstance(when, datetime) or when.tzinfo is None:
        return images.c.taken_at
    has_time = sa.func.length(images.c.taken_at) > 10
    offset = sa.case((has_time, sa.func.coalesce(images.c.taken_at_offset, "")), else_="")
    return sa.func.strftime("%Y-%m-%dT%H:%M:%S", images.c.taken_at + offset)


def parse_when(value: str) -> date | datetime:
    """Parse an ISO date or datetime; raises ValueError with Python's message otherwise."""
    if len(value) == 10:
        return date.fromisoformat(value)
    return datetime.fromisoformat(value)


def _iso_lower(value: str) -> str:
    return _as_stored(parse_when(value))


def _iso_upper(value: str) -> str:
    when = parse_when(value)
    if isinstance(when, datetime):
        return _as_stored(when)
    return (when + timedelta(days=1)).isoformat()


def _as_stored(when: date | datetime) -> str:
    """A bound as `taken_at` is written; an instant (with an offset) in UTC, as `_taken_at_for` compares it."""
    if isinstance(when, datetime) and when.tzinfo is not None:
        return when.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
    return when.isoformat()


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
