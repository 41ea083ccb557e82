"""Feature extraction on a Dask cluster: partitions of the catalogue embedded by workers into Parquet shards,
then ingested into the :class:`~cbir.store.FeatureStore` by the client.

::

    extract_distributed(catalog, model="mobilenet_v2", store="features.sqlite", cluster="local:2")

``cluster``: ``"local"`` / ``"local:N"`` starts a :class:`distributed.LocalCluster` (N worker processes, one
thread each; default: one per CPU), any scheduler address (``"tcp://host:8786"``) uses a running cluster
(SLURM through dask-jobqueue, Kubernetes, a cloud). The run is the in-process run: same identity (model,
layer, pooling, weights and their SHA-1, variant, ``labels_sha1``), hence the same ``run_id``, the same ids,
vectors and failures (:func:`cbir.extract.extract_features` and this module share the per-image loading: each
file read once, hashed and exactly those bytes decoded).

How a run goes:

1. one worker builds the extractor and returns its identity; the client starts (or resumes) the run, copies
   outcomes of a sibling run on the same file content, and plans what is left, exactly as in-process;
2. the catalogue is cut into fixed partitions (``partition_size`` rows in catalogue order, named by index and
   the SHA-1 of their ids, paths and catalogue hashes) and each partition with work left is one task; each
   worker builds the model once (a per-worker cache), decodes and embeds its partition and writes one Parquet
   shard atomically (temporary file, then ``os.replace``): ``image_id``, ``vector`` (fixed-size list of
   float32, null for a failure), ``sha1`` of the file bytes, ``reason`` and ``detail`` of failures, and the
   run's identity in the file's metadata;
3. the client ingests each shard as it completes (one transaction per shard, idempotent) with a progress bar
   over shards; a shard already on disk from an interrupted session (same run identity, same partition,
   same file content) is ingested without being computed again; a worker that dies has its tasks retried
   elsewhere by Dask (``retries``), so after any crash a rerun ends with exactly the vectors of an
   uninterrupted run.

The shard directory (default ``<store>.shards/run-<run_id>/``) is recorded in the run's stats
(``shard_dir``, ``n_shards``); :func:`iter_shard_vectors` streams a run's vectors from it one shard at a time,
for readers that should not go through SQLite. With a remote cluster the shard directory, the catalogue's
files and the weights must be reachable under the same paths from every worker (a shared file system).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from cbir.catalog import CatalogError, catalog_frame
from cbir.extract import (Loader, _finish, _identity, _load_one, _resolve_extractor, _Stream, _with_file_sha1,
                          ensure_features, prepare_run, whiten_for_catalog)
from cbir.extractors import get_entry
from cbir.shards import MANIFEST, SHARD_FORMAT, iter_shard_vectors, read_manifest, read_shard
from cbir.shards import shard_dir_for as _shard_dir_for
from cbir.shards import write_shard as _write_shard
from cbir.store import FeatureStore, canonical_json, open_store

__all__ = ["parse_cluster", "connect", "extract_distributed", "ensure_features_cluster", "read_shard", "iter_shard_vectors", "shard_dir_for",
           "ClusterSpec", "SHARD_FORMAT"]

log = logging.getLogger(__name__)

_LOCAL_RE = re.compile(r"^local(?::(\d+))?$")
_ADDRESS_RE = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$")


# -- cluster settings -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``cluster`` setting: ``kind`` ``"local"`` (``n_workers``; None = one per CPU) or
    ``"scheduler"`` (``address``)."""

    kind: str
    n_workers: int | None = None
    address: str | None = None

    def __str__(self) -> str:
        if self.kind == "local":
            return "local" if self.n_workers is None else f"local:{self.n_workers}"
        return str(self.address)


