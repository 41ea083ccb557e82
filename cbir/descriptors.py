"""Handcrafted descriptors: colour histograms (OpenCV), LBP texture (scikit-image), HOG; comparisons.

Colour histogram: ``cv2.calcHist`` per channel with ``bins`` bins, in RGB (each channel 0..255) or
OpenCV HSV (H 0..179, S and V 0..255); each channel normalised to sum 1; shape ``(3, bins)``.

LBP histogram: ``skimage.feature.local_binary_pattern`` on the greyscale image (``cv2`` RGB->GRAY,
uint8) with ``points`` samples on a circle of ``radius`` pixels; method ``"uniform"`` gives codes
0..P+1 (P+1 = every non-uniform pattern), so ``P + 2`` bins; normalised to sum 1.

Both take an optional ``mask`` (HxW bool): only pixels inside count (the region of interest from
:func:`cbir.roi.find_roi`). LBP codes are computed on the whole image and only the codes inside
the mask are counted.

Comparisons (:func:`compare_histograms`, vectorised over leading axes, formulas identical to
``cv2.compareHist``, which the tests check) for per-channel histograms, with one value per pair:
the mean over the three channels of the per-channel comparison.

* ``correlation`` (``HISTCMP_CORREL``; identical = 1, the maximum): Pearson r of a and b
  (1 when a or b is flat, as OpenCV does);
* ``chisqr`` (``HISTCMP_CHISQR``; identical = 0): ``sum((a-b)^2 / a)`` over bins with a > 0;
* ``chisqr_alt`` (``HISTCMP_CHISQR_ALT``; identical = 0): ``2 * sum((a-b)^2 / (a+b))``;
* ``intersection`` (``HISTCMP_INTERSECT``; identical = 1 for normalised histograms): ``sum(min(a, b))``;
* ``bhattacharyya`` (``HISTCMP_BHATTACHARYYA``; identical = 0):
  ``sqrt(1 - sum(sqrt(a*b)) / sqrt(sum(a) * sum(b)))``;
* ``chi2`` (identical = 0): :func:`chi2_distance`.

:func:`chi2_distance` (the LBP comparison): ``0.5 * sum((a - b)^2 / (a + b + eps))``, 0 for
identical histograms and at most 1 for two normalised histograms with no common bin.

:func:`pair_similarities` adds ``color_corr`` and ``lbp_chi2`` columns to a neighbours table,
computing each image's histograms once; :func:`similarity_summary` and
:func:`similarity_by_rank` give the per-model and per-rank tables. :func:`build_descriptor_extractor`
wraps the ``descriptor`` entries of :mod:`cbir.extractors` (``color_hist``, ``lbp``, ``hog``: their builders
:func:`color_hist_feature`, :func:`lbp_feature`, :func:`hog_feature`) as feature extractors for the pipeline.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cbir.extractors import descriptor_names, get_entry, resolve

__all__ = [
    "COLOR_SPACES", "COMPARE_METHODS", "DESCRIPTORS", "LBP_METHODS",
    "color_histogram", "lbp_codes", "lbp_histogram", "hog_descriptor", "compare_histograms",
    "chi2_distance", "image_histograms", "HistogramSet", "pair_similarities",
    "similarity_summary", "similarity_by_rank", "DescriptorExtractor", "build_descriptor_extractor",
    "color_hist_feature", "lbp_feature", "hog_feature",
]

COLOR_SPACES = ("rgb", "hsv")
COMPARE_METHODS = ("correlation", "chisqr", "chisqr_alt", "intersection", "bhattacharyya", "chi2")
LBP_METHODS = ("uniform", "nri_uniform")
_EPS = 1e-10

MaskSpec = None | str | np.ndarray | Callable[[np.ndarray], np.ndarray]
Feature = tuple[int, dict[str, Any], Callable[[np.ndarray], np.ndarray]]
"""What a descriptor entry's builder returns: ``(dim, params, fn)`` with ``fn(HxWx3 uint8) -> (dim,)``."""


