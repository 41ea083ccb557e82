"""Learned features: fine-tune a pretrained backbone on the catalogue's own labels, cheaply on CPU.

Three methods, registered in :data:`METHODS` (adding one is one :func:`register_method` call plus its test):

- ``classifier``: a tagging classifier (softmax over ``category`` or ``subcategory``); its pooled features
  (the fine-tuned backbone's, like the reference study's fine-tuned GoogLeNet) are the retrieval embedding.
- ``metric``: a retrieval embedding (``embedding_dim``, L2-normalised) trained with a normalised-softmax loss with
  an additive cosine margin (CosFace), written with ``keras.ops``.
- ``autoencoder``: ``encoder: pretrained`` (the backbone, then a trained bottleneck and decoder) or ``scratch``
  (a convolutional autoencoder on small thumbnails); MSE reconstruction; the bottleneck is the embedding.

**Data protocol** (:func:`training_split`): only the searchable part of the catalogue is ever trained on. Query
images, and every byte-identical copy of a query (same SHA-1 or ``dup_group``), are left out, and that is
asserted. Sub-categories named in ``holdout`` (the open-set protocol) are left out too. The rest is split
80:20 train/test and 80:20 of train for validation, stratified, seeded, byte-identical copies kept on one side.
Classes with fewer than ``min_class_images`` images go to an ``other`` class or are dropped (``small_classes``).

**Practical on two CPU cores**: the frozen part of the backbone runs once per image (and once per augmented
view of a training image: random rotation, horizontal flip and zoom, Keras preprocessing layers, seeded per
chunk) and its activations at a cut point are cached on disk in atomic chunks keyed by the files' SHA-1
(:class:`ActivationCache`), so an interrupted cache resumes. Training then runs only the last ``blocks`` blocks
of the backbone (BatchNorm kept in inference mode) and the head, on the cache: first the head alone, then the
blocks too at a lower learning rate, early-stopped on validation loss, with class weights; Keras'
``BackupAndRestore`` resumes an interrupted training at its last epoch.

**The result** is a folder ``DIR/``: ``model.keras`` (the whole network, float RGB 0..255 in, preprocessing
inside, outputs ``embedding`` and ``probabilities`` or ``reconstruction``), ``classes.json``, ``training.json``
(settings and data), ``split.csv``, ``history.csv``, ``metrics.json`` (test-part classification metrics),
``per_class.csv``, ``confusion.csv``. :func:`build_trained_extractor` (the ``trained`` extractor kind) makes
``model.keras`` a feature extractor like any backbone: its file's SHA-1 and its training settings are the run's
identity. Models are loaded with Keras' ``safe_mode`` (no code from the file) and only cbir's registered layers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Method", "METHODS", "register_method", "method_names", "training_split",
           "ActivationCache", "train", "ensure_trained", "load_trained", "TrainedExtractor",
           "build_trained_extractor", "is_model_path", "trained_name", "TrainingError", "MODEL_FILE", "resolve_training",
           "reconstruct", "classification_metrics", "backbone_cut", "training_report"]

MODEL_FILE = "model.keras"
OTHER = "other"
THUMB = 64  # side of the thumbnails the autoencoders reconstruct
_CACHE_VERSION = 1


class TrainingError(ValueError):
    """Training cannot start or its folder cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a trained model (its ``training.json``; part of the run identity of its features).

    ``blocks``: backbone blocks trained (from cached activations; 0 = the pooled backbone features, frozen).
    ``views``: cached views per training image (the photo plus ``views - 1`` augmented ones).
    ``epochs`` / ``learning_rate``: the head alone; ``fine_tune_epochs`` / ``fine_tune_learning_rate``: then the
    blocks too. ``holdout``: sub-categories never trained on (open-set evaluation).
    """

    method: str = "classifier"
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    label: str = "subcategory"
    blocks: int = 1
    views: int = 2
    rotation: float = 0.05
    zoom: float = 0.15
    epochs: int = 8
    fine_tune_epochs: int = 6
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    batch_size: int = 64
    patience: int = 2
    dropout: float = 0.2
    embedding_dim: int = 256
    scale: float = 16.0
    margin: float = 0.1
    encoder: str = "pretrained"
    min_class_images: int = 10
    small_classes: str = "other"
    holdout: tuple[str, ...] = ()
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "holdout", tuple(sorted(str(h) for h in self.holdout)))
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {method_names()}, got {self.method!r}")
        if self.label not in ("category", "subcategory"):
            problems.append(f"label must be category or subcategory, got {self.label!r}")
        if self.small_classes not in ("other", "drop"):
            problems.append(f"small_classes must be other or drop, got {self.small_classes!r}")
        if self.encoder not in ("pretrained", "scratch"):
            problems.append(f"encoder must be pretrained or scratch, got {self.encoder!r}")
        for name in ("blocks", "views", "epochs", "fine_tune_epochs", "batch_size", "patience", "embedding_dim",
                     "min_class_images", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name in (
                    "views", "batch_size", "embedding_dim") else 0):
                problems.append(f"{name} must be a non-negative int (views, batch_size, embedding_dim >= 1), "
                                f"got {value!r}")
        for name in ("test_fraction", "val_fraction"):
            if not 0 < getattr(self, name) < 1:
                problems.append(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.epochs + self.fine_tune_epochs < 1:
            problems.append("epochs + fine_tune_epochs must be >= 1")
        if problems:
            raise TrainingError("training settings: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> TrainConfig:
        """A config from a mapping (params ``train:``, ``training.json``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TrainingError(f"unknown training settings {unknown}; known: {sorted(known)}")
        values = dict(settings)
        if "holdout" in values:
            values["holdout"] = tuple(values["holdout"] or ())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["holdout"] = list(self.holdout)
        return out

    @property
    def has_classes(self) -> bool:
        return METHODS[self.method].classes


# ---------------------------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    """A training method: ``head(features, n_classes, config) -> dict`` of named Keras tensors built on the
    pooled (or, for the scratch autoencoder, encoded) features: ``embedding`` plus ``probabilities`` (methods
    with ``classes``) or ``reconstruction``; ``loss(config) -> (output name, loss)`` the training loss;
    ``classes``: trained on labels; ``monitor``: what early stopping watches."""

    name: str
    head: Callable[..., dict[str, Any]]
    loss: Callable[[TrainConfig], tuple[str, Any]]
    classes: bool
    note: str = ""


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    if method.name in METHODS and not replace:
        raise ValueError(f"a training method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def _classifier_head(pooled: Any, n_classes: int, config: TrainConfig) -> dict[str, Any]:
    import keras

    x = keras.layers.Dropout(config.dropout, name="head_dropout")(pooled)
    probs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return {"embedding": keras.layers.Identity(name="embedding")(pooled), "probabilities": probs}


def _metric_head(pooled: Any, n_classes: int, config: TrainConfig) -> dict[str, Any]:
    import keras

    from cbir.layers import CosineClassifier, L2Normalize

    x = keras.layers.Dropout(config.dropout, name="head_dropout")(pooled)
    x = keras.layers.Dense(config.embedding_dim, name="projection")(x)
    embedding = L2Normalize(name="embedding")(x)
    cosines = CosineClassifier(n_classes, name="cosines")(embedding)
    probs = keras.layers.Activation("softmax", name="probabilities")(keras.layers.Rescaling(config.scale)(cosines))
    return {"embedding": embedding, "probabilities": probs, "cosines": cosines}


def _decoder(latent: Any, name: str = "decoder") -> Any:
    import keras
    from keras import layers

    x = layers.Dense(4 * 4 * 128, activation="relu", name=f"{name}_dense")(latent)
    x = layers.Reshape((4, 4, 128), name=f"{name}_reshape")(x)
    for i, filters in enumerate((128, 64, 32, 16)):  # 4 -> 64
        x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu",
                                   name=f"{name}_up{i}")(x)
    return layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="reconstruction")(x)


def _autoencoder_head(features: Any, n_classes: int, config: TrainConfig) -> dict[str, Any]:
    import keras

    latent = keras.layers.Dense(config.embedding_dim, name="embedding")(features)
    return {"embedding": latent, "reconstruction": _decoder(latent)}


def _cross_entropy(config: TrainConfig) -> tuple[str, Any]:
    return "probabilities", "sparse_categorical_crossentropy"


def _margin_softmax(config: TrainConfig) -> tuple[str, Any]:
    """Normalised softmax with an additive cosine margin (CosFace): CE of ``scale * (cos - margin * onehot)``."""
    from keras import ops

    scale, margin = float(config.scale), float(config.margin)

    def loss(y_true, cosines):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        onehot = ops.one_hot(labels, ops.shape(cosines)[-1])
        logits = scale * (cosines - margin * onehot)
        return ops.mean(ops.categorical_crossentropy(onehot, logits, from_logits=True))

    return "cosines", loss


def _mse(config: TrainConfig) -> tuple[str, Any]:
    return "reconstruction", "mse"


register_method(Method("classifier", _classifier_head, _cross_entropy, classes=True,
                       note="softmax tagging classifier; embedding = the fine-tuned pooled features"))
register_method(Method("metric", _metric_head, _margin_softmax, classes=True,
                       note="normalised-softmax (CosFace margin) embedding, L2-normalised"))
register_method(Method("autoencoder", _autoencoder_head, _mse, classes=False,
                       note="MSE reconstruction of 64 px thumbnails; embedding = the bottleneck"))


# ------------------------------------------------------------------------------------------ data protocol
def _content_key(df: pd.DataFrame) -> pd.Series:
    """One key per distinct file content: the SHA-1 when known, else ``dup_group``, else the id."""
    key = df["image_id"].astype(str)
    if "dup_group" in df.columns:
        key = df["dup_group"].astype("string").fillna(key).astype(str)
    if "sha1" in df.columns:
        sha = df["sha1"].astype("string")
        key = sha.where(sha.str.fullmatch(r"[0-9a-fA-F]{40}").fillna(False), key).astype(str)
    return key


def training_split(catalog: Any, config: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(split, classes_report)`` of a query-split catalogue (a :class:`cbir.catalog.Catalog` with ``split``).

    ``split``: ``image_id, path, sha1, category, subcategory, class, part`` (train / val / test), only searchable,
    usable images whose content is not a query's, sub-categories of ``config.holdout`` left out.
    ``classes_report``: ``class, images, fate`` (``kept``, ``merged into other``, ``dropped``) for every label.
    """
    from sklearn.model_selection import train_test_split

    df = getattr(catalog, "df", catalog)
    if "split" not in df.columns:
        raise TrainingError("the catalogue has no query split (cbir.catalog.split_queries first): training must "
                            "know which images are queries so that it never sees them")
    usable = ~catalog.problem_mask() if hasattr(catalog, "problem_mask") else np.ones(len(df), bool)
    key = _content_key(df)
    is_query = (df["split"] == "query").to_numpy()
    query_content = set(key[is_query])
    unknown = sorted(set(config.holdout) - set(df["subcategory"].astype(str)))
    if unknown:
        raise TrainingError(f"holdout names sub-categories the catalogue does not have: {unknown}")
    keep = usable & ~is_query & ~key.isin(query_content).to_numpy()
    keep &= ~df["subcategory"].astype(str).isin(config.holdout).to_numpy()
    rows = df.loc[keep, [c for c in ("image_id", "path", "sha1", "category", "subcategory") if c in df.columns]].copy()
    if "sha1" not in rows.columns:
        from cbir.extract import catalogue_sha1

        rows["sha1"] = catalogue_sha1(df.loc[keep])
    rows["image_id"] = rows["image_id"].astype(str)
    rows["content"] = key[keep].to_numpy()
    label = rows[config.label].astype(str)
    counts = rows.assign(_l=label).groupby("_l")["content"].nunique()
    small = set(counts.index[counts < config.min_class_images])
    fate = {c: ("kept" if c not in small else ("merged into other" if config.small_classes == "other" else "dropped"))
            for c in counts.index}
    rows["class"] = label.where(~label.isin(small), OTHER if config.small_classes == "other" else None)
    if config.small_classes == "other" and small:
        other = rows.loc[rows["class"] == OTHER, "content"].nunique()
        if other < config.min_class_images:  # too small even merged
            rows.loc[rows["class"] == OTHER, "class"] = None
            fate = {c: ("dropped" if f == "merged into other" else f) for c, f in fate.items()}
    report = pd.DataFrame({"class": counts.index, "images": counts.to_numpy(),
                           "fate": [fate[c] for c in counts.index]})
    rows = rows[rows["class"].notna()].reset_index(drop=True)
    if rows["class"].nunique() < 2:
        raise TrainingError(f"only {rows['class'].nunique()} class(es) of {config.label} with at least "
                            f"{config.min_class_images} training images; nothing to learn")
    # split distinct contents, so byte-identical copies never straddle train and test
    groups = rows.drop_duplicates("content")[["content", "class"]]
    rest, test = train_test_split(groups, test_size=config.test_fraction, stratify=groups["class"],
                                  random_state=config.seed)
    train, val = train_test_split(rest, test_size=config.val_fraction, stratify=rest["class"],
                                  random_state=config.seed)
    part = {**dict.fromkeys(train["content"], "train"), **dict.fromkeys(val["content"], "val"),
            **dict.fromkeys(test["content"], "test")}
    rows["part"] = rows["content"].map(part)
    assert not rows["content"].isin(query_content).any(), "a query's content reached the training data"
    assert not rows["image_id"].isin(df.loc[is_query, "image_id"].astype(str)).any(), "a query reached training"
    return rows.drop(columns="content"), report


# ------------------------------------------------------------------------------------------ the backbone cut
def backbone_cut(backbone: str, blocks: int) -> str:
    """The layer whose activations are cached when the last ``blocks`` blocks are trained (0: the entry's
    ``conv_layer``, pooled). The cut points are the entry's ``train_cuts`` (data, or a hook for a family)."""
    from cbir.extractors import get_entry, resolve

    entry = get_entry(backbone)
    if entry.kind != "cnn":
        raise TrainingError(f"{backbone} is a {entry.kind}, not a CNN backbone: it cannot be fine-tuned")
    if blocks == 0:
        return entry.conv_layer
    cuts = entry.train_cuts
    cuts = tuple(resolve(cuts)(backbone)) if cuts is not None and not isinstance(cuts, tuple) else (cuts or ())
    if blocks > len(cuts):
        raise TrainingError(f"{backbone}: at most {len(cuts)} block(s) can be trained from cached activations "
                            f"(its registered train_cuts), got blocks={blocks}")
    return cuts[blocks - 1]


def _split_backbone(base: Any, cut: str, conv_layer: str, blocks: int) -> tuple[Any, Any]:
    """``(bottom, top_blocks)``: the frozen network up to ``cut`` and the blocks after it up to ``conv_layer``
    (None for ``blocks == 0``, where the bottom ends with global average pooling)."""
    import keras

    from cbir.backbones import _find_layer
    from cbir.layers import GlobalPool

    cut_out = _find_layer(base, cut).output
    if blocks == 0:
        return keras.Model(base.input, GlobalPool("gap", name="pool_gap")(cut_out), name="bottom"), None
    top = keras.Model(cut_out, _find_layer(base, conv_layer).output, name="top_blocks")
    return keras.Model(base.input, cut_out, name="bottom"), top


def _affine_preprocess(preprocess: Callable[[np.ndarray], np.ndarray]) -> tuple[list[list[float]], list[float]]:
    """``(matrix 3x3, offset 3)`` with ``preprocess(x) == x @ matrix + offset`` per pixel, found by probing;
    TrainingError when the backbone's preprocessing is not per-pixel affine (it could not live in the model)."""
    probe = np.zeros((1, 1, 4, 3), np.float32)
    probe[0, 0, 1, 0] = probe[0, 0, 2, 1] = probe[0, 0, 3, 2] = 1.0
    out = np.asarray(preprocess(probe.copy()), np.float64).reshape(4, 3)
    offset = out[0]
    matrix = out[1:] - offset
    check = np.random.default_rng(0).uniform(0, 255, (2, 3, 3, 3)).astype(np.float32)
    want = np.asarray(preprocess(check.copy()), np.float64)
    if not np.allclose(check.astype(np.float64) @ matrix + offset, want, atol=1e-3):
        raise TrainingError("the backbone's preprocessing is not a per-pixel affine map; it cannot be saved "
                            "inside the model")
    return matrix.tolist(), offset.tolist()


# -------------------------------------------------------------------------------------- activation cache
def _augmenter(config: TrainConfig, seed: int) -> Any:
    import keras

    return keras.Sequential([keras.layers.RandomFlip("horizontal", seed=seed),
                             keras.layers.RandomRotation(config.rotation, fill_mode="nearest", seed=seed + 1),
                             keras.layers.RandomZoom((-config.zoom, config.zoom), fill_mode="nearest", seed=seed + 2)],
                            name="augment")


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


@dataclass
class ActivationCache:
    """Cached activations of a backbone's frozen part, in chunk files ``<dir>/v<view>-<key>.npz`` written
    atomically: ``sha1`` (str), ``acts`` (float16) and ``thumbs`` (uint8, 64 px). A chunk's key hashes its files'
    SHA-1, so a chunk is reused only for the very same images and view, and a rerun computes only missing
    chunks. Loaded with ``allow_pickle=False``."""

    root: Path
    backbone: str
    weights: str
    cut: str | None
    blocks: int
    config: TrainConfig
    chunk: int = 256
    progress: bool = False
    _models: tuple[Any, Any, Any, Any] | None = field(default=None, repr=False)

    def models(self) -> tuple[Any, Any, Any, Any]:
        """``(base, bottom, top_blocks, weights_choice)``, built once."""
        if self._models is None:
            from cbir.backbones import build_base_model

            entry = _entry(self.backbone)
            base, choice = build_base_model(self.backbone, include_top=False, weights=self.weights)
            bottom, top = _split_backbone(base, self.cut, entry.conv_layer, self.blocks)
            self._models = (base, bottom, top, choice)
        return self._models

    @property
    def directory(self) -> Path:
        """``<root>/<backbone>-<cut>-<weights sha1>-<augmentation>-v1`` (``thumbs-...`` without a backbone)."""
        from cbir.backbones import _sha1

        c = self.config
        aug = f"r{c.rotation:g}z{c.zoom:g}"
        if self.cut is None:
            return self.root / f"thumbs-{aug}-v{_CACHE_VERSION}"
        choice = self.models()[3]
        tag = (_sha1(choice.path) or choice.label.replace(" ", "_"))[:12]
        return self.root / f"{self.backbone}-{self.cut}-{tag}-{aug}-v{_CACHE_VERSION}"

    def _file(self, view: int, sha1s: Sequence[str]) -> Path:
        key = hashlib.sha1(("\n".join(sha1s) + f"\n{view}").encode()).hexdigest()[:20]
        return self.directory / f"v{view}-{key}.npz"

    def activations(self, rows: pd.DataFrame, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ok, acts, thumbs)`` of ``rows`` (``path``, ``sha1``) for ``view`` (0: the photo), computing missing
        chunks; ``ok`` is False for files that could not be read (or whose content changed)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        n = len(rows)
        starts = range(0, n, self.chunk)
        parts = []
        started = time.perf_counter()
        for i, start in enumerate(starts):
            part = rows.iloc[start:start + self.chunk]
            path = self._file(view, part["sha1"].astype(str).tolist())
            if not path.is_file():
                self._compute(part, view, path, seed=self.config.seed * 1000 + view * 100_003 + i)
            with np.load(path, allow_pickle=False) as data:
                if list(data["sha1"]) != part["sha1"].astype(str).tolist():
                    raise TrainingError(f"{path}: cache chunk holds other images than its name says; delete it")
                parts.append((data["ok"].copy(), data["acts"].copy(), data["thumbs"].copy()))
            if self.progress:
                done = min(n, start + self.chunk)
                print(f"\rcache view {view}: {done}/{n} images ({time.perf_counter() - started:.0f} s)",
                      end="" if done < n else "\n", flush=True)
        if not parts:
            return np.zeros(0, bool), np.zeros((0,), np.float16), np.zeros((0, THUMB, THUMB, 3), np.uint8)
        return tuple(np.concatenate(a) for a in zip(*parts))  # type: ignore[return-value]

    def _compute(self, part: pd.DataFrame, view: int, path: Path, seed: int) -> None:
        from cbir.extractors import resolve
        from cbir.images import ImageError, decode_bytes, read_file_bytes

        size = _entry(self.backbone).input_size if self.cut else THUMB

        def load(item: tuple[str, str]) -> tuple[np.ndarray | None, np.ndarray | None]:
            p, sha = item
            try:
                data = read_file_bytes(p)
                if hashlib.sha1(data).hexdigest() != sha:
                    return None, None
                return decode_bytes(data, size=size, name=str(p)), decode_bytes(data, size=THUMB, name=str(p))
            except (ImageError, OSError, ValueError):
                return None, None

        with ThreadPoolExecutor(max_workers=2) as pool:
            loaded = list(pool.map(load, zip(part["path"].astype(str), part["sha1"].astype(str))))
        ok = np.array([im is not None for im, _ in loaded])
        images = np.zeros((len(part), size, size, 3), np.uint8)
        thumbs = np.zeros((len(part), THUMB, THUMB, 3), np.uint8)
        for j, (im, th) in enumerate(loaded):
            if im is not None:
                images[j], thumbs[j] = im, th
        batch = images.astype(np.float32)
        if view > 0 and len(batch):
            augment = _augmenter(self.config, seed)
            batch = np.clip(np.asarray(augment(batch, training=True)), 0, 255).astype(np.float32)
            thumbs = _resize_uint8(batch.round().astype(np.uint8), THUMB)
        if self.cut is None:  # thumbnails only (the scratch autoencoder)
            acts = np.zeros((len(part), 0), np.float16)
        else:
            bottom, preprocess = self.models()[1], resolve(_entry(self.backbone).preprocess)
            outs = [np.asarray(bottom.predict_on_batch(np.asarray(preprocess(batch[s:s + 32]), np.float32)))
                    for s in range(0, len(batch), 32)]
            acts = np.concatenate(outs).astype(np.float16) if outs else np.zeros((0,), np.float16)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.savez(fh, sha1=part["sha1"].astype(str).to_numpy(dtype=str), ok=ok, acts=acts, thumbs=thumbs)
        os.replace(tmp, path)


def _entry(backbone: str) -> Any:
    from cbir.extractors import get_entry

    return get_entry(backbone)


# ------------------------------------------------------------------------------------------------ training
def _set_seed(seed: int) -> None:
    """Seeds Python, NumPy and Keras; with TensorFlow, its ops are made deterministic too."""
    import keras

    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _build_top(input_shape: tuple[int, ...], top_blocks: Any, n_classes: int, config: TrainConfig) -> Any:
    """The trained part: (cached activations) -> [top blocks, BatchNorm in inference mode] -> GAP -> head."""
    import keras

    from cbir.layers import GlobalPool

    inp = keras.Input(input_shape, name="activations")
    x = inp
    if top_blocks is not None:
        x = top_blocks(x, training=False)  # and BatchNorm layers stay non-trainable (_unfreeze): inference mode
        x = GlobalPool("gap", name="pool_gap")(x)
    outputs = METHODS[config.method].head(x, n_classes, config)
    return keras.Model(inp, outputs, name="top")


def _build_scratch(n_classes: int, config: TrainConfig) -> Any:
    """A convolutional autoencoder from scratch: 64 px thumbnails (0..1) -> bottleneck -> reconstruction."""
    import keras
    from keras import layers

    inp = keras.Input((THUMB, THUMB, 3), name="thumbs")
    x = inp
    for i, filters in enumerate((32, 64, 128, 128)):  # 64 -> 4
        x = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"encoder_conv{i}")(x)
    x = layers.Flatten(name="encoder_flatten")(x)
    outputs = METHODS[config.method].head(x, n_classes, config)
    return keras.Model(inp, outputs, name="top")


