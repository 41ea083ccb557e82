"""Parquet feature shards: the files Dask workers write (:mod:`cbir.distributed`) and the reader that serves a
run's vectors straight from them (:class:`ShardSet`), for catalogues too big to copy into SQLite.

A shard holds one catalogue partition: columns ``image_id``, ``vector`` (fixed-size list of float32, null for
a failure), ``sha1`` (of the image file bytes), ``reason`` and ``detail`` (of a failure), and the run's
identity in the file's key/value metadata (keys ``cbir.*``). A run's directory lists its current shards in
``_manifest.json``, written atomically when the run completes.

A run whose vectors stay in its shards (``vectors="shards"``: :meth:`cbir.store.FeatureStore.keep_vectors_in_shards`)
has no rows in the store's ``features`` / ``failures`` tables; the store records the shard directory and its
readers (``features``, ``iter_features``, ``done_ids``, ``content_sha1``, ``failures``, ...) go through a
:class:`ShardSet`: the ids, hashes and failures of every listed shard are read once (no vector), and vectors
are read one shard at a time (a shard's vector column, about ``partition_size x dim x 4`` bytes, is the only
extra memory), each shard at most once per sequential pass.

This module imports nothing of cbir.
"""
from __future__ import annotations

import json
import os
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["SHARD_FORMAT", "SHARD_COLUMNS", "MANIFEST", "ShardError", "ShardSet", "shard_dir_for", "write_shard",
           "read_shard", "read_manifest", "shard_files", "iter_shard_vectors"]

SHARD_FORMAT = "1"
"""Version of the shard layout (columns and metadata keys)."""
SHARD_COLUMNS = ("image_id", "vector", "sha1", "reason", "detail")
ROW_GROUP_BYTES = 256 * 1024
"""Vector bytes per Parquet row group (51 rows of 1,280-d float32, 256 of 256-d; 16 to 4,096 rows): a reader
that needs a few rows of a shard reads only their row groups."""