def __getattr__(name: str) -> Any:
    """``DESCRIPTORS``: the names of the registered descriptor entries (:func:`cbir.extractors.descriptor_names`)."""
    if name == "DESCRIPTORS":
        return descriptor_names()
    raise AttributeError(f"module 'cbir.descriptors' has no attribute {name!r}")


# ------------------------------------------------------------------------------------------ checks
def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {img.shape} dtype {img.dtype}")
    return img


def _check_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match the image's {shape}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask selects no pixel; a histogram of nothing has no meaning")
    return m


# ------------------------------------------------------------------------------------ descriptors
def color_histogram(image: np.ndarray, *, bins: int = 32, space: str = "rgb",
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Per-channel colour histogram of an HxWx3 uint8 RGB image: float32 ``(3, bins)``, rows sum to 1.

    ``space``: ``"rgb"`` (R, G, B over 0..255) or ``"hsv"`` (OpenCV H over 0..179, S, V over 0..255).
    ``mask``: HxW bool, only True pixels count.
    """
    import cv2

    img = _check_image(image)
    if space not in COLOR_SPACES:
        raise ValueError(f"space must be one of {COLOR_SPACES}, got {space!r}")
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    m = _check_mask(mask, img.shape[:2])
    m8 = None if m is None else m.astype(np.uint8)
    if space == "hsv":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        ranges = ([0, 180], [0, 256], [0, 256])
    else:
        ranges = ([0, 256],) * 3
    img = np.ascontiguousarray(img)
    hist = np.stack([cv2.calcHist([img], [c], m8, [int(bins)], ranges[c]).ravel() for c in range(3)])
    hist /= hist.sum(axis=1, keepdims=True)
    return hist.astype(np.float32)


def _grey(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(_check_image(image), cv2.COLOR_RGB2GRAY)


def _lbp_bins(points: int, method: str) -> int:
    if method == "uniform":
        return points + 2
    if method == "nri_uniform":
        return points * (points - 1) + 3
    raise ValueError(f"LBP method must be one of {LBP_METHODS}, got {method!r}")


def lbp_codes(image: np.ndarray, *, points: int = 24, radius: float = 3, method: str = "uniform") -> np.ndarray:
    """LBP code per pixel of the greyscale image: HxW int (0..P+1 for ``"uniform"``).

    Neighbours outside the image read as 0 (scikit-image's convention).
    """
    from skimage.feature import local_binary_pattern

    _lbp_bins(points, method)
    if points < 1 or radius <= 0:
        raise ValueError(f"LBP needs points >= 1 and radius > 0, got points={points} radius={radius}")
    return local_binary_pattern(_grey(image), int(points), float(radius), method=method).astype(np.int64)


def lbp_histogram(image: np.ndarray, *, points: int = 24, radius: float = 3, method: str = "uniform",
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Normalised histogram of LBP codes (:func:`lbp_codes`) inside ``mask``: float32 ``(P + 2,)``
    for ``"uniform"`` (``P*(P-1) + 3`` for ``"nri_uniform"``), sums to 1."""
    img = _check_image(image)
    m = _check_mask(mask, img.shape[:2])
    codes = lbp_codes(img, points=points, radius=radius, method=method)
    values = codes.ravel() if m is None else codes[m]
    hist = np.bincount(values, minlength=_lbp_bins(points, method)).astype(np.float64)
    return (hist / hist.sum()).astype(np.float32)


def hog_descriptor(image: np.ndarray, *, orientations: int = 9, pixels_per_cell: int = 16,
                   cells_per_block: int = 2) -> np.ndarray:
    """``skimage.feature.hog`` of the greyscale image (L2-Hys blocks), float32 flat vector of
    ``blocks_y * blocks_x * cells_per_block^2 * orientations`` values."""
    from skimage.feature import hog

    grey = _grey(image)
    return hog(grey, orientations=int(orientations), pixels_per_cell=(pixels_per_cell, pixels_per_cell),
               cells_per_block=(cells_per_block, cells_per_block), block_norm="L2-Hys",
               feature_vector=True).astype(np.float32)


def _hog_dim(size: int, orientations: int, pixels_per_cell: int, cells_per_block: int) -> int:
    blocks = size // pixels_per_cell - cells_per_block + 1
    if blocks < 1:
        raise ValueError(f"HOG input {size}px is too small for {pixels_per_cell}px cells in "
                         f"{cells_per_block}x{cells_per_block} blocks")
    return blocks * blocks * cells_per_block * cells_per_block * orientations


# ------------------------------------------------------------------------------------ comparisons
def _per_bin(method: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One comparison value over the last axis, OpenCV's formulas (``compareHist``), float64."""
    if method == "correlation":
        n = a.shape[-1]
        s1, s2 = a.sum(-1), b.sum(-1)
        num = (a * b).sum(-1) - s1 * s2 / n
        den2 = ((a * a).sum(-1) - s1 * s1 / n) * ((b * b).sum(-1) - s2 * s2 / n)
        ok = np.abs(den2) > np.finfo(np.float64).eps
        return np.where(ok, num / np.sqrt(np.where(ok, den2, 1.0)), 1.0)
    if method == "chisqr":
        ok = np.abs(a) > np.finfo(np.float64).eps
        return np.where(ok, (a - b) ** 2 / np.where(ok, a, 1.0), 0.0).sum(-1)
    if method == "chisqr_alt":
        s = a + b
        ok = np.abs(s) > np.finfo(np.float64).eps
        return 2.0 * np.where(ok, (a - b) ** 2 / np.where(ok, s, 1.0), 0.0).sum(-1)
    if method == "intersection":
        return np.minimum(a, b).sum(-1)
    if method == "bhattacharyya":
        prod = a.sum(-1) * b.sum(-1)
        scale = np.where(np.abs(prod) > np.finfo(np.float32).eps, 1.0 / np.sqrt(np.abs(prod)), 1.0)
        return np.sqrt(np.maximum(1.0 - np.sqrt(a * b).sum(-1) * scale, 0.0))
    if method == "chi2":
        return chi2_distance(a, b)
    raise ValueError(f"method must be one of {COMPARE_METHODS}, got {method!r}")


def compare_histograms(a: np.ndarray, b: np.ndarray, *, method: str = "correlation") -> np.ndarray | float:
    """Compare per-channel histograms ``(..., C, bins)`` (broadcasting over ``...``): the mean over
    the C channels of the per-channel comparison (table in the module docstring). Returns a float for
    a single pair, else an array of shape ``...``. A 1-D input counts as one channel."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"histograms have different numbers of bins: {a.shape} vs {b.shape}")
    with np.errstate(invalid="ignore"):
        per = _per_bin(method, a, b)
    # NaN histograms (unreadable images) give NaN, never a made-up similarity
    per = np.where(np.isnan(a).any(-1) | np.isnan(b).any(-1), np.nan, per)
    if a.ndim == 1 and b.ndim == 1:
        return float(per)
    out = per if (a.ndim < 2 and b.ndim < 2) else per.mean(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def chi2_distance(a: np.ndarray, b: np.ndarray, *, eps: float = _EPS) -> np.ndarray | float:
    """Symmetric chi-square distance over the last axis: ``0.5 * sum((a-b)^2 / (a+b+eps))``.

    0 for identical histograms; for histograms summing to 1 it lies in [0, 1] (1: no common bin).
    Broadcasts over leading axes; a float for two 1-D inputs.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = 0.5 * ((a - b) ** 2 / (a + b + eps)).sum(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


# ------------------------------------------------------------------------- many images, pairwise
def _image_loader(images: Any, *, size: int | tuple[int, int] | None) -> Callable[[str], np.ndarray]:
    """id -> HxWx3 uint8 from a Mapping (id -> path or array), a DataFrame / Catalog with
    ``image_id`` and ``path`` columns, or a callable(id) -> array."""
    from cbir.images import read_image

    if callable(images) and not isinstance(images, (pd.DataFrame, Mapping)):
        return lambda i: images(i)
    df = getattr(images, "df", images)
    if isinstance(df, pd.DataFrame):
        missing = [c for c in ("image_id", "path") if c not in df.columns]
        if missing:
            raise ValueError(f"the image table needs columns image_id and path; missing {missing}")
        lookup: Mapping[str, Any] = dict(zip(df["image_id"].astype(str), df["path"]))
    elif isinstance(images, Mapping):
        lookup = {str(k): v for k, v in images.items()}
    else:
        raise TypeError("images must be a dict id -> path/array, a DataFrame or Catalog with image_id and "
                        f"path, or a callable; got {type(images).__name__}")

    def load(image_id: str) -> np.ndarray:
        if image_id not in lookup:
            raise KeyError(f"image id {image_id!r} not found among the {len(lookup)} given images")
        src = lookup[image_id]
        if isinstance(src, np.ndarray):
            return src
        return read_image(src, size=size)

    return load


def _resolve_mask(mask: MaskSpec, image: np.ndarray, roi_kwargs: Mapping[str, Any]) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "roi":
            raise ValueError(f"mask must be None, 'roi', an array or a callable, got {mask!r}")
        from cbir.roi import find_roi

        return find_roi(image, **roi_kwargs).mask
    if callable(mask):
        return np.asarray(mask(image), dtype=bool)
    return np.asarray(mask, dtype=bool)


@dataclass
class HistogramSet:
    """Colour and LBP histograms of many images, row-aligned with ``ids``.

    ``color``: float32 ``(N, 3, bins)``; ``lbp``: float32 ``(N, P+2)``; rows of images that could
    not be read are NaN and listed in ``problems`` (``image_id, problem, detail``).
    """

    ids: np.ndarray
    color: np.ndarray
    lbp: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    problems: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["image_id", "problem", "detail"]))

    def rows(self, ids: Iterable[str]) -> np.ndarray:
        """Row positions of ``ids`` (KeyError naming the first unknown id)."""
        index = pd.Index(self.ids)
        ids = np.asarray(list(ids), dtype=str)
        pos = index.get_indexer(ids)
        if (pos < 0).any():
            raise KeyError(f"no histograms for image id {ids[pos < 0][0]!r}")
        return pos


def image_histograms(ids: Iterable[str], images: Any, *, bins: int = 32, space: str = "rgb",
                     lbp_points: int = 24, lbp_radius: float = 3, lbp_method: str = "uniform",
                     mask: MaskSpec = None, roi_margin: int = 4, roi_kwargs: Mapping[str, Any] | None = None,
                     size: int | tuple[int, int] | None = None, workers: int = 2,
                     progress: bool = True) -> HistogramSet:
    """Colour and LBP histograms of each distinct id (each image read once), in a thread pool.

    ``images``: dict id -> path (or array), a Catalog / DataFrame with ``image_id`` and ``path``, or a
    callable(id) -> HxWx3 uint8. ``mask``: None (whole image), ``"roi"`` (:func:`cbir.roi.find_roi`
    with ``margin=roi_margin`` and ``roi_kwargs``), or a callable(image) -> HxW bool. ``size`` resizes
    on reading (None keeps the file's size). Bad images give NaN rows and a row in ``problems``.
    """
    from tqdm.auto import tqdm

    uniq = pd.unique(pd.Series(list(ids), dtype=str)).astype(str)
    load = _image_loader(images, size=size)
    rk = {"margin": roi_margin, **dict(roi_kwargs or {})}
    n_lbp = _lbp_bins(lbp_points, lbp_method)

    def one(image_id: str) -> tuple[np.ndarray | None, np.ndarray | None, str | None, str]:
        try:
            img = _check_image(load(image_id))
            m = _resolve_mask(mask, img, rk)
            c = color_histogram(img, bins=bins, space=space, mask=m)
            t = lbp_histogram(img, points=lbp_points, radius=lbp_radius, method=lbp_method, mask=m)
            return c, t, None, ""
        except Exception as exc:  # noqa: BLE001 - a bad image gives NaN, never stops the table
            return None, None, getattr(exc, "reason", type(exc).__name__), str(exc)

    color = np.full((len(uniq), 3, int(bins)), np.nan, np.float32)
    lbp = np.full((len(uniq), n_lbp), np.nan, np.float32)
    problems = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(one, uniq)
        for i, (c, t, problem, detail) in enumerate(tqdm(results, total=len(uniq), disable=not progress,
                                                         desc="histograms", unit="img")):
            if problem is None:
                color[i], lbp[i] = c, t
            else:
                problems.append({"image_id": uniq[i], "problem": problem, "detail": detail})
    params = {"bins": int(bins), "space": space, "lbp_points": int(lbp_points), "lbp_radius": float(lbp_radius),
              "lbp_method": lbp_method, "mask": mask if isinstance(mask, str) or mask is None else "custom"}
    return HistogramSet(ids=uniq, color=color, lbp=lbp, params=params,
                        problems=pd.DataFrame(problems, columns=["image_id", "problem", "detail"]))


def pair_similarities(neighbours: pd.DataFrame, images: Any = None, *, histograms: HistogramSet | None = None,
                      bins: int = 32, space: str = "rgb", color_method: str = "correlation",
                      lbp_points: int = 24, lbp_radius: float = 3, lbp_method: str = "uniform",
                      mask: MaskSpec = None, roi_margin: int = 4, roi_kwargs: Mapping[str, Any] | None = None,
                      size: int | tuple[int, int] | None = None, workers: int = 2,
                      progress: bool = True) -> pd.DataFrame:
    """Colour and texture similarity of each (query, neighbour) pair of a neighbours table.

    ``neighbours``: DataFrame with ``query_id`` and ``neighbour_id`` (plus ``rank``, ``distance``,
    model/metric columns, kept). ``images``: see :func:`image_histograms`; or pass precomputed
    ``histograms`` (a :class:`HistogramSet`, e.g. shared between several models' tables).
    Returns a copy with ``color_corr`` (mean over channels of the Pearson correlation of the colour
    histograms; named ``color_<method>`` for another ``color_method``) and ``lbp_chi2``
    (:func:`chi2_distance` of the LBP histograms); NaN where an image could not be read.
    """
    for col in ("query_id", "neighbour_id"):
        if col not in neighbours.columns:
            raise ValueError(f"neighbours table needs columns query_id and neighbour_id; missing {col!r}")
    q = neighbours["query_id"].astype(str).to_numpy()
    n = neighbours["neighbour_id"].astype(str).to_numpy()
    if histograms is None:
        if images is None:
            raise ValueError("pass images (dict id -> path, Catalog or DataFrame) or precomputed histograms")
        histograms = image_histograms(np.concatenate([q, n]), images, bins=bins, space=space,
                                      lbp_points=lbp_points, lbp_radius=lbp_radius, lbp_method=lbp_method,
                                      mask=mask, roi_margin=roi_margin, roi_kwargs=roi_kwargs, size=size,
                                      workers=workers, progress=progress)
    iq, ineigh = histograms.rows(q), histograms.rows(n)
    out = neighbours.copy()
    name = "color_corr" if color_method == "correlation" else f"color_{color_method}"
    out[name] = np.asarray(compare_histograms(histograms.color[iq], histograms.color[ineigh],
                                              method=color_method), dtype=np.float64).reshape(-1)
    out["lbp_chi2"] = np.asarray(chi2_distance(histograms.lbp[iq], histograms.lbp[ineigh]),
                                 dtype=np.float64).reshape(-1)
    return out


def similarity_summary(pairs: pd.DataFrame, *, by: str | Sequence[str] = "model",
                       measures: Sequence[str] = ("color_corr", "lbp_chi2"),
                       decimals: int | None = 3) -> pd.DataFrame:
    """Average, minimum and maximum of each measure per group (the study's Tables 11 and 13).

    Tidy: one row per group and measure; columns ``*by, measure, mean, min, max, n``.
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, *measures] if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table lacks columns {missing}; has {list(pairs.columns)}")
    long = pairs.melt(id_vars=by, value_vars=list(measures), var_name="measure", value_name="value")
    out = (long.groupby([*by, "measure"], sort=False)["value"]
           .agg(mean="mean", min="min", max="max", n="count").reset_index())
    if decimals is not None:
        out[["mean", "min", "max"]] = out[["mean", "min", "max"]].round(decimals)
    return out


def similarity_by_rank(pairs: pd.DataFrame, *, measure: str = "color_corr", by: str | Sequence[str] = "model",
                       stat: str = "mean", decimals: int | None = 3) -> pd.DataFrame:
    """``stat`` of ``measure`` per group and neighbour rank (the study's Tables 12 and 14):
    rows = groups, columns = ranks 1..k."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, "rank", measure] if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table lacks columns {missing}; has {list(pairs.columns)}")
    out = pairs.pivot_table(index=by, columns="rank", values=measure, aggfunc=stat, sort=False)
    out.columns.name = "rank"
    return out.round(decimals) if decimals is not None else out


# ------------------------------------------------------------------------ pipeline extractors
class DescriptorExtractor:
    """A handcrafted descriptor with the backbone Extractor protocol.

    Attributes ``name`` (``color_hist``, ``lbp`` or ``hog``), ``layer`` and ``pooling`` (None),
    ``weights_label`` (``"handcrafted"``), ``weights_sha1`` (None), ``input_size`` (side the
    pipeline resizes to), ``dim``, ``params``. ``__call__(uint8[N,H,W,3]) -> float32[N,dim]``;
    deterministic. ``roi=True`` computes colour/LBP histograms inside :func:`cbir.roi.find_roi`'s mask.
    """

    layer = None
    pooling = None
    weights_label = "handcrafted"
    weights_sha1 = None

    def __init__(self, name: str, *, input_size: int, dim: int, fn: Callable[[np.ndarray], np.ndarray],
                 params: dict[str, Any], l2_normalize: bool = False) -> None:
        self.name = name
        self.input_size = int(input_size)
        self.dim = int(dim)
        self.params = params
        self.l2_normalize = bool(l2_normalize)
        self._fn = fn

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import cv2

        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
            raise ValueError(f"{self.name}: expected uint8[N,H,W,3], got {batch.dtype}{list(batch.shape)}")
        out = np.empty((len(batch), self.dim), np.float32)
        s = self.input_size
        for i, img in enumerate(batch):  # histogram/LBP/HOG are per-image library calls
            if img.shape[:2] != (s, s):
                img = cv2.resize(img, (s, s), interpolation=cv2.INTER_AREA)
            out[i] = self._fn(img)
        if self.l2_normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def identity(self) -> dict[str, Any]:
        """Everything that identifies a run of this descriptor (stored with it)."""
        return {"model": self.name, "layer": None, "pooling": None, "weights": self.weights_label,
                "weights_sha1": None, "input_size": self.input_size, "dim": self.dim,
                "params": dict(self.params), "l2_normalize": self.l2_normalize}

    def __repr__(self) -> str:
        return f"DescriptorExtractor({self.name!r}, dim={self.dim}, input_size={self.input_size}, {self.params})"


def color_hist_feature(size: int, *, bins: int = 32, space: str = "rgb",
                       mask_of: Callable[[np.ndarray], np.ndarray | None] = lambda img: None, **_: Any) -> Feature:
    """The ``color_hist`` entry's builder: flattened :func:`color_histogram` (``bins``, ``space``) inside
    ``mask_of(image)``, dim ``3 * bins``."""
    if space not in COLOR_SPACES:
        raise ValueError(f"space must be one of {COLOR_SPACES}, got {space!r}")

    def fn(img: np.ndarray) -> np.ndarray:
        return color_histogram(img, bins=bins, space=space, mask=mask_of(img)).ravel()

    return 3 * int(bins), {"bins": int(bins), "space": space}, fn


def lbp_feature(size: int, *, points: int = 24, radius: float = 3, method: str = "uniform",
                mask_of: Callable[[np.ndarray], np.ndarray | None] = lambda img: None, **_: Any) -> Feature:
    """The ``lbp`` entry's builder: :func:`lbp_histogram` (``points``, ``radius``, ``method``) inside
    ``mask_of(image)``, dim ``P + 2`` (uniform)."""

    def fn(img: np.ndarray) -> np.ndarray:
        return lbp_histogram(img, points=points, radius=radius, method=method, mask=mask_of(img))

    return _lbp_bins(int(points), method), {"points": int(points), "radius": float(radius), "method": method}, fn


def hog_feature(size: int, *, orientations: int = 9, pixels_per_cell: int = 16, cells_per_block: int = 2,
                roi: bool = False, **_: Any) -> Feature:
    """The ``hog`` entry's builder: :func:`hog_descriptor` of the ``size`` px image (dim 1764 at 128 px with the
    defaults). No ``roi``: crop images for HOG instead."""
    if roi:
        raise ValueError("roi=True applies to histograms (color_hist, lbp); crop images for HOG instead")

    def fn(img: np.ndarray) -> np.ndarray:
        return hog_descriptor(img, orientations=orientations, pixels_per_cell=pixels_per_cell,
                              cells_per_block=cells_per_block)

    params = {"orientations": int(orientations), "pixels_per_cell": int(pixels_per_cell),
              "cells_per_block": int(cells_per_block)}
    return _hog_dim(size, orientations, pixels_per_cell, cells_per_block), params, fn


def build_descriptor_extractor(name: str, *, input_size: int | None = None, l2_normalize: bool = False,
                               layer: str | None = None, pooling: str | None = None, weights: Any = None,
                               bins: int = 32, space: str = "rgb", points: int = 24, radius: float = 3,
                               method: str = "uniform", orientations: int = 9, pixels_per_cell: int = 16,
                               cells_per_block: int = 2, roi: bool = False, roi_margin: int = 4,
                               gem_p: float | None = None) -> DescriptorExtractor:
    """A handcrafted feature extractor by name: the ``descriptor`` kind's factory, through the entry's builder
    (:mod:`cbir.extractors`).

    * ``color_hist``: flattened :func:`color_histogram` (``bins``, ``space``), dim ``3 * bins``, input 224;
    * ``lbp``: :func:`lbp_histogram` (``points``, ``radius``, ``method``), dim ``P + 2`` (uniform), input 224;
    * ``hog``: :func:`hog_descriptor` (``orientations``, ``pixels_per_cell``, ``cells_per_block``), input 128
      (dim 1764 with the defaults).

    ``input_size`` default: the entry's. ``roi=True``: colour/LBP histograms inside the :func:`cbir.roi.find_roi`
    mask. ``layer`` and ``pooling`` must be None; ``weights`` (and other backbone-only keywords such as
    ``gem_p``) are ignored: handcrafted descriptors have none.
    """
    if name not in descriptor_names():
        raise ValueError(f"unknown descriptor {name!r}; choose one of {descriptor_names()}")
    if layer is not None or pooling is not None:
        raise ValueError(f"{name} is a handcrafted descriptor: it has no layers or pooling "
                         f"(got layer={layer!r}, pooling={pooling!r})")
    entry = get_entry(name)

    def mask_of(img: np.ndarray) -> np.ndarray | None:
        if not roi:
            return None
        from cbir.roi import find_roi

        return find_roi(img, margin=roi_margin).mask

    size = input_size or entry.input_size
    dim, params, fn = resolve(entry.builder)(
        size, bins=bins, space=space, points=points, radius=radius, method=method, orientations=orientations,
        pixels_per_cell=pixels_per_cell, cells_per_block=cells_per_block, roi=roi, mask_of=mask_of)
    if roi:
        params.update(roi=True, roi_margin=int(roi_margin))
    return DescriptorExtractor(name, input_size=size, dim=dim, fn=fn, params=params, l2_normalize=l2_normalize)