def _unfreeze(blocks: Any) -> None:
    """Make the blocks trainable but keep every BatchNormalization frozen: Keras runs a non-trainable BatchNorm in
    inference mode (its ImageNet statistics), whatever ``training`` the surrounding call passes."""
    import keras

    blocks.trainable = True
    for layer in blocks._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _fit(model: Any, config: TrainConfig, data: dict[str, Any], *, epochs: int, learning_rate: float,
         backup: Path, phase: str, class_weight: dict[int, float] | None, verbose: int) -> pd.DataFrame:
    import keras

    name, loss = METHODS[config.method].loss(config)
    train_model = keras.Model(model.input, model.output[name] if isinstance(model.output, dict) else model.output)
    train_model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                        metrics=["accuracy"] if name == "probabilities" else None)
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                               restore_best_weights=True),
                 keras.callbacks.BackupAndRestore(str(backup / phase), delete_checkpoint=True)]
    history = train_model.fit(data["x_train"], data["y_train"], validation_data=(data["x_val"], data["y_val"]),
                              epochs=epochs, batch_size=config.batch_size, shuffle=True, verbose=verbose,
                              class_weight=class_weight, callbacks=callbacks)
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    frame.insert(0, "phase", phase)
    return frame


def _arrays(cache: ActivationCache, split: pd.DataFrame, config: TrainConfig, classes: list[str]
            ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Training arrays from the cache: every view of the train part, the photo of val and test. Returns the
    arrays and ``split`` with ``cached`` (False for unreadable files, left out)."""
    index = {c: i for i, c in enumerate(classes)}
    split = split.copy()
    ok0, acts0, thumbs0 = cache.activations(split, 0)
    split["cached"] = ok0
    out: dict[str, Any] = {}
    scratch = config.method == "autoencoder" and config.encoder == "scratch"
    for part in ("train", "val", "test"):
        mask = (split["part"] == part).to_numpy() & ok0
        xs, ts, ys = [acts0[mask]], [thumbs0[mask]], [split.loc[mask, "class"].map(index).to_numpy()]
        if part == "train":
            rows = split[(split["part"] == "train").to_numpy()]
            for view in range(1, config.views):
                okv, actsv, thumbsv = cache.activations(rows, view)
                xs.append(actsv[okv])
                ts.append(thumbsv[okv])
                ys.append(rows.loc[okv, "class"].map(index).to_numpy())
        thumbs = np.concatenate(ts)
        x = (thumbs.astype(np.float32) / 255.0) if scratch else np.concatenate(xs).astype(np.float32)
        y = np.concatenate(ys).astype(np.int32)
        out[f"x_{part}"] = x
        out[f"y_{part}"] = (thumbs.astype(np.float32) / 255.0) if config.method == "autoencoder" else y
        out[f"labels_{part}"] = y
    return out, split


def _class_weights(y: np.ndarray, n: int) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    out = dict.fromkeys(range(n), 1.0)
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
                           ) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Test-part metrics: ``(summary, per_class, confusion)``. Summary: accuracy, top-3 accuracy, macro
    precision / recall / F1, one-vs-rest macro ROC-AUC (over the classes present in ``y_true``), n. Per class:
    precision, recall, F1, support. Confusion: rows true, columns predicted, normalised per true class."""
    from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score,
                                 top_k_accuracy_score)

    labels = np.arange(len(classes))
    pred = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    present = s > 0
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, pred, labels=labels[present], average="macro",
                                                    zero_division=0)
    try:
        auc = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
    except ValueError:  # a class absent from the test part: the one-vs-rest AUC over the present ones
        cols = labels[present]
        sub = probs[:, cols] / probs[:, cols].sum(axis=1, keepdims=True)
        remap = {c: i for i, c in enumerate(cols)}
        auc = float(roc_auc_score(np.vectorize(remap.get)(y_true), sub, multi_class="ovr", average="macro"))
    summary = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, pred)),
               "top3_accuracy": float(top_k_accuracy_score(y_true, probs, k=min(3, len(classes)), labels=labels)),
               "macro_precision": float(mp), "macro_recall": float(mr), "macro_f1": float(mf), "roc_auc_ovr": auc}
    per_class = pd.DataFrame({"class": list(classes), "precision": p, "recall": r, "f1": f, "support": s})
    cm = confusion_matrix(y_true, pred, labels=labels).astype(float)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    confusion = pd.DataFrame(cm, index=pd.Index(list(classes), name="true"), columns=list(classes))
    return summary, per_class, confusion


