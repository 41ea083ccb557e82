"""Visual search app (notebook 07, also served by Voila): a photo in, the top-k catalogue products out.

:class:`VisualSearchApp` holds the logic and can be used without a browser:
``search_bytes(data, name)`` for an upload (validated, then embedded with the same extractor as the
chosen run, built once and cached) and ``search_catalog_image(image_id)`` for a stored image (its stored
vector; itself and its byte-identical duplicates left out). ``widget()`` builds the ipywidgets UI:
upload (FileUpload) or pick a catalogue image (Dropdown), choose run and measure, see thumbnails with
labels and distances. Bad uploads show a message in an element with CSS class ``cbir-error``.

Environment overrides (Voila cannot inject papermill parameters): ``CBIR_STORE``, ``CBIR_CATALOG``,
``CBIR_OUT_DIR``, ``CBIR_MODEL``, ``CBIR_LAYER``, ``CBIR_POOLING``, ``CBIR_WEIGHTS``, ``CBIR_K``,
``CBIR_MINKOWSKI_P``, ``CBIR_RUN`` (run id or name), applied by :func:`env_overrides`.
"""
from __future__ import annotations

import base64
import functools
import html
import inspect
import io
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from cbir.images import IMAGE_SUFFIXES, ImageError, decode_bytes, read_image
from cbir.search import METRICS, ExactIndex, similarity
from cbir.store import FeatureStore, StoreError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
"""Uploads larger than this (10 MiB) are refused before decoding."""
UPLOAD_SUFFIXES = IMAGE_SUFFIXES
RESULT_COLUMNS = ["rank", "image_id", "category", "subcategory", "distance", "similarity", "path"]
ENV_PREFIX = "CBIR_"
_PATH_KEYS = ("store", "catalog", "out_dir", "weights")
_ENV_KEYS = ("store", "catalog", "out_dir", "model", "layer", "pooling", "weights", "k", "minkowski_p", "run")
_REASON_TEXT = {
    "empty": "the file is empty",
    "not_an_image": "the file is not an image",
    "truncated": "the image file is cut short",
    "corrupt": "the image file is damaged",
    "too_large": "the image has too many pixels",
    "unsupported_mode": "the image's colour format is not supported",
}


