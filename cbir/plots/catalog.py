"""Catalogue overview figures (notebook 00): counts per category / sub-category, a sample grid per
sub-category, image sizes and background statistics.

Each function returns a ``matplotlib.figure.Figure`` (not attached to pyplot, so a notebook shows it
once); pass ``path`` to also save it as PNG (parent folders are created).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cbir.catalog import Catalog
from cbir.images import ImageError, read_image
from cbir.plots import save_figure

__all__ = ["plot_counts", "plot_samples", "plot_image_sizes", "plot_backgrounds", "sample_table", "save_figure"]


def plot_counts(catalog: Catalog | pd.DataFrame, *, by: str = "subcategory", path: str | os.PathLike | None = None,
                column: str = "n_images") -> Figure:
    """Horizontal bar chart of image counts per sub-category (``by="subcategory"``, bars coloured by
    category) or per category (``by="category"``), from a Catalog or its ``summary()`` table."""
    import seaborn as sns

    summary = catalog.summary() if isinstance(catalog, Catalog) else catalog
    if by == "category":
        data = summary.groupby("category", as_index=False)[column].sum().sort_values(column, ascending=False)
        y, hue = "category", None
    elif by == "subcategory":
        data = summary.sort_values(["category", column], ascending=[True, False])
        y, hue = "subcategory", "category"
    else:
        raise ValueError(f"by must be 'category' or 'subcategory', got {by!r}")
    fig = Figure(figsize=(8, 1.2 + 0.24 * len(data)), layout="constrained")
    ax = fig.subplots()
    sns.barplot(data=data, x=column, y=y, hue=hue, dodge=False, ax=ax, orient="h")
    ax.set_xlabel("images")
    ax.set_ylabel("")
    for container in ax.containers:
        ax.bar_label(container, fmt="%d", padding=2, fontsize=7)
    ax.set_title(f"Images per {'sub-category' if by == 'subcategory' else 'category'}")
    if hue is not None and ax.get_legend() is not None:
        ax.legend(title="category", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def sample_table(catalog: Catalog, *, per_subcategory: int = 4, seed: int = 0) -> pd.DataFrame:
    """Up to ``per_subcategory`` usable images per sub-category (seeded), ordered by category,
    sub-category; columns ``image_id, path, category, subcategory``."""
    df = catalog.usable().df[["image_id", "path", "category", "subcategory"]]
    shuffled = df.sample(frac=1.0, random_state=seed)
    picked = shuffled.groupby("subcategory", sort=False).head(per_subcategory)
    return picked.sort_values(["category", "subcategory"], kind="stable").reset_index(drop=True)


def _thumb(path: str, size: int) -> np.ndarray:
    try:
        return read_image(path, size=size)
    except ImageError:
        return np.full((size, size, 3), 255, np.uint8)


def plot_samples(catalog: Catalog, *, per_subcategory: int = 4, seed: int = 0, thumb: int = 96,
                 path: str | os.PathLike | None = None, workers: int = 4) -> Figure:
    """One row per sub-category with up to ``per_subcategory`` seeded sample images (one mosaic)."""
    table = sample_table(catalog, per_subcategory=per_subcategory, seed=seed)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        thumbs = list(pool.map(lambda p: _thumb(p, thumb), table["path"]))
    groups = list(table.groupby(["category", "subcategory"], sort=False).indices.items())
    pad = 4
    cell = thumb + pad
    mosaic = np.full((len(groups) * cell + pad, per_subcategory * cell + pad, 3), 255, np.uint8)
    for r, (_, rows) in enumerate(groups):
        for c, i in enumerate(rows):
            mosaic[pad + r * cell: pad + r * cell + thumb, pad + c * cell: pad + c * cell + thumb] = thumbs[i]
    counts = catalog.usable().df.groupby("subcategory").size()
    height = max(2.0, 0.9 * len(groups) * thumb / 96)
    fig = Figure(figsize=(per_subcategory * 0.9 * thumb / 96 + 2.6, height), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + r * cell + thumb / 2 for r in range(len(groups))])
    ax.set_yticklabels([f"{cat} / {sub} ({counts[sub]})" for (cat, sub), _ in groups], fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(f"Samples per sub-category (seed {seed})", fontsize=10)
    return save_figure(fig, path)


def plot_image_sizes(catalog: Catalog, *, path: str | os.PathLike | None = None) -> Figure:
    """Left: image width x height (pixels; marker area ~ number of images). Right: file size (KiB)
    per category. Needs a validated catalogue (``width``, ``height``, ``bytes`` columns)."""
    import seaborn as sns

    df = catalog.usable().df
    missing = [c for c in ("width", "height", "bytes") if c not in df.columns]
    if missing:
        raise ValueError(f"catalogue lacks {missing}: load it with validate=True")
    sizes = df.groupby(["width", "height"]).size().rename("n").reset_index()
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_size, ax_bytes = fig.subplots(1, 2, width_ratios=[1, 1.4])
    ax_size.scatter(sizes["width"], sizes["height"], s=20 + 400 * sizes["n"] / sizes["n"].max(), alpha=0.6)
    for row in sizes.nlargest(5, "n").itertuples():
        ax_size.annotate(f"{row.width}x{row.height}: {row.n}", (row.width, row.height), fontsize=8,
                         xytext=(4, 4), textcoords="offset points")
    ax_size.set_xlabel("width (px)")
    ax_size.set_ylabel("height (px)")
    ax_size.set_title("Image sizes")
    data = df.assign(kib=df["bytes"].astype(float) / 1024)
    sns.boxplot(data=data, x="kib", y="category", ax=ax_bytes, fliersize=1, color="#9ecae1")
    ax_bytes.set_xlabel("file size (KiB)")
    ax_bytes.set_ylabel("")
    ax_bytes.set_title("JPEG file size per category")
    return save_figure(fig, path)


def plot_backgrounds(stats: pd.DataFrame, *, path: str | os.PathLike | None = None) -> Figure:
    """Background statistics from :func:`cbir.catalog.background_stats`: histogram of the share of
    near-white border pixels, median border brightness vs that share, and the background class
    per category."""
    import seaborn as sns

    stats = stats.dropna(subset=["border_white_frac"])
    palette = {"white": "#bdbdbd", "grey": "#636363", "other": "#e6550d"}
    fig = Figure(figsize=(14, 4), layout="constrained")
    ax_hist, ax_scatter, ax_bar = fig.subplots(1, 3)
    sns.histplot(data=stats, x="border_white_frac", bins=np.linspace(0, 1, 21), ax=ax_hist, color="#3182bd")
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel("share of near-white border pixels")
    ax_hist.set_title("Border whiteness")
    sns.scatterplot(data=stats, x="border_white_frac", y="border_brightness", hue="background", palette=palette,
                    ax=ax_scatter, s=12, alpha=0.7, linewidth=0)
    ax_scatter.set_xlabel("share of near-white border pixels")
    ax_scatter.set_ylabel("median border brightness (0-255)")
    ax_scatter.set_title("Background colour")
    counts = stats.groupby(["category", "background"]).size().rename("n").reset_index()
    sns.barplot(data=counts, x="n", y="category", hue="background", palette=palette, ax=ax_bar, orient="h")
    ax_bar.set_xscale("log")
    ax_bar.set_xlabel("images (log scale)")
    ax_bar.set_ylabel("")
    ax_bar.set_title("Background class per category")
    return save_figure(fig, path)
