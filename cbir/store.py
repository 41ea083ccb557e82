"""The SQLite feature store: catalogue, extraction runs, feature vectors, failures, neighbours, results.

One file holds everything a workspace computed, so each stage reads what the previous one wrote and a
notebook can be rerun alone. The file is in WAL mode with a busy timeout, every write is one explicit
``BEGIN IMMEDIATE`` transaction and every query is parameterised, so several processes (for example two
extractions of different models) can write into the same store at the same time.

Layout (schema version in ``PRAGMA user_version``, upgraded by :func:`migrate`):

- ``images``: one row per catalogue image (``image_id`` primary key, ``path``, ``category``,
  ``subcategory``, ``split``, ``is_fashion``, ``product_id``, ``dup_group`` and ``extra``, a JSON object
  holding every other catalogue column). Row order = catalogue order. It says where files are (the latest
  catalogue put); labels are read per run from ``run_labels``.
- ``runs``: one row per extraction identity (model, layer, pooling, weights, variant, the sha1 of the labels
  and split, ...). The identity is stored as canonical JSON (sorted keys), so the same identity always maps
  to the same run and an interrupted extraction resumes.
- ``run_labels``: ``(run_id, image_id) -> path, category, subcategory, split, is_fashion, product_id,
  dup_group``: the labels and query split each run was extracted and is evaluated with (schema 3).
- ``features``: ``(run_id, image_id) -> vector, sha1, crc32``: a float32 little-endian BLOB, the SHA-1 of the
  image file bytes it was computed from (NULL for vectors written before schema 2: unknown content) and a
  CRC-32 of the image id and the blob, checked on every read (NULL before schema 2: only finiteness checked).
- ``failures``: ``(run_id, image_id) -> reason, detail, sha1`` for images that could not be read.
  An id has one outcome per run: writing a vector removes its failure and vice versa.
- ``neighbour_sets`` / ``neighbours``: k-NN results per (run, metric, tag).
- ``results``: named DataFrames (optionally per run) serialised as JSON with their dtypes.

Readers open a store with ``FeatureStore(path, readonly=True)``: never created, never written, and
readable on read-only storage (a folder where WAL's ``-shm`` cannot be created is read as ``immutable``).
Every SQLite error becomes a :class:`StoreError` naming the file, with a hint.

A run extracted with ``vectors="shards"`` (:mod:`cbir.distributed`, for catalogues too big to copy into
SQLite) keeps its vectors and failures in its Parquet shards instead: the ``runs`` row records
``stats.vectors = "shards"`` and ``stats.shard_dir``, the ``features`` / ``failures`` tables hold nothing of it,
and every reader below serves it from the shards through :class:`cbir.shards.ShardSet`.

This module imports nothing of cbir but :mod:`cbir.shards` (which imports nothing of cbir).
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.shards import MANIFEST, ShardError, ShardSet

__all__ = ["FeatureStore", "StoreError", "RunNotFoundError", "SCHEMA_VERSION", "migrate", "canonical_json"]

SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 60_000
_WRITE_RETRIES = 20
_VECTOR_DTYPE = np.dtype("<f4")
READ_CHUNK = 4096
"""Rows per step when vectors are read (:meth:`FeatureStore.features`, :meth:`FeatureStore.iter_features`)."""

#: Standard catalogue columns kept as table columns; every other column goes into ``extra`` (JSON).
IMAGE_COLUMNS = ("path", "category", "subcategory", "split", "is_fashion", "product_id", "dup_group")

#: Run columns copied out of the identity (the full identity stays in ``params``).
_RUN_IDENTITY_COLUMNS = ("model", "layer", "pooling", "weights", "weights_sha1", "variant", "input_size", "dim")


class StoreError(RuntimeError):
    """The store file is unusable (missing, not SQLite, damaged, read-only, disk full, newer schema, ...) or a
    request does not fit its content. The message names the file."""


class RunNotFoundError(StoreError, KeyError):
    """No run with the requested id (also a ``KeyError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


#: ``(words in the SQLite message, hint)``, first match wins.
_HINTS = (
    (("full",), "the disk (or the store's size limit) is full; free some disk space and retry"),
    (("readonly", "read-only"), "the file or its folder is read-only; readers open it with "
                                "FeatureStore(path, readonly=True), writers need write access"),
    (("not a database", "malformed", "corrupt"), "the file is damaged or not a cbir feature store; restore it "
                                                 "from a backup or extract into a new store"),
    (("unable to open",), "check that the file's folder exists and is readable (writable to write)"),
    (("locked", "busy"), "another process held the store too long; retry when it has finished"),
    (("i/o",), "the disk reported an I/O error; check the disk and the file"),
)


def store_error(path: Any, exc: BaseException) -> StoreError:
    """A :class:`StoreError` for a ``sqlite3`` (or OS) error on the store at ``path``, with a hint."""
    text = str(exc)
    hint = next((h for words, h in _HINTS if any(w in text.lower() for w in words)), None)
    return StoreError(f"{path}: {text}" + (f" ({hint})" if hint else ""))


# --------------------------------------------------------------------------------------------- JSON helpers
def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars/arrays, paths, timestamps; missing values become null."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if isinstance(value, (pd.Timestamp, datetime, date)):
        return value.isoformat()
    if isinstance(value, pd.Timedelta):
        return str(value)
    raise TypeError(f"cannot store a value of type {type(value).__name__} as JSON: {value!r}")


def _normalise(value: Any) -> Any:
    """Plain JSON types (dict keys as str, tuples as lists, NaN as null), recursively."""
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return _normalise(_jsonable(value))


def canonical_json(value: Any) -> str:
    """Canonical JSON of ``value`` (sorted keys, no spaces, tuples as lists): equal identities, equal text."""
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_jsonable, ensure_ascii=False)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _index_to_json(index: pd.Index) -> dict[str, Any] | None:
    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1 and index.name is None:
        return None  # the default index: rebuilt from the row count
    values = [list(v) for v in index] if isinstance(index, pd.MultiIndex) else list(index)
    return {"values": values, "names": list(index.names), "multi": isinstance(index, pd.MultiIndex),
            "dtype": None if isinstance(index, pd.MultiIndex) else str(index.dtype)}


def _index_from_json(payload: dict[str, Any] | None, n: int) -> pd.Index:
    if payload is None:
        return pd.RangeIndex(n)
    if payload["multi"]:
        return pd.MultiIndex.from_tuples([tuple(v) for v in payload["values"]], names=payload["names"])
    index = pd.Index(payload["values"], name=payload["names"][0])
    try:
        return index.astype(payload["dtype"])
    except (TypeError, ValueError):
        return index


def frame_to_json(df: pd.DataFrame) -> str:
    """Serialise a DataFrame losslessly enough for result tables: values, index, columns and dtypes.

    Floats keep full precision (Python ``repr``), missing values become null, timestamps ISO strings.
    Why not ``DataFrame.to_json(orient="table")``: pandas writes at most 15 significant digits
    (``double_precision <= 15``), so stored tables would no longer equal the computed ones bit for bit, and
    the Table Schema orient refuses the MultiIndex columns some result tables have.
    """
    split = df.to_dict(orient="split", index=False)
    payload = {
        "columns": _index_to_json(df.columns) or {"values": list(df.columns), "names": [None], "multi": False,
                                                  "dtype": str(df.columns.dtype)},
        "index": _index_to_json(df.index),
        "dtypes": [str(t) for t in df.dtypes],
        "data": split["data"],
    }
    return _dumps(payload)


