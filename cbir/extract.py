"""Batched, streaming, resumable feature extraction into the :class:`~cbir.store.FeatureStore`.

A thread pool decodes and resizes the next batches (at most ``prefetch`` batches ahead, so memory stays
flat whatever the catalogue size) while the model runs the current one; each batch's vectors and
failures are written in one transaction; ids already in the store are skipped, so a run interrupted at
any point (even ``kill -9``) resumes where it stopped and ends with exactly the vectors of an
uninterrupted run. Works with any Keras backend: plain numpy batches in, numpy vectors out.

A vector belongs to the file content it was computed from: each is stored with the SHA-1 of exactly the
bytes decoded, and an id counts as done only when that SHA-1 equals the current file's (the catalogue's
``sha1`` column when it has one, else the file is hashed). Vectors of other content (another catalogue
under the same ids, an edited file, or a store written before cbir recorded hashes) are re-extracted and
replaced, and what was computed from them (neighbour sets, tables, whitened runs) is dropped.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cbir.catalog import CatalogError, catalog_frame, labels_sha1
from cbir.images import ImageError, decode_bytes, read_file_bytes
from cbir.postprocess import get_postprocess, whitening_components
from cbir.shards import MANIFEST
from cbir.store import FeatureStore, StoreError, canonical_json, open_store

__all__ = ["extract_features", "ensure_features", "export_features", "load_run_features", "extraction_failures",
           "whiten_run", "whiten_for_catalog", "loaded_library_versions", "ExtractionError"]

log = logging.getLogger(__name__)


class ExtractionError(RuntimeError):
    """An extraction produced no vector at all (every image failed); the run is recorded as ``failed``."""

Loader = Callable[[str, int], np.ndarray]
"""``loader(path, size) -> uint8[size, size, 3]``; raises :class:`~cbir.images.ImageError` for bad files."""

_VERSION_MODULES = ("numpy", "pandas", "PIL", "keras", "tensorflow", "jax", "torch", "sklearn", "cv2")


def loaded_library_versions() -> dict[str, str]:
    """Versions of Python, cbir and the numeric libraries already imported (nothing is imported here)."""
    import cbir

    versions = {"python": platform.python_version(), "cbir": cbir.__version__}
    for name in _VERSION_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__version__", None):
            versions[name] = str(module.__version__)
    if "keras" in sys.modules:
        try:
            versions["keras_backend"] = str(sys.modules["keras"].backend.backend())
        except Exception:  # pragma: no cover - a broken keras install must not stop an extraction
            pass
    return versions


@functools.lru_cache(maxsize=2)
def _cached_extractor(name: str, layer: str | None, pooling: str | None, weights: str, l2_normalize: bool) -> Any:
    from cbir.extractors import build_extractor

    return build_extractor(name, layer=layer, pooling=pooling, weights=weights, l2_normalize=l2_normalize)


def _resolve_extractor(model: Any, *, layer: str | None, pooling: str | None, weights: Any,
                       l2_normalize: bool) -> tuple[Any, bool]:
    """``(extractor, normalise_here)``: a name is built by :func:`cbir.extractors.build_extractor`
    (which L2-normalises itself); an instance is used as is and normalised here when asked."""
    if isinstance(model, str):
        weights = str(weights) if isinstance(weights, os.PathLike) else weights
        return _cached_extractor(model, layer, pooling, weights, bool(l2_normalize)), False
    for attr in ("input_size", "dim", "identity"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a backbone name or an Extractor (missing {attr!r}), got {model!r}")
    already = bool(model.identity().get("l2_normalize", False))
    return model, bool(l2_normalize) and not already


def _identity(extractor: Any, *, variant: str, l2_here: bool) -> dict[str, Any]:
    identity = dict(extractor.identity())
    identity.update(
        model=getattr(extractor, "name", identity.get("model")),
        layer=getattr(extractor, "layer", identity.get("layer")),
        pooling=getattr(extractor, "pooling", identity.get("pooling")),
        weights=getattr(extractor, "weights_label", identity.get("weights")),
        weights_sha1=getattr(extractor, "weights_sha1", identity.get("weights_sha1")),
        input_size=int(extractor.input_size),
        dim=int(extractor.dim),
        variant=variant,
    )
    if l2_here:
        identity["l2_normalize"] = True
    return identity


Loaded = tuple[np.ndarray | None, str | None, str | None, str | None]
"""``(image, sha1, reason, detail)``: ``image`` None on failure; ``sha1`` of the file content, None if unread."""


def _load_one(loader: Loader | None, path: Any, size: int, expected: str | None) -> Loaded:
    """Decode one image and hash its file; never raises for a bad file.

    Default loader (None): the file is read once, hashed and those very bytes decoded; a hash other than
    ``expected`` (the catalogue's) is a ``changed`` failure. A custom loader reads what it wants: the hash
    is then ``expected`` when known, else that of the file at ``path``.
    """
    if path is None or (isinstance(path, float) and np.isnan(path)) or str(path) == "":
        return None, None, "missing", "no path"
    sha1 = None
    try:
        if loader is None:
            data = read_file_bytes(str(path))
            sha1 = hashlib.sha1(data).hexdigest()
            if expected is not None and sha1 != expected:
                return None, sha1, "changed", (f"{path}: file content changed since the catalogue was checked "
                                               f"(sha1 {sha1}, catalogue {expected}); reload the catalogue")
            image = decode_bytes(data, size=size, name=str(path))
        else:
            sha1 = expected or hashlib.sha1(read_file_bytes(str(path))).hexdigest()
            image = loader(str(path), size)
    except ImageError as exc:
        return None, sha1, exc.reason, getattr(exc, "detail", "") or str(exc)
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the run; recorded with its type
        return None, sha1, "error", f"{type(exc).__name__}: {exc}"
    if image.shape != (size, size, 3) or image.dtype != np.uint8:
        return None, sha1, "bad_shape", (f"loader returned {image.dtype}{list(image.shape)}, "
                                         f"expected uint8[{size}, {size}, 3]")
    return image, sha1, None, None


def catalogue_sha1(df: pd.DataFrame) -> np.ndarray:
    """The catalogue's ``sha1`` per row (object array; None where absent or not a 40-hex digest)."""
    if "sha1" not in df.columns:
        return np.full(len(df), None, dtype=object)
    text = df["sha1"].astype("string").str.strip().str.lower()
    valid = text.str.fullmatch(r"[0-9a-f]{40}").fillna(False).to_numpy(dtype=bool)
    return np.where(valid, text.to_numpy(dtype=object, na_value=None), None)


def _file_sha1(path: Any) -> str | None:
    """SHA-1 of the file at ``path``; None when it cannot be read."""
    try:
        return hashlib.sha1(read_file_bytes(str(path))).hexdigest()
    except (ImageError, TypeError, ValueError):
        return None


def _with_file_sha1(paths: np.ndarray, expected: np.ndarray, where: np.ndarray, workers: int) -> np.ndarray:
    """``expected`` with the rows of ``where`` that have no sha1 filled by hashing their files now."""
    current = expected.copy()
    hash_now = np.flatnonzero(where & (current == None))  # noqa: E711 - elementwise on an object array
    if len(hash_now):
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cbir-hash") as pool:
            current[hash_now] = list(pool.map(_file_sha1, paths[hash_now]))
    return current


def _plan(store: FeatureStore, run_id: int, ids: np.ndarray, paths: np.ndarray, expected: np.ndarray,
          workers: int) -> tuple[np.ndarray, int]:
    """``(todo[N] bool, n_replaced)``: ids to (re-)extract. A stored vector is done when its sha1 equals the
    current content's (``expected``, else the file is hashed now); a stored failure when its sha1 equals it
    too (None = None: unreadable then and now). ``n_replaced``: stored vectors that will be replaced."""
    vectors = store.content_sha1(run_id)
    failed = store.content_sha1(run_id, failures=True)
    stored = np.array([i in vectors or i in failed for i in ids], dtype=bool)
    current = _with_file_sha1(paths, expected, stored, workers)
    todo = np.ones(len(ids), dtype=bool)
    for k in np.flatnonzero(stored):
        image_id = ids[k]
        if image_id in vectors:
            todo[k] = vectors[image_id] is None or vectors[image_id] != current[k]
        else:
            todo[k] = failed[image_id] != current[k]
    n_replaced = int(sum(1 for k in np.flatnonzero(todo & stored) if ids[k] in vectors))
    return todo, n_replaced


def extract_features(
    catalog: Any,
    *,
    model: Any,
    layer: str | None = None,
    pooling: str | None = None,
    weights: Any = "imagenet",
    store: FeatureStore | str | os.PathLike[str],
    batch_size: int = 32,
    workers: int = 2,
    l2_normalize: bool = False,
    progress: bool = True,
    name: str | None = None,
    variant: str = "original",
    loader: Loader | None = None,
    prefetch: int = 2,
    pad_batches: bool = True,
) -> int:
    """Extract one vector per catalogue image into ``store``; returns the run id.

    ``catalog``: a Catalog or a DataFrame with ``image_id`` and ``path`` (written to the store's catalogue).
    ``model``: a backbone/descriptor name (built with ``layer``, ``pooling``, ``weights``, ``l2_normalize``)
    or an Extractor instance (``input_size``, ``dim``, ``identity()``, ``__call__(uint8[N,H,W,3]) ->
    float32[N,dim]``). ``variant`` labels the image version (``"original"``, ``"roi"``, ...) and ``loader``
    (``loader(path, size) -> uint8[size,size,3]``; default: the file read once, hashed and decoded exactly as
    :func:`cbir.images.read_image` does) produces it.
    ``workers`` decoding threads run ``prefetch`` batches ahead of the model (``workers=0``: decode inline).
    ``pad_batches`` pads a short batch (the last one, or one thinned by bad images) with black images whose
    outputs are dropped, so the model always sees the same input shape (tf.function / jax.jit never retrace).
    Bad images are recorded as failures (``store.failures(run_id)``), never raised; a model output that is
    not finite is a ``non_finite`` failure. Images already done in the run with the same identity and the
    same file content (sha1, see the module doc) are skipped, so calling again resumes or is a no-op; other
    content is re-extracted (``n_vectors_replaced`` in the run's stats). Raises :class:`CatalogError` for a
    catalogue without rows (before any store or run is made) and :class:`ExtractionError` when no image of
    the catalogue has a vector (the run is then recorded as ``failed``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    df = catalog_frame(catalog)
    if len(df) == 0:
        where = getattr(catalog, "root", None) or "the catalogue"
        raise CatalogError(f"{where}: no usable image to extract; nothing was written (see `cbir catalog check`)")
    store = open_store(store)
    extractor, l2_here = _resolve_extractor(model, layer=layer, pooling=pooling, weights=weights,
                                            l2_normalize=l2_normalize)
    p = prepare_run(store, df, extractor, variant=variant, l2_here=l2_here, name=name, workers=workers)
    if not p.todo.any():
        return p.run_id
    run_id, ids, paths, expected, todo, n_replaced = p.run_id, p.ids, p.paths, p.expected, p.todo, p.n_replaced
    stream = _Stream(store=store, run_id=run_id, extractor=extractor, l2_here=l2_here, loader=loader,
                     batch_size=batch_size, workers=workers, prefetch=prefetch, pad_batches=pad_batches)
    stats = stream.run(ids[todo], paths[todo], expected[todo], total=len(ids), progress=progress)
    _finish(store, run_id, ids, n_images=len(ids), n_processed=int(todo.sum()), n_vectors_replaced=n_replaced,
            batch_size=int(batch_size), workers=int(workers), prefetch=int(prefetch), **stats)
    return run_id


@dataclass
class PreparedRun:
    """A run ready to extract into: its id, the catalogue's ``ids``, ``paths`` and ``expected`` sha1 (None
    where unknown), which rows are still ``todo`` and how many stored vectors will be replaced."""

    run_id: int
    ids: np.ndarray
    paths: np.ndarray
    expected: np.ndarray
    todo: np.ndarray
    n_replaced: int


def prepare_run(store: FeatureStore, df: pd.DataFrame, extractor: Any, *, variant: str, l2_here: bool,
                name: str | None, workers: int, shards: Callable[[int], Any] | None = None) -> PreparedRun:
    """Start or resume the run (:func:`_start_run`), plan what is left (:func:`_plan`) and, when nothing is,
    finish it; otherwise drop what was computed from vectors about to be replaced and mark it running.
    Shared by the in-process pipeline and :mod:`cbir.distributed`.

    ``shards(run_id)``: the shard directory of a run that keeps its vectors there (:mod:`cbir.distributed`
    with ``vectors="shards"``); such a run copies nothing from sibling runs. A run kept in shards with work left
    is refused without ``shards`` (nothing of it is written to the store)."""
    ids = df["image_id"].astype(str).to_numpy()
    paths, expected = df["path"].to_numpy(dtype=object), catalogue_sha1(df)
    run_id = _start_run(store, df, extractor, variant=variant, l2_here=l2_here, name=name,
                        sha1=lambda: dict(zip(ids, _with_file_sha1(paths, expected, np.ones(len(ids), bool),
                                                                   workers))), shards=shards)
    todo, n_replaced = _plan(store, run_id, ids, paths, expected, workers)
    prepared = PreparedRun(run_id, ids, paths, expected, todo, n_replaced)
    if not todo.any():
        if store.run(run_id)["status"] != "complete":
            _finish(store, run_id, ids, n_images=len(ids))
        return prepared
    where = store.shard_dir(run_id)
    if where is not None and shards is None:
        raise ExtractionError(f"{store.path}: run {run_id} keeps its vectors in its shards ({where}) and "
                              f"{int(todo.sum())} image(s) need extracting: extract it on a cluster with "
                              "vectors='shards' (`cbir extract --cluster local --vectors shards`, params "
                              "`vectors: shards`)")
    if n_replaced:
        dropped = store.invalidate_derived(run_id)
        log.warning("%s: run %s: re-extracting %d image(s) whose stored vectors came from other file content; "
                    "dropped what was computed from them: %s", store.path, run_id, n_replaced, dropped)
    store.set_status(run_id, "running")
    return prepared


def _sibling_runs(store: FeatureStore, identity: Mapping[str, Any]) -> list[int]:
    """Complete runs of the same model, layer, pooling, weights and variant on another labelling (or on
    none, from before labels were part of a run's identity), newest first."""
    same = {k: v for k, v in json.loads(canonical_json(identity)).items() if k != "labels_sha1"}
    runs = store.runs()
    return [int(r.run_id) for r in runs.iloc[::-1].itertuples()
            if r.status == "complete" and {k: v for k, v in r.params.items() if k != "labels_sha1"} == same
            and r.params.get("labels_sha1") != identity["labels_sha1"]]


def _start_run(store: FeatureStore, df: pd.DataFrame, extractor: Any, *, variant: str, l2_here: bool,
               name: str | None, sha1: Callable[[], Mapping[str, str | None]],
               shards: Callable[[int], Any] | None = None) -> int:
    """Start (or resume) the run of ``extractor`` on this catalogue's labelling and record its labels.

    The labelling (:func:`cbir.catalog.labels_sha1`) is part of the run's identity: a catalogue labelled or
    split otherwise gets a run of its own, whose vectors are copied from the same model's run on the same
    file content (no re-extraction) rather than computed again. ``sha1()`` gives each id's file content sha1
    (called only for such a copy).
    """
    identity = _identity(extractor, variant=variant, l2_here=l2_here)
    identity["labels_sha1"] = labels_sha1(df)
    is_new = store.find_run(**identity) is None
    run_id = store.start_run(identity, name=name, versions=loaded_library_versions())
    store.put_catalog(df)
    store.put_run_labels(run_id, df)
    if shards is not None:  # before anything is copied: a run kept in shards holds nothing in the store
        store.keep_vectors_in_shards(run_id, shards(run_id))
        where = Path(store.shard_dir(run_id))
        if not (where / MANIFEST).is_file() and store.run(run_id)["status"] == "complete":
            log.warning("%s: run %s: its shard directory %s has no manifest any more; extracting it again",
                        store.path, run_id, where)
            store.set_status(run_id, "interrupted")
    siblings = _sibling_runs(store, identity) if is_new and shards is None else []
    content = sha1() if siblings else {}
    for sibling in siblings:
        copied = store.copy_outcomes(sibling, run_id, content)
        if copied:
            log.info("%s: run %s: %d vector(s) copied from run %s (same model and file content)",
                     store.path, run_id, copied, sibling)
    return run_id


class _Stream:
    """The streaming extraction of one run: a thread pool decodes the next batches while the model embeds
    the current one; each batch's vectors and failures are written in one transaction."""

    def __init__(self, *, store: FeatureStore, run_id: int, extractor: Any, l2_here: bool,
                 loader: Loader | None, batch_size: int, workers: int, prefetch: int, pad_batches: bool) -> None:
        self.store, self.run_id, self.extractor, self.l2_here = store, run_id, extractor, l2_here
        self.loader, self.batch_size, self.workers = loader, batch_size, workers
        self.prefetch, self.pad_batches = prefetch, pad_batches
        self.size = int(extractor.input_size)

    def embed(self, results: list[Loaded], batch_ids: np.ndarray, model_rows: int
              ) -> tuple[list[int], np.ndarray, list[tuple]]:
        """``(ok, X, failures)`` of one decoded batch: rows with a finite vector, their vectors, the rest."""
        ok = [k for k, r in enumerate(results) if r[0] is not None]
        fails = [(batch_ids[k], r[2], r[3], r[1]) for k, r in enumerate(results) if r[0] is None]
        X = np.empty((0, int(self.extractor.dim)), dtype=np.float32)
        if not ok:
            return ok, X, fails
        batch = np.stack([results[k][0] for k in ok])
        if self.pad_batches and len(ok) < model_rows:  # one input shape: compiled models never retrace
            batch = np.concatenate([batch, np.zeros((model_rows - len(ok), *batch.shape[1:]), np.uint8)])
        X = np.asarray(self.extractor(batch), dtype=np.float32)[:len(ok)]
        if self.l2_here:
            X = get_postprocess("l2").apply(None, X)
        finite = np.isfinite(X).all(axis=1)
        fails += [(batch_ids[k], "non_finite", "the model returned NaN or infinite values", results[k][1])
                  for k, f in zip(ok, finite) if not f]
        return [k for k, f in zip(ok, finite) if f], X[finite], fails

    def run(self, ids: np.ndarray, paths: np.ndarray, sha1: np.ndarray, *, total: int,
            progress: bool) -> dict[str, Any]:
        """Extract ``ids`` (files ``paths``, expected content ``sha1``); returns the run's timing stats."""
        from tqdm import tqdm

        bs, timings = self.batch_size, {"decode_wait": 0.0, "model": 0.0, "write": 0.0}
        n_vectors = n_failed = 0
        start = time.perf_counter()
        model_rows = min(bs, len(ids))
        pool = (ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cbir-decode")
                if self.workers > 0 else None)
        pending: deque[tuple[int, list[Any]]] = deque()

        def submit(i: int) -> None:
            batch = list(zip(paths[i:i + bs], sha1[i:i + bs]))
            if pool is None:
                pending.append((i, batch))  # decoded when its turn comes
            else:
                pending.append((i, [pool.submit(_load_one, self.loader, p, self.size, e) for p, e in batch]))

        bar = tqdm(total=total, initial=total - len(ids), disable=not progress, unit="img",
                   desc=f"{getattr(self.extractor, 'name', 'features')} run {self.run_id}", dynamic_ncols=True)
        try:
            next_start = iter(range(0, len(ids), bs))
            for _ in range(1 + (max(0, self.prefetch) if pool is not None else 0)):
                i = next(next_start, None)
                if i is None:
                    break
                submit(i)
            while pending:
                i, slots = pending.popleft()
                t0 = time.perf_counter()
                if pool is not None:
                    results = [s.result() for s in slots]
                else:
                    results = [_load_one(self.loader, p, self.size, e) for p, e in slots]
                t1 = time.perf_counter()
                following = next(next_start, None)
                if following is not None:
                    submit(following)  # keep the decoders `prefetch` batches ahead
                batch_ids = ids[i:i + bs]
                ok, X, fails = self.embed(results, batch_ids, model_rows)
                t2 = time.perf_counter()
                self.store.put_features(self.run_id, batch_ids[ok], X, sha1=[results[k][1] for k in ok],
                                        failures=fails)
                t3 = time.perf_counter()
                timings["decode_wait"] += t1 - t0
                timings["model"] += t2 - t1
                timings["write"] += t3 - t2
                n_vectors += len(ok)
                n_failed += len(fails)
                bar.update(len(batch_ids))
        except BaseException:
            try:
                self.store.set_status(self.run_id, "interrupted")
            except Exception:  # noqa: BLE001 - never hide the original error
                pass
            raise
        finally:
            bar.close()
            if pool is not None:
                for _, slots in pending:
                    for future in slots:
                        future.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
        seconds = time.perf_counter() - start
        return {"seconds": round(seconds, 4), "n_vectors_written": n_vectors, "n_failures_written": n_failed,
                "images_per_second": round(len(ids) / seconds, 3) if seconds > 0 else None,
                **{f"seconds_{k}": round(v, 4) for k, v in timings.items()}}


def _finish(store: FeatureStore, run_id: int, ids: np.ndarray, **stats: Any) -> None:
    """Finish the run: ``complete`` when any catalogue image has a vector, else ``failed`` and
    :class:`ExtractionError` naming the failure reasons."""
    if len(store.ids_with_vectors(run_id, ids)):
        store.finish_run(run_id, **stats)
        return
    store.finish_run(run_id, status="failed", **stats)
    reasons = store.failures(run_id).query("image_id in @ids")["reason"].value_counts().sort_index()
    listed = ", ".join(f"{reason}: {n}" for reason, n in reasons.items())
    raise ExtractionError(f"{store.path}: run {run_id}: all {len(ids)} images failed ({listed}); the run is "
                          f"recorded as failed (details: store.failures({run_id}) or `cbir catalog check`)")


def ensure_features(catalog: Any, *, store: FeatureStore | str | os.PathLike[str], model: Any,
                    layer: str | None = None, pooling: str | None = None, weights: Any = "imagenet",
                    pca_whiten: bool = False, **kwargs: Any) -> int:
    """The run id of ``model``'s features for every image of ``catalog``, extracting only what is missing.

    A no-op (apart from building the extractor, cached per process) when the run is complete.
    With ``pca_whiten`` the id of the derived run of :func:`whiten_run` instead, its PCA fitted on the
    searchable catalogue (rows whose ``split`` is not ``"query"``; every row when there is no split).
    Other keyword arguments go to :func:`extract_features` (:func:`cbir.distributed.ensure_features_cluster`
    takes a ``cluster`` as well: the same run extracted on Dask).
    """
    run_id = extract_features(catalog, model=model, layer=layer, pooling=pooling, weights=weights, store=store,
                              **kwargs)
    return whiten_for_catalog(store, run_id, catalog) if pca_whiten else run_id


def whiten_for_catalog(store: FeatureStore | str | os.PathLike[str], run_id: int, catalog: Any) -> int:
    """:func:`whiten_run` fitted on the catalogue's searchable rows (``split`` not ``"query"``; all rows
    when there is no split column), keeping ``min(WHITEN_MAX_COMPONENTS, n_searchable // 4)`` components
    (fewer when the features have lower rank)."""
    df = catalog_frame(catalog)
    searchable = df["split"].ne("query") if "split" in df.columns else pd.Series(True, index=df.index)
    fit_ids = df.loc[searchable, "image_id"].astype(str).tolist()
    return whiten_run(store, run_id, fit_ids, n_components=whitening_components(len(fit_ids)))


def whiten_run(store: FeatureStore | str | os.PathLike[str], run_id: int, fit_ids: Sequence[str], *,
               n_components: int | None = None, seed: int = 0) -> int:
    """A derived run holding run ``run_id``'s vectors PCA-whitened and L2-normalised; returns its id.

    The PCA (the ``pca_whiten`` step of :mod:`cbir.postprocess`) is fitted on the vectors of ``fit_ids`` (the
    searchable catalogue, so queries never shape the projection) and applied to every vector of the run.
    The derived run's identity is the source's plus ``variant`` ``"<variant>+pcaw"`` and the sha1 of the
    sorted fit ids, so it is computed once per (run, fit set) and reused afterwards.
    """
    import hashlib

    store = open_store(store)
    source = store.run(run_id)
    ids, X = store.features(run_id)
    fit = sorted(set(map(str, fit_ids)) & set(ids.tolist()))
    if len(fit) < 2:
        raise ValueError(f"whiten_run: run {run_id} has vectors for {len(fit)} of the fit ids; need at least 2")
    identity = dict(source["params"])
    identity.pop("dim", None)  # the whitened dimension is the PCA's, set by the first write
    identity.update(variant=f"{source.get('variant') or 'original'}+pcaw", whiten_source_run=int(run_id),
                    whiten_fit_sha1=hashlib.sha1("\n".join(fit).encode()).hexdigest(),
                    whiten_components=n_components, whiten_seed=seed)
    derived = store.start_run(identity, name=source.get("name"))
    store.put_run_labels(derived, store.run_labels(run_id))  # the source's labels and split
    record = store.run(derived)
    if record.get("status") == "complete" and record.get("n_features") == len(ids):
        return derived
    position = {image_id: i for i, image_id in enumerate(ids.tolist())}
    step = get_postprocess("pca_whiten")
    pca = step.fit(X[[position[i] for i in fit]], n_components=len(fit) if n_components is None else n_components,
                   seed=seed)  # None: the features' numerical rank (at most the number of fitted images)
    content = store.content_sha1(run_id)  # the whitened vectors come from the same file content
    store.put_features(derived, ids, step.apply(pca, X), sha1=[content.get(i) for i in ids])
    store.finish_run(derived, n_images=len(ids), whiten_fit_images=len(fit),
                     whiten_components=int(pca.n_components_))
    return derived


def load_run_features(store: FeatureStore | str | os.PathLike[str], run_id: int, catalog: Any
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids[N], X[N, D] float32)``: the run's vectors for the catalogue's images, in catalogue order.

    Images without a vector (failures, not extracted) are left out. When the catalogue has a ``sha1``
    column, a vector computed from other content (or of unknown content) raises :class:`StoreError`.
    """
    store = open_store(store, readonly=True)
    df = catalog_frame(catalog)
    ids = store.ids_with_vectors(run_id, df["image_id"])
    expected = dict(zip(df["image_id"].astype(str), catalogue_sha1(df)))
    stored = store.content_sha1(run_id)
    other = [str(i) for i in ids if expected[i] is not None and stored.get(i) != expected[i]]
    if other:
        raise StoreError(f"{store.path}: run {run_id}: the vectors of {len(other)} image(s) were computed from other "
                         f"file content than the catalogue's (sha1 differs or unknown): {other[:10]}; extract "
                         "again (cbir.extract.ensure_features or `cbir extract`) to replace them")
    return store.features(run_id, ids)


def extraction_failures(store: FeatureStore | str | os.PathLike[str], run_id: int, *,
                        root: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """The images a run could not use: ``image_id, path, reason, detail`` in catalogue order, ``path``
    relative to ``root`` (e.g. ``catalog.root``) when given, so the table does not depend on the machine."""
    store = open_store(store, readonly=True)
    table = store.failures(run_id)
    if root is not None and len(table):
        base = os.path.abspath(root)
        table["path"] = [p if p is None or pd.isna(p) else os.path.relpath(os.path.abspath(p), base)
                         for p in table["path"]]
    return table


def export_features(store: FeatureStore | str | os.PathLike[str], run_id: int,
                    out_npz: str | os.PathLike[str]) -> Path:
    """Write a run to ``out_npz`` (``.npz`` added when missing): arrays ``ids`` (unicode), ``features``
    (float32[N, D]) and ``run`` (the run's metadata as a JSON string); loadable with ``allow_pickle=False``.
    Returns the path written."""
    store = open_store(store, readonly=True)
    info = store.run(run_id)
    ids, X = store.features(run_id)
    out = Path(out_npz)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: info[k] for k in ("run_id", "name", "model", "layer", "pooling", "weights", "weights_sha1",
                                 "variant", "input_size", "dim", "status", "params", "versions", "created")}
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=ids.astype(str), features=X.astype(np.float32, copy=False),
                     run=np.array(json.dumps(meta, sort_keys=True)))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed
    return out