class UploadError(ValueError):
    """An upload that cannot be searched; ``reason`` is a short code, the message is for the user."""

    def __init__(self, name: str, reason: str, message: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(message)


def env_overrides(environ: Mapping[str, str] | None = None, **params: Any) -> dict[str, Any]:
    """``params`` with ``CBIR_<KEY>`` environment variables applied (values parsed as YAML).

    A relative path is taken from the directory the server was started in (``$PWD``, which the
    kernel inherits), not from the kernel's own folder (the notebook's)."""
    import yaml

    environ = os.environ if environ is None else environ
    out = dict(params)
    for key in _ENV_KEYS:
        raw = environ.get(ENV_PREFIX + key.upper())
        if raw is None or raw == "":
            continue
        if key not in _PATH_KEYS:
            out[key] = yaml.safe_load(raw)
        elif raw in ("demo", "imagenet", "none") or Path(raw).expanduser().is_absolute():
            out[key] = str(Path(raw).expanduser()) if raw not in ("demo", "imagenet", "none") else raw
        else:
            out[key] = str(Path(environ.get("PWD") or os.getcwd()) / raw)
    return out


def validate_upload(data: bytes | memoryview, name: str, mime: str | None = None, *,
                    max_bytes: int = MAX_UPLOAD_BYTES, size: int | None = None) -> np.ndarray:
    """Check an upload (extension, MIME type, byte size, full decode); returns HxWx3 uint8 RGB
    (resized to ``size`` x ``size`` when given). Raises :class:`UploadError` with a user-facing message."""
    name = str(name or "upload")
    suffix = Path(name).suffix.lower()
    allowed = ", ".join(s.lstrip(".").upper() for s in UPLOAD_SUFFIXES)
    if suffix not in UPLOAD_SUFFIXES:
        raise UploadError(name, "extension", f"{name}: not an image file ({suffix or 'no extension'}); "
                                             f"upload a photo ({allowed})")
    if mime and not mime.lower().startswith("image/"):
        raise UploadError(name, "mime", f"{name}: the browser says this is {mime}, not an image; "
                                        f"upload a photo ({allowed})")
    n_bytes = len(data) if not isinstance(data, memoryview) else data.nbytes
    if n_bytes == 0:
        raise UploadError(name, "empty", f"{name}: the file is empty")
    if n_bytes > max_bytes:
        raise UploadError(name, "too_large", f"{name}: {n_bytes / 2**20:.1f} MB is over the "
                                             f"{max_bytes / 2**20:.0f} MB upload limit")
    try:
        return decode_bytes(bytes(data), size=size, name=name)
    except ImageError as exc:
        text = _REASON_TEXT.get(exc.reason, exc.reason)
        raise UploadError(name, exc.reason, f"{name}: {text}; upload a photo ({allowed})") from None


def _run_name(run: int | str | None) -> str:
    return "this run" if run is None else f"run {run}"


def _refuse(run: int | str | None, reason: str, text: str) -> UploadError:
    return UploadError("", reason, f"{_run_name(run)}{text}")


def resolve_weights(identity: Mapping[str, Any], *, weights: str | os.PathLike | None = None,
                    run: int | str | None = None) -> str:
    """The ``weights`` argument that rebuilds a run's extractor from its stored identity.

    ``imagenet``, seeded random init (``none ...``) and handcrafted runs need nothing; a run made from
    a weights file needs that file: ``weights`` (the app's parameter) or a file of the same name in
    :func:`cbir.backbones.weights_dirs`, whose SHA-1 must equal the stored one. Only the file's name is
    taken from the store (never its folder); a run without a valid stored SHA-1, or no file with it, is
    refused (:class:`UploadError` naming ``run``, the file and the SHA-1), never served by another file.
    """
    label = str(identity.get("weights") or "none")
    if label == "imagenet":
        return "imagenet"
    if label.startswith("none") or label == "handcrafted":
        return "none"
    from cbir.backbones import weights_dirs
    from cbir.efficientnet_lite import file_sha1

    fname = Path(str(identity.get("weights_file") or label)).name
    sha1 = identity.get("weights_sha1")
    if not (isinstance(sha1, str) and re.fullmatch(r"[0-9a-f]{40}", sha1)):
        raise _refuse(run, "weights", f" used the weights file {fname!r} but records no valid SHA-1 for it "
                                      f"({sha1!r}); refusing to load an unchecked file")
    candidates = [Path(weights)] if weights not in (None, "imagenet", "none") else []
    candidates += [folder / fname for folder in weights_dirs()]
    differ = []
    for candidate in candidates:
        if candidate.is_file() and candidate.name == fname:
            found = file_sha1(candidate)
            if found == sha1:
                return str(candidate)
            differ.append(f"{candidate} has SHA-1 {found}")
    seen = f" ({'; '.join(differ)})" if differ else ""
    raise _refuse(run, "weights", f" used the weights file {fname!r}, which was not found with SHA-1 {sha1}{seen}; "
                                  f"start the app with weights=PATH (or CBIR_WEIGHTS) pointing to that file")


@functools.cache
def descriptor_settings() -> dict[str, Any]:
    """Settings a run's stored ``params`` may pass on, with their defaults: the keyword parameters of
    :func:`cbir.descriptors.build_descriptor_extractor` that have a value default and that
    :func:`cbir.extractors.build_extractor` does not set itself (so never weights, layer, pooling, ...)."""
    from cbir.descriptors import build_descriptor_extractor
    from cbir.extractors import build_extractor

    own = set(inspect.signature(build_extractor).parameters)
    return {name: p.default for name, p in inspect.signature(build_descriptor_extractor).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is not None and name not in own}


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, (bool, str)):
        return type(value) is type(default)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _descriptor_params(identity: Mapping[str, Any], run: int | str | None) -> dict[str, Any]:
    """The stored ``params`` checked against :func:`descriptor_settings` (only descriptor runs have any)."""
    from cbir.extractors import descriptor_names

    params = identity.get("params") or {}
    if not isinstance(params, Mapping):
        raise _refuse(run, "identity", f": stored params must be a mapping, got {type(params).__name__}")
    allowed = descriptor_settings() if identity.get("model") in descriptor_names() else {}
    for key in sorted(params):
        if key not in allowed:
            raise _refuse(run, "identity", f": stored params may not set {key!r} (a {identity.get('model')} "
                                           f"run takes {', '.join(sorted(allowed)) or 'no params'})")
        if not _same_kind(params[key], allowed[key]):
            raise _refuse(run, "identity", f": stored params {key}={params[key]!r} is not of type "
                                           f"{type(allowed[key]).__name__}")
    return dict(params)


