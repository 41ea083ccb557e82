"""Visual search app (notebook 07, also served by Voila): a photo in, the top-k catalogue products out.

:class:`VisualSearchApp` holds the logic and can be used without a browser:
``search_bytes(data, name)`` for an upload (validated, then embedded with the same extractor as the
chosen run, built once and cached) and ``search_catalog_image(image_id)`` for a stored image (its stored
vector; itself and its byte-identical duplicates left out), both over the run's
:class:`cbir.gallery.RunVectors`. ``widget()`` builds the ipywidgets UI: choose run, measure and ``k``,
upload a photo (FileUpload) or pick a catalogue image (Dropdown), see thumbnails with labels and distances,
and "search from this" under each result. In an interactive kernel the model is loaded as the page opens,
behind a progress bar. An upload whose nearest distance is beyond the catalogue's own nearest-neighbour
distances (:meth:`cbir.gallery.RunVectors.no_match_threshold`) gets a "no close match" warning
(class ``cbir-warning``); a bad upload a message in class ``cbir-error``. Image paths that moved with the
outputs folder are found again (:func:`cbir.gallery.relocate_paths`).

Searches use the run's faiss index for the measure when ``cbir index build`` made one and it is fresh
(:meth:`cbir.gallery.RunVectors.how`): the run-info line under the run says which index and its measured recall,
or that the search is exact and why (manhattan, minkowski and chebyshev always: faiss approximate indexes serve only L2 and inner product). The app
searches every image of the run with a vector, the query split included (here they are products like the others),
while an index holds only the run's searchable images (:func:`cbir.index.build_index` keeps the query split out to
measure recall on it): those few images are searched exactly and merged by exact distance, and the line says so.
A stale index (the run's vectors changed since the build) is not used: the search is exact and a warning line
(class ``cbir-warning``) says to rebuild it. A search within the predicted label (below) is always exact.

With a trained model folder (``tagger=``, ``CBIR_TAGGER``; :mod:`cbir.tagging`) an uploaded photo is also tagged:
the predicted label (the model's: sub-category or category) and its probability are shown above the results
(class ``cbir-tag``; :attr:`VisualSearchApp.last_tag`), and the checkbox "search within the predicted <label>"
(``search_bytes(..., within_predicted=True)``) searches only the catalogue images whose label in the run's labels
equals the prediction, as the reference study's per-category index does. Without a tagger nothing changes.

Voila cannot inject papermill parameters: ``CBIR_STORE``, ``CBIR_CATALOG``, ``CBIR_OUT_DIR``, ``CBIR_MODEL``,
``CBIR_LAYER``, ``CBIR_POOLING``, ``CBIR_WEIGHTS``, ``CBIR_K``, ``CBIR_MINKOWSKI_P``, ``CBIR_RUN`` (run id or
name), ``CBIR_TAGGER`` (a trained model folder) override them (:func:`env_overrides`; the README's app section
lists them).
"""
from __future__ import annotations

import html
import os
import re
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from cbir.gallery import (RESULT_COLUMNS, RunVectors, card_html, distance_caption, image_uri,
                          thumbnail_uri)
from cbir.images import IMAGE_SUFFIXES, ImageError, decode_bytes
from cbir.index import exact_how
from cbir.rebuild import (RunRefusedError, cached_extractor, checked_extractor, descriptor_settings, extractor_kwargs,
                          resolve_weights)
from cbir.runs import features_label
from cbir.search import METRICS
from cbir.store import FeatureStore, StoreError
from cbir.tagging import Tagger, load_tagger, read_classes

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
"""Uploads larger than this (10 MiB) are refused before decoding."""
UPLOAD_SUFFIXES = IMAGE_SUFFIXES
ENV_PREFIX = "CBIR_"
_PATH_KEYS = ("store", "catalog", "out_dir", "weights", "tagger")
_ENV_KEYS = ("store", "catalog", "out_dir", "model", "layer", "pooling", "weights", "k", "minkowski_p", "run",
             "tagger")
_LABEL_TEXT = {"subcategory": "sub-category", "category": "category"}
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


