"""Product tagging with a trained model (``cbir train``'s folder): predicted labels for catalogue images,
low-confidence predictions and likely mis-tags (``cbir tag``), and the app's tag of an uploaded photo.

A trained-model folder ``DIR/`` holds ``model.keras`` (Keras 3; input float RGB ``(N, S, S, 3)`` in 0..255, the
preprocessing inside the model; a dict of outputs with ``"probabilities"`` ``(N, C)``, the softmax over the classes)
and ``classes.json`` (``{"label": "subcategory" | "category", "classes": [names in output order], "parents":
{subcategory: category}}``). A sub-category model also predicts the category: a category's probability is the sum of
its sub-categories' probabilities. A folder without ``classes.json`` or without a ``probabilities`` output (an
autoencoder) cannot tag: :class:`TaggerError` naming the folder. The model is loaded with ``safe_mode=True`` (no code
from the file runs); cbir's own Keras layers are registered first (:mod:`cbir.layers`).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.catalog import Catalog, load_catalog
from cbir.images import ImageError, read_image

__all__ = ["TaggerError", "Tagger", "read_classes", "load_tagger", "tag_catalog", "tag_summary", "write_tags",
           "check_out", "LABELS", "MODEL_FILE", "CLASSES_FILE"]

LABELS = ("subcategory", "category")
"""The labels a model may predict (``classes.json``'s ``label``): columns of every catalogue."""
MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
MAX_CLASSES_BYTES = 16 * 2**20
TOP = 3
"""How many classes ``top3`` lists."""


class TaggerError(ValueError):
    """A model folder that cannot tag (missing or malformed ``classes.json``, no ``probabilities`` output, ...);
    the message names the folder or the file."""


def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise TaggerError(f"{path}: no such model folder (a folder written by `cbir train`)")
    return path


def read_classes(model_dir: str | os.PathLike) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """``(label, classes, parents)`` from ``DIR/classes.json``, checked; nothing of Keras is loaded.

    ``parents`` maps each sub-category class to its category (empty for a category model, or when the file
    gives none). Raises :class:`TaggerError` naming the folder or the file."""
    folder = _model_dir(model_dir)
    file = folder / CLASSES_FILE
    if not file.is_file():
        raise TaggerError(f"{folder}: no {CLASSES_FILE}: this model has no classes (an autoencoder?), it cannot tag")
    if file.stat().st_size > MAX_CLASSES_BYTES:
        raise TaggerError(f"{file}: {file.stat().st_size} bytes, too large for a class list")
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaggerError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TaggerError(f"{file}: expected an object with label, classes and parents")
    label, classes, parents = data.get("label"), data.get("classes"), data.get("parents") or {}
    if classes == []:  # what `cbir train` writes for an autoencoder
        raise TaggerError(f"{folder}: {CLASSES_FILE} lists no classes (an autoencoder?): this model cannot tag")
    if label not in LABELS:
        raise TaggerError(f"{file}: label {label!r} is not one of {', '.join(LABELS)}")
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise TaggerError(f"{file}: classes must be a list of names")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise TaggerError(f"{file}: classes named twice: {', '.join(repeated)}")
    if not isinstance(parents, dict) or not all(isinstance(v, str) and v for v in parents.values()):
        raise TaggerError(f"{file}: parents must map each sub-category to its category name")
    if label == "category":
        parents = {}
    elif parents:
        orphans = [c for c in classes if c not in parents]
        if orphans:
            raise TaggerError(f"{file}: parents gives no category for {', '.join(orphans[:10])}")
        parents = {c: parents[c] for c in classes}
    return label, tuple(classes), parents


def _trained_model(model_dir: str | os.PathLike) -> Any:
    """The folder's ``model.keras``, loaded without running code from the file (:func:`cbir.train.load_trained`)."""
    from cbir.train import TrainingError, load_trained

    folder = _model_dir(model_dir)
    if not (folder / MODEL_FILE).is_file():
        raise TaggerError(f"{folder}: no {MODEL_FILE}")
    try:
        return load_trained(folder)[0]
    except TrainingError as exc:
        raise TaggerError(str(exc)) from None


@dataclass
class Tagger:
    """A trained model that predicts ``label`` (one of :data:`LABELS`) over ``classes``.

    ``parents``: each sub-category class's category (empty for a category model); ``input_size``: the side S of
    the square images ``predict`` takes."""

    model_dir: Path
    label: str
    classes: tuple[str, ...]
    parents: dict[str, str]
    input_size: int
    model: Any = field(repr=False)
    batch_size: int = 32

    @property
    def categories(self) -> tuple[str, ...]:
        """The categories a sub-category model also predicts (first-seen order of ``parents``; the classes for a
        category model; empty when a sub-category model's folder gives no parents)."""
        if self.label == "category":
            return self.classes
        return tuple(dict.fromkeys(self.parents.values()))

    def predict(self, images: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities of ``images`` (uint8 ``(N, S, S, 3)``): float32 ``(N, C)``, in batches."""
        images = np.asarray(images)
        s = self.input_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"{self.model_dir}: the model takes images of shape (N, {s}, {s}, 3), "
                             f"got {images.shape}")
        from keras import ops

        out = np.empty((len(images), len(self.classes)), dtype=np.float32)
        bs = max(1, int(batch_size or self.batch_size))
        for start in range(0, len(images), bs):
            batch = images[start:start + bs].astype(np.float32)
            out[start:start + len(batch)] = ops.convert_to_numpy(self.model(batch, training=False)["probabilities"])
        return out

    def category_matrix(self) -> np.ndarray:
        """``M`` float32 ``(C, K)``: 1 where class c's category is ``categories[k]``; ``P @ M`` sums the
        probabilities of each category's sub-categories."""
        if self.label == "category":
            return np.eye(len(self.classes), dtype=np.float32)
        cats = self.categories
        m = np.zeros((len(self.classes), len(cats)), dtype=np.float32)
        if cats:
            m[np.arange(len(self.classes)), [cats.index(self.parents[c]) for c in self.classes]] = 1.0
        return m

    def prediction_table(self, probabilities: np.ndarray) -> pd.DataFrame:
        """Predictions from probabilities ``(N, C)`` (rows of NaN: no prediction): ``predicted_subcategory,
        subcategory_probability`` (sub-category models), ``predicted_category, category_probability`` (when the
        categories are known) and ``top3`` (``"Tshirts 0.81 | Tops 0.12 | Shirts 0.04"``)."""
        P = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(self.classes))
        ok = np.isfinite(P).all(axis=1)
        cols: dict[str, Any] = {}
        levels = [(self.label, np.asarray(self.classes, dtype=object), P)]
        if self.label == "subcategory" and self.categories:
            levels.append(("category", np.asarray(self.categories, dtype=object), P @ self.category_matrix()))
        for level, names, probs in levels:
            best = np.argmax(np.where(ok[:, None], probs, -np.inf), axis=1) if len(probs) else np.zeros(0, int)
            cols[f"predicted_{level}"] = np.where(ok, names[best], None)
            cols[f"{level}_probability"] = np.where(ok, probs[np.arange(len(probs)), best], np.nan)
        top = np.argsort(-np.where(ok[:, None], P, 0.0), axis=1, kind="stable")[:, :TOP]
        cols["top3"] = [" | ".join(f"{self.classes[j]} {P[i, j]:.2f}" for j in top[i]) if ok[i] else None
                        for i in range(len(P))]
        return pd.DataFrame(cols)

    def tag(self, image: np.ndarray) -> tuple[str, float]:
        """The predicted label of one uint8 ``(S, S, 3)`` image and its probability."""
        p = self.predict(np.asarray(image)[None])[0]
        best = int(np.argmax(p))
        return self.classes[best], float(p[best])


def load_tagger(model_dir: str | os.PathLike, *, batch_size: int = 32) -> Tagger:
    """The trained model of ``model_dir`` ready to tag; :class:`TaggerError` naming the folder when it cannot
    (no ``classes.json``, no ``probabilities`` output, a class count the output does not have, ...)."""
    folder = _model_dir(model_dir)
    label, classes, parents = read_classes(folder)
    model = _trained_model(folder)
    outputs = model.output if isinstance(model.output, dict) else {}
    if "probabilities" not in outputs:
        names = ", ".join(outputs) or "one unnamed output"
        raise TaggerError(f"{folder}: the model has no 'probabilities' output ({names}): it cannot tag")
    width = outputs["probabilities"].shape[-1]
    if width != len(classes):
        raise TaggerError(f"{folder}: the model gives {width} probabilities, {CLASSES_FILE} names "
                          f"{len(classes)} classes")
    shape = tuple(model.input.shape) if not isinstance(model.input, (list, dict)) else ()
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
        raise TaggerError(f"{folder}: the model's input {shape} is not square RGB images (N, S, S, 3)")
    return Tagger(model_dir=folder, label=label, classes=classes, parents=parents, input_size=int(shape[1]),
                  model=model, batch_size=int(batch_size))


def _read(path: Any, size: int) -> tuple[np.ndarray | None, str | None]:
    """``(image, None)`` or ``(None, error)``; never raises for a bad file."""
    if path is None or (isinstance(path, float) and np.isnan(path)) or str(path) == "":
        return None, "missing: no path"
    try:
        return read_image(str(path), size=size), None
    except ImageError as exc:
        return None, f"{exc.reason}: {exc}"


def _probabilities(tagger: Tagger, paths: list[Any], skip: dict[int, str], *, batch_size: int, workers: int,
                   progress: bool) -> tuple[np.ndarray, list[str | None]]:
    """``(P (N, C) float32 with NaN rows where no prediction, errors (N,))``: images decoded in a thread pool,
    one batch ahead of the model; rows in ``skip`` (row -> error) are never opened."""
    from tqdm.auto import tqdm

    n, s = len(paths), tagger.input_size
    P = np.full((n, len(tagger.classes)), np.nan, dtype=np.float32)
    errors: list[str | None] = [skip.get(i) for i in range(n)]
    todo = [i for i in range(n) if i not in skip]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cbir-tag") as pool, \
            tqdm(total=len(todo), disable=not progress, unit="img", desc="tagging") as bar:
        decoded = [pool.map(_read, [paths[i] for i in batch], [s] * len(batch)) for batch in batches[:1]]
        for b, rows in enumerate(batches):
            if b + 1 < len(batches):  # the next batch decodes while the model runs this one
                decoded.append(pool.map(_read, [paths[i] for i in batches[b + 1]], [s] * len(batches[b + 1])))
            results = list(decoded[b])
            decoded[b] = None
            good = [r for r, (image, _) in zip(rows, results) if image is not None]
            for r, (_, error) in zip(rows, results):
                errors[r] = error
            if good:
                P[good] = tagger.predict(np.stack([image for image, _ in results if image is not None]),
                                         batch_size=batch_size)
            bar.update(len(rows))
    bad = ~np.isfinite(P).all(axis=1) & np.array([e is None for e in errors], dtype=bool)
    for r in np.flatnonzero(bad):
        errors[r] = "non_finite: the model gave a non-finite probability"
    P[bad] = np.nan
    return P, errors


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability between 0 and 1, got {value}")
    return value


def tag_catalog(model_dir: str | os.PathLike | Tagger, catalog: Catalog | str | os.PathLike, *,
                batch_size: int = 32, low_confidence: float = 0.5, disagree: float = 0.9, progress: bool = False,
                workers: int = 2) -> pd.DataFrame:
    """Tag every catalogue image with the model of ``model_dir`` (a folder or a loaded :class:`Tagger`).

    ``catalog``: a :class:`cbir.catalog.Catalog` or a path for :func:`cbir.catalog.load_catalog` (images are not
    decoded twice: it is loaded without validation). One row per catalogue image, in catalogue order:
    ``image_id, path, category, subcategory`` (the given labels), ``predicted_subcategory,
    subcategory_probability`` (sub-category models), ``predicted_category, category_probability`` (a category's
    probability is the sum of its sub-categories'), ``top3``, ``low_confidence`` (the top probability is below
    ``low_confidence``), ``mistag`` (the given label, one the model knows, differs from a prediction of
    probability >= ``disagree``), ``given_unknown`` (the given label is not one of the model's classes: never a
    mis-tag), ``given_probability`` (the model's probability of the given label; NaN when unknown) and ``error``
    (why an image has no prediction: the catalogue's problem or the file's :class:`~cbir.images.ImageError`;
    empty otherwise). A bad image is a row with ``error``, never a failure of the whole catalogue."""
    low_confidence = _check_fraction("low_confidence", low_confidence)
    disagree = _check_fraction("disagree", disagree)
    tagger = model_dir if isinstance(model_dir, Tagger) else load_tagger(model_dir, batch_size=batch_size)
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog, validate=False, progress=progress)
    df = catalog.df.reset_index(drop=True)
    problems = {str(p.image_id): f"{p.problem}: {p.detail}" for p in catalog.problems.itertuples(index=False)}
    ids = df["image_id"].astype(str).tolist()
    skip = {i: problems[image_id] for i, image_id in enumerate(ids) if image_id in problems}
    P, errors = _probabilities(tagger, df["path"].tolist(), skip, batch_size=max(1, int(batch_size)),
                               workers=workers, progress=progress)
    predicted = tagger.prediction_table(P)
    ok = np.isfinite(P).all(axis=1)
    top = predicted[f"{tagger.label}_probability"].to_numpy(dtype=np.float64)
    given = df[tagger.label].astype(str).to_numpy(dtype=object)
    position = pd.Index(tagger.classes).get_indexer(given)
    known = position >= 0
    given_probability = np.full(len(df), np.nan)
    rows = np.flatnonzero(known & ok)
    given_probability[rows] = P[rows, position[rows]]
    mistag = ok & known & (given != predicted[f"predicted_{tagger.label}"].to_numpy(dtype=object)) \
        & (np.nan_to_num(top, nan=0.0) >= disagree)
    out = pd.concat([df[["image_id", "path", "category", "subcategory"]].astype(object), predicted], axis=1)
    out["low_confidence"] = ok & (np.nan_to_num(top, nan=1.0) < low_confidence)
    out["mistag"] = mistag
    out["given_unknown"] = ~known
    out["given_probability"] = given_probability
    out["error"] = errors
    return out


def tag_summary(tags: pd.DataFrame) -> dict[str, int]:
    """Counts of a :func:`tag_catalog` table: ``n_images, n_tagged, n_errors, n_low_confidence, n_mistag,
    n_given_unknown``."""
    errors = tags["error"].notna() & (tags["error"].astype(str) != "")
    return {"n_images": int(len(tags)), "n_tagged": int((~errors).sum()), "n_errors": int(errors.sum()),
            "n_low_confidence": int(tags["low_confidence"].sum()), "n_mistag": int(tags["mistag"].sum()),
            "n_given_unknown": int(tags["given_unknown"].sum())}


def check_out(out: str | os.PathLike) -> Path:
    """``out`` as a path :func:`write_tags` can write (checked before any image is tagged): not a folder."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"{out}: is a folder; give the CSV file to write, e.g. {out / 'tags.csv'}")
    return out


def write_tags(tags: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write a :func:`tag_catalog` table as CSV (UTF-8) to ``out``, its folder created; written whole or not at
    all (a temporary file renamed). Refuses a directory at ``out``."""
    out = check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            tags.to_csv(handle, index=False, float_format="%.6g")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