def frame_from_json(text: str) -> pd.DataFrame:
    """Inverse of :func:`frame_to_json`."""
    payload = json.loads(text)
    data = payload["data"]
    columns = _index_from_json(payload["columns"], len(payload["dtypes"]))
    frame = pd.DataFrame(data if data else None, columns=range(len(columns)))
    if not data:
        frame = pd.DataFrame({i: pd.Series([], dtype=object) for i in range(len(columns))})
    for i, dtype in enumerate(payload["dtypes"]):
        try:
            frame[i] = frame[i].astype(dtype)
        except (TypeError, ValueError):
            pass  # keep the decoded Python objects
    frame.columns = columns
    frame.index = _index_from_json(payload["index"], len(frame))
    return frame


# --------------------------------------------------------------------------------------------- schema
def _schema_v1(con: sqlite3.Connection) -> None:
    _execute_script(con, """
        CREATE TABLE images (
            image_id    TEXT PRIMARY KEY NOT NULL,
            path        TEXT,
            category    TEXT,
            subcategory TEXT,
            split       TEXT,
            is_fashion  INTEGER,
            product_id  TEXT,
            dup_group   TEXT,
            extra       TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE runs (
            run_id       INTEGER PRIMARY KEY AUTOINCREMENT,
            identity_key TEXT NOT NULL UNIQUE,
            name         TEXT,
            model        TEXT,
            layer        TEXT,
            pooling      TEXT,
            weights      TEXT,
            weights_sha1 TEXT,
            variant      TEXT,
            input_size   INTEGER,
            dim          INTEGER,
            params       TEXT NOT NULL,
            versions     TEXT NOT NULL DEFAULT '{}',
            stats        TEXT NOT NULL DEFAULT '{}',
            status       TEXT NOT NULL DEFAULT 'running',
            n_images     INTEGER,
            created      TEXT NOT NULL,
            finished     TEXT
        );
        CREATE TABLE features (
            run_id   INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            image_id TEXT NOT NULL,
            vector   BLOB NOT NULL,
            PRIMARY KEY (run_id, image_id)
        );
        CREATE TABLE failures (
            run_id   INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            image_id TEXT NOT NULL,
            reason   TEXT NOT NULL,
            detail   TEXT,
            PRIMARY KEY (run_id, image_id)
        );
        CREATE TABLE neighbour_sets (
            run_id  INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            metric  TEXT NOT NULL,
            tag     TEXT NOT NULL DEFAULT '',
            params  TEXT NOT NULL DEFAULT '{}',
            created TEXT NOT NULL,
            PRIMARY KEY (run_id, metric, tag)
        );
        CREATE TABLE neighbours (
            run_id       INTEGER NOT NULL,
            metric       TEXT NOT NULL,
            tag          TEXT NOT NULL DEFAULT '',
            query_id     TEXT NOT NULL,
            "rank"       INTEGER NOT NULL,
            neighbour_id TEXT NOT NULL,
            distance     REAL,
            similarity   REAL,
            PRIMARY KEY (run_id, metric, tag, query_id, "rank"),
            FOREIGN KEY (run_id, metric, tag) REFERENCES neighbour_sets(run_id, metric, tag) ON DELETE CASCADE
        );
        CREATE TABLE results (
            result_id INTEGER PRIMARY KEY AUTOINCREMENT,
            name      TEXT NOT NULL,
            run_id    INTEGER REFERENCES runs(run_id) ON DELETE CASCADE,
            created   TEXT NOT NULL,
            data      TEXT NOT NULL
        );
        CREATE UNIQUE INDEX results_name_run ON results(name, ifnull(run_id, -1));
        """)