def extractor_kwargs(identity: Mapping[str, Any], *, weights: str | os.PathLike | None = None,
                     run: int | str | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`cbir.extractors.build_extractor` for a run's stored identity.

    The weights come only from :func:`resolve_weights` (name + SHA-1 checked); the stored ``params``
    may set only descriptor settings (:func:`descriptor_settings`). A tampered identity raises
    :class:`UploadError` naming ``run``."""
    kwargs: dict[str, Any] = {
        "name": identity["model"],
        "layer": identity.get("layer"),
        "pooling": identity.get("pooling"),
        "weights": resolve_weights(identity, weights=weights, run=run),
        "l2_normalize": bool(identity.get("l2_normalize", False)),
    }
    if identity.get("gem_p") is not None:
        kwargs["gem_p"] = identity["gem_p"]
    kwargs.update(_descriptor_params(identity, run))  # descriptor settings (bins, points, radius, ...)
    return kwargs


def checked_extractor(identity: Mapping[str, Any], kwargs: Mapping[str, Any], *,
                      run: int | str | None = None) -> Any:
    """:func:`cached_extractor` of ``kwargs``, refused (:class:`UploadError`) when the weights it loaded
    do not have the SHA-1 stored with the run (e.g. other ImageNet weights than the run's)."""
    extractor = cached_extractor(kwargs)
    wanted, got = identity.get("weights_sha1"), getattr(extractor, "weights_sha1", None)
    if wanted and got != wanted:
        found = getattr(extractor, "weights_file", None) or getattr(extractor, "weights_label", "?")
        raise _refuse(run, "weights", f": the weights found here ({found}, SHA-1 {got}) are not the ones the "
                                      f"run was made with (SHA-1 {wanted})")
    return extractor


@functools.lru_cache(maxsize=4)
def _build_extractor(frozen: tuple[tuple[str, Any], ...]) -> Any:
    from cbir.extractors import build_extractor

    kwargs = dict(frozen)
    return build_extractor(kwargs.pop("name"), **kwargs)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def cached_extractor(kwargs: Mapping[str, Any]) -> Any:
    """``build_extractor(**kwargs)``, built once per process for the same arguments."""
    return _build_extractor(tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))


@functools.lru_cache(maxsize=512)
def thumbnail_uri(path: str, *, size: int = 128) -> str:
    """A ``data:image/jpeg;base64,...`` thumbnail (longest side ``size`` px) of an image file ('' if unreadable)."""
    try:
        return image_uri(read_image(path), size=size)
    except ImageError:
        return ""


def image_uri(image: np.ndarray, *, size: int = 128) -> str:
    """A JPEG data URI of an HxWx3 uint8 image scaled so its longest side is ``size`` px."""
    from PIL import Image

    pil = Image.fromarray(image)
    pil.thumbnail((size, size))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class VisualSearchApp:
    """Top-k visual search over one feature store.

    ``store``: a FeatureStore or its path. ``run``: run id or name to start with (default: the latest
    complete run matching ``model``/``pooling``/``weights``, else the latest complete run). ``metric``:
    one of ``metrics`` (default cosine), ``k`` results, ``minkowski_p`` for minkowski. ``weights``: the weights
    file, for runs made from one. ``catalog`` (``"demo"`` resolved under ``out_dir``): read for labels only
    when the store has no catalogue.
    A missing store does not raise: ``problem`` says what is wrong and the widget shows it.
    ``controls``: the widgets by role (``run, metric, upload, pick, message, query, results``) once
    :meth:`widget` has built them.
    """

    def __init__(self, store: FeatureStore | str | os.PathLike, *, run: int | str | None = None,
                 metric: str | None = None, k: int = 5, minkowski_p: float = 3, model: str | None = None,
                 layer: str | None = None, pooling: str | None = None, weights: str | None = "imagenet",
                 catalog: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                 metrics: list[str] | None = None, max_bytes: int = MAX_UPLOAD_BYTES,
                 thumb_size: int = 128) -> None:
        self.metrics = tuple(metrics or METRICS)
        metric = metric or ("cosine" if "cosine" in self.metrics else self.metrics[0])
        if metric not in self.metrics:
            raise ValueError(f"metric {metric!r} is not one of {', '.join(self.metrics)}")
        self.metric, self.k, self.minkowski_p = metric, int(k), minkowski_p
        self.weights, self.max_bytes, self.thumb_size = weights, int(max_bytes), int(thumb_size)
        self.catalog_spec, self.out_dir = catalog, out_dir
        self.problem: str | None = None
        self.store: FeatureStore | None = None
        self.run_id: int | None = None
        self._labels = pd.DataFrame(columns=["image_id", "category", "subcategory", "path"])
        self._features: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._indexes: dict[tuple[int, str, float], Any] = {}
        self.controls: dict[str, Any] = {}
        self._last_query: tuple[str, Any] | None = None
        self._updating = False
        if isinstance(store, FeatureStore):
            self.store = store
        elif not Path(store).is_file():
            self.problem = (f"No feature store at {store}: run `make demo` (or `cbir run params/demo.yaml`) "
                            f"first, or set CBIR_STORE to a store with features")
            return
        else:
            try:  # the app only reads: a store on read-only storage works too
                self.store = FeatureStore(store, readonly=True)
            except StoreError as exc:
                self.problem = str(exc)
                return
        runs = self.runs()
        if runs.empty:
            self.problem = f"The feature store {self.store.path} has no finished run with features yet"
            return
        try:
            self.select_run(self._default_run(runs, run, model=model, layer=layer, pooling=pooling,
                                              weights=weights))
        except ValueError as exc:  # e.g. CBIR_RUN names no searchable run: show it, do not die
            self.problem = str(exc)

    # -- data ---------------------------------------------------------------------------------
    def _load_labels(self, run_id: int) -> pd.DataFrame:
        """The labels run ``run_id`` was extracted with (the store's catalogue for runs without any; the
        catalogue named by ``catalog`` when the store has neither)."""
        labels = self.store.run_labels(run_id)
        if labels.empty:
            labels = self.store.catalog()
        if labels.empty and self.catalog_spec is not None and (self.catalog_spec != "demo" or self.out_dir):
            from cbir.catalog import load_catalog
            from cbir.datasets import resolve_catalog

            labels = load_catalog(resolve_catalog(self.catalog_spec, self.out_dir or "."), validate=False).df
        for col in ("category", "subcategory", "path"):
            if col not in labels.columns:
                labels[col] = ""
        return labels.set_index(labels["image_id"].astype(str), drop=False)

    def runs(self) -> pd.DataFrame:
        """Runs that can be searched: complete, with features, of the original images."""
        if self.store is None:
            return pd.DataFrame(columns=["run_id"])
        runs = self.store.runs()
        variant = runs["variant"].fillna("original") if "variant" in runs else "original"
        keep = (runs["n_features"] > 0) & (runs["status"] == "complete") & (variant == "original")
        return runs[keep].reset_index(drop=True)

    @staticmethod
    def _default_run(runs: pd.DataFrame, run: int | str | None, *, model: str | None, layer: str | None,
                     pooling: str | None, weights: str | None) -> int:
        if run is not None:
            hit = runs[(runs["run_id"].astype(str) == str(run)) | (runs["name"].astype(str) == str(run))]
            if hit.empty:
                raise ValueError(f"no complete run {run!r} with features in this store; runs: "
                                 f"{', '.join(f'{r.run_id} ({r.name or r.model})' for r in runs.itertuples())}")
            return int(hit["run_id"].iloc[-1])
        wanted = runs
        if model is not None:
            wanted = wanted[wanted["model"] == model]
            if layer is not None:
                wanted = wanted[wanted["layer"] == layer]
            wanted = wanted[wanted["pooling"].fillna("none") == (pooling or "none")]
            stored = wanted["weights"].astype(str)
            if weights is not None and not (stored == "handcrafted").all():  # descriptors have no weights
                if str(weights).lower() == "none":
                    wanted = wanted[stored.str.lower().str.startswith("none")]  # "none (random init)"
                else:
                    label = weights if weights == "imagenet" else Path(weights).name
                    wanted = wanted[stored == label]
            if wanted.empty:
                raise ValueError(f"no complete run of model {model!r} (layer {layer!r}, pooling {pooling!r}, weights "
                                 f"{weights!r}) in this store; runs: "
                                 f"{', '.join(f'{r.run_id} ({r.name or r.model})' for r in runs.itertuples())}")
        return int(wanted["run_id"].iloc[-1])

    def select_run(self, run_id: int) -> None:
        """Search ``run_id``'s vectors from now on."""
        if int(run_id) not in set(self.runs()["run_id"].astype(int)):
            raise ValueError(f"run {run_id} is not a complete run with features in {self.store.path}")
        self.run_id = int(run_id)
        self._labels = self._load_labels(self.run_id)

    def run_info(self, run_id: int | None = None) -> dict[str, Any]:
        """The stored run record (model, layer, pooling, weights, dim, params = identity, ...)."""
        return self.store.run(self.run_id if run_id is None else run_id)

    def features(self, run_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids[N], X[N, D] float32)`` of a run, read once and cached."""
        run_id = self.run_id if run_id is None else int(run_id)
        if run_id not in self._features:
            self._features[run_id] = self.store.features(run_id)
        return self._features[run_id]

    def extractor(self, run_id: int | None = None) -> Any:
        """The run's extractor, rebuilt from its stored identity (cached per process, weights checked)."""
        run_id = self.run_id if run_id is None else int(run_id)
        identity = self.run_info(run_id)["params"]
        return checked_extractor(identity, extractor_kwargs(identity, weights=self.weights, run=run_id), run=run_id)

    def embed_bytes(self, data: bytes | memoryview, name: str, mime: str | None = None) -> np.ndarray:
        """Validate an upload and embed it: float32[1, D] with the current run's extractor."""
        identity = self.run_info()["params"]
        kwargs = extractor_kwargs(identity, weights=self.weights, run=self.run_id)  # raises before decoding
        size = int(identity.get("input_size") or 224)
        image = validate_upload(data, name, mime, max_bytes=self.max_bytes, size=size)
        extractor = checked_extractor(identity, kwargs, run=self.run_id)
        vector = np.asarray(extractor(image[None]), dtype=np.float32)
        if vector.shape != (1, self.features()[1].shape[1]):
            raise RuntimeError(f"run {self.run_id}: the rebuilt extractor gives {vector.shape[1]}-d vectors, "
                               f"the store holds {self.features()[1].shape[1]}-d ones")
        return vector

    # -- search -------------------------------------------------------------------------------
    def index(self, metric: str | None = None) -> Any:
        """The exact k-NN index (:class:`cbir.search.ExactIndex`) of the current run for ``metric``, cached."""
        key = (self.run_id, metric or self.metric, float(self.minkowski_p))
        if key not in self._indexes:
            self._indexes[key] = ExactIndex(self.features()[1], key[1], p=key[2])
        return self._indexes[key]

    def _neighbours(self, query: np.ndarray, *, exclude: set[str] = frozenset(), metric: str | None = None,
                    k: int | None = None) -> pd.DataFrame:
        metric = metric or self.metric
        k = int(k or self.k)
        ids, _ = self.features()
        n = min(len(ids), k + len(exclude))
        dist, idx = self.index(metric).search(query, n)
        dist, idx = np.asarray(dist)[0], np.asarray(idx)[0]
        keep = ~np.isin(ids[idx], np.array(sorted(exclude), dtype=str)) if exclude else np.ones(len(idx), bool)
        dist, idx = dist[keep][:k], idx[keep][:k]
        found = ids[idx]
        labels = self._labels.reindex(found)
        return pd.DataFrame({
            "rank": np.arange(1, len(found) + 1),
            "image_id": found,
            "category": labels["category"].to_numpy(dtype=object),
            "subcategory": labels["subcategory"].to_numpy(dtype=object),
            "distance": dist.astype(np.float64),
            "similarity": similarity(metric, dist),
            "path": labels["path"].to_numpy(dtype=object),
        }, columns=RESULT_COLUMNS)

    def search_bytes(self, data: bytes | memoryview, name: str, mime: str | None = None, *,
                     metric: str | None = None, k: int | None = None) -> pd.DataFrame:
        """Top-k catalogue images for an uploaded photo: ``rank, image_id, category, subcategory,
        distance, similarity, path``. Raises :class:`UploadError` for a bad upload."""
        self._require_ready()
        return self._neighbours(self.embed_bytes(data, name, mime), metric=metric, k=k)

    def search_catalog_image(self, image_id: str, *, metric: str | None = None,
                             k: int | None = None) -> pd.DataFrame:
        """Top-k for a stored image (its stored vector), leaving out itself and its byte-identical copies."""
        self._require_ready()
        ids, X = self.features()
        where = np.flatnonzero(ids == str(image_id))
        if where.size == 0:
            raise KeyError(f"image {image_id!r} has no vector in run {self.run_id}")
        exclude = {str(image_id)}
        if "dup_group" in self._labels.columns and str(image_id) in self._labels.index:
            group = self._labels.at[str(image_id), "dup_group"]
            if isinstance(group, str) and group:
                exclude |= set(self._labels.index[self._labels["dup_group"] == group])
        return self._neighbours(X[where[:1]], exclude=exclude, metric=metric, k=k)

    def _require_ready(self) -> None:
        if self.problem is not None:
            raise RuntimeError(self.problem)

    # -- widgets ------------------------------------------------------------------------------
    def widget(self) -> Any:
        """The ipywidgets UI (a VBox); shows ``problem`` instead when there is nothing to search."""
        import ipywidgets as w

        message = w.HTML(layout=w.Layout(min_height="1.5em"))
        message.add_class("cbir-message")
        self.controls["message"] = message
        if self.problem is not None:
            self._show_error(self.problem)
            box = w.VBox([message])
            box.add_class("cbir-app")
            return box
        runs = self.runs()
        run_pick = w.Dropdown(options=[(self._run_label(r), int(r.run_id)) for r in runs.itertuples()],
                              value=self.run_id, description="Run", layout=w.Layout(width="36em"))
        metric_pick = w.Dropdown(options=list(self.metrics), value=self.metric, description="Measure")
        upload = w.FileUpload(accept=",".join(UPLOAD_SUFFIXES), multiple=False,
                              description="Upload a photo")
        image_pick = w.Dropdown(options=self._image_options(), value=None, description="or pick",
                                layout=w.Layout(width="36em"))
        query = w.HTML()
        results = w.HTML()
        for widget, css in ((upload, "cbir-upload"), (image_pick, "cbir-pick"), (run_pick, "cbir-run"),
                            (metric_pick, "cbir-metric"), (query, "cbir-query-box"), (results, "cbir-results-box")):
            widget.add_class(css)
        self.controls.update(run=run_pick, metric=metric_pick, upload=upload, pick=image_pick, query=query,
                             results=results)
        upload.observe(self._on_upload, names="value")
        image_pick.observe(self._on_pick, names="value")
        run_pick.observe(self._on_settings, names="value")
        metric_pick.observe(self._on_settings, names="value")
        self._show_message(f"{len(self.features()[0])} catalogue images in run {self.run_id}: upload a photo "
                           f"or pick one")
        box = w.VBox([w.HBox([run_pick, metric_pick]), w.HBox([upload, image_pick]), message, query, results])
        box.add_class("cbir-app")
        return box

    def _run_label(self, run: Any) -> str:
        parts = [str(x) for x in (run.model, run.layer, run.pooling) if isinstance(x, str) and x]
        name = f"{run.name} · " if isinstance(run.name, str) and run.name else ""
        return f"run {run.run_id}: {name}{'/'.join(parts)} · {run.weights} · {int(run.n_features)} images"

    def _image_options(self) -> list[tuple[str, str]]:
        ids = self.features()[0]
        labels = self._labels.reindex(ids)
        text = [f"{i} · {s} ({c})" for i, s, c in zip(ids, labels["subcategory"], labels["category"])]
        order = np.lexsort((ids, labels["subcategory"].astype(str).to_numpy()))
        return [(text[j], str(ids[j])) for j in order]

    def _show_message(self, text: str) -> None:
        self.controls["message"].value = f'<div class="cbir-info">{html.escape(text)}</div>'

    def _show_error(self, text: str) -> None:
        self.controls["message"].value = (f'<div class="cbir-error" style="color:#b00020;font-weight:bold">'
                                          f'{html.escape(text)}</div>')

    def _on_upload(self, change: Mapping[str, Any]) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0]
        self._last_query = ("upload", item)
        self._run_query()
        self.controls["upload"].value = ()  # so the same file can be uploaded again

    def _on_pick(self, change: Mapping[str, Any]) -> None:
        if change["new"] is None or self._updating:
            return
        self._last_query = ("image", change["new"])
        self._run_query()

    def _on_settings(self, change: Mapping[str, Any]) -> None:
        run_changed = self.controls["run"].value != self.run_id
        self.select_run(self.controls["run"].value)
        self.metric = self.controls["metric"].value
        if run_changed:  # another run may cover other images: refresh the picker, keep a picked image
            picked = self._last_query[1] if self._last_query and self._last_query[0] == "image" else None
            self._updating = True
            try:
                self.controls["pick"].options = self._image_options()
                self.controls["pick"].value = picked if picked in set(self.features()[0]) else None
            finally:
                self._updating = False
            if picked is not None and self.controls["pick"].value is None:
                self._last_query = None
        if self._last_query is not None:
            self._run_query()

    def _run_query(self) -> None:
        kind, item = self._last_query
        self.controls["results"].value = ""
        self._show_message("Searching ...")
        try:
            if kind == "upload":
                name, data = str(item["name"]), item["content"]
                found = self.search_bytes(data, name, item.get("type") or None)
                image = validate_upload(data, name, item.get("type") or None, max_bytes=self.max_bytes)
                query_html = self._card(image_uri(image, size=self.thumb_size), name, "your photo", "", "cbir-query")
            else:
                found = self.search_catalog_image(item)
                row = self._labels.loc[item] if item in self._labels.index else {}
                query_html = self._card(thumbnail_uri(str(row.get("path", "")), size=self.thumb_size), item,
                                        str(row.get("subcategory", "")), str(row.get("category", "")), "cbir-query")
        except (UploadError, ImageError) as exc:
            self.controls["query"].value = ""
            self._show_error(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the app shows every failure instead of dying silently
            self.controls["query"].value = ""
            self._show_error(f"Search failed: {type(exc).__name__}: {exc}")
            return
        self.controls["query"].value = f'<div class="cbir-query-row"><b>Query</b>{query_html}</div>'
        self.controls["results"].value = self.results_html(found)
        self._show_message(f"Top {len(found)} by {self.metric} distance in run {self.run_id}")

    def _card(self, uri: str, title: str, label: str, category: str, css: str, extra: str = "") -> str:
        img = f'<img src="{uri}" alt="{html.escape(title)}" style="max-width:{self.thumb_size}px">' if uri else ""
        return (f'<div class="{css}" style="display:inline-block;margin:6px;text-align:center;vertical-align:top">'
                f'{img}<div class="cbir-label"><b>{html.escape(label)}</b></div>'
                f'<div class="cbir-category">{html.escape(category)}</div>'
                f'<div class="cbir-id" style="color:#666">{html.escape(title)}</div>{extra}</div>')

    def results_html(self, found: pd.DataFrame) -> str:
        """HTML cards (class ``cbir-result``) with thumbnail, sub-category, category, id and distance."""
        cards = []
        for row in found.itertuples():
            extra = f'<div class="cbir-distance">#{row.rank} · d = {row.distance:.3f}</div>'
            cards.append(self._card(thumbnail_uri(str(row.path), size=self.thumb_size), str(row.image_id),
                                    str(row.subcategory), str(row.category), "cbir-result", extra))
        return f'<div class="cbir-results">{"".join(cards)}</div>'