def parse_cluster(value: Any) -> ClusterSpec | None:
    """``None`` / ``""`` -> None (extract in-process); ``"local"``, ``"local:N"`` (N >= 1) or a scheduler
    address (``tcp://HOST:PORT``, also ``tls://``, ``ucx://``, ``ws://``, ``inproc://``) -> a
    :class:`ClusterSpec`. Anything else is a ``ValueError`` saying what is allowed (imports no Dask)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, ClusterSpec):
        return value
    allowed = "null (in-process), 'local', 'local:N' (N worker processes) or a scheduler address 'tcp://HOST:PORT'"
    if not isinstance(value, str):
        raise ValueError(f"cluster must be {allowed}; got {value!r}")
    text = value.strip()
    local = _LOCAL_RE.match(text)
    if local:
        n = None if local.group(1) is None else int(local.group(1))
        if n is not None and n < 1:
            raise ValueError(f"cluster {value!r}: the number of local workers must be >= 1")
        return ClusterSpec("local", n_workers=n)
    if _ADDRESS_RE.match(text):
        return ClusterSpec("scheduler", address=text)
    raise ValueError(f"cluster {value!r} is not understood; expected {allowed}")


def _is_client(value: Any) -> bool:
    """True for a connected :class:`distributed.Client` (passed as ``cluster``)."""
    return hasattr(value, "submit") and hasattr(value, "scheduler_info")


def _dashboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


@contextmanager
def connect(cluster: Any, *, threads_per_worker: int = 1, processes: bool = True,
            announce: Callable[[str], None] | None = None) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``cluster`` (see :func:`parse_cluster`), closed afterwards (with its
    LocalCluster when one was started here). ``announce`` (default: print to stderr) gets one line with the
    workers and the dashboard address, or ``dashboard unavailable`` when bokeh is not installed."""
    from distributed import Client, LocalCluster

    spec = parse_cluster(cluster)
    if spec is None:
        raise ValueError("connect: no cluster given (null means in-process extraction)")
    say = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    local = None
    if spec.kind == "local":
        n = spec.n_workers or os.cpu_count() or 1
        dashboard = _dashboard_available()
        local = LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=processes,
                             dashboard_address=":8787" if dashboard else None, silence_logs=logging.ERROR)
        client = Client(local)
    else:
        client = Client(spec.address, timeout="30s")
        dashboard = True
    try:
        workers = len(client.scheduler_info().get("workers", {}))
        link = client.dashboard_link if dashboard else None
        say(f"dask cluster {spec} ({workers} worker(s)): "
            + (f"dashboard {link}" if link else "dashboard unavailable (pip install bokeh to get one)"))
        yield client
    finally:
        client.close()
        if local is not None:
            local.close()


# -- shards -----------------------------------------------------------------------------------------
def shard_dir_for(store: FeatureStore | str | os.PathLike[str], run_id: int) -> Path:
    """The default shard directory of a run: ``<store file>.shards/run-<run_id>``."""
    return _shard_dir_for(store.path if isinstance(store, FeatureStore) else store, run_id)


def _partition_digest(ids: np.ndarray, paths: np.ndarray, expected: np.ndarray) -> str:
    """SHA-1 of a partition's ids, paths and catalogue hashes: a shard belongs to exactly these rows."""
    text = "\n".join(f"{i}\t{p}\t{e or ''}" for i, p, e in zip(ids, paths, expected))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# -- worker side -----------------------------------------------------------------------------------
_LOCAL_CACHE: dict[str, Any] = {}  # outside a Dask worker (direct calls)


def _worker_extractor(spec: Mapping[str, Any]) -> tuple[Any, bool, int]:
    """``(extractor, l2_here, n_builds)``: the extractor of ``spec`` built once per worker and kept on the
    worker object (``n_builds``: how many times this worker built it, 1 once built)."""
    try:
        from distributed import get_worker

        holder: Any = get_worker()
    except (ImportError, ValueError):
        holder = sys.modules[__name__]
    cache = getattr(holder, "_cbir_extractors", None)
    if cache is None:
        cache = {}
        setattr(holder, "_cbir_extractors", cache)
    key = canonical_json(dict(spec))
    if key not in cache:
        extractor, l2_here = _resolve_extractor(spec["model"], layer=spec["layer"], pooling=spec["pooling"],
                                                weights=spec["weights"], l2_normalize=spec["l2_normalize"])
        builds = cache.get(f"{key}#builds", 0) + 1
        cache[key], cache[f"{key}#builds"] = (extractor, l2_here), builds
    extractor, l2_here = cache[key]
    return extractor, l2_here, int(cache[f"{key}#builds"])