def _execute_script(con: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated DDL statements inside the caller's transaction (``executescript`` would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            con.execute(statement)


def _schema_v2(con: sqlite3.Connection) -> None:
    """Content hashes: the sha1 of the image file behind each vector/failure and a CRC-32 of each vector."""
    _execute_script(con, """
        ALTER TABLE features ADD COLUMN sha1 TEXT;
        ALTER TABLE features ADD COLUMN crc32 INTEGER;
        ALTER TABLE failures ADD COLUMN sha1 TEXT
        """)


def _schema_v3(con: sqlite3.Connection) -> None:
    """Labels per run: the labels and query split each run was extracted and evaluated with. A store from
    before keeps, for each run, the labels its shared ``images`` table holds now (the only ones it knew)."""
    _execute_script(con, f"""
        CREATE TABLE run_labels (
            run_id      INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            image_id    TEXT NOT NULL,
            {', '.join(f'{c} {"INTEGER" if c == "is_fashion" else "TEXT"}' for c in IMAGE_COLUMNS)},
            PRIMARY KEY (run_id, image_id)
        );
        INSERT INTO run_labels (run_id, image_id, {', '.join(IMAGE_COLUMNS)})
            SELECT r.run_id, i.image_id, {', '.join(f'i.{c}' for c in IMAGE_COLUMNS)}
            FROM runs r JOIN images i ORDER BY r.run_id, i.rowid
        """)


#: ``version -> function`` bringing a store from ``version - 1`` to ``version`` (run inside one transaction).
MIGRATIONS = {1: _schema_v1, 2: _schema_v2, 3: _schema_v3}


def migrate(con: sqlite3.Connection, *, path: str = "<store>") -> int:
    """Bring the schema of an open connection up to :data:`SCHEMA_VERSION`; returns the version.

    Each step runs in its own ``BEGIN IMMEDIATE`` transaction together with the ``user_version`` bump,
    so concurrent openers never apply a step twice.
    """
    while True:
        _begin_immediate(con)
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{path}: schema version {version} is newer than this cbir "
                                 f"(knows up to {SCHEMA_VERSION}); upgrade cbir to read it")
            if version == SCHEMA_VERSION:
                con.execute("COMMIT")
                return version
            MIGRATIONS[version + 1](con)
            con.execute(f"PRAGMA user_version = {int(version) + 1}")
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _begin_immediate(con: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE`` with retries on top of the busy timeout (WAL writers queue here)."""
    for attempt in range(_WRITE_RETRIES):
        try:
            con.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or attempt == _WRITE_RETRIES - 1:
                raise
            time.sleep(min(0.05 * 2**attempt, 2.0))


# --------------------------------------------------------------------------------------------- the store
class FeatureStore:
    """A SQLite feature store at ``path``.

    Writable (default): created with its parent folders when missing. ``readonly=True``: for readers; a
    missing file is a :class:`StoreError` (nothing is created), nothing is ever written, and a store on
    read-only storage (a folder where WAL's ``-shm`` file cannot be created, a read-only file) is still
    readable. Safe to share between threads of one process (a lock serialises calls) and between processes
    (WAL, busy timeout, immediate transactions). Picklable: a copy re-opens the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path).expanduser().resolve()
        self.readonly = bool(readonly)
        self._lock = threading.RLock()
        self._con: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._shard_sets: dict[int, tuple[tuple, ShardSet]] = {}
        self._connect()

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._con is not None and self._pid == os.getpid():
            return self._con
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, expected a SQLite file")
        con = self._open_readonly() if self.readonly else self._open_writable()
        self._con, self._pid = con, os.getpid()
        return con

    def _open_writable(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the store's folder {exc.filename} ({exc.strerror})") from exc
        try:
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                  check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise store_error(self.path, exc) from exc
        try:
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if con.execute("PRAGMA page_count").fetchone()[0] == 0:
                con.execute("PRAGMA page_size = 16384")  # feature vectors are kilobytes; fewer overflow pages
            mode = self._retry(lambda: con.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL mode (got {mode!r})")
            con.execute("PRAGMA synchronous = NORMAL")
            con.execute("PRAGMA foreign_keys = ON")
            migrate(con, path=str(self.path))
        except sqlite3.DatabaseError as exc:
            con.close()
            if "not a database" in str(exc):
                raise StoreError(f"{self.path}: not a usable SQLite feature store ({exc})") from exc
            raise store_error(self.path, exc) from exc
        except BaseException:
            con.close()
            raise
        return con

    def _open_readonly(self) -> sqlite3.Connection:
        """``mode=ro``; where WAL cannot work (no writable folder for ``-shm``), ``immutable=1`` unless a
        ``-wal`` file holds changes that only a writer can bring into the file."""
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no such feature store")
        try:
            con = self._connect_uri("mode=ro")
        except sqlite3.OperationalError as exc:
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.is_file() and wal.stat().st_size > 0:
                raise StoreError(f"{self.path}: cannot be read here ({exc}): {wal.name} holds changes not yet "
                                 "written into the store, and its folder is read-only; open it once with write "
                                 "access") from exc
            try:
                con = self._connect_uri("mode=ro&immutable=1")
            except sqlite3.Error as exc2:
                raise store_error(self.path, exc2) from exc2
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a usable SQLite feature store ({exc})") from exc
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            con.close()
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this cbir "
                                 f"(knows up to {SCHEMA_VERSION}); upgrade cbir to read it")
            if version == 0:
                raise StoreError(f"{self.path}: not a cbir feature store (no schema)")
            raise StoreError(f"{self.path}: schema version {version} is older than this cbir's "
                             f"{SCHEMA_VERSION}; open it once without readonly=True to upgrade it")
        return con

    def _connect_uri(self, query: str) -> sqlite3.Connection:
        con = sqlite3.connect(f"{self.path.as_uri()}?{query}", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                              isolation_level=None, check_same_thread=False)
        try:
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opening is lazy: fail here
        except BaseException:
            con.close()
            raise
        return con

    @staticmethod
    def _retry(fn):  # noqa: ANN001, ANN205 - tiny internal helper
        for attempt in range(_WRITE_RETRIES):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or attempt == _WRITE_RETRIES - 1:
                    raise
                time.sleep(min(0.05 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """Turn ``sqlite3`` errors (disk full, read-only, damaged file, ...) into :class:`StoreError`."""
        try:
            yield
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a bug in the calling code, not a problem of the file
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error)."""
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only (FeatureStore(path, readonly=True)); "
                             "open it without readonly to write")
        with self._lock, self._sqlite_errors():
            con = self._connect()
            _begin_immediate(con)
            try:
                yield con
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock, self._sqlite_errors():
            return self._connect().execute(sql, params).fetchall()

    def _frame(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._lock, self._sqlite_errors():
            cur = self._connect().execute(sql, params)
            rows = cur.fetchall()
            columns = [d[0] for d in cur.description]
        return pd.DataFrame.from_records(rows, columns=columns)

    def close(self) -> None:
        """Close the connection (the store re-opens on the next call)."""
        with self._lock:
            if self._con is not None and self._pid == os.getpid():
                self._con.close()
            self._con = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "readonly": self.readonly}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], readonly=state.get("readonly", False))

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}" + (", readonly=True)" if self.readonly else ")")

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    # -- catalogue --------------------------------------------------------------------------
    def put_catalog(self, df: pd.DataFrame) -> int:
        """Upsert catalogue rows (needs ``image_id``); returns the number of rows written.

        Standard columns present in ``df`` (:data:`IMAGE_COLUMNS`) overwrite the stored values; absent ones
        are left alone. Every other column is merged into the row's ``extra`` JSON object. New images are
        appended, so the stored order is the order in which images were first put.
        """
        if "image_id" not in df.columns:
            raise ValueError(f"{self.path}: put_catalog needs an 'image_id' column, got {list(df.columns)}")
        ids = df["image_id"].astype(str)
        if ids.duplicated().any():
            dup = ids[ids.duplicated()].iloc[:5].tolist()
            raise ValueError(f"{self.path}: put_catalog got duplicate image_id values, e.g. {dup}")
        std = [c for c in IMAGE_COLUMNS if c in df.columns]
        extra_cols = [c for c in df.columns if c != "image_id" and c not in IMAGE_COLUMNS]
        columns: list[list[Any]] = [ids.tolist()]
        for col in std:
            columns.append(_bool_column(df[col]) if col == "is_fashion" else _text_column(df[col]))
        names = ["image_id", *std]
        if extra_cols:
            records = df[extra_cols].astype(object).where(df[extra_cols].notna(), None).to_dict(orient="records")
            columns.append([_dumps({str(k): v for k, v in r.items()}) for r in records])
            names.append("extra")
        updates = [f"{c} = excluded.{c}" for c in std]
        if extra_cols:
            updates.append("extra = json_patch(images.extra, excluded.extra)")
        conflict = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
        sql = (f"INSERT INTO images ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
               f"ON CONFLICT(image_id) {conflict}")
        with self._write() as con:
            con.executemany(sql, zip(*columns))
        return len(ids)

    def catalog(self) -> pd.DataFrame:
        """The stored catalogue in catalogue order: standard columns, then the ``extra`` columns."""
        frame = self._frame(f"SELECT image_id, {', '.join(IMAGE_COLUMNS)}, extra FROM images ORDER BY rowid")
        extra = pd.DataFrame.from_records([json.loads(e) for e in frame.pop("extra")], index=frame.index)
        frame["is_fashion"] = frame["is_fashion"].map({1: True, 0: False, None: pd.NA}).astype("boolean")
        if frame["is_fashion"].notna().all():
            frame["is_fashion"] = frame["is_fashion"].astype(bool)
        return pd.concat([frame, extra], axis=1) if len(extra.columns) else frame

    def put_run_labels(self, run_id: int, df: pd.DataFrame) -> int:
        """Record the labels (and query split) run ``run_id`` is extracted and evaluated with, replacing any
        earlier ones: ``image_id`` plus the :data:`IMAGE_COLUMNS` present in ``df`` (absent ones stay NULL).
        Returns the number of rows. Each run keeps its own labels, so runs that share a store never relabel
        each other's images."""
        if "image_id" not in df.columns:
            raise ValueError(f"{self.path}: put_run_labels needs an 'image_id' column, got {list(df.columns)}")
        ids = df["image_id"].astype(str)
        if ids.duplicated().any():
            raise ValueError(f"{self.path}: put_run_labels got duplicate image_id values, "
                             f"e.g. {ids[ids.duplicated()].iloc[:5].tolist()}")
        std = [c for c in IMAGE_COLUMNS if c in df.columns]
        columns = [[int(run_id)] * len(ids), ids.tolist(),
                   *(_bool_column(df[c]) if c == "is_fashion" else _text_column(df[c]) for c in std)]
        names = ["run_id", "image_id", *std]
        with self._write() as con:
            self._require_run(con, run_id)
            con.execute("DELETE FROM run_labels WHERE run_id = ?", (int(run_id),))
            con.executemany(f"INSERT INTO run_labels ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                            zip(*columns))
        return len(ids)

    def run_labels(self, run_id: int) -> pd.DataFrame:
        """The labels run ``run_id`` was extracted with, in catalogue order: ``image_id`` + :data:`IMAGE_COLUMNS`
        (``is_fashion`` as bool). Raises :class:`RunNotFoundError` for an unknown run."""
        self.run(run_id)
        frame = self._frame(f"SELECT image_id, {', '.join(IMAGE_COLUMNS)} FROM run_labels WHERE run_id = ? "
                            "ORDER BY rowid", (int(run_id),))
        frame["is_fashion"] = frame["is_fashion"].map({1: True, 0: False, None: pd.NA}).astype("boolean")
        if frame["is_fashion"].notna().all():
            frame["is_fashion"] = frame["is_fashion"].astype(bool)
        return frame

    def copy_outcomes(self, from_run: int, to_run: int, sha1: Mapping[str, str | None]) -> int:
        """Copy run ``from_run``'s vectors and failures into ``to_run`` for the ids of ``sha1`` whose stored
        content sha1 equals the given one (the same model on the same file content gives the same outcome; a
        failure with no sha1 matches a file that is still unreadable); ids ``to_run`` already has are left
        alone. Returns the number of vectors copied. Both runs must have the same dimension."""
        dims = {int(r): self.run(r)["dim"] for r in (from_run, to_run)}
        if dims[int(from_run)] != dims[int(to_run)]:
            raise ValueError(f"{self.path}: runs {from_run} and {to_run} have different dimensions {dims}")
        pairs = [(str(i), None if _is_missing(h) else str(h)) for i, h in sha1.items()]
        with self._write() as con:
            self._refuse_shard_run(con, to_run)
            con.execute("CREATE TEMP TABLE IF NOT EXISTS _want (image_id TEXT PRIMARY KEY, sha1 TEXT)")
            con.execute("DELETE FROM _want")
            con.executemany("INSERT OR REPLACE INTO _want VALUES (?, ?)", pairs)
            have = "SELECT image_id FROM features WHERE run_id = :to UNION SELECT image_id FROM failures WHERE run_id = :to"
            n = con.execute(
                "INSERT INTO features (run_id, image_id, vector, sha1, crc32)"
                " SELECT :to, f.image_id, f.vector, f.sha1, f.crc32 FROM features f JOIN _want w"
                f" ON w.image_id = f.image_id AND w.sha1 = f.sha1 WHERE f.run_id = :src AND f.image_id NOT IN ({have})",
                {"to": int(to_run), "src": int(from_run)}).rowcount
            con.execute(
                "INSERT INTO failures (run_id, image_id, reason, detail, sha1)"
                " SELECT :to, x.image_id, x.reason, x.detail, x.sha1 FROM failures x JOIN _want w"
                f" ON w.image_id = x.image_id AND w.sha1 IS x.sha1 WHERE x.run_id = :src AND x.image_id NOT IN ({have})",
                {"to": int(to_run), "src": int(from_run)})
            con.execute("DELETE FROM _want")
        return int(n)

    # -- runs -------------------------------------------------------------------------------
    def start_run(self, identity: Mapping[str, Any], *, name: str | None = None,
                  versions: Mapping[str, Any] | None = None) -> int:
        """The run id for ``identity`` (canonical JSON, sorted keys): the existing run if any, else a new one.

        An existing run keeps its id, features, creation time and versions (so extraction resumes); a given
        ``name`` replaces the stored one.
        """
        key = canonical_json(identity)
        params = json.loads(key)
        cols = {c: params.get(c) for c in _RUN_IDENTITY_COLUMNS}
        if cols["model"] is None:
            cols["model"] = params.get("name")
        for c in ("layer", "pooling", "weights", "weights_sha1", "variant", "model"):
            if cols[c] is not None and not isinstance(cols[c], str):
                cols[c] = canonical_json(cols[c])
        with self._write() as con:
            row = con.execute("SELECT run_id FROM runs WHERE identity_key = ?", (key,)).fetchone()
            if row is not None:
                if name is not None:
                    con.execute("UPDATE runs SET name = ? WHERE run_id = ?", (name, row[0]))
                return int(row[0])
            cur = con.execute(
                "INSERT INTO runs (identity_key, name, model, layer, pooling, weights, weights_sha1, variant,"
                " input_size, dim, params, versions, created, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                (key, name, *(cols[c] for c in _RUN_IDENTITY_COLUMNS), key, _dumps(dict(versions or {})), _now()),
            )
            return int(cur.lastrowid)

    def set_status(self, run_id: int, status: str) -> None:
        """Set a run's status (``running``, ``complete``, ``failed``, ...)."""
        with self._write() as con:
            self._require_run(con, run_id)
            con.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, int(run_id)))

    def finish_run(self, run_id: int, *, status: str = "complete", n_images: int | None = None,
                   **stats: Any) -> None:
        """Mark a run finished now with ``status``; ``stats`` (timings, counts) are merged into its stats JSON."""
        with self._write() as con:
            self._require_run(con, run_id)
            con.execute(
                "UPDATE runs SET status = ?, finished = ?, n_images = coalesce(?, n_images),"
                " stats = json_patch(stats, ?) WHERE run_id = ?",
                (status, _now(), n_images, _dumps(stats), int(run_id)),
            )

    def delete_run(self, run_id: int) -> None:
        """Delete a run with its features, failures, neighbours and results (a run kept in shards: its shard
        directory is left on disk)."""
        with self._write() as con:
            self._require_run(con, run_id)
            con.execute("DELETE FROM runs WHERE run_id = ?", (int(run_id),))

    def _require_run(self, con: sqlite3.Connection, run_id: int) -> sqlite3.Row | tuple:
        row = con.execute("SELECT run_id, dim FROM runs WHERE run_id = ?", (int(run_id),)).fetchone()
        if row is None:
            raise self._run_not_found(con, run_id)
        return row

    def _run_not_found(self, con: sqlite3.Connection, run_id: Any) -> RunNotFoundError:
        """``run 99 not found in <store>; runs: 1, 2``."""
        have = [str(r[0]) for r in con.execute("SELECT run_id FROM runs ORDER BY run_id")]
        return RunNotFoundError(f"run {run_id} not found in {self.path}; runs: {', '.join(have) or 'none'}")

    def invalidate_derived(self, run_id: int) -> dict[str, int]:
        """Delete what was computed from run ``run_id``'s current vectors (call before replacing them):
        its neighbour sets, its result tables and the runs derived from it (``whiten_source_run``).
        Returns the counts deleted: ``neighbour_sets``, ``tables``, ``derived_runs``."""
        with self._write() as con:
            self._require_run(con, run_id)
            derived = [r[0] for r in con.execute(
                "SELECT run_id FROM runs WHERE json_extract(params, '$.whiten_source_run') = ?", (int(run_id),))]
            counts = {
                "neighbour_sets": con.execute("DELETE FROM neighbour_sets WHERE run_id = ?", (int(run_id),)).rowcount,
                "tables": con.execute("DELETE FROM results WHERE run_id = ?", (int(run_id),)).rowcount,
                "derived_runs": len(derived),
            }
            con.executemany("DELETE FROM runs WHERE run_id = ?", [(r,) for r in derived])
        return counts

    _RUNS_SQL = (
        "SELECT r.run_id, r.name, r.model, r.layer, r.pooling, r.weights, r.weights_sha1, r.variant,"
        " r.input_size, r.dim, r.status,"
        " (SELECT count(*) FROM features f WHERE f.run_id = r.run_id) AS n_features,"
        " (SELECT count(*) FROM failures x WHERE x.run_id = r.run_id) AS n_failures,"
        " r.n_images, r.created, r.finished, r.params, r.versions, r.stats FROM runs r"
    )

    def runs(self) -> pd.DataFrame:
        """All runs, oldest first: ``run_id, name, model, layer, pooling, weights, weights_sha1, variant,
        input_size, dim, status, n_features, n_failures, n_images, created, finished, params, versions, stats``
        (the last three as dicts)."""
        frame = self._frame(self._RUNS_SQL + " ORDER BY r.run_id")
        for col in ("params", "versions", "stats"):
            frame[col] = [json.loads(v) for v in frame[col]]
        for k, stats in enumerate(frame["stats"]):
            if stats.get("vectors") == "shards":  # counted when the run was last extracted
                frame.loc[k, "n_features"] = stats.get("n_features", 0)
                frame.loc[k, "n_failures"] = stats.get("n_failures", 0)
        return frame

    def run(self, run_id: int) -> dict[str, Any]:
        """One run as a dict (the columns of :meth:`runs`, with ``n_features`` and ``n_failures``)."""
        frame = self._frame(self._RUNS_SQL + " WHERE r.run_id = ?", (int(run_id),))
        if frame.empty:
            with self._lock, self._sqlite_errors():
                raise self._run_not_found(self._connect(), run_id)
        row = {k: (None if _is_missing(v) else v) for k, v in frame.iloc[0].to_dict().items()}
        for col in ("params", "versions", "stats"):
            row[col] = json.loads(row[col])
        if row["stats"].get("vectors") == "shards":
            row["n_features"] = row["stats"].get("n_features", 0)
            row["n_failures"] = row["stats"].get("n_failures", 0)
        for col in ("run_id", "input_size", "dim", "n_features", "n_failures", "n_images"):
            if row[col] is not None:
                row[col] = int(row[col])
        return row

    def find_run(self, **identity: Any) -> int | None:
        """The latest run whose identity has all the given key/values (``None`` if none).

        Keys are identity keys (``model``, ``layer``, ``pooling``, ``weights``, ``variant``, ...); ``name`` and
        ``status`` also match the run's name and status. Values compare after canonical JSON.
        """
        wanted = json.loads(canonical_json(identity))
        rows = self._read("SELECT run_id, params, name, status FROM runs ORDER BY run_id DESC")
        for run_id, params, name, status in rows:
            have = json.loads(params)
            columns = {"name": name, "status": status}
            if all((have[k] if k in have else columns.get(k, _MISSING)) == v for k, v in wanted.items()):
                return int(run_id)
        return None

    # -- runs whose vectors stay in their shards ----------------------------------------------
    @staticmethod
    def _shard_location(con: sqlite3.Connection, run_id: int) -> tuple[str | None, str] | None:
        """``(shard directory or None for a run stored here, status)`` of run ``run_id``; None if no such run."""
        row = con.execute("SELECT json_extract(stats, '$.vectors'), json_extract(stats, '$.shard_dir'), status"
                          " FROM runs WHERE run_id = ?", (int(run_id),)).fetchone()
        return None if row is None else (row[1] if row[0] == "shards" else None, row[2])

    def shard_dir(self, run_id: int) -> str | None:
        """The shard directory that holds run ``run_id``'s vectors and failures, None for a run stored here."""
        with self._lock, self._sqlite_errors():
            con = self._connect()
            found = self._shard_location(con, run_id)
            if found is None:
                raise self._run_not_found(con, run_id)
        return found[0]

    def keep_vectors_in_shards(self, run_id: int, shard_dir: str | os.PathLike[str]) -> None:
        """Record that run ``run_id`` keeps its vectors and failures in the Parquet shards of ``shard_dir`` (its
        manifest's shards) rather than in this store. Refused (:class:`StoreError`) for a run that already
        holds vectors or failures here, or whose shards are recorded elsewhere."""
        where = str(Path(shard_dir).expanduser().resolve())
        with self._write() as con:
            self._require_run(con, run_id)
            held = con.execute("SELECT (SELECT count(*) FROM features WHERE run_id = :r)"
                               " + (SELECT count(*) FROM failures WHERE run_id = :r)", {"r": int(run_id)}).fetchone()[0]
            if held:
                raise StoreError(f"{self.path}: run {run_id} already holds {held} vector(s) or failure(s) in the store;"
                                 " its vectors cannot move to shards (extract into a new store, or without "
                                 "vectors='shards')")
            now, _ = self._shard_location(con, run_id)
            if now is not None and now != where:
                raise StoreError(f"{self.path}: run {run_id} keeps its vectors in {now}, not {where}")
            con.execute("UPDATE runs SET stats = json_patch(stats, ?) WHERE run_id = ?",
                        (_dumps({"vectors": "shards", "shard_dir": where}), int(run_id)))

    def _shards(self, run_id: int) -> ShardSet | None:
        """The :class:`ShardSet` of a run whose vectors stay in shards (None for a run stored here), cached
        until its manifest changes. A complete run must have its manifest; a run still being extracted without
        one has no visible outcome yet."""
        with self._lock, self._sqlite_errors():
            found = self._shard_location(self._connect(), run_id)
        if found is None or found[0] is None:
            return None
        where, status = found
        manifest = Path(where) / MANIFEST
        try:
            st = manifest.stat()
            key: tuple = (where, st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            key = (where, None, status == "complete")
        cached = self._shard_sets.get(int(run_id))
        if cached is not None and cached[0] == key and cached[1].unchanged():
            return cached[1]
        try:
            shard_set = ShardSet(where, required=status == "complete")
        except ShardError as exc:
            raise StoreError(f"{self.path}: run {run_id}: {exc}") from None
        self._shard_sets[int(run_id)] = (key, shard_set)
        return shard_set

    def _refuse_shard_run(self, con: sqlite3.Connection, run_id: int) -> None:
        found = self._shard_location(con, run_id)
        if found is not None and found[0] is not None:
            raise StoreError(f"{self.path}: run {run_id} keeps its vectors in its shards ({found[0]}); nothing of it "
                             "is written to the store (extract it on a cluster with vectors='shards')")

    # -- features ---------------------------------------------------------------------------
    def done_ids(self, run_id: int, sha1: Mapping[str, str | None] | None = None) -> set[str]:
        """Image ids that already have a feature vector in ``run_id``; with ``sha1`` (``image_id -> sha1`` of
        the current files) only those whose vector was computed from that very content."""
        if sha1 is None:
            shards = self._shards(run_id)
            if shards is not None:
                return set(shards.ids.tolist())
            return {r[0] for r in self._read("SELECT image_id FROM features WHERE run_id = ?", (int(run_id),))}
        return {i for i, s in self.content_sha1(run_id).items() if s is not None and sha1.get(i) == s}

    def content_sha1(self, run_id: int, *, failures: bool = False) -> dict[str, str | None]:
        """``image_id -> sha1`` of the file content each stored vector (``failures=True``: each recorded
        failure) of ``run_id`` came from; None where unknown (written before schema 2, or unreadable file)."""
        shards = self._shards(run_id)
        if shards is not None:
            return shards.content_sha1(failures=failures)
        table = "failures" if failures else "features"
        return dict(self._read(f"SELECT image_id, sha1 FROM {table} WHERE run_id = ?", (int(run_id),)))

    def vector_crc32(self, run_id: int) -> dict[str, int | None]:
        """``image_id -> CRC-32`` of each stored vector of ``run_id`` (of id + blob; None before schema 2): a cheap
        fingerprint of a run's vectors (``cbir.index`` tells a stale index by it) without reading them. For a
        run kept in shards: a CRC-32 of the name, size and modification time of the shard holding the vector."""
        shards = self._shards(run_id)
        if shards is not None:
            return shards.fingerprints()
        return dict(self._read("SELECT image_id, crc32 FROM features WHERE run_id = ?", (int(run_id),)))

    def ids_with_vectors(self, run_id: int, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """The ``ids`` (as str, in the given order) that have a feature vector in ``run_id``."""
        ids = np.asarray(ids).astype(str)
        return ids[np.isin(ids, np.array(sorted(self.done_ids(run_id)), dtype=str))]

    def failed_ids(self, run_id: int) -> set[str]:
        """Image ids recorded as failures in ``run_id``."""
        shards = self._shards(run_id)
        if shards is not None:
            return set(shards.failures["image_id"])
        return {r[0] for r in self._read("SELECT image_id FROM failures WHERE run_id = ?", (int(run_id),))}

    def put_features(self, run_id: int, ids: Sequence[str] | np.ndarray, X: np.ndarray, *,
                     sha1: Sequence[str | None] | None = None, failures: Iterable[Sequence[Any]] = ()) -> int:
        """Write ``X[N, D]`` (stored as float32, finite) for ``ids[N]`` (and ``failures``) in ONE transaction.

        ``sha1[N]``: the SHA-1 of the image file bytes each vector was computed from (None: unknown).
        ``failures``: ``(image_id, reason[, detail[, sha1]])``. An id keeps one outcome: a vector replaces the
        id's vector and failure, a failure its vector and failure. The first write fixes the run's ``dim``;
        later writes must match it. Non-finite vectors are refused (``ValueError`` naming the ids). Returns N.
        """
        ids = [str(i) for i in ids]
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[0] != len(ids):
            raise ValueError(f"{self.path}: put_features needs X of shape (len(ids)={len(ids)}, D), got {X.shape}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.path}: put_features got duplicate image ids")
        sha1 = [None] * len(ids) if sha1 is None else [None if s is None else str(s) for s in sha1]
        if len(sha1) != len(ids):
            raise ValueError(f"{self.path}: put_features got {len(sha1)} sha1 values for {len(ids)} ids")
        X = np.ascontiguousarray(X, dtype=_VECTOR_DTYPE)
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            raise ValueError(f"{self.path}: run {run_id}: refusing non-finite (NaN or infinite) vectors for "
                             f"{int(bad.sum())} id(s): {[i for i, b in zip(ids, bad) if b][:10]}")
        blobs = [row.tobytes() for row in X]
        rows = [(int(run_id), i, b, s, _crc32(i, b)) for i, b, s in zip(ids, blobs, sha1)]
        fails = [_failure_row(f) for f in failures]
        with self._write() as con:
            _, dim = self._require_run(con, run_id)
            self._refuse_shard_run(con, run_id)
            if len(ids):
                if dim is None:
                    con.execute("UPDATE runs SET dim = ? WHERE run_id = ?", (X.shape[1], int(run_id)))
                elif dim != X.shape[1]:
                    raise ValueError(f"{self.path}: run {run_id} stores {dim}-d vectors, got {X.shape[1]}-d")
                con.executemany("INSERT OR REPLACE INTO features (run_id, image_id, vector, sha1, crc32)"
                                " VALUES (?, ?, ?, ?, ?)", rows)
                con.executemany("DELETE FROM failures WHERE run_id = ? AND image_id = ?",
                                [(int(run_id), i) for i in ids])
            self._insert_failures(con, run_id, fails)
        return len(ids)

    @staticmethod
    def _insert_failures(con: sqlite3.Connection, run_id: int, fails: list[tuple]) -> None:
        con.executemany("INSERT OR REPLACE INTO failures (run_id, image_id, reason, detail, sha1)"
                        " VALUES (?, ?, ?, ?, ?)", [(int(run_id), *f) for f in fails])
        con.executemany("DELETE FROM features WHERE run_id = ? AND image_id = ?", [(int(run_id), f[0]) for f in fails])

    def put_failures(self, run_id: int, failures: Iterable[Sequence[Any]]) -> int:
        """Record ``(image_id, reason[, detail[, sha1]])`` failures for ``run_id`` in one transaction (replacing
        those ids' vectors); returns the count."""
        fails = [_failure_row(f) for f in failures]
        with self._write() as con:
            self._require_run(con, run_id)
            self._refuse_shard_run(con, run_id)
            self._insert_failures(con, run_id, fails)
        return len(fails)

    def failures(self, run_id: int) -> pd.DataFrame:
        """``image_id, path, reason, detail`` of the images that failed in ``run_id``, in catalogue order (a
        run kept in shards: in shard order)."""
        shards = self._shards(run_id)
        if shards is not None:
            fails = shards.failures
            paths = dict(self._read("SELECT image_id, path FROM images WHERE image_id IN (SELECT value FROM"
                                    " json_each(?))", (_dumps(fails["image_id"].tolist()),)))
            return pd.DataFrame({"image_id": fails["image_id"].astype(str).to_numpy(),
                                 "path": [paths.get(i) for i in fails["image_id"]],
                                 "reason": fails["reason"].to_numpy(dtype=object),
                                 "detail": fails["detail"].to_numpy(dtype=object)})
        frame = self._frame(
            "SELECT x.image_id, i.path, x.reason, x.detail FROM failures x"
            " LEFT JOIN images i ON i.image_id = x.image_id WHERE x.run_id = ?"
            " ORDER BY i.rowid IS NULL, i.rowid, x.rowid", (int(run_id),))
        if frame.empty:
            frame = pd.DataFrame({c: pd.Series([], dtype=str) for c in ("image_id", "path", "reason", "detail")})
        return frame

    def features(self, run_id: int, ids: Sequence[str] | np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids[N] str, X[N, D] float32)`` of a run, read in one snapshot of the store.

        With ``ids`` the rows follow ``ids`` exactly (a ``KeyError`` names the ids without a vector);
        without, every stored vector in catalogue order (vectors of images absent from the catalogue last).
        Every vector read is checked (its CRC-32 and finiteness): a damaged one raises :class:`StoreError`
        naming the store, the run and the ids.

        Memory: about the size of ``X`` itself. The order is decided first from the ids alone, ``X`` is
        allocated once and the vectors are streamed into their rows :data:`READ_CHUNK` at a time (never all
        blobs at once; each blob copied once, straight into its row). :meth:`iter_features` streams a run in
        chunks instead.

        A run kept in shards is read from them (shard order instead of catalogue order without ``ids``; each
        shard read once; memory: ``X`` and one shard's vectors); a damaged or missing shard is a
        :class:`StoreError` naming the file.
        """
        shards = self._shards(run_id)
        if shards is not None:
            try:
                if ids is None:
                    return shards.ids.copy(), shards.take(np.arange(len(shards)))
                out_ids = np.array([str(i) for i in ids], dtype=str)
                try:
                    positions = shards.positions(out_ids)
                except KeyError as exc:
                    raise KeyError(f"{self.path}: run {run_id}: {exc.args[0]}") from None
                return out_ids, shards.take(positions)
            except ShardError as exc:
                raise StoreError(f"{self.path}: run {run_id}: {exc}") from None
        with self._lock, self._sqlite_errors():
            con = self._connect()
            _, dim = self._require_run(con, run_id)
            dim = int(dim or 0)
            con.execute("BEGIN")  # one read snapshot: the ids and the blobs agree even while others write
            try:
                if ids is None:
                    out_ids = self._catalogue_order(con, run_id)
                    unique, first = out_ids, np.arange(len(out_ids))
                    cursor = con.execute("SELECT image_id, vector, crc32 FROM features WHERE run_id = ?",
                                         (int(run_id),))
                else:
                    out_ids = np.array([str(i) for i in ids], dtype=str)
                    codes, unique = pd.factorize(out_ids.astype(object), sort=False)
                    first = np.empty(len(unique), dtype=np.int64)  # each distinct id's first row
                    first[codes[::-1]] = np.arange(len(out_ids))[::-1]
                    cursor = con.execute(
                        "SELECT image_id, vector, crc32 FROM features WHERE run_id = ? AND image_id IN"
                        " (SELECT value FROM json_each(?))", (int(run_id), _dumps(list(unique))))
                X = np.empty((len(out_ids), dim), dtype=np.float32)
                filled = self._read_vectors(cursor, run_id, dim, pd.Index(unique, dtype=object), first, X)
            finally:
                if con.in_transaction:
                    con.execute("COMMIT")
        if not filled.all():
            missing = [str(u) for u in np.asarray(unique)[~filled]]
            if ids is None:  # only possible if the order and the blobs disagreed: never within one snapshot
                raise StoreError(f"{self.path}: run {run_id}: {len(missing)} vector(s) vanished while being read,"
                                 f" e.g. {missing[:5]}")
            raise KeyError(f"{self.path}: run {run_id} has no vector for {len(missing)} id(s), e.g. {missing[:5]}")
        if ids is not None and len(unique) < len(out_ids):  # repeated ids: copy their first row
            again = np.flatnonzero(first[codes] != np.arange(len(out_ids)))
            X[again] = X[first[codes[again]]]
        bad = np.zeros(len(X), dtype=bool)
        for start in range(0, len(X), READ_CHUNK):  # in slices: no N x D temporary
            bad[start:start + READ_CHUNK] = ~np.isfinite(X[start:start + READ_CHUNK]).all(axis=1)
        if bad.any():
            raise StoreError(f"{self.path}: run {run_id}: stored vector(s) of {sorted(set(out_ids[bad]))[:10]} hold "
                             "non-finite values (NaN or infinite): the store is damaged; re-extract them")
        return out_ids, X

    def iter_features(self, run_id: int, *, chunk: int = READ_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids[n] str, X[n, D] float32)`` chunks of at most ``chunk`` rows covering every stored vector
        of ``run_id`` in catalogue order (the order of :meth:`features`; vectors of images absent from the
        catalogue last), checked like :meth:`features`. Memory: a few chunks (the one being read, its blobs, and
        the one the caller holds), whatever the run's size. The order is fixed when iteration starts; each chunk
        is read in its own snapshot (a vector deleted meanwhile is a ``KeyError``)."""
        if int(chunk) < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        shards = self._shards(run_id)
        if shards is not None:  # shard order; each shard read once
            try:
                yield from shards.iter_chunks(int(chunk))
            except ShardError as exc:
                raise StoreError(f"{self.path}: run {run_id}: {exc}") from None
            return
        with self._lock, self._sqlite_errors():
            con = self._connect()
            self._require_run(con, run_id)
            order = self._catalogue_order(con, run_id)
        for start in range(0, len(order), int(chunk)):
            yield self.features(run_id, order[start:start + int(chunk)])

    def _catalogue_order(self, con: sqlite3.Connection, run_id: int) -> np.ndarray:
        """The ids of ``run_id``'s vectors in catalogue order (those absent from the catalogue last, by id),
        from the ids alone (an index scan: no vector is read)."""
        # No ORDER BY: sorting in SQLite costs more than sorting the catalogue rows in numpy.
        rows = con.execute("SELECT f.image_id, i.rowid FROM features f LEFT JOIN images i"
                           " ON i.image_id = f.image_id WHERE f.run_id = ?", (int(run_id),)).fetchall()
        if not rows:
            return np.zeros(0, dtype=str)
        got_ids, pos = zip(*rows)
        got_ids = np.array(got_ids, dtype=str)
        pos = np.array([-1 if p is None else p for p in pos], dtype=np.int64)
        return got_ids[np.lexsort((got_ids, pos, pos < 0))]  # catalogue row; absent ones last, by id

    def _read_vectors(self, cursor: sqlite3.Cursor, run_id: int, dim: int, where: pd.Index,
                      first: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Copy the ``(image_id, vector, crc32)`` rows of ``cursor`` into row ``first[where.get_loc(id)]`` of
        ``X`` (C-contiguous), :data:`READ_CHUNK` rows at a time, each blob straight into its row after checking
        its size and CRC-32 (NULL for vectors written before schema 2: size only). Returns which of ``where``
        were found; raises :class:`StoreError` naming the damaged ids once every row has been seen."""
        width = dim * _VECTOR_DTYPE.itemsize
        into = memoryview(X.reshape(-1).view(np.uint8))
        filled = np.zeros(len(where), dtype=bool)
        damaged: list[str] = []
        while True:
            rows = cursor.fetchmany(READ_CHUNK)
            if not rows:
                break
            at = where.get_indexer([r[0] for r in rows])
            if (at < 0).any():  # cannot happen within one snapshot; never write a row by a -1
                raise StoreError(f"{self.path}: run {run_id}: vectors changed while being read; read again")
            filled[at] = True
            for (image_id, blob, crc), offset in zip(rows, (first[at] * width).tolist()):
                if len(blob) != width or (crc is not None and crc != _crc32(image_id, blob)):
                    damaged.append(image_id)
                else:
                    into[offset:offset + width] = blob
            del rows  # before the next fetch: one chunk of blobs alive at a time
        if damaged:
            raise StoreError(f"{self.path}: run {run_id}: {len(damaged)} stored vector(s) are damaged (checksum "
                             f"or size mismatch): {damaged[:10]}; re-extract them into a new store or restore a backup")
        if not _VECTOR_DTYPE.isnative:  # the blobs are little-endian float32
            X.byteswap(inplace=True)
        return filled

    # -- neighbours -------------------------------------------------------------------------
    def put_neighbours(self, run_id: int, metric: str, df: pd.DataFrame, *, tag: str = "",
                       params: Mapping[str, Any] | None = None) -> int:
        """Replace the (run, metric, tag) neighbour set with ``df`` (``query_id, rank, neighbour_id, distance``
        and optional ``similarity``); returns the number of rows."""
        required = ("query_id", "rank", "neighbour_id", "distance")
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise ValueError(f"{self.path}: put_neighbours needs columns {list(required)}; missing {missing}")
        sim = df["similarity"] if "similarity" in df.columns else pd.Series(np.nan, index=df.index)
        rows = zip([int(run_id)] * len(df), [metric] * len(df), [tag] * len(df),
                   df["query_id"].astype(str).tolist(), df["rank"].astype(int).tolist(),
                   df["neighbour_id"].astype(str).tolist(), _float_column(df["distance"]), _float_column(sim))
        with self._write() as con:
            self._require_run(con, run_id)
            con.execute("DELETE FROM neighbour_sets WHERE run_id = ? AND metric = ? AND tag = ?",
                        (int(run_id), metric, tag))
            con.execute("INSERT INTO neighbour_sets (run_id, metric, tag, params, created) VALUES (?, ?, ?, ?, ?)",
                        (int(run_id), metric, tag, _dumps(dict(params or {})), _now()))
            con.executemany('INSERT INTO neighbours (run_id, metric, tag, query_id, "rank", neighbour_id, distance,'
                            " similarity) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return len(df)

    def neighbours(self, run_id: int, metric: str, *, tag: str = "") -> pd.DataFrame:
        """The stored neighbour set (``query_id, rank, neighbour_id, distance, similarity``) in stored order."""
        if not self._read("SELECT 1 FROM neighbour_sets WHERE run_id = ? AND metric = ? AND tag = ?",
                          (int(run_id), metric, tag)):
            raise KeyError(f"{self.path}: no neighbours for run {run_id}, metric {metric!r}, tag {tag!r}")
        frame = self._frame('SELECT query_id, "rank", neighbour_id, distance, similarity FROM neighbours'
                            " WHERE run_id = ? AND metric = ? AND tag = ? ORDER BY rowid", (int(run_id), metric, tag))
        return frame.astype({"query_id": str, "rank": "int64", "neighbour_id": str,
                             "distance": "float64", "similarity": "float64"})

    def neighbour_sets(self) -> pd.DataFrame:
        """One row per stored neighbour set: ``run_id, model, metric, tag, n_queries, k, n_rows, created, params``."""
        frame = self._frame(
            'SELECT s.run_id, r.model, s.metric, s.tag, count(DISTINCT n.query_id) AS n_queries,'
            ' coalesce(max(n."rank"), 0) AS k, count(n.query_id) AS n_rows, s.created, s.params'
            " FROM neighbour_sets s JOIN runs r ON r.run_id = s.run_id"
            " LEFT JOIN neighbours n ON n.run_id = s.run_id AND n.metric = s.metric AND n.tag = s.tag"
            " GROUP BY s.run_id, s.metric, s.tag ORDER BY s.run_id, s.metric, s.tag")
        frame["params"] = [json.loads(p) for p in frame["params"]] if len(frame) else []
        return frame

    # -- result tables ----------------------------------------------------------------------
    def put_table(self, name: str, df: pd.DataFrame, *, run_id: int | None = None) -> None:
        """Store (replace) the DataFrame ``df`` under ``name`` (optionally attached to ``run_id``)."""
        data = frame_to_json(df)
        with self._write() as con:
            if run_id is not None:
                self._require_run(con, run_id)
            rid = None if run_id is None else int(run_id)
            con.execute("DELETE FROM results WHERE name = ? AND run_id IS ?", (name, rid))
            con.execute("INSERT INTO results (name, run_id, created, data) VALUES (?, ?, ?, ?)",
                        (name, rid, _now(), data))

    def table(self, name: str, run_id: int | None = None) -> pd.DataFrame:
        """The DataFrame stored under ``name`` (and ``run_id``); ``KeyError`` when absent."""
        rows = self._read("SELECT data FROM results WHERE name = ? AND run_id IS ?",
                          (name, None if run_id is None else int(run_id)))
        if not rows:
            raise KeyError(f"{self.path}: no table {name!r}" + ("" if run_id is None else f" for run {run_id}"))
        return frame_from_json(rows[0][0])

    def tables(self) -> pd.DataFrame:
        """``name, run_id, created`` of every stored result table."""
        frame = self._frame("SELECT name, run_id, created FROM results ORDER BY name, run_id")
        frame["run_id"] = frame["run_id"].astype("Int64")
        return frame


# --------------------------------------------------------------------------------------------- helpers
_MISSING = object()


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _failure_row(failure: Sequence[Any]) -> tuple[str, str, str | None, str | None]:
    if isinstance(failure, str) or not 2 <= len(failure) <= 4:
        raise ValueError(f"a failure is (image_id, reason[, detail[, sha1]]), got {failure!r}")
    detail, sha1 = (list(failure[2:]) + [None, None])[:2]
    return str(failure[0]), str(failure[1]), None if detail is None else str(detail), None if sha1 is None else str(sha1)


def _crc32(image_id: str, blob: bytes) -> int:
    """CRC-32 of the image id and the vector blob (so a vector moved to another id fails too)."""
    return zlib.crc32(blob, zlib.crc32(image_id.encode("utf-8") + b"\0"))


def _text_column(series: pd.Series) -> list[str | None]:
    """Strings with missing values as None; integral floats (ids read with NaNs) without ``.0``."""
    if pd.api.types.is_float_dtype(series):
        values = [None if pd.isna(v) else (str(int(v)) if float(v).is_integer() else repr(float(v)))
                  for v in series]
        return values
    return [None if _is_missing(v) else str(v) for v in series.astype(object)]


def _bool_column(series: pd.Series) -> list[int | None]:
    out: list[int | None] = []
    for v in series.astype(object):
        if _is_missing(v):
            out.append(None)
        elif isinstance(v, str):
            low = v.strip().lower()
            if low not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(f"is_fashion must be boolean, got {v!r}")
            out.append(int(low in {"true", "1", "yes"}))
        else:
            out.append(int(bool(v)))
    return out


def _float_column(series: pd.Series) -> list[float | None]:
    values = pd.to_numeric(series, errors="coerce").astype("float64").to_numpy()
    return [None if math.isnan(v) else float(v) for v in values]


def open_store(store: FeatureStore | str | os.PathLike[str], *, readonly: bool = False) -> FeatureStore:
    """``store`` itself when it is a :class:`FeatureStore`, else the store at that path (``readonly``: for
    readers; a missing file is a :class:`StoreError`)."""
    return store if isinstance(store, FeatureStore) else FeatureStore(store, readonly=readonly)
