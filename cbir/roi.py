"""Region of interest: find the product against its studio background and crop to it.

Product photos sit on a white or grey, roughly uniform studio background. Colour and texture
statistics of a whole photo are dominated by that background, so two different garments on the
same white background look alike. :func:`find_roi` separates the product from the background:

1. Lab colour (``L`` 0..100, ``a``/``b`` -128..127); the background model is a smooth quadratic
   surface per channel, fitted robustly (outliers dropped, refitted) to the border ring, which
   follows the light gradients and vignettes of studio shots. ``border_colour`` is the median
   RGB of the border pixels that fit the model.
2. Distance of every pixel to the model (CIE76 delta E); background = pixels within
   ``max(min_threshold, k_sigma * spread)`` of it that are connected to the border (flood fill,
   so white parts inside a garment stay foreground). ``spread`` is the per-channel noise of the
   background border pixels (median distance / 1.538, the median of a 3-D Gaussian's norm).
   Canny edges (dilated) are barriers to that flood, so a white shirt on white keeps its inside;
   on lit backdrops (the model's lightness varies) smooth pixels a little farther from the model
   also count as background, which follows spotlights the border cannot see.
3. Morphology (close, then open, ellipse kernels), hole filling, and removal of the
   background-coloured rim the dilated edges added; the largest connected component plus every
   component of at least ``min_component_frac`` of it are kept.
4. Optional GrabCut refinement seeded with that mask.

The crop box is the mask's bounding box grown by ``margin`` pixels and clipped to the image,
``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive. When the background cannot be trusted
(too little of the border matches it, it is noisy), or the product touches the border on most
sides, or the region is tiny or nearly the whole image, the result falls back to the whole
image with ``fallback=True`` and the cause in ``reason``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["RoiResult", "RoiSettings", "find_roi", "crop_to_roi", "crop_catalog", "roi_loader", "roi_table"]

# Reason codes (the first word of ``reason``), stable for tables and tests.
OK = "ok"
BORDER_NOT_UNIFORM = "border_not_uniform"
NOISY_BACKGROUND = "noisy_background"
TOUCHES_BORDER = "touches_border"
TOO_SMALL = "too_small"
WHOLE_IMAGE = "whole_image"


@dataclass
class RoiResult:
    """Where the product is in one image.

    ``mask``: HxW bool (True = product); ``box``: ``(x0, y0, x1, y1)`` pixels, ``x1``/``y1``
    exclusive; ``fallback``: True when the whole image is used; ``reason``: ``"ok"`` or a code
    (``border_not_uniform``, ``noisy_background``, ``touches_border``, ``too_small``,
    ``whole_image``) followed by the numbers that decided it; ``border_colour``: median RGB of the
    background border pixels (0..255); ``stats``: border match fraction, spread (delta E),
    threshold, mask area fraction, box area fraction, touched sides.
    """

    mask: np.ndarray
    box: tuple[int, int, int, int]
    fallback: bool
    reason: str
    border_colour: tuple[float, float, float]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> str:
        """The reason code without its numbers (``"ok"``, ``"touches_border"``, ...)."""
        return self.reason.split(":", 1)[0]


def _border_ring(h: int, w: int, width: int) -> np.ndarray:
    ring = np.zeros((h, w), bool)
    ring[:width, :] = ring[-width:, :] = True
    ring[:, :width] = ring[:, -width:] = True
    return ring


def _design(xs: np.ndarray, ys: np.ndarray, h: int, w: int, degree: int) -> np.ndarray:
    """Polynomial terms in normalised coordinates (-1..1): 1, x, y[, x^2, xy, y^2], stacked last.

    ``xs`` and ``ys`` broadcast (a row and a column give the whole image's grid)."""
    x = xs / max(w - 1, 1) * 2 - 1
    y = ys / max(h - 1, 1) * 2 - 1
    x, y = np.broadcast_arrays(x, y)
    cols = [np.ones_like(x)]
    if degree >= 1:
        cols += [x, y]
    if degree >= 2:
        cols += [x * x, x * y, y * y]
    return np.stack(cols, axis=-1)


def _solve(A: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Least squares by the (tiny, k x k) normal equations; a small ridge keeps them regular.

    ``einsum`` rather than ``@``: these products are too small to gain from (possibly busy,
    multi-threaded) BLAS."""
    k = A.shape[1]
    return np.linalg.solve(np.einsum("ni,nj->ij", A, A) + 1e-9 * len(A) * np.eye(k),
                           np.einsum("ni,nc->ic", A, vals))


def _fit_background(lab: np.ndarray, ring: np.ndarray, *, degree: int, inlier_de: float,
                    iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Robust polynomial surface per Lab channel fitted to the ring pixels.

    Returns (model HxWx3 float32, inlier mask over the ring pixels). The first fit is a
    constant (the median); later fits use only ring pixels within ``inlier_de`` of the model.
    """
    h, w, _ = lab.shape
    ys, xs = np.nonzero(ring)
    vals = lab[ys, xs].astype(np.float64)
    A = _design(xs.astype(np.float64), ys.astype(np.float64), h, w, degree)
    coef = np.zeros((A.shape[1], 3))
    coef[0] = np.median(vals, axis=0)
    for _ in range(iterations):
        inliers = np.linalg.norm(np.einsum("ni,ic->nc", A, coef) - vals, axis=1) <= inlier_de
        if inliers.sum() < A.shape[1] * 10:
            break
        coef = _solve(A[inliers], vals[inliers])
    inliers = np.linalg.norm(np.einsum("ni,ic->nc", A, coef) - vals, axis=1) <= inlier_de
    grid = _design(np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None],
                   h, w, degree)
    model = np.einsum("hwi,ic->hwc", grid, coef.astype(np.float32))
    return model.astype(np.float32), inliers


def _touched_sides(mask: np.ndarray, *, frac: float) -> list[str]:
    h, w = mask.shape
    sides = {"top": mask[0, :].mean(), "bottom": mask[-1, :].mean(),
             "left": mask[:, 0].mean(), "right": mask[:, -1].mean()}
    return [s for s, v in sides.items() if v >= frac]


def _keep_components(mask: np.ndarray, *, min_component_frac: float) -> np.ndarray:
    import cv2

    n, labels, st, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask)
    areas = st[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= min_component_frac * areas.max()) + 1
    return np.isin(labels, keep)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill regions not connected to the image border (flood fill of the background)."""
    import cv2

    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    ff = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(padded, ff, (0, 0), 1)
    # padded now: 1 where mask or outside background; holes stay 0
    return mask | (padded[1:-1, 1:-1] == 0)


def _peel(fg: np.ndarray, removable: np.ndarray, *, steps: int, min_component_frac: float,
          min_area_frac: float) -> np.ndarray:
    """Drop ``removable`` pixels of ``fg`` reached from the background through removable pixels
    in at most ``steps`` 4-connected steps; unchanged if that would leave too little."""
    import cv2

    bg = ~fg
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    for _ in range(steps):
        bg |= cv2.dilate(bg.astype(np.uint8), cross).astype(bool) & removable
    core = _keep_components(fg & ~bg, min_component_frac=min_component_frac)
    return core if core.mean() >= min_area_frac else fg


def _fallback(h: int, w: int, code: str, detail: str, colour, stats) -> RoiResult:
    return RoiResult(mask=np.ones((h, w), bool), box=(0, 0, w, h), fallback=True,
                     reason=f"{code}: {detail}", border_colour=colour, stats=stats)


@dataclass(frozen=True)
class RoiSettings:
    """The knobs of :func:`find_roi` (defaults tuned on the shared real catalogue; 0.73 % fall back).

    ``margin``: pixels added around the mask's bounding box (in the input's pixels).
    ``border_width``: width of the border ring (work pixels) that samples the background.
    ``degree``: 0 (flat colour), 1 (plane) or 2 (quadratic) background model.
    Threshold on delta E: ``max(min_threshold, k_sigma * spread)``.
    Fallback (whole image) when fewer than ``min_border_match`` of the border pixels fit the
    model, when ``spread > max_spread`` (delta E), when the mask reaches more than
    ``max_touching_sides`` image sides (a side counts when ``touch_frac`` of it is product),
    when the mask covers less than ``min_area_frac`` of the image, or when the box covers more
    than ``max_box_frac`` of it. ``close_px``/``open_px``: morphology kernel sizes (work pixels).
    ``grow_threshold``/``grow_gradient``: background also takes smooth pixels (Lab gradient
    <= ``grow_gradient`` delta E per pixel) within ``grow_threshold`` of the model (None: off),
    only when the model's lightness varies by ``grow_min_range`` or more (a lit backdrop).
    ``canny``: (low, high) thresholds of ``cv2.Canny`` on the blurred grey image; the dilated
    edges block the background flood so pale garments keep their inside (None: off).
    ``rim_px``/``box_rim_px``/``rim_threshold``: the pale halo around the region (JPEG ringing,
    anti-aliasing: pixels within ``rim_threshold`` delta E of the background, reached from it
    through such pixels) is peeled ``box_rim_px`` steps deep before the box is taken (pale product
    edges lost there lie within ``margin``) and ``rim_px`` steps deep for the mask.
    ``grabcut``: refine the mask with ``cv2.grabCut`` seeded from it (``grabcut_iterations``).
    ``work_size``: images with a longer side are analysed downscaled to it (mask and box are
    returned at full size); None analyses at full size.
    """

    margin: int = 4
    border_width: int = 3
    degree: int = 2
    min_threshold: float = 3.0
    k_sigma: float = 6.0
    min_border_match: float = 0.5
    max_spread: float = 3.0
    grow_threshold: float | None = 25.0
    grow_gradient: float = 1.0
    grow_min_range: float = 4.0
    canny: tuple[float, float] | None = (10.0, 30.0)
    close_px: int = 5
    open_px: int = 3
    rim_px: int = 8
    box_rim_px: int = 3
    rim_threshold: float = 10.0
    min_component_frac: float = 0.1
    touch_frac: float = 0.05
    max_touching_sides: int = 2
    min_area_frac: float = 0.01
    max_box_frac: float = 0.97
    grabcut: bool = False
    grabcut_iterations: int = 3
    work_size: int | None = 256


@dataclass
class _Background:
    """The background model of one work image: delta E of every pixel to it, and its statistics."""

    lab: np.ndarray
    dist: np.ndarray
    model: np.ndarray
    ring: np.ndarray
    match: float
    spread: float
    threshold: float
    colour: tuple[float, ...]


def _work_image(img: np.ndarray, work_size: int | None) -> tuple[np.ndarray, float]:
    """The image downscaled so its longer side is at most ``work_size`` (INTER_AREA), and the scale."""
    import cv2

    H, W = img.shape[:2]
    if work_size is None or max(H, W) <= work_size:
        return img, 1.0
    scale = work_size / max(H, W)
    return cv2.resize(img, (max(1, round(W * scale)), max(1, round(H * scale))),
                      interpolation=cv2.INTER_AREA), scale


def _background(work: np.ndarray, s: RoiSettings) -> _Background:
    """Fit the smooth Lab background model to the border ring; distances, spread and threshold."""
    import cv2

    h, w = work.shape[:2]
    bw = max(1, min(s.border_width, h // 4, w // 4))
    lab = cv2.cvtColor(work.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    ring = _border_ring(h, w, bw)
    # inlier tolerance for the fit: generous first (JPEG noise, gradients), spread decides later
    model, inl = _fit_background(lab, ring, degree=s.degree, inlier_de=max(s.min_threshold, 8.0))
    dist = np.linalg.norm(lab - model, axis=2)
    fit_d = dist[ring][inl]
    # per-channel noise sigma: the median of a 3-D Gaussian's norm is 1.538 sigma
    spread = float(np.median(fit_d) / 1.538) if fit_d.size else float("inf")
    ring_rgb = work[ring][inl] if inl.any() else work[ring]
    colour = tuple(float(v) for v in np.median(ring_rgb, axis=0))
    return _Background(lab=lab, dist=dist, model=model, ring=ring, match=float(inl.mean()), spread=spread,
                       threshold=max(s.min_threshold, s.k_sigma * spread), colour=colour)


def _foreground(work: np.ndarray, bg: _Background, s: RoiSettings, stats: dict[str, Any]) -> np.ndarray:
    """Foreground mask: not background (near-model pixels connected to the border), cleaned.

    With ``grow_threshold`` the background also takes smooth pixels (Lab gradient below
    ``grow_gradient`` delta E per pixel) a little farther from the model, which follows spotlights
    the border ring cannot see; only on lit backgrounds (model lightness range >= grow_min_range):
    on flat white ones it would leak into white garments. Canny edges are barriers: the background
    must not flow through a garment's outline.
    """
    import cv2

    near = bg.dist <= bg.threshold
    bg_range = float(np.ptp(bg.model[..., 0]))
    stats["bg_range"] = round(bg_range, 3)
    if s.grow_threshold is not None and s.grow_threshold > bg.threshold and bg_range >= s.grow_min_range:
        blur = cv2.GaussianBlur(bg.lab, (5, 5), 0)
        gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3) / 8.0
        gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        grad = np.sqrt((gx * gx + gy * gy).sum(axis=2))
        near |= (bg.dist <= s.grow_threshold) & (grad <= s.grow_gradient)
    barrier = near
    if s.canny is not None:
        grey = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(cv2.GaussianBlur(grey, (3, 3), 0), s.canny[0], s.canny[1])
        barrier = near & ~(cv2.dilate(edges, np.ones((3, 3), np.uint8)) > 0)
    _, labels = cv2.connectedComponents(barrier.astype(np.uint8), connectivity=4)
    border_labels = np.unique(labels[bg.ring & barrier])
    fg = ~np.isin(labels, border_labels[border_labels > 0])
    for op, px in ((cv2.MORPH_CLOSE, s.close_px), (cv2.MORPH_OPEN, s.open_px)):
        if px > 1:
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (px, px))
            fg = cv2.morphologyEx(fg.astype(np.uint8), op, k).astype(bool)
    fg = _keep_components(_fill_holes(fg), min_component_frac=s.min_component_frac)
    if s.grabcut and fg.any() and not fg.all():
        fg = _grabcut(work, fg, iterations=s.grabcut_iterations)
        fg = _keep_components(_fill_holes(fg), min_component_frac=s.min_component_frac)
    return fg


def _peeled_masks(fg: np.ndarray, bg: _Background, s: RoiSettings) -> tuple[np.ndarray, np.ndarray]:
    """(mask for the box, mask) with the pale halo peeled off.

    The halo (JPEG ringing, anti-aliasing, the band the dilated edges added) is the pixels within
    ``rim_threshold`` of the background reached from it through such pixels: peeled ``box_rim_px``
    steps deep for the box (pale product edges lost there are within the margin) and ``rim_px``
    steps deep for the mask (the product's own colours only).
    """
    pale = bg.dist <= max(s.rim_threshold, bg.threshold)
    fg_box = _peel(fg, pale, steps=s.box_rim_px, min_component_frac=s.min_component_frac,
                   min_area_frac=s.min_area_frac)
    if s.rim_px <= s.box_rim_px:
        return fg_box, fg_box
    return fg_box, _peel(fg_box, pale, steps=s.rim_px - s.box_rim_px, min_component_frac=s.min_component_frac,
                         min_area_frac=s.min_area_frac)


def _full_size(m: np.ndarray, H: int, W: int, scale: float) -> np.ndarray:
    """A work-size mask back at the input's ``H x W`` (nearest neighbour)."""
    if scale == 1.0:
        return m
    import cv2

    return cv2.resize(m.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)


def _box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """Bounding box ``(x0, y0, x1, y1)`` of ``mask`` grown by ``margin`` and clipped to it."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    return (max(int(xs.min()) - margin, 0), max(int(ys.min()) - margin, 0),
            min(int(xs.max()) + 1 + margin, W), min(int(ys.max()) + 1 + margin, H))


def find_roi(image: np.ndarray, settings: RoiSettings | None = None, **overrides: Any) -> RoiResult:
    """Find the product in an HxWx3 uint8 RGB photo on a studio background.

    ``settings``: a :class:`RoiSettings` (default: its defaults); keyword ``overrides`` replace
    single fields, e.g. ``find_roi(img, margin=10)``. See the module docstring for the steps.
    """
    s = replace(settings or RoiSettings(), **overrides)
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"find_roi expects an HxWx3 uint8 RGB image, got shape {img.shape} "
                         f"dtype {img.dtype}")
    H, W = img.shape[:2]
    work, scale = _work_image(img, s.work_size)
    bg = _background(work, s)
    stats: dict[str, Any] = {"border_match": round(bg.match, 4), "spread": round(bg.spread, 3),
                             "threshold": round(bg.threshold, 3)}
    if bg.match < s.min_border_match:
        return _fallback(H, W, BORDER_NOT_UNIFORM,
                         f"only {bg.match:.0%} of the border matches the background", bg.colour, stats)
    if bg.spread > s.max_spread:
        return _fallback(H, W, NOISY_BACKGROUND,
                         f"background spread {bg.spread:.1f} > {s.max_spread} delta E", bg.colour, stats)
    fg = _foreground(work, bg, s, stats)
    area = float(fg.mean())
    stats["area_frac"] = round(area, 4)
    if area < s.min_area_frac:
        return _fallback(H, W, TOO_SMALL, f"region covers {area:.1%} of the image", bg.colour, stats)
    sides = _touched_sides(fg, frac=s.touch_frac)
    stats["touching"] = ",".join(sides)
    if len(sides) > s.max_touching_sides:
        return _fallback(H, W, TOUCHES_BORDER,
                         f"product touches {len(sides)} sides ({', '.join(sides)})", bg.colour, stats)
    fg_box, fg = _peeled_masks(fg, bg, s)
    stats["mask_frac"] = round(float(fg.mean()), 4)
    box = _box(_full_size(fg_box, H, W, scale), s.margin)
    box_frac = (box[2] - box[0]) * (box[3] - box[1]) / float(H * W)
    stats["box_frac"] = round(box_frac, 4)
    if box_frac > s.max_box_frac:
        return _fallback(H, W, WHOLE_IMAGE, f"box covers {box_frac:.0%} of the image", bg.colour, stats)
    return RoiResult(mask=_full_size(fg, H, W, scale), box=box, fallback=False, reason=OK,
                     border_colour=bg.colour, stats=stats)


def _grabcut(work: np.ndarray, fg: np.ndarray, *, iterations: int) -> np.ndarray:
    """Refine a foreground mask with GrabCut: the eroded mask is sure foreground, the rest of the
    mask probable foreground, a band around it probable background, everything else sure background.
    Deterministic: OpenCV's RNG is seeded before each call."""
    import cv2

    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    inner = cv2.erode(fg.astype(np.uint8), k).astype(bool)
    outer = cv2.dilate(fg.astype(np.uint8), k, iterations=2).astype(bool)
    gc = np.full(fg.shape, cv2.GC_BGD, np.uint8)
    gc[outer] = cv2.GC_PR_BGD
    gc[fg] = cv2.GC_PR_FGD
    gc[inner] = cv2.GC_FGD
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    bgr = cv2.cvtColor(work, cv2.COLOR_RGB2BGR)
    cv2.setRNGSeed(0)  # GrabCut's k-means initialisation draws from OpenCV's global RNG: same image, same mask
    try:
        cv2.grabCut(bgr, gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return fg
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def crop_to_roi(image: np.ndarray, result: RoiResult) -> np.ndarray:
    """The HxWx3 crop of ``image`` inside ``result.box`` (a view; the whole image on fallback)."""
    x0, y0, x1, y1 = result.box
    return np.asarray(image)[y0:y1, x0:x1]


def roi_table(results: Mapping[str, RoiResult]) -> pd.DataFrame:
    """Tidy table of ROI results: image_id, roi_x0..roi_y1, roi_fallback, roi_reason, roi_code."""
    rows = [{"image_id": k, "roi_x0": r.box[0], "roi_y0": r.box[1], "roi_x1": r.box[2],
             "roi_y1": r.box[3], "roi_fallback": r.fallback, "roi_code": r.code,
             "roi_reason": r.reason} for k, r in results.items()]
    return pd.DataFrame(rows, columns=["image_id", "roi_x0", "roi_y0", "roi_x1", "roi_y1",
                                       "roi_fallback", "roi_code", "roi_reason"])


def roi_loader(*, margin: int = 4, **roi_kwargs: Any):
    """A loader ``(path, size) -> uint8[size, size, 3]`` reading the full image, cropping it to
    :func:`find_roi`'s box and resizing (``cv2.INTER_AREA``), for
    ``extract_features(..., loader=roi_loader(), variant="roi")``."""
    import cv2

    from cbir.images import read_image

    def load(path: str, size: int) -> np.ndarray:
        image = read_image(path)
        crop = crop_to_roi(image, find_roi(image, margin=margin, **roi_kwargs))
        return np.ascontiguousarray(cv2.resize(crop, (int(size), int(size)), interpolation=cv2.INTER_AREA))

    return load


_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_ROI_COLUMNS = ["image_id", "file", "roi_x0", "roi_y0", "roi_x1", "roi_y1", "roi_fallback", "roi_code",
                "roi_reason", "src_width", "src_height"]


def _file_name(image_id: str) -> str:
    """A file-system-safe, collision-free JPEG name for an image id."""
    import hashlib

    safe = _SAFE.sub("_", image_id)
    if safe != image_id or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"
    return f"{safe}.jpg"


def _crop_one(image_id: str, path: Any, out: Path, *, margin: int, size: int | None, quality: int,
              roi_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Crop one image to its ROI and write it (atomically); returns (roi row, None) or (None, problem)."""
    import cv2

    from cbir.images import ImageError, read_image

    try:
        image = read_image(path)
    except ImageError as exc:
        return None, {"image_id": image_id, "path": str(path), "problem": exc.reason,
                      "detail": getattr(exc, "detail", "") or str(exc)}
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the catalogue
        return None, {"image_id": image_id, "path": str(path), "problem": "error",
                      "detail": f"{type(exc).__name__}: {exc}"}
    result = find_roi(image, margin=margin, **roi_kwargs)
    crop = crop_to_roi(image, result)
    if size is not None:
        crop = cv2.resize(crop, (int(size), int(size)), interpolation=cv2.INTER_AREA)
    name = _file_name(image_id)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        return None, {"image_id": image_id, "path": str(path), "problem": "write_failed",
                      "detail": "cv2.imencode failed"}
    target = out / "images" / name
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, target)
    x0, y0, x1, y1 = result.box
    return {"image_id": image_id, "file": f"images/{name}", "roi_x0": x0, "roi_y0": y0, "roi_x1": x1,
            "roi_y1": y1, "roi_fallback": result.fallback, "roi_code": result.code,
            "roi_reason": result.reason, "src_width": image.shape[1], "src_height": image.shape[0]}, None


def crop_catalog(catalog: Any, out_dir: str | os.PathLike, *, margin: int = 4, size: int | None = None,
                 quality: int = 95, workers: int = 2, progress: bool = True, chunk: int = 256,
                 roi_kwargs: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Crop every catalogue image to its region of interest and write it as a JPEG.

    ``catalog``: a Catalog or DataFrame with ``image_id`` and ``path``. Writes
    ``out_dir/images/<image_id>.jpg`` (ids made file-system safe), ``out_dir/roi.csv`` (one row per
    cropped image: file, ``roi_x0, roi_y0, roi_x1, roi_y1`` in source pixels, ``roi_fallback``,
    ``roi_code``, ``roi_reason``, source size), ``out_dir/problems.csv`` (``image_id, path, problem,
    detail`` of unreadable images) and, when the table has ``category`` and ``subcategory``,
    ``out_dir/manifest.csv`` (``image_id``, ``image`` relative path, the catalogue's other columns)
    so ``load_catalog(out_dir)`` reads the cropped catalogue.
    ``size``: resize each crop to ``size x size`` (None keeps the crop's size). Images listed in
    ``roi.csv`` whose JPEG exists are skipped, so a rerun resumes; ``roi.csv`` is appended every
    ``chunk`` images. Returns the catalogue rows that have a crop, ``path`` pointing at it and the
    original in ``source_path``, plus the ROI columns; unreadable images are left out, listed in
    ``result.attrs["problems"]`` and ``problems.csv`` (a warning says how many).
    """
    import warnings

    from tqdm.auto import tqdm

    from cbir.catalog import catalog_frame

    df = catalog_frame(catalog)
    ids = df["image_id"].astype(str)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    roi_csv = out / "roi.csv"
    rk = dict(roi_kwargs or {})

    done = pd.DataFrame(columns=_ROI_COLUMNS)
    if roi_csv.is_file() and roi_csv.stat().st_size > 0:
        done = pd.read_csv(roi_csv, dtype={"image_id": str, "file": str, "roi_code": str, "roi_reason": str})
        done = done.drop_duplicates("image_id", keep="last")
        done = done[done["file"].map(lambda f: (out / f).is_file())]
    todo = ~ids.isin(done["image_id"])
    todo_ids = ids[todo].to_numpy()
    todo_paths = df.loc[todo.to_numpy(), "path"].to_numpy(dtype=object)

    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo_ids), disable=not progress, desc="crop", unit="img")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(todo_ids), chunk):
            part = list(zip(todo_ids[start:start + chunk], todo_paths[start:start + chunk]))
            new = []
            for row, problem in pool.map(lambda a: _crop_one(a[0], a[1], out, margin=margin, size=size,
                                                             quality=quality, roi_kwargs=rk), part):
                (new.append(row) if row is not None else problems.append(problem))
                bar.update(1)
            if new:
                pd.DataFrame(new, columns=_ROI_COLUMNS).to_csv(
                    roi_csv, mode="a", header=not (roi_csv.is_file() and roi_csv.stat().st_size > 0), index=False)
                rows.extend(new)
    bar.close()

    prob = pd.DataFrame(problems, columns=["image_id", "path", "problem", "detail"])
    prob.to_csv(out / "problems.csv", index=False)
    if len(prob):
        warnings.warn(f"crop_catalog: {len(prob)} image(s) could not be read and were left out "
                      f"(see {out / 'problems.csv'}), e.g. {prob['path'].iloc[0]}: {prob['problem'].iloc[0]}",
                      stacklevel=2)
    roi = pd.concat([d for d in (done, pd.DataFrame(rows, columns=_ROI_COLUMNS)) if len(d)], ignore_index=True) \
        if (len(done) or rows) else pd.DataFrame(columns=_ROI_COLUMNS)
    roi["image_id"] = roi["image_id"].astype(str)
    roi["roi_fallback"] = roi["roi_fallback"].astype(bool)
    base = df.assign(image_id=ids).rename(columns={"path": "source_path"})
    base = base.drop(columns=[c for c in _ROI_COLUMNS[2:] if c in base.columns])
    result = base.merge(roi, on="image_id", how="inner", validate="one_to_one")
    result.insert(1, "path", result.pop("file").map(lambda f: str((out / f).absolute())))
    if {"category", "subcategory"} <= set(result.columns):
        manifest = result.drop(columns=["path"]).assign(
            image=result["path"].map(lambda p: os.path.relpath(p, out.absolute())))
        manifest = manifest[["image_id", "image"] + [c for c in manifest.columns if c not in ("image_id", "image")]]
        manifest.to_csv(out / "manifest.csv", index=False)
    result.attrs["problems"] = prob
    return result