def _worker_identity(spec: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The run identity (as :func:`cbir.extract._identity` makes it) of ``spec``'s extractor, built on a worker."""
    extractor, l2_here, _ = _worker_extractor(spec)
    return _identity(extractor, variant=variant, l2_here=l2_here)


def _shard_usable(path: Path, meta_wanted: Mapping[str, str], todo_ids: set[str]) -> bool:
    """True when ``path`` is a readable shard of the same run identity and partition holding every id of
    ``todo_ids``."""
    if not path.is_file():
        return False
    try:
        meta, rows, _ = read_shard(path)
    except Exception:  # noqa: BLE001 - a damaged shard is recomputed
        return False
    same = all(meta.get(k) == v for k, v in meta_wanted.items() if k in ("identity_sha1", "partition_sha1"))
    return same and todo_ids <= set(rows["image_id"])


def _embed_partition(spec: Mapping[str, Any], *, ids: list[str], paths: list[Any], expected: list[str | None],
                     out: str, meta: Mapping[str, str], batch_size: int, decode_threads: int,
                     loader: Loader | None, pad_batches: bool, model_rows: int) -> dict[str, Any]:
    """Task: decode and embed one partition's ``ids`` and write its shard ``out``; returns what was done.
    ``model_rows``: the batch shape every batch is padded to (the same in every task of the run, so a
    compiled model never retraces for a short partition).

    A shard already at ``out`` for this run and partition (a retried task whose first attempt finished
    writing) is returned as is."""
    t_start = time.perf_counter()
    out_path = Path(out)
    worker = _worker_name()
    if _shard_usable(out_path, meta, set(ids)):
        return {"path": out, "computed": False, "worker": worker, "pid": os.getpid(), "builds": None,
                "seconds_decode": 0.0, "seconds_model": 0.0, "n_vectors": None, "n_failures": None}
    extractor, l2_here, builds = _worker_extractor(spec)
    size = int(extractor.input_size)
    stream = _Stream(store=None, run_id=None, extractor=extractor, l2_here=l2_here, loader=loader,
                     batch_size=batch_size, workers=0, prefetch=0, pad_batches=pad_batches)  # type: ignore[arg-type]
    ids_arr = np.asarray(ids, dtype=object)
    out_ids, out_sha1, reasons, details, ok_rows, vectors = [], [], [], [], [], []
    t_decode = t_model = 0.0
    def load_batch(i: int) -> list[Any]:
        return [_load_one(loader, p, size, e) for p, e in zip(paths[i:i + batch_size], expected[i:i + batch_size])]

    with ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="cbir-decode") as pool:
        starts = list(range(0, len(ids), batch_size))
        pending = {j: pool.submit(load_batch, starts[j]) for j in range(min(2, len(starts)))}
        for j, i in enumerate(starts):
            t0 = time.perf_counter()
            results = pending.pop(j).result()
            if j + 2 < len(starts):  # keep the decoders two batches ahead of the model
                pending[j + 2] = pool.submit(load_batch, starts[j + 2])
            t1 = time.perf_counter()
            batch_ids = ids_arr[i:i + batch_size]
            ok, X, fails = stream.embed(results, batch_ids, model_rows)
            t2 = time.perf_counter()
            t_decode += t1 - t0
            t_model += t2 - t1
            failed = {f[0]: f for f in fails}
            ok_set = set(ok)
            for k, image_id in enumerate(batch_ids):
                out_ids.append(str(image_id))
                if k in ok_set:
                    ok_rows.append(len(out_ids) - 1)
                    out_sha1.append(results[k][1])
                    reasons.append(None)
                    details.append(None)
                else:
                    _, reason, detail, sha1 = failed[image_id]
                    out_sha1.append(sha1)
                    reasons.append(reason)
                    details.append(detail)
            vectors.append(X)
    dim = int(extractor.dim)
    X_all = np.concatenate(vectors) if vectors else np.empty((0, dim), np.float32)
    _write_shard(out_path, out_ids, X_all, ok_rows, out_sha1, reasons, details, dict(meta, dim=str(dim),
                 n_rows=str(len(out_ids)), worker=worker), dim)
    return {"path": out, "computed": True, "worker": worker, "pid": os.getpid(), "builds": builds,
            "seconds_decode": round(t_decode, 4), "seconds_model": round(t_model, 4),
            "seconds_task": round(time.perf_counter() - t_start, 4),
            "n_vectors": len(ok_rows), "n_failures": len(out_ids) - len(ok_rows)}


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


