"""Colour/texture figures (notebooks 05, 06): a pair of images with their RGB and LBP histograms, heatmaps of
colour/texture similarity by features x measure, a region-of-interest overlay grid and the changes with
ROI cropping (:mod:`cbir.ablation`).

Each function returns a ``matplotlib.figure.Figure`` (not attached to pyplot, so a notebook
shows it once and nothing leaks between cells); save it with ``fig.savefig(path)``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cbir.ablation import ROI_MEASURES
from cbir.descriptors import chi2_distance, color_histogram, compare_histograms, lbp_histogram
from cbir.plots import measure_colour
from cbir.runs import feature_label

__all__ = ["plot_pair_histograms", "plot_similarity_heatmap", "plot_color_texture_heatmaps", "plot_roi_grid",
           "plot_roi_differences"]

_RGB = ("#d62728", "#2ca02c", "#1f77b4")


def _as_image(image: Any) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        from cbir.images import read_image

        return read_image(image)
    return np.asarray(image)


def _mask_for(spec: Any, image: np.ndarray, margin: int) -> np.ndarray | None:
    if spec is None:
        return None
    if isinstance(spec, str) and spec == "roi":
        from cbir.roi import find_roi

        return find_roi(image, margin=margin).mask
    return np.asarray(spec, dtype=bool)


def plot_pair_histograms(image_a: Any, image_b: Any, *, bins: int = 32, lbp_points: int = 24,
                         lbp_radius: float = 3, mask: Any = None, mask_b: Any = None, roi_margin: int = 4,
                         titles: Sequence[str] = ("query", "neighbour"), tile: float = 3.0) -> Figure:
    """Two images (rows) with their RGB histograms and LBP histograms (the study's Figures 17, 18,
    27, 28); the title gives colour correlation (mean over channels) and LBP chi-square.

    Images are HxWx3 uint8 arrays or paths. ``mask``: None, ``"roi"`` (both images'
    :func:`cbir.roi.find_roi` masks) or an HxW bool array for ``image_a``; ``mask_b`` for
    ``image_b`` (defaults to ``mask`` when that is ``"roi"``). Masked pixels are greyed out.
    """
    a, b = _as_image(image_a), _as_image(image_b)
    ma = _mask_for(mask, a, roi_margin)
    mb = _mask_for(mask_b if mask_b is not None else (mask if isinstance(mask, str) else None), b, roi_margin)
    ca, cb = (color_histogram(x, bins=bins, mask=m) for x, m in ((a, ma), (b, mb)))
    la, lb = (lbp_histogram(x, points=lbp_points, radius=lbp_radius, mask=m) for x, m in ((a, ma), (b, mb)))
    corr = compare_histograms(ca, cb, method="correlation")
    chi2 = chi2_distance(la, lb)

    fig = Figure(figsize=(3 * tile + 1.5, 2 * tile), layout="constrained")
    axes = fig.subplots(2, 3, gridspec_kw={"width_ratios": [1, 1.3, 1.3]})
    centres = (np.arange(bins) + 0.5) * 256 / bins
    ymax_c = max(ca.max(), cb.max()) * 1.05
    ymax_l = max(la.max(), lb.max()) * 1.05
    for row, (img, m, ch, lh, title) in enumerate(((a, ma, ca, la, titles[0]), (b, mb, cb, lb, titles[1]))):
        shown = img.copy()
        if m is not None:
            shown[~m] = (0.35 * shown[~m] + 0.65 * 160).astype(np.uint8)
        axes[row, 0].imshow(shown)
        axes[row, 0].set_axis_off()
        axes[row, 0].set_title(title + (" (ROI)" if m is not None else ""), fontsize=9)
        for c, colour in enumerate(_RGB):
            axes[row, 1].plot(centres, ch[c], color=colour, lw=1.2, label="RGB"[c])
        axes[row, 1].set(xlim=(0, 256), ylim=(0, ymax_c), xlabel="intensity", ylabel="share of pixels")
        axes[row, 1].set_title(f"RGB histogram ({bins} bins)", fontsize=9)
        axes[row, 1].legend(fontsize=7, loc="upper center", ncols=3, frameon=False)
        axes[row, 2].bar(np.arange(len(lh)), lh, color="0.35", width=0.85)
        axes[row, 2].set(ylim=(0, ymax_l), xlabel="LBP code (uniform)", ylabel="share of pixels")
        axes[row, 2].set_title(f"LBP histogram (P={lbp_points}, R={lbp_radius:g})", fontsize=9)
    fig.suptitle(f"colour correlation {corr:.3f}   LBP chi-square {chi2:.3f}", fontsize=10)
    return fig


def plot_similarity_heatmap(table: pd.DataFrame, *, value: str = "mean", rows: str = "model",
                            cols: str = "metric", measure: str | None = None, title: str | None = None,
                            cmap: str | None = None, fmt: str = ".3f", ax: Any = None) -> Figure:
    """Heatmap of ``value`` by ``rows`` x ``cols`` (e.g. mean colour correlation per model x
    distance measure).

    ``table``: a :func:`cbir.descriptors.similarity_summary` table (choose ``measure`` when it holds
    several) or a pairs table (``value`` = ``color_corr``/``lbp_chi2``, averaged per cell).
    Colour scale: higher is darker for correlation; for chi-square (a distance) the map is reversed
    so darker still means more similar.
    """
    import seaborn as sns

    data = table
    if measure is not None:
        if "measure" not in data.columns:
            raise ValueError("measure= needs a similarity_summary table (with a 'measure' column)")
        data = data[data["measure"] == measure]
        if data.empty:
            raise ValueError(f"no rows for measure {measure!r}; have {sorted(table['measure'].unique())}")
    missing = [c for c in (rows, cols, value) if c not in data.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; has {list(data.columns)}")
    grid = data.pivot_table(index=rows, columns=cols, values=value, aggfunc="mean", sort=False)
    name = measure or value
    distance = "chi2" in name or "chisqr" in name or "bhattacharyya" in name
    if ax is None:
        fig = Figure(figsize=(1.1 * grid.shape[1] + 2.5, 0.5 * grid.shape[0] + 1.6), layout="constrained")
        FigureCanvasAgg(fig)  # seaborn measures tick labels with the canvas' renderer: without one it peaks at GBs
        ax = fig.subplots()
    else:
        fig = ax.figure
    sns.heatmap(grid, ax=ax, annot=True, fmt=fmt, cmap=cmap or ("viridis" if distance else "viridis_r"),
                cbar_kws={"label": f"{name} (colours span the values' range)"}, annot_kws={"fontsize": 8})
    ax.set_title(title or f"{name} ({value}) by {rows} x {cols}", fontsize=10)
    return fig


def plot_roi_grid(images: Sequence[Any], results: Sequence[Any] | None = None, *,
                  titles: Sequence[str] | None = None, ncols: int = 6, margin: int = 4,
                  roi_kwargs: dict[str, Any] | None = None, tile: float = 2.0) -> Figure:
    """Grid of images with their region of interest: background dimmed outside the mask, crop box in
    green (or the whole-image box in red on fallback), the reason code under each image.

    ``images``: HxWx3 uint8 arrays or paths; ``results``: their :class:`cbir.roi.RoiResult` (computed
    with :func:`cbir.roi.find_roi`, ``margin`` and ``roi_kwargs`` when None).
    """
    from matplotlib.patches import Rectangle

    from cbir.roi import find_roi

    imgs = [_as_image(i) for i in images]
    if results is None:
        results = [find_roi(i, margin=margin, **(roi_kwargs or {})) for i in imgs]
    if len(results) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(results)} ROI results")
    n = len(imgs)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(tile * ncols, tile * nrows + 0.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k >= n:
            continue
        img, r = imgs[k], results[k]
        shown = img.copy()
        if not r.fallback:
            shown[~r.mask] = (0.45 * shown[~r.mask]).astype(np.uint8)
        ax.imshow(shown)
        x0, y0, x1, y1 = r.box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.8,
                               edgecolor="tab:red" if r.fallback else "lime"))
        label = r.code if titles is None else f"{titles[k]}\n{r.code}"
        ax.set_title(label, fontsize=7, color="tab:red" if r.fallback else "black")
    n_fb = sum(bool(r.fallback) for r in results)
    fig.suptitle(f"region of interest: {n - n_fb}/{n} cropped, {n_fb} whole-image fallbacks", fontsize=9)
    return fig


def plot_color_texture_heatmaps(pairs: pd.DataFrame, *, rows: str = "features", cols: str = "metric",
                                title: str | None = None) -> Figure:
    """Mean colour correlation (top) and mean LBP chi-square (bottom) of the pairs by ``rows`` x ``cols``
    (:func:`plot_similarity_heatmap` on two stacked axes; ``rows="features"`` is made
    with :func:`cbir.runs.feature_label` when absent). Darker = more alike in both. Returns a matplotlib Figure."""
    df = pairs.assign(features=feature_label(pairs)) if rows == "features" and "features" not in pairs else pairs
    n_rows, n_cols = df[rows].nunique(), df[cols].nunique()
    label = int(df[rows].astype(str).str.len().max())
    fig = Figure(figsize=(1.05 * n_cols + 0.075 * label + 2.2, 2 * (0.42 * n_rows + 1.25)), layout="constrained")
    axes = fig.subplots(2, 1)
    for ax, value, name in zip(axes, ("color_corr", "lbp_chi2"), ("colour correlation", "LBP chi-square")):
        plot_similarity_heatmap(df, value=value, rows=rows, cols=cols, ax=ax, title=f"mean {name}")
        ax.tick_params(axis="y", rotation=0, labelsize=8)
        ax.tick_params(axis="x", rotation=0, labelsize=8)
        ax.set_ylabel("")
    axes[0].set_xlabel("")
    fig.suptitle(title or "query-neighbour pairs by features x distance measure (darker = more alike)", fontsize=10)
    return fig


_MEASURE_TITLES = {"category_match": "category match (share of top k)",
                   "subcategory_match": "sub-category match (share of top k)",
                   "color_corr": "colour correlation (1 = same colours)",
                   "lbp_chi2": "LBP chi-square (0 = same texture)"}


def plot_roi_differences(summary: pd.DataFrame, *, title: str | None = None, tile: float = 3.2) -> Figure:
    """One panel per measure: the mean change ``cropped - original`` per metric with its 95% CI (from
    :func:`cbir.ablation.paired_summary`), each metric in its colour of the shared palette
    (:func:`cbir.plots.measure_colour`); filled markers where the CI excludes 0. Returns a matplotlib Figure."""
    measures = [m for m in ROI_MEASURES if m in set(summary["measure"])]
    if not measures:
        raise ValueError(f"summary has none of the measures {ROI_MEASURES}")
    fig = Figure(figsize=(tile * len(measures), 0.35 * summary["metric"].nunique() + 1.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(measures), sharey=True))
    metrics = list(pd.unique(summary["metric"]))
    y = np.arange(len(metrics))
    for ax, measure in zip(axes, measures):
        rows = summary.loc[summary["measure"] == measure].set_index("metric").reindex(metrics)
        d, lo, hi = (rows[c].to_numpy(dtype=float) for c in ("difference", "diff_lo", "diff_hi"))
        sig = (lo > 0) | (hi < 0)
        ax.axvline(0, color="0.5", lw=0.8)
        ax.errorbar(d, y, xerr=np.vstack([d - lo, hi - d]), fmt="none", ecolor="0.3", capsize=3, lw=1)
        colours = np.array([measure_colour(m) for m in metrics])
        ax.scatter(d[sig], y[sig], color=colours[sig], zorder=3, s=28)
        ax.scatter(d[~sig], y[~sig], facecolor="white", edgecolor=colours[~sig], linewidths=1.5, zorder=3, s=28)
        ax.set_title(_MEASURE_TITLES.get(measure, measure), fontsize=9)
        ax.set_xlabel("cropped - original", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(y, metrics)
    axes[0].invert_yaxis()
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color="0.35", label="CI excludes 0"),
               Line2D([], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="0.35", label="CI includes 0")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(title or "change with region-of-interest cropping (mean over queries, 95% paired bootstrap CI)",
                 fontsize=10)
    return fig