def _assemble(cache: ActivationCache, top: Any, config: TrainConfig) -> Any:
    """The whole network for ``model.keras``: float RGB 0..255 -> preprocessing -> frozen bottom -> trained top."""
    import keras

    from cbir.extractors import resolve
    from cbir.layers import AffinePreprocess

    outputs_of = {k: v for k, v in top.output.items() if k != "cosines"}
    if config.method == "autoencoder" and config.encoder == "scratch":
        inp = keras.Input((THUMB, THUMB, 3), name="image")
        x = keras.layers.Rescaling(1.0 / 255, name="preprocess")(inp)
    else:
        entry = _entry(config.backbone)
        inp = keras.Input((entry.input_size, entry.input_size, 3), name="image")
        matrix, offset = _affine_preprocess(resolve(entry.preprocess))
        x = AffinePreprocess(matrix, offset, name="preprocess")(inp)
        x = cache.models()[1](x)
    inner = keras.Model(top.input, outputs_of, name="trained_top")
    outputs = inner(x)
    return keras.Model(inp, {k: keras.layers.Identity(name=k)(v) for k, v in outputs.items()},
                       name=f"cbir_{config.method}_{config.backbone}")


def train(catalog: Any, config: TrainConfig, out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
          progress: bool = False, verbose: int = 2) -> Path:
    """Train ``config`` on ``catalog`` (query-split) and write the model folder ``out_dir`` (see the module doc).
    Returns ``out_dir``. ``cache_dir`` (default ``<out_dir>/../cache``) holds the activation cache, shared by
    trainings of the same backbone. Resumes an interrupted cache or training."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    split, report = training_split(catalog, config)
    method = METHODS[config.method]
    classes = sorted(split["class"].unique(), key=lambda c: (c == OTHER, c))
    _set_seed(config.seed)
    blocks = 0 if config.method == "autoencoder" and config.encoder == "scratch" else config.blocks
    cut = backbone_cut(config.backbone, blocks) if not (config.method == "autoencoder"
                                                         and config.encoder == "scratch") else None
    cache = ActivationCache(Path(cache_dir) if cache_dir else out.parent / "cache", config.backbone, config.weights,
                            cut, blocks, config, progress=progress)
    data, split = _arrays(cache, split, config, classes)
    cached_s = time.perf_counter() - started
    n_classes = len(classes) if method.classes else 0
    if config.method == "autoencoder" and config.encoder == "scratch":
        top = _build_scratch(n_classes, config)
        top_blocks = None
    else:
        _, _, top_blocks, _ = cache.models()
        if top_blocks is not None:
            top_blocks.trainable = False
        top = _build_top(data["x_train"].shape[1:], top_blocks, n_classes, config)
    weights = _class_weights(data["y_train"], n_classes) if method.classes else None
    backup = out / "backup"
    histories = []
    if config.epochs:
        histories.append(_fit(top, config, data, epochs=config.epochs, learning_rate=config.learning_rate,
                              backup=backup, phase="head", class_weight=weights, verbose=verbose))
    if config.fine_tune_epochs and top_blocks is not None:
        _unfreeze(top_blocks)
        histories.append(_fit(top, config, data, epochs=config.fine_tune_epochs,
                              learning_rate=config.fine_tune_learning_rate, backup=backup, phase="fine_tune",
                              class_weight=weights, verbose=verbose))
    shutil.rmtree(backup, ignore_errors=True)
    train_s = time.perf_counter() - started - cached_s
    history = pd.concat(histories, ignore_index=True)
    history.to_csv(out / "history.csv", index=False)
    metrics: dict[str, Any] = {"method": config.method, "classes": n_classes,
                               "images": {p: int((split["part"] == p).sum()) for p in ("train", "val", "test")},
                               "train_samples": int(len(data["x_train"])), "cache_seconds": round(cached_s, 1),
                               "train_seconds": round(train_s, 1)}
    outputs = top.predict(data["x_test"], batch_size=256, verbose=0)
    if method.classes:
        summary, per_class, confusion = classification_metrics(data["labels_test"], outputs["probabilities"], classes)
        metrics["test"] = summary
        per_class.to_csv(out / "per_class.csv", index=False)
        confusion.to_csv(out / "confusion.csv")
    else:
        metrics["test"] = {"n": int(len(data["x_test"])),
                           "mse": float(np.mean((outputs["reconstruction"] - data["y_test"]) ** 2))}
    full = _assemble(cache, top, config)
    tmp = out / f".{MODEL_FILE}.tmp.keras"
    full.save(tmp)
    os.replace(tmp, out / MODEL_FILE)
    from cbir.catalog import labels_sha1

    parents = (split.drop_duplicates("subcategory").set_index("subcategory")["category"].astype(str).to_dict()
               if config.label == "subcategory" else {})
    if config.label == "subcategory":
        parents[OTHER] = OTHER  # the merged small classes span categories: their category is "other" too
    _write_json(out / "classes.json", {"label": config.label, "classes": classes if method.classes else [],
                                       "parents": {c: parents[c] for c in classes if c in parents}})
    split[["image_id", "sha1", "class", "part", "cached"]].to_csv(out / "split.csv", index=False)
    report.to_csv(out / "classes_report.csv", index=False)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "training.json", {"config": config.to_dict(), "cut": cut, "blocks": blocks,
                                        "catalog_labels_sha1": labels_sha1(catalog),
                                        "split_sha1": hashlib.sha1(split.to_csv(index=False).encode()).hexdigest(),
                                        "weights_sha1": _weights_sha1(cache) if cut else None})
    return out


def resolve_training(model: str, weights: str, train: Mapping[str, Any] | None, out_dir: str | os.PathLike, *,
                     name: str = "model") -> tuple[TrainConfig, Path]:
    """``(config, model folder)`` of a notebook's parameters: ``train`` (a params file's resolved ``train``, which
    names its backbone; or a notebook's own settings, whose backbone is ``model``) and the folder the model is
    written to (``model``'s folder when it is a ``.keras`` path, else ``<out_dir>/<name>``)."""
    settings = dict(train or {})
    if not is_model_path(model):
        settings.setdefault("backbone", model)
        settings.setdefault("weights", weights)
    config = TrainConfig.from_mapping(settings)
    folder = Path(model).parent if is_model_path(model) else Path(out_dir) / name
    return config, folder


def training_report(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What a trained folder says about its training: ``summary`` (one row: method, classes, images per part,
    the test metrics rounded to 3 decimals, wall time), ``history``, and for models with classes ``per_class`` and
    ``confusion`` (normalised per true class)."""
    folder = Path(model_dir)
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{folder / 'metrics.json'}: unreadable ({exc})") from None
    row = {"method": metrics["method"], "classes": metrics["classes"],
           **{f"{p}_images": n for p, n in metrics["images"].items()}, "train_samples": metrics["train_samples"],
           **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics["test"].items() if k != "n"}}
    out: dict[str, Any] = {"summary": pd.DataFrame([row]), "history": pd.read_csv(folder / "history.csv"),
                           "seconds": metrics.get("wall_seconds"), "cache_seconds": metrics.get("cache_seconds")}
    if (folder / "per_class.csv").is_file():
        out["per_class"] = pd.read_csv(folder / "per_class.csv")
        out["confusion"] = pd.read_csv(folder / "confusion.csv", index_col=0)
    return out


def reconstruct(model_dir: str | os.PathLike, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(originals, reconstructions)``: the images at ``paths`` as the autoencoder of ``model_dir`` sees them
    (64 px thumbnails, uint8) and its reconstructions (uint8, 64 px)."""
    from cbir.images import read_image

    model, _, _ = load_trained(model_dir)
    if "reconstruction" not in model.output:
        raise TrainingError(f"{model_dir}: not an autoencoder (no 'reconstruction' output)")
    size = int(model.input.shape[1])
    images = np.stack([read_image(p, size=size) for p in paths])
    out = model(images.astype(np.float32), training=False)["reconstruction"]
    return (_resize_uint8(images, THUMB) if size != THUMB else images,
            np.clip(np.asarray(out) * 255 + 0.5, 0, 255).astype(np.uint8))


def _weights_sha1(cache: ActivationCache) -> str | None:
    from cbir.backbones import _sha1

    return _sha1(cache.models()[3].path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def _same_training(done: Mapping[str, Any], config: TrainConfig) -> bool:
    """Whether a folder's ``training.json`` records ``config``: the same settings, the weights file compared by
    its SHA-1 (so a relative and an absolute path to one file agree)."""
    from cbir.backbones import _sha1

    stored = dict(done.get("config") or {})
    wanted = config.to_dict()
    if stored.pop("weights", None) == wanted.pop("weights"):
        return stored == wanted
    path = Path(str(config.weights))
    return stored == wanted and path.is_file() and done.get("weights_sha1") == _sha1(path)


def ensure_trained(catalog: Any, config: TrainConfig, out_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """:func:`train` unless ``out_dir`` already holds a model trained with these settings on this labelling."""
    from cbir.catalog import labels_sha1

    out = Path(out_dir)
    info = out / "training.json"
    if (out / MODEL_FILE).is_file() and info.is_file():
        try:
            done = json.loads(info.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if _same_training(done, config) and done.get("catalog_labels_sha1") == labels_sha1(catalog):
            return out
    return train(catalog, config, out, **kwargs)


# ---------------------------------------------------------------------------------- the trained extractor
def is_model_path(name: Any) -> bool:
    """True for a ``model`` value that names a trained model file (``*.keras``) rather than a registry entry."""
    return isinstance(name, (str, os.PathLike)) and str(name).endswith(".keras")


def trained_name(path: str | os.PathLike) -> str:
    """The ``model`` name a trained model's runs carry: ``trained/<folder name>`` (the folder above when the
    model's folder is called ``model``, as in ``outputs/<run name>/model/model.keras``)."""
    folder = Path(path).resolve().parent
    if folder.name.startswith("model"):  # outputs/<run>/model[_scratch]/model.keras
        return f"trained/{folder.parent.name}{folder.name[len('model'):]}"
    return f"trained/{folder.name}"


def load_trained(model_dir: str | os.PathLike) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(keras model, training.json, classes.json)`` of a trained folder (or its ``model.keras``), loaded with
    ``safe_mode`` (no code from the file) and only cbir's registered layers; TrainingError naming the file."""
    path = Path(model_dir)
    folder = path.parent if path.suffix == ".keras" else path
    file = path if path.suffix == ".keras" else path / MODEL_FILE
    if not file.is_file():
        raise TrainingError(f"{file}: no trained model there (cbir train writes DIR/{MODEL_FILE})")
    import keras

    import cbir.layers  # noqa: F401 - registers cbir's layers for deserialisation

    try:
        model = keras.saving.load_model(file, compile=False, safe_mode=True)
    except Exception as exc:  # zip, JSON or h5 errors, unknown layers, lambdas refused by safe_mode
        raise TrainingError(f"{file}: not a loadable Keras model ({type(exc).__name__}: {str(exc)[:300]})") from None
    meta = {}
    for name in ("training.json", "classes.json"):
        try:
            meta[name] = json.loads((folder / name).read_text()) if (folder / name).is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{folder / name}: unreadable ({exc})") from None
    if not isinstance(model.output, dict) or "embedding" not in model.output:
        raise TrainingError(f"{file}: the model has no 'embedding' output (not written by cbir train)")
    return model, meta["training.json"], meta["classes.json"]


class TrainedExtractor:
    """A trained model as a feature extractor: uint8 ``(N, S, S, 3)`` -> its ``embedding`` (float32)."""

    def __init__(self, path: str | os.PathLike, *, l2_normalize: bool = False) -> None:
        import keras

        from cbir.efficientnet_lite import file_sha1

        self.file = Path(path).resolve()
        full, self.training, self.classes = load_trained(self.file)
        self.model = keras.Model(full.input, full.output["embedding"])
        self.name = trained_name(self.file)
        self.layer, self.pooling, self.gem_p = "embedding", None, None
        self.weights_label, self.weights_file = MODEL_FILE, MODEL_FILE
        self.weights_sha1 = file_sha1(self.file)
        self.input_size = int(full.input.shape[1])
        self.dim = int(self.model.output.shape[-1])
        self.l2_normalize = bool(l2_normalize)

    def __repr__(self) -> str:
        return f"TrainedExtractor({str(self.file)!r}, dim={self.dim})"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"{self.name}: expected a batch (N, {self.input_size}, {self.input_size}, 3), "
                             f"got shape {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = np.asarray(self.model.predict_on_batch(batch.astype(np.float32)), np.float32).reshape(len(batch), -1)
        if self.l2_normalize:
            from cbir.postprocess import l2_normalize

            out = l2_normalize(out)
        return out

    def identity(self) -> dict[str, Any]:
        import keras

        return {"model": self.name, "layer": self.layer, "pooling": None, "gem_p": None,
                "weights": self.weights_label, "weights_file": self.weights_file, "weights_sha1": self.weights_sha1,
                "model_file": str(self.file), "training": self.training.get("config", {}),
                "input_size": self.input_size, "dim": self.dim, "l2_normalize": self.l2_normalize,
                "keras_version": keras.__version__, "keras_backend": keras.backend.backend()}


def build_trained_extractor(name: str, *, layer: str | None = None, pooling: str | None = None, gem_p: float = 3.0,
                            weights: Any = None, l2_normalize: bool = False, **settings: Any) -> TrainedExtractor:
    """The ``trained`` kind's factory: ``name`` is the path of a ``model.keras`` written by :func:`train`."""
    if settings or layer not in (None, "embedding") or pooling is not None:
        raise TrainingError(f"{name}: a trained model gives its 'embedding'; layer, pooling and settings do not "
                            f"apply (got layer={layer!r}, pooling={pooling!r}, {sorted(settings)})")
    return TrainedExtractor(name, l2_normalize=l2_normalize)