# -- client side -----------------------------------------------------------------------------------
def _ingest(store: FeatureStore, run_id: int, path: Path, todo_ids: set[str]) -> tuple[int, int]:
    """Write the shard's outcomes for ``todo_ids`` in one transaction (INSERT OR REPLACE: idempotent);
    returns ``(n_vectors, n_failures)``."""
    _, rows, X = read_shard(path)
    wanted = rows["image_id"].isin(todo_ids).to_numpy()
    has = rows["has_vector"].to_numpy()
    vec_rows = np.flatnonzero(has)
    keep_vec = wanted[vec_rows]
    vec = rows.iloc[vec_rows[keep_vec]]
    fail = rows[wanted & ~has]
    failures = [(r.image_id, r.reason, r.detail, r.sha1) for r in fail.itertuples(index=False)]
    store.put_features(run_id, vec["image_id"].tolist(), X[keep_vec], sha1=vec["sha1"].tolist(), failures=failures)
    return int(keep_vec.sum()), len(failures)


def _content_matches(path: Path, current: Mapping[str, str | None], todo_ids: set[str]) -> bool:
    """True when every ``todo_ids`` row of the shard came from the current file content (a vector: its sha1
    equals the current one; a failure: equal, None for unreadable then and now)."""
    _, rows, _ = read_shard(path)
    for r in rows[rows["image_id"].isin(todo_ids)].itertuples(index=False):
        now = current.get(r.image_id)
        if r.has_vector and (r.sha1 is None or r.sha1 != now):
            return False
        if not r.has_vector and r.sha1 != now:
            return False
    return True