def interactive_kernel(environ: Mapping[str, str] | None = None) -> bool:
    """True in a kernel that serves a person: Voila (``VOILA_BASE_URL``, ``SERVER_SOFTWARE=voila/...``) or a
    Jupyter server session (``JPY_SESSION_NAME``); False in batch runs (papermill, nbconvert, nbval), where
    nobody uploads and loading the model would only cost time."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("VOILA_BASE_URL") or str(environ.get("SERVER_SOFTWARE", "")).startswith("voila")
                or environ.get("JPY_SESSION_NAME"))


def catalogue_bases(store_path: str | os.PathLike, *, catalog: str | os.PathLike | None = None,
                    out_dir: str | os.PathLike | None = None,
                    catalog_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders where moved images are looked for (:func:`cbir.gallery.relocate_paths`), most specific first:
    ``catalog_root``, the catalogue ``catalog`` names (its folder), ``out_dir``, the store's folder and up to
    three of its parents."""
    bases: list[Path] = []
    if catalog_root is not None:
        bases.append(Path(catalog_root).expanduser())
    if catalog is not None and str(catalog) != "demo":
        spec = Path(catalog).expanduser()
        bases.append(spec if spec.is_dir() else spec.parent)
    if out_dir is not None:
        bases.append(Path(out_dir).expanduser())
    folder = Path(store_path).expanduser().absolute().parent
    bases += [folder, *list(folder.parents)[:3]]
    return list(dict.fromkeys(bases))