def row_group_rows(dim: int) -> int:
    """Rows per row group of a shard of ``dim``-d vectors (:data:`ROW_GROUP_BYTES` of vectors, 16 to 4,096)."""
    return int(np.clip(ROW_GROUP_BYTES // max(1, 4 * int(dim)), 16, 4096))
MANIFEST = "_manifest.json"
META_PREFIX = "cbir."
_OUTCOME_COLUMNS = ["image_id", "sha1", "reason", "detail"]


class ShardError(RuntimeError):
    """A run's shards are missing, unreadable or inconsistent (the message names the file)."""


def shard_dir_for(store_path: str | os.PathLike[str], run_id: int) -> Path:
    """The default shard directory of a run: ``<store file>.shards/run-<run_id>``."""
    path = Path(store_path)
    return path.with_name(path.name + ".shards") / f"run-{int(run_id)}"


# -- one shard ---------------------------------------------------------------------------------------
def write_shard(path: Path, ids: list[str], X: np.ndarray, ok: list[int], sha1: list[str | None],
                reasons: list[str | None], details: list[str | None], meta: Mapping[str, str], dim: int) -> None:
    """One shard, atomically: a temporary file beside ``path``, then ``os.replace``. ``X`` holds the vectors
    of rows ``ok`` (in order); the other rows are failures (``reasons``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(ids)
    values = np.zeros((n, dim), dtype=np.float32)
    values[ok] = X
    mask = np.ones(n, dtype=bool)
    mask[ok] = False
    vector = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), dim,
                                               mask=pa.array(mask))
    table = pa.table({"image_id": pa.array(ids, pa.string()), "vector": vector,
                      "sha1": pa.array(sha1, pa.string()), "reason": pa.array(reasons, pa.string()),
                      "detail": pa.array(details, pa.string())})
    table = table.replace_schema_metadata({f"{META_PREFIX}{k}": str(v) for k, v in meta.items()})
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        # float32 embeddings do not compress: the vectors are stored plain, the text columns with snappy
        pq.write_table(table, tmp, row_group_size=row_group_rows(dim), use_dictionary=False,
                       compression={"image_id": "snappy", "vector": "none", "sha1": "snappy", "reason": "snappy",
                                    "detail": "snappy"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed


def _metadata(table: object) -> dict[str, str]:
    raw = table.schema.metadata or {}  # type: ignore[attr-defined]
    return {k.decode()[len(META_PREFIX):]: v.decode() for k, v in raw.items() if k.decode().startswith(META_PREFIX)}


def _vector_matrix(table: object, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(has[n] bool, values[n, dim] float32)`` of a table's ``vector`` column (zeros where null)."""
    vector = table.column("vector").combine_chunks()  # type: ignore[attr-defined]
    has = ~np.asarray(vector.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    flat = vector.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    n = len(has)
    if dim <= 0 or flat.size != n * dim:
        raise ValueError(f"{flat.size} values for {n} rows of dimension {dim}")
    return has, flat.reshape(n, dim)


def read_shard(path: str | os.PathLike[str]) -> tuple[dict[str, str], pd.DataFrame, np.ndarray]:
    """``(metadata, rows, X)`` of one shard: ``metadata`` the ``cbir.*`` keys (prefix dropped), ``rows`` a
    DataFrame ``image_id, sha1, reason, detail, has_vector``, ``X`` float32[n_vectors, dim] of the rows with
    ``has_vector`` (in row order)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = _metadata(table)
    dim = int(meta.get("dim", 0))
    if dim:
        has, values = _vector_matrix(table, dim)
        X = values[has]
    else:
        has = ~np.asarray(table.column("vector").is_null().to_numpy(zero_copy_only=False), dtype=bool)
        X = np.empty((0, 0), np.float32)
    rows = pd.DataFrame({c: pd.Series(table.column(c).to_pylist(), dtype=object)  # None stays None
                         for c in _OUTCOME_COLUMNS})
    rows["has_vector"] = has
    return meta, rows, X


# -- a run's directory ---------------------------------------------------------------------------------
def read_manifest(shard_dir: str | os.PathLike[str]) -> dict | None:
    """The run's ``_manifest.json`` (``format``, ``identity_sha1``, ``shards``), None when there is none yet."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        names = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{path}: unreadable shard manifest ({exc}); rerun the extraction to rewrite it") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n and "\\" not in n for n in names):
        raise ShardError(f"{path}: the manifest's 'shards' must be a list of file names in its directory")
    return manifest


def shard_files(shard_dir: str | os.PathLike[str]) -> list[Path]:
    """The run's current shards: those the manifest lists (written when a run completes), else every
    ``part-*.parquet`` (a run still being extracted)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if manifest is not None:
        return [shard_dir / name for name in manifest["shards"]]
    return sorted(shard_dir.glob("part-*.parquet"))


def iter_shard_vectors(shard_dir: str | os.PathLike[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream a run's vectors from its shard directory, one shard at a time (memory: one shard):
    ``(ids[n] str, X[n, dim] float32, sha1[n] object)`` per shard, in partition order; failures left out.

    The directory is a run's ``stats["shard_dir"]``. Every id appears once: each catalogue row belongs to one
    partition, and a completed run's manifest lists only its current shards."""
    for path in shard_files(shard_dir):
        _, rows, X = read_shard(path)
        keep = rows["has_vector"].to_numpy()
        yield (rows["image_id"].to_numpy(dtype=str)[keep], X,
               rows["sha1"].to_numpy(dtype=object)[keep])


def _stamp(path: Path) -> tuple | None:
    """A shard file's name, size, modification time and inode (None when missing): changes when it is rewritten."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (path.name, st.st_size, st.st_mtime_ns, st.st_ino)


class ShardSet:
    """A run's outcomes served from the shards its manifest lists: the reader behind a store run whose
    vectors stay in shards.

    ``ShardSet(shard_dir, required=True)``: a directory without a manifest is an error when ``required`` (a
    complete run), else an empty set (an extraction not finished yet: nothing is visible until its manifest is
    written). Opening reads the ids, hashes and failures of every shard (no vector); vectors are read per
    shard, on demand. Every shard must carry the manifest's run identity and every id must appear once."""

    def __init__(self, shard_dir: str | os.PathLike[str], *, required: bool = True) -> None:
        import pyarrow.parquet as pq

        self.dir = Path(shard_dir)
        manifest = read_manifest(self.dir)
        if manifest is None and required:
            raise ShardError(f"{self.dir}: no {MANIFEST}: the run's shard directory is missing or was never "
                             "completed; rerun the extraction (complete shards are reused)")
        names = [] if manifest is None else manifest["shards"]
        self.identity_sha1 = None if manifest is None else manifest.get("identity_sha1")
        self.files = [self.dir / name for name in names]
        self.dim = 0
        ids, sha1, shard, row, fails, prints, stamps, n_rows = [], [], [], [], [], [], [], []
        for s, path in enumerate(self.files):
            try:
                table = pq.read_table(path, columns=_OUTCOME_COLUMNS)
            except FileNotFoundError:
                raise ShardError(f"{path}: a shard the manifest lists is missing; rerun the extraction to "
                                 "recompute it") from None
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise ShardError(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); delete it and rerun "
                                 "the extraction to recompute it") from None
            meta = _metadata(table)
            if self.identity_sha1 is not None and meta.get("identity_sha1") != self.identity_sha1:
                raise ShardError(f"{path}: written for another run identity than its manifest's; rerun the "
                                 "extraction")
            dim = int(meta.get("dim", 0) or 0)
            if self.dim and dim and dim != self.dim:
                raise ShardError(f"{path}: {dim}-d vectors where the run's other shards hold {self.dim}-d ones")
            self.dim = self.dim or dim
            cols = {c: np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=object)  # None stays None
                    for c in _OUTCOME_COLUMNS}
            vec = np.array([r is None for r in cols["reason"]], dtype=bool)  # no failure reason: a vector (checked on read)
            ids.append(cols["image_id"][vec])
            sha1.append(cols["sha1"][vec])
            shard.append(np.full(int(vec.sum()), s, dtype=np.int32))
            row.append(np.flatnonzero(vec).astype(np.int64))
            fails.append(pd.DataFrame({c: pd.Series(cols[c][~vec], dtype=object) for c in _OUTCOME_COLUMNS}))
            n_rows.append(len(vec))
            prints.append(zlib.crc32(repr(_stamp(path)).encode()))
            stamps.append(_stamp(path))
        self.ids = np.concatenate(ids).astype(str) if ids else np.zeros(0, dtype=str)
        self.sha1 = np.concatenate(sha1) if sha1 else np.zeros(0, dtype=object)
        self._shard = np.concatenate(shard) if shard else np.zeros(0, dtype=np.int32)
        self._row = np.concatenate(row) if row else np.zeros(0, dtype=np.int64)
        self._fingerprints = np.array(prints, dtype=np.int64)
        self._stamps = stamps
        self._n_rows = n_rows
        self.failures = (pd.concat(fails, ignore_index=True) if fails
                         else pd.DataFrame({c: pd.Series([], dtype=object) for c in _OUTCOME_COLUMNS}))
        self.index = pd.Index(self.ids.astype(object))
        both = pd.Index(np.concatenate([self.ids.astype(object), self.failures["image_id"].to_numpy(dtype=object)]))
        if not both.is_unique:
            dup = both[both.duplicated()].unique()[:5].tolist()
            raise ShardError(f"{self.dir}: image id(s) {dup} appear in more than one shard; rerun the extraction "
                             "to rewrite the manifest")
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def unchanged(self) -> bool:
        """True while every listed shard is the file that was opened (same size, time and inode)."""
        return all(_stamp(path) == stamp for path, stamp in zip(self.files, self._stamps))

    def content_sha1(self, *, failures: bool = False) -> dict[str, str | None]:
        """``image_id -> sha1`` of each vector's (``failures=True``: each failure's) file content."""
        if failures:
            return dict(zip(self.failures["image_id"], self.failures["sha1"]))
        return dict(zip(self.ids.tolist(), self.sha1.tolist()))

    def fingerprints(self) -> dict[str, int]:
        """``image_id -> fingerprint of its shard file`` (name, size, modification time): changes when the
        shard holding the vector is rewritten, without reading any vector."""
        return dict(zip(self.ids.tolist(), self._fingerprints[self._shard].tolist()))

    def _vectors(self, s: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (all: None) of shard ``s`` as float32[len(rows), dim] (failures as zeros). A read of a
        quarter of the shard or more reads it whole and keeps it (the last shard read whole is kept); fewer
        rows read only their row groups."""
        import pyarrow.parquet as pq

        if self._cache is not None and self._cache[0] == s:
            return self._cache[1] if rows is None else self._cache[1][rows]
        if rows is not None and 4 * len(rows) < self._n_rows[s]:
            return self._some_rows(s, np.asarray(rows, dtype=np.int64))
        values = self._checked(s, lambda path: pq.read_table(path, columns=["vector", "reason"]))
        self._cache = (s, values)
        return values if rows is None else values[rows]

    def _some_rows(self, s: int, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of shard ``s``, reading only the row groups that hold them."""
        import pyarrow.parquet as pq

        layout = {}

        def read(path: Path) -> object:
            pf = pq.ParquetFile(path)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
            layout.update(sizes=sizes, starts=starts, groups=groups)
            return pf.read_row_groups(groups.tolist(), columns=["vector", "reason"])

        values = self._checked(s, read)
        sizes, starts, groups = layout["sizes"], layout["starts"], layout["groups"]
        offset = np.zeros(len(starts), dtype=np.int64)  # where each read group starts in ``values``
        offset[groups] = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])[:-1]])
        group_of = np.searchsorted(starts, rows, side="right") - 1
        return values[offset[group_of] + rows - starts[group_of]]

    def _checked(self, s: int, read: Callable[[Path], object]) -> np.ndarray:
        """The vectors (float32[n, dim], failures as zeros) of the ``vector`` / ``reason`` table ``read(path)``
        gives for shard ``s``; a missing or unreadable shard, or one whose vector rows are not exactly its rows
        without a failure reason, is a :class:`ShardError` naming the file."""
        path = self.files[s]
        try:
            table = read(path)
            has, values = _vector_matrix(table, self.dim)
        except FileNotFoundError:
            raise ShardError(f"{path}: a shard the manifest lists is missing; rerun the extraction") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise ShardError(f"{path}: unreadable vectors ({type(exc).__name__}: {exc}); delete the shard and "
                             "rerun the extraction to recompute it") from None
        no_reason = np.asarray(table.column("reason").is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if not np.array_equal(has, no_reason):
            raise ShardError(f"{path}: rows with a vector and rows with a failure reason disagree: the shard is "
                             "damaged; delete it and rerun the extraction")
        return values

    def take(self, positions: np.ndarray) -> np.ndarray:
        """float32[len(positions), dim]: the vectors at ``positions`` (into :attr:`ids`), each shard read once
        (shards in order), checked finite."""
        positions = np.asarray(positions, dtype=np.int64)
        X = np.empty((len(positions), self.dim), dtype=np.float32)
        if not len(positions):
            return X
        shard = self._shard[positions]
        order = np.argsort(shard, kind="stable")
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for group in np.split(order, bounds):
            s = int(shard[group[0]])
            X[group] = self._vectors(s, self._row[positions[group]])
            bad = ~np.isfinite(X[group]).all(axis=1)
            if bad.any():
                raise ShardError(f"{self.files[s]}: vector(s) of {self.ids[positions[group][bad]][:10].tolist()} "
                                 "hold non-finite values: the shard is damaged; delete it and rerun the extraction")
        return X

    def positions(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Positions of ``ids`` in :attr:`ids`; a ``KeyError`` names those without a vector."""
        at = self.index.get_indexer(pd.Index(np.asarray(ids).astype(str).astype(object)))
        if (at < 0).any():
            missing = np.asarray(ids).astype(str)[at < 0]
            raise KeyError(f"{self.dir}: no vector for {len(missing)} id(s), e.g. {missing[:5].tolist()}")
        return at

    def iter_chunks(self, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, X)`` chunks of at most ``chunk`` rows, in shard order, each shard read once."""
        for start in range(0, len(self.ids), int(chunk)):
            positions = np.arange(start, min(start + int(chunk), len(self.ids)))
            yield self.ids[positions], self.take(positions)