def extract_distributed(
    catalog: Any,
    *,
    model: str,
    layer: str | None = None,
    pooling: str | None = None,
    weights: Any = "imagenet",
    store: FeatureStore | str | os.PathLike[str],
    cluster: Any = "local",
    client: Any = None,
    batch_size: int = 32,
    workers: int = 2,
    l2_normalize: bool = False,
    progress: bool = True,
    name: str | None = None,
    variant: str = "original",
    loader: Loader | None = None,
    pad_batches: bool = True,
    partition_size: int = 256,
    shard_dir: str | os.PathLike[str] | None = None,
    retries: int = 3,
    prefetch: int | None = None,
    vectors: str = "store",
) -> int:
    """Extract one vector per catalogue image on a Dask cluster into ``store``; returns the run id (the
    in-process run's: :func:`cbir.extract.extract_features` has the same arguments and outcomes).

    ``cluster``: ``"local"``, ``"local:N"`` or a scheduler address (:func:`parse_cluster`), or a connected
    :class:`distributed.Client` (also as ``client``). ``model``: a registered backbone or descriptor name (each worker builds it once).
    ``workers``: decoding threads per Dask worker. ``partition_size``: catalogue rows per task and shard.
    ``shard_dir``: default :func:`shard_dir_for`. ``retries``: Dask retries of a failing task (a task whose
    worker died is rescheduled by the scheduler, up to ``distributed.scheduler.allowed-failures``).
    ``loader`` (and ``variant``) as in-process; it is sent to the workers, so it must pickle.
    ``vectors``: ``"store"`` ingests the shards into ``store`` (the default); ``"shards"`` leaves the vectors
    and failures in the shards, for catalogues too big to copy into SQLite: the store records the run, its
    labels and its shard directory, and its readers (``features``, ``iter_features``, ``failures``, the index
    builder, ...) stream from the shards (:class:`cbir.shards.ShardSet`). Such a shard holds its whole
    partition, so a partition with any image to (re-)extract is computed again whole, and the run's
    ``_manifest.json`` (written when it completes) decides which shards are current.
    Stats recorded with the run: ``shard_dir``, ``n_shards``, ``n_shards_computed``, ``n_shards_reused``,
    ``cluster``, ``n_workers``, ``seconds``, ``images_per_second``, the workers' decode and model seconds.
    """
    del prefetch  # accepted for symmetry with extract_features; workers decode two batches ahead
    if vectors not in ("store", "shards"):
        raise ValueError(f"vectors must be 'store' (ingest the shards into the store) or 'shards' (keep them "
                         f"there), got {vectors!r}")
    if batch_size < 1 or partition_size < 1:
        raise ValueError(f"batch_size and partition_size must be >= 1, got {batch_size}, {partition_size}")
    if not isinstance(model, str):
        raise TypeError("with a cluster, model must be a registered backbone or descriptor name (each worker "
                        f"builds it once), got {type(model).__name__}")
    get_entry(model)  # an unknown name fails here, before any cluster starts
    df = catalog_frame(catalog)
    if len(df) == 0:
        where = getattr(catalog, "root", None) or "the catalogue"
        raise CatalogError(f"{where}: no usable image to extract; nothing was written (see `cbir catalog check`)")
    store = open_store(store)
    weights = str(weights) if isinstance(weights, os.PathLike) else weights
    spec = {"model": model, "layer": layer, "pooling": pooling, "weights": weights,
            "l2_normalize": bool(l2_normalize)}
    if client is None and _is_client(cluster):
        client = cluster
    if client is not None:
        return _extract_with_client(client, df, spec, store=store, batch_size=batch_size, workers=workers,
                                    progress=progress, name=name, variant=variant, loader=loader,
                                    pad_batches=pad_batches, partition_size=partition_size, shard_dir=shard_dir,
                                    retries=retries, cluster_label="client", vectors=vectors)
    with connect(cluster) as connected:
        return _extract_with_client(connected, df, spec, store=store, batch_size=batch_size, workers=workers,
                                    progress=progress, name=name, variant=variant, loader=loader,
                                    pad_batches=pad_batches, partition_size=partition_size, shard_dir=shard_dir,
                                    retries=retries, cluster_label=str(parse_cluster(cluster)), vectors=vectors)