class VisualSearchApp:
    """Top-k visual search over one feature store.

    ``store``: a FeatureStore or its path. ``run``: run id or name to start with (default: the latest
    complete run matching ``model``/``pooling``/``weights``, else the latest complete run). ``metric``:
    one of ``metrics`` (default cosine), ``k`` results (1 to ``max_k``), ``minkowski_p`` for minkowski.
    ``weights``: the weights file, for runs made from one. ``catalog`` (``"demo"`` resolved under ``out_dir``):
    read for labels only when the store has no catalogue; with ``catalog_root`` and ``out_dir`` it also tells
    where to look for images whose stored paths moved (:func:`catalogue_bases`).
    ``tagger``: a trained model folder (or a loaded :class:`cbir.tagging.Tagger`) that tags uploads; ``last_tag``
    is the last upload's ``(label, probability)`` and ``within_predicted`` (the checkbox) restricts an upload's
    search to the catalogue images of the predicted label.
    A missing store or an unusable tagger folder does not raise: ``problem`` says what is wrong and the widget
    shows it.
    ``controls``: the widgets by role (``run, run_info, metric, k, upload, pick, loading, progress, message,
    query, results``, with a tagger also ``within, tag``) once :meth:`widget` has built them; ``buttons`` the
    "search from this" buttons of the results on display and ``shown`` their rows.
    """

    def __init__(self, store: FeatureStore | str | os.PathLike, *, run: int | str | None = None,
                 metric: str | None = None, k: int = 5, minkowski_p: float = 3, model: str | None = None,
                 layer: str | None = None, pooling: str | None = None, weights: str | None = "imagenet",
                 catalog: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                 catalog_root: str | os.PathLike | None = None, metrics: list[str] | None = None,
                 max_bytes: int = MAX_UPLOAD_BYTES, thumb_size: int = 128, max_k: int = 50,
                 tagger: str | os.PathLike | Tagger | None = None, within_predicted: bool = False) -> None:
        self.metrics = tuple(metrics or METRICS)
        metric = metric or ("cosine" if "cosine" in self.metrics else self.metrics[0])
        if metric not in self.metrics:
            raise ValueError(f"metric {metric!r} is not one of {', '.join(self.metrics)}")
        self.metric, self.k, self.max_k, self.minkowski_p = metric, int(k), int(max_k), minkowski_p
        self.weights, self.max_bytes, self.thumb_size = weights, int(max_bytes), int(thumb_size)
        self.catalog_spec, self.out_dir, self.catalog_root = catalog, out_dir, catalog_root
        self.problem: str | None = None
        self.store: FeatureStore | None = None
        self.run_id: int | None = None
        self._vectors: dict[int, RunVectors] = {}
        self._lock = threading.RLock()
        self.controls: dict[str, Any] = {}
        self.buttons: list[Any] = []
        self.shown = pd.DataFrame(columns=RESULT_COLUMNS)
        self.preload_thread: threading.Thread | None = None
        self._last_query: tuple[str, Any] | None = None
        self._updating = False
        self.tagger_spec = None if tagger is None or str(tagger).strip().lower() in ("", "none") else tagger
        self._tagger: Tagger | None = tagger if isinstance(tagger, Tagger) else None
        self.tagger_label: str | None = None
        if within_predicted and self.tagger_spec is None:
            raise ValueError("within_predicted needs a tagger (a trained model folder) to predict the label")
        self.within_predicted = bool(within_predicted)
        self.last_tag: tuple[str, float] | None = None
        if isinstance(store, FeatureStore):
            self.store = store
        elif not Path(store).is_file():
            self.problem = (f"No feature store at {store}: run `make demo` (or `cbir run params/demo.yaml`) "
                            f"first, or start the app with another store (see the README)")
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
            if self.tagger_spec is not None:  # classes.json checked now, the model loaded when first needed
                self.tagger_label = (self._tagger.label if self._tagger is not None
                                     else read_classes(self.tagger_spec)[0])
        except ValueError as exc:  # e.g. CBIR_RUN names no searchable run, a tagger that cannot tag: show it
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
        return labels

    def bases(self) -> list[Path]:
        """Where moved images are looked for (:func:`catalogue_bases`)."""
        return catalogue_bases(self.store.path, catalog=self.catalog_spec, out_dir=self.out_dir,
                               catalog_root=self.catalog_root)

    def vectors(self, run_id: int | None = None) -> RunVectors:
        """The run's vectors, labels (paths relocated when the outputs folder moved) and indexes; built once."""
        run_id = self.run_id if run_id is None else int(run_id)
        with self._lock:
            if run_id not in self._vectors:
                self._vectors[run_id] = RunVectors(self.store, run_id, searchable="all", bases=self.bases(),
                                                   p=float(self.minkowski_p), labels=self._load_labels(run_id))
            return self._vectors[run_id]

    @property
    def _labels(self) -> pd.DataFrame:
        return self.vectors().labels

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
        self.vectors()

    def run_info(self, run_id: int | None = None) -> dict[str, Any]:
        """The stored run record (model, layer, pooling, weights, dim, params = identity, ...)."""
        return self.store.run(self.run_id if run_id is None else run_id)

    def features(self, run_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids[N], X[N, D] float32)`` of a run, read once and cached."""
        vectors = self.vectors(run_id)
        return vectors.ids, vectors.X

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

    def tagger(self) -> Tagger | None:
        """The trained model that tags uploads (loaded once), or None without one."""
        if self.tagger_spec is None:
            return None
        with self._lock:
            if self._tagger is None:
                self._tagger = load_tagger(self.tagger_spec)
            return self._tagger

    def tag_bytes(self, data: bytes | memoryview, name: str, mime: str | None = None) -> tuple[str, float]:
        """The tagger's ``(label, probability)`` for an upload (validated); ``ValueError`` without a tagger."""
        tagger = self.tagger()
        if tagger is None:
            raise ValueError("this app has no tagger: start it with tagger= (or CBIR_TAGGER) naming a trained "
                             "model folder")
        image = validate_upload(data, name, mime, max_bytes=self.max_bytes, size=tagger.input_size)
        return tagger.tag(image)

    def outside_label(self, value: str, *, column: str | None = None) -> frozenset[str]:
        """The current run's searchable image ids whose label (``column``, default the tagger's) is not
        ``value``: what a search within ``value`` leaves out."""
        vectors = self.vectors()
        column = column or self.tagger_label
        labels = vectors.labels[column].reindex(vectors.catalog_ids).astype(str).to_numpy()
        return frozenset(vectors.catalog_ids[labels != str(value)])

    # -- search -------------------------------------------------------------------------------
    def index(self, metric: str | None = None) -> Any:
        """The exact k-NN index (:class:`cbir.search.ExactIndex`) of the current run for ``metric``, cached."""
        return self.vectors().index(metric or self.metric)

    def search_how(self, metric: str | None = None) -> str:
        """How the current run is searched under ``metric``: its faiss index's label and measured recall, or
        ``"exact search (<metric>: <why>)"`` (:meth:`cbir.gallery.RunVectors.how`)."""
        return self.vectors().how(metric or self.metric)

    def index_warning(self, metric: str | None = None) -> str | None:
        """Why the current run's saved index for ``metric`` is not used (stale), or None."""
        warning = self.vectors().index_warning(metric or self.metric)
        return None if warning is None else f"{warning}. This search was exact."

    def search_bytes(self, data: bytes | memoryview, name: str, mime: str | None = None, *,
                     metric: str | None = None, k: int | None = None,
                     within_predicted: bool | None = None) -> pd.DataFrame:
        """Top-k catalogue images for an uploaded photo: ``rank, image_id, category, subcategory,
        distance, similarity, path``. Raises :class:`UploadError` for a bad upload.

        With a tagger the photo is tagged (``last_tag``: label, probability) and ``within_predicted`` (default:
        the app's ``within_predicted``, the checkbox) searches only the catalogue images of the predicted label
        (fewer than k, or none, when the run has fewer of them). The search goes through the run's fresh index
        for the measure when there is one, except within the predicted label (exact: an index's measured
        recall is for the whole catalogue); ``.attrs["how"]`` says how (:meth:`search_how`)."""
        self._require_ready()
        self.last_tag = None
        within = self.within_predicted if within_predicted is None else bool(within_predicted)
        if within and self.tagger_spec is None:
            raise ValueError("search within the predicted label needs a tagger: start the app with tagger= "
                             "(or CBIR_TAGGER) naming a trained model folder")
        vector = self.embed_bytes(data, name, mime)
        if self.tagger_spec is not None:
            self.last_tag = self.tag_bytes(data, name, mime)
        metric = metric or self.metric
        if not within:
            return self.vectors().search_vector(vector, metric=metric, k=int(k or self.k))
        found = self.vectors().search_vector(vector, metric=metric, k=int(k or self.k), use_index=False,
                                             exclude=self.outside_label(self.last_tag[0]))
        found.attrs["how"] = exact_how(metric, f"search within the predicted {_LABEL_TEXT[self.tagger_label]}")
        return found

    def search_catalog_image(self, image_id: str, *, metric: str | None = None,
                             k: int | None = None) -> pd.DataFrame:
        """Top-k for a stored image (its stored vector), leaving out itself and its byte-identical copies."""
        self._require_ready()
        return self.vectors().search_image(str(image_id), metric=metric or self.metric, k=int(k or self.k))

    def no_match_threshold(self, metric: str | None = None) -> float:
        """The distance beyond which an upload has no close match in the current run under ``metric``: the 99th
        percentile of the catalogue images' distances to their own nearest neighbour (computed once)."""
        with self._lock:
            return self.vectors().no_match_threshold(metric or self.metric)

    def no_match_warning(self, found: pd.DataFrame, *, metric: str | None = None) -> str | None:
        """The "no close match" text when the nearest result of an upload is farther than
        :meth:`no_match_threshold`; None when it is within it (or there is no result)."""
        if found.empty:
            return None
        metric = metric or self.metric
        threshold, nearest = self.no_match_threshold(metric), float(found["distance"].iloc[0])
        if not np.isfinite(threshold) or nearest <= threshold:
            return None
        return (f"No close match: the nearest catalogue image is at {metric} distance {nearest:.3f}, while 99% of "
                f"the catalogue's images have a neighbour within {threshold:.3f}. The photo probably shows "
                f"something this catalogue does not hold; the results below are only the least far.")

    def _require_ready(self) -> None:
        if self.problem is not None:
            raise RuntimeError(self.problem)

    # -- widgets ------------------------------------------------------------------------------
    def widget(self, *, preload: bool | None = None, background: bool = True) -> Any:
        """The ipywidgets UI (a VBox); shows ``problem`` instead when there is nothing to search.

        ``preload`` (default: in an interactive kernel, :func:`interactive_kernel`) loads the run's vectors,
        its model and the no-match threshold now, behind a progress bar, in a thread when ``background``,
        so the first upload does not wait for the model."""
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
        wide = {"description_width": "5em"}
        run_pick = w.Dropdown(options=[(self._run_label(r), int(r.run_id)) for r in runs.itertuples()],
                              value=self.run_id, description="Run", style=wide,
                              layout=w.Layout(width="100%", max_width="64em"))
        run_info = w.HTML(layout=w.Layout(margin="0 0 4px 5.5em"))
        metric_pick = w.Dropdown(options=list(self.metrics), value=self.metric, description="Measure", style=wide,
                                 layout=w.Layout(width="20em"))
        k_pick = w.BoundedIntText(value=min(self.k, self.max_k), min=1, max=self.max_k, description="Results (k)",
                                  style={"description_width": "6.5em"}, layout=w.Layout(width="11em"))
        upload = w.FileUpload(accept=",".join(UPLOAD_SUFFIXES), multiple=False, description="Upload a photo",
                              layout=w.Layout(width="13em"))
        image_pick = w.Dropdown(options=self._image_options(), value=None, description="or pick",
                                style={"description_width": "4em"}, layout=w.Layout(width="100%", max_width="40em"))
        progress = w.IntProgress(value=0, min=0, max=3, bar_style="info", layout=w.Layout(width="16em"))
        loading_text = w.HTML()
        loading = w.HBox([progress, loading_text], layout=w.Layout(display="none", align_items="center"))
        query = w.HTML()
        results = w.Box(layout=w.Layout(display="flex", flex_flow="row wrap", align_items="flex-start"))
        for widget, css in ((upload, "cbir-upload"), (image_pick, "cbir-pick"), (run_pick, "cbir-run"),
                            (run_info, "cbir-run-info"), (metric_pick, "cbir-metric"), (k_pick, "cbir-k"),
                            (loading, "cbir-loading"), (query, "cbir-query-box"), (results, "cbir-results-box")):
            widget.add_class(css)
        self.controls.update(run=run_pick, run_info=run_info, metric=metric_pick, k=k_pick, upload=upload,
                             pick=image_pick, loading=loading, progress=progress, loading_text=loading_text,
                             query=query, results=results)
        self._show_run_info()
        upload.observe(self._on_upload, names="value")
        image_pick.observe(self._on_pick, names="value")
        for control in (run_pick, metric_pick, k_pick):
            control.observe(self._on_settings, names="value")
        tagging, tag_shown = [], []
        if self.tagger_spec is not None:  # the upload's predicted label, and the search within it
            within = w.Checkbox(value=self.within_predicted, indent=False,
                                description=f"search within the predicted {_LABEL_TEXT[self.tagger_label]}",
                                layout=w.Layout(width="auto"))
            tag = w.HTML()
            within.add_class("cbir-within")
            tag.add_class("cbir-tag-box")
            within.observe(self._on_within, names="value")
            self.controls.update(within=within, tag=tag)
            tagging, tag_shown = [within], [tag]
        box = w.VBox([run_pick, run_info, w.HBox([metric_pick, k_pick], layout=w.Layout(flex_flow="row wrap")),
                      w.HBox([upload, image_pick], layout=w.Layout(flex_flow="row wrap", width="100%")),
                      *tagging, loading, message, *tag_shown, query, results])
        box.add_class("cbir-app")
        self._preload = interactive_kernel() if preload is None else bool(preload)
        self._background = bool(background)
        if self._preload:
            self.preload(background=self._background)
        else:
            self._show_ready()
        return box

    def preload(self, *, background: bool = True) -> threading.Thread | None:
        """Load the current run's vectors, model and no-match threshold behind the progress bar (the upload
        button is disabled meanwhile); in a daemon thread when ``background`` (returned; see :meth:`wait_ready`)."""
        c = self.controls
        run_id, model = self.run_id, self.run_info()["model"]
        steps = [("reading the run's vectors", lambda: self.vectors(run_id).how(self.metric)),
                 (f"loading the model ({model})", lambda: self.extractor(run_id)),
                 ("calibrating the no-match warning", lambda: self.no_match_threshold())]
        if self.tagger_spec is not None:
            steps.append(("loading the tagger", self.tagger))
        c["upload"].disabled = True
        c["progress"].max = len(steps)
        c["progress"].value = 0
        c["loading"].layout.display = "flex"

        def work() -> None:
            failed = None
            try:
                for i, (text, step) in enumerate(steps):
                    c["progress"].value = i
                    c["loading_text"].value = (f'<span style="margin-left:8px">Getting ready: {html.escape(text)} '
                                               f'... (step {i + 1} of {len(steps)})</span>')
                    step()
                c["progress"].value = len(steps)
            except Exception as exc:  # noqa: BLE001 - shown to the user, who may still pick catalogue images
                failed = f"Could not load the model of run {run_id}: {type(exc).__name__}: {exc}"
            finally:
                c["loading"].layout.display = "none"
                c["upload"].disabled = False
            if failed:
                self._show_error(failed)
            elif self._last_query is None:
                self._show_ready()

        if not background:
            work()
            return None
        self.preload_thread = threading.Thread(target=work, name="cbir-preload", daemon=True)
        self.preload_thread.start()
        return self.preload_thread

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for a background :meth:`preload`; True when it has finished."""
        thread = self.preload_thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _show_ready(self) -> None:
        self._show_message(f"{len(self.features()[0])} catalogue images in run {self.run_id}: upload a photo "
                           f"or pick one")

    def _run_label(self, run: Any) -> str:
        name = f"{run.name} · " if isinstance(run.name, str) and run.name else ""
        return f"run {run.run_id}: {name}{features_label(run.model, run.layer, run.pooling, weights=run.weights)}"

    def _show_run_info(self) -> None:
        """The run-info line: the run's extractor and size, then how it is searched under the current measure
        (class ``cbir-search-how``: the index and its recall, or exact and why)."""
        run = self.run_info()
        text = (f"{run['model']} · layer {run['layer'] or '-'} · pooling {run['pooling'] or 'none'} · weights "
                f"{run['weights']} · {run['dim']}-d vectors · {run['n_features']} images")
        how = f"search: {self.search_how()}"
        if self.within_predicted and not how.startswith("search: exact"):
            how += f"; uploads searched within the predicted {_LABEL_TEXT[self.tagger_label]}: exact search"
        self.controls["run_info"].value = (f'<span style="font-size:12px;color:#555">{html.escape(text)}</span>'
                                           f'<div class="cbir-search-how" style="font-size:12px;color:#555">'
                                           f'{html.escape(how)}</div>')

    def _image_options(self) -> list[tuple[str, str]]:
        return self.vectors().image_options(mark_queries=False)

    def _show_message(self, text: str) -> None:
        self.controls["message"].value = f'<div class="cbir-info">{html.escape(text)}</div>'

    def _show_warning(self, *texts: str) -> None:
        """One warning line (class ``cbir-warning``) per text."""
        self.controls["message"].value = "".join(
            f'<div class="cbir-warning" style="color:#8a4b00;background:#fff4e0;border-left:4px solid #e69500;'
            f'padding:4px 8px;margin-bottom:2px;font-weight:bold">{html.escape(text)}</div>' for text in texts)

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

    def _on_within(self, change: Mapping[str, Any]) -> None:
        self.within_predicted = bool(change["new"])
        self._show_run_info()
        if self._last_query is not None and self._last_query[0] == "upload":
            self._run_query()

    def _show_tag(self) -> None:
        """The last upload's predicted label and probability (class ``cbir-tag``); nothing without one."""
        if "tag" not in self.controls:
            return
        if self.last_tag is None:
            self.controls["tag"].value = ""
            return
        label, probability = self.last_tag
        parent = self._tagger.parents.get(label) if self._tagger is not None else None
        also = f" · category {html.escape(parent)}" if parent else ""
        self.controls["tag"].value = (f'<div class="cbir-tag">Predicted {_LABEL_TEXT[self.tagger_label]}: '
                                      f'<b>{html.escape(label)}</b> (probability {probability:.2f}){also}</div>')

    def search_from(self, image_id: str) -> None:
        """Search from a result (its "search from this" button): the catalogue image becomes the query."""
        self._last_query = ("image", str(image_id))
        self._updating = True
        try:
            self.controls["pick"].value = str(image_id)
        finally:
            self._updating = False
        self._run_query()

    def _on_settings(self, change: Mapping[str, Any]) -> None:
        run_changed = self.controls["run"].value != self.run_id
        self.select_run(self.controls["run"].value)
        self.metric = self.controls["metric"].value
        self.k = int(self.controls["k"].value)
        self._show_run_info()  # the measure decides the index (or exact search)
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
            if getattr(self, "_preload", False):
                self.preload(background=self._background)
        if self._last_query is not None:
            self._run_query()

    def _run_query(self) -> None:
        kind, item = self._last_query
        self.controls["results"].children, self.buttons = (), []
        self.shown = pd.DataFrame(columns=RESULT_COLUMNS)
        self._show_message("Searching ...")
        warning, query_label, within = None, None, None
        self.last_tag = None
        try:
            if kind == "upload":
                name, data = str(item["name"]), item["content"]
                found = self.search_bytes(data, name, item.get("type") or None)
                within = self.last_tag[0] if self.within_predicted and self.last_tag else None
                image = validate_upload(data, name, item.get("type") or None, max_bytes=self.max_bytes)
                query_html = card_html(image_id=name, uri=image_uri(image, size=self.thumb_size), label="your photo",
                                       role="query", thumb=self.thumb_size)
                warning = self.no_match_warning(found)
            else:
                found = self.search_catalog_image(item)
                row = self._labels.loc[item] if item in self._labels.index else pd.Series(dtype=object)
                query_label = row.get("subcategory")
                query_html = card_html(image_id=str(item), uri=thumbnail_uri(str(row.get("path", "")),
                                                                             size=self.thumb_size),
                                       label=str(row.get("subcategory", "")), category=str(row.get("category", "")),
                                       role="query", thumb=self.thumb_size)
        except (UploadError, RunRefusedError, ImageError) as exc:
            self.controls["query"].value = ""
            self._show_tag()
            self._show_error(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the app shows every failure instead of dying silently
            self.controls["query"].value = ""
            self._show_tag()
            self._show_error(f"Search failed: {type(exc).__name__}: {exc}")
            return
        self._show_tag()
        self.controls["query"].value = (f'<div class="cbir-query-row"><b>Query</b><br>{query_html}</div>'
                                        f'<div><b>Nearest first</b> (click "search from this" to search from a '
                                        f'result)</div>')
        self._show_results(found, query_label)
        among = ""
        if within is not None:
            n_within = len(self.vectors().catalog_ids) - len(self.outside_label(within))
            among = f" among the {n_within} catalogue images of {_LABEL_TEXT[self.tagger_label]} {within}"
            if found.empty:
                self._show_warning(f"No catalogue image of the predicted {_LABEL_TEXT[self.tagger_label]} {within} "
                                   f"in run {self.run_id}: untick \"search within\" to search them all")
                return
        warnings = [text for text in (self.index_warning(), warning) if text]  # a stale index, no close match
        if warnings:
            self._show_warning(*warnings)
        else:
            self._show_message(f"Top {len(found)} by {self.metric} distance{among} in run {self.run_id}")

    def _show_results(self, found: pd.DataFrame, query_label: Any = None) -> None:
        import ipywidgets as w

        cards, buttons = [], []
        for row, card in zip(found.itertuples(index=False), self._result_cards(found, query_label)):
            button = w.Button(description="search from this", tooltip=f"search from {row.image_id}",
                              layout=w.Layout(width=f"{self.thumb_size + 16}px", margin="0 3px 6px 3px"))
            button.add_class("cbir-search-from")
            button.on_click(lambda _, image_id=str(row.image_id): self.search_from(image_id))
            buttons.append(button)
            cards.append(w.VBox([w.HTML(card), button], layout=w.Layout(width="auto")))
        self.controls["results"].children, self.buttons, self.shown = tuple(cards), buttons, found

    def _result_cards(self, found: pd.DataFrame, query_label: Any = None) -> list[str]:
        return [card_html(image_id=str(r.image_id), uri=thumbnail_uri(str(r.path), size=self.thumb_size),
                          label=str(r.subcategory), category=str(r.category),
                          caption=distance_caption(r.rank, r.distance),
                          match=None if query_label is None else r.subcategory == query_label, thumb=self.thumb_size)
                for r in found.itertuples(index=False)]

    def results_html(self, found: pd.DataFrame) -> str:
        """HTML cards (class ``cbir-result``) with thumbnail, sub-category, category, id and distance."""
        return f'<div class="cbir-results">{"".join(self._result_cards(found))}</div>'

    def shown_html(self) -> str:
        """The result cards on display, as one HTML string."""
        results = self.controls.get("results")
        return "" if results is None else "".join(box.children[0].value for box in results.children)