def _extract_with_client(client: Any, df: pd.DataFrame, spec: dict[str, Any], *, store: FeatureStore,
                         batch_size: int, workers: int, progress: bool, name: str | None, variant: str,
                         loader: Loader | None, pad_batches: bool, partition_size: int,
                         shard_dir: str | os.PathLike[str] | None, retries: int, cluster_label: str,
                         vectors: str = "store") -> int:
    from distributed import as_completed
    from tqdm.auto import tqdm

    identity = client.submit(_worker_identity, spec, variant, pure=False, retries=retries).result()
    remote = SimpleNamespace(identity=lambda: dict(identity), input_size=identity["input_size"],
                             dim=identity["dim"])
    in_shards = vectors == "shards"
    where = (lambda rid: Path(shard_dir) if shard_dir is not None else shard_dir_for(store, rid)) if in_shards else None
    p = prepare_run(store, df, remote, variant=variant, l2_here=False, name=name, workers=workers, shards=where)
    if not p.todo.any():
        return p.run_id
    run_id, ids, paths, expected, todo, n_replaced = p.run_id, p.ids, p.paths, p.expected, p.todo, p.n_replaced
    start = time.perf_counter()
    if in_shards:
        out_dir = Path(store.shard_dir(run_id))
    else:
        out_dir = Path(shard_dir) if shard_dir is not None else shard_dir_for(store, run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_identity = canonical_json(store.run(run_id)["params"])
    identity_sha1 = hashlib.sha1(run_identity.encode("utf-8")).hexdigest()
    listed = ((read_manifest(out_dir) or {}).get("shards", [])) if in_shards else []

    partitions = []  # (index, shard path, rows slice, todo ids, meta, shard files it may reuse)
    final: dict[int, str] = {}  # shards mode: each partition's current shard
    for index, lo in enumerate(range(0, len(ids), partition_size)):
        sl = slice(lo, lo + partition_size)
        digest = _partition_digest(ids[sl], paths[sl], expected[sl])
        prefix = f"part-{index:06d}-{digest[:12]}"
        path = out_dir / f"{prefix}.parquet"
        meta = {"format": SHARD_FORMAT, "identity": run_identity, "identity_sha1": identity_sha1,
                "run_id": str(run_id), "partition": str(index), "partition_sha1": digest}
        if in_shards:  # a shard holds its whole partition: any row to do redoes it, unless a usable one exists
            current = [n for n in listed if n == path.name or n.startswith(prefix + "-")]
            if current and not todo[sl].any():
                final[index] = current[0]
                continue
            partitions.append((index, path, sl, set(ids[sl]), meta, sorted(out_dir.glob(f"{prefix}*.parquet"))))
        else:
            partitions.append((index, path, sl, set(ids[sl][todo[sl]]), meta, [path]))
    live = [p for p in partitions if p[3]]
    # shards left by an interrupted session: reuse those of the same run, partition and file content
    existing = []
    for index, path, sl, todo_ids, meta, candidates in live:
        usable = [c for c in candidates if _shard_usable(c, meta, todo_ids)]
        if usable:
            existing.append((index, usable, sl, todo_ids, meta))
    if existing:
        rows = np.zeros(len(ids), dtype=bool)
        for _, _, sl, _, _ in existing:
            rows[sl] = True
        current = dict(zip(ids, _with_file_sha1(paths, expected, rows, workers)))
        matching = []
        for index, usable, sl, todo_ids, meta in existing:
            found = next((c for c in usable if _content_matches(c, current, todo_ids)), None)
            if found is not None:
                matching.append((index, found, sl, todo_ids, meta))
        existing = matching
    reuse = {p[0] for p in existing}

    stats: dict[str, Any] = {"seconds_decode": 0.0, "seconds_model": 0.0, "n_vectors_written": 0,
                             "n_failures_written": 0, "seconds_write": 0.0}
    computed: list[dict[str, Any]] = []
    bar = tqdm(total=len(live), disable=not progress, unit="shard", dynamic_ncols=True,
               desc=f"{spec['model']} run {run_id} (dask)")

    def ingest(index: int, path: Path, todo_ids: set[str]) -> None:
        if in_shards:  # the shard is the store of record
            final[index] = path.name
            bar.update(1)
            return
        t0 = time.perf_counter()
        n_vec, n_fail = _ingest(store, run_id, path, todo_ids)
        stats["seconds_write"] += time.perf_counter() - t0
        stats["n_vectors_written"] += n_vec
        stats["n_failures_written"] += n_fail
        bar.update(1)

    futures: dict[Any, tuple] = {}
    try:
        for index, path, sl, todo_ids, meta, _ in live:
            if index in reuse:
                continue
            if in_shards:  # never touch a shard the manifest may still list: compute into a fresh name
                if path.exists():
                    path = path.with_name(f"{path.stem}-{uuid.uuid4().hex[:8]}.parquet")
                part_todo = np.ones(len(ids[sl]), dtype=bool)
            else:
                path.unlink(missing_ok=True)  # stale (other content, damaged): a shard found by the task is this session's
                part_todo = todo[sl]
            future = client.submit(
                _embed_partition, spec, ids=ids[sl][part_todo].tolist(), paths=paths[sl][part_todo].tolist(),
                expected=expected[sl][part_todo].tolist(), out=str(path), meta=meta, batch_size=batch_size,
                decode_threads=workers, loader=loader, pad_batches=pad_batches, retries=retries, pure=False,
                model_rows=min(batch_size, int(todo.sum())),
                key=f"cbir-shard-{identity_sha1[:10]}-{index:06d}-{uuid.uuid4().hex[:6]}")
            futures[future] = (index, path, todo_ids)
        for index, path, _, todo_ids, _ in existing:  # ingested while the workers compute the rest
            ingest(index, path, todo_ids)
        for future in as_completed(list(futures)):
            result = future.result()
            computed.append(result)
            ingest(*futures[future])
    except BaseException:
        for future in futures:
            future.cancel()
        try:
            store.set_status(run_id, "interrupted")
        except Exception:  # noqa: BLE001 - never hide the original error
            pass
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if in_shards:
        current_names = [final[k] for k in sorted(final)]
    else:
        current_names = [p[1].name for p in partitions if p[1].is_file()]
    _write_manifest(out_dir, current_names, identity_sha1)
    counts = ({"n_features": len(store.done_ids(run_id)), "n_failures": len(store.failed_ids(run_id))}
              if in_shards else {})
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    done = [r for r in computed if r.get("computed")]
    _finish(store, run_id, ids, n_images=len(ids), n_processed=int(todo.sum()), n_vectors_replaced=n_replaced,
            batch_size=int(batch_size), workers=int(workers), partition_size=int(partition_size),
            cluster=cluster_label, n_workers=n_workers, shard_dir=str(out_dir.resolve()),
            n_shards=len(current_names), n_shards_computed=len(done), n_shards_reused=len(existing),
            max_model_builds_per_worker=max((int(r["builds"]) for r in done if r.get("builds")), default=0),
            seconds=round(seconds, 4), images_per_second=round(int(todo.sum()) / seconds, 3) if seconds else None,
            worker_seconds_decode=round(sum(r["seconds_decode"] for r in done), 4),
            worker_seconds_model=round(sum(r["seconds_model"] for r in done), 4),
            seconds_decode_wait=round(sum(r["seconds_decode"] for r in done) / n_workers, 4),
            seconds_model=round(sum(r["seconds_model"] for r in done) / n_workers, 4), **counts,
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()
               if k not in ("seconds_decode", "seconds_model")})
    return run_id


def ensure_features_cluster(catalog: Any, *, store: FeatureStore | str | os.PathLike[str], model: Any,
                            cluster: Any = None, pca_whiten: bool = False, **kwargs: Any) -> int:
    """:func:`cbir.extract.ensure_features` with a ``cluster``: None (or ``""``) extracts in-process exactly as
    it does; ``"local"``, ``"local:N"`` or a scheduler address extracts on Dask (:func:`extract_distributed`),
    the same run with the same outcomes (``vectors`` as :func:`extract_distributed`'s; ``"shards"`` needs a
    cluster). ``pca_whiten`` and the other keywords as there."""
    if not _is_client(cluster) and parse_cluster(cluster) is None:
        if kwargs.pop("vectors", "store") != "store":
            raise ValueError("vectors='shards' needs a cluster (cluster='local', 'local:N' or 'tcp://HOST:PORT'): "
                             "only Dask workers write shards")
        return ensure_features(catalog, store=store, model=model, pca_whiten=pca_whiten, **kwargs)
    kwargs.pop("prefetch", None)
    run_id = extract_distributed(catalog, store=store, model=model, cluster=cluster, **kwargs)
    return whiten_for_catalog(store, run_id, catalog) if pca_whiten else run_id


def _write_manifest(out_dir: Path, names: list[str], identity_sha1: str) -> None:
    """List the run's current shards (atomically) and remove shard files of older partitionings."""
    for stale in out_dir.glob("part-*.parquet*"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    tmp = out_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"format": SHARD_FORMAT, "identity_sha1": identity_sha1, "shards": names},
                              indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)
