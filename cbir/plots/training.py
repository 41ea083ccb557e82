"""Figures of trained models (notebooks 09 and 10): training curves, an image grid with captions (the tagging
gallery of likely mis-tagged products), and reconstructions beside their originals.

Inputs are the files :func:`cbir.train.train` writes (``history.csv``) and plain arrays. Each function returns a
``matplotlib.figure.Figure``; pass ``path`` to also save it as PNG.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cbir.plots import run_colour, save_figure

__all__ = ["plot_history", "plot_image_grid", "plot_reconstructions", "plot_disagreements"]

_SPLIT_STYLE = {"train": "-", "val": "--"}


def plot_history(history: pd.DataFrame, *, title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Loss (and accuracy, when recorded) per epoch, train (solid) vs validation (dashed); epochs numbered
    across the phases (``head`` then ``fine_tune``), a dotted line where fine-tuning starts."""
    h = history.reset_index(drop=True)
    epoch = np.arange(1, len(h) + 1)
    panels = [m for m in ("loss", "accuracy") if m in h.columns]
    fig = Figure(figsize=(4.2 * len(panels), 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    colour = run_colour(title or "training")
    for ax, metric in zip(axes, panels):
        for split, style in _SPLIT_STYLE.items():
            column = metric if split == "train" else f"val_{metric}"
            if column in h.columns:
                ax.plot(epoch, h[column], style, color=colour, marker="o", ms=3, label=split)
        if "phase" in h.columns and (h["phase"] == "fine_tune").any():
            start = int(np.flatnonzero(h["phase"].to_numpy() == "fine_tune")[0]) + 0.5
            ax.axvline(start, color="grey", ls=":", lw=1)
            ax.text(start, ax.get_ylim()[1], " fine-tune", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_image_grid(images: Sequence[np.ndarray], captions: Sequence[str], *, columns: int = 6, tile: float = 1.9,
                    title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Images (uint8 RGB) in a grid, each with its caption (a few short lines) below."""
    n = max(len(images), 1)
    cols = min(columns, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(tile * cols, (tile + 0.55) * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7, y=-0.02, va="top", pad=0)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_reconstructions(originals: np.ndarray, reconstructions: Mapping[str, np.ndarray], *,
                         tile: float = 1.25, path: str | os.PathLike | None = None) -> Figure:
    """One column per image: the original on top, then each model's reconstruction (rows labelled)."""
    rows = ["original", *reconstructions]
    n = len(originals)
    fig = Figure(figsize=(tile * n + 1.4, tile * len(rows)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), n, squeeze=False))
    for r, name in enumerate(rows):
        images = originals if name == "original" else reconstructions[name]
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    return save_figure(fig, path)



def plot_disagreements(tags: pd.DataFrame, *, n: int = 12, columns: int = 6, thumb: int = 128,
                       path: str | os.PathLike | None = None) -> Figure:
    """The ``n`` most confident disagreements of a :func:`cbir.tagging.tag_catalog` table (``mistag`` rows, by
    the predicted label's probability): each photo with its given and predicted label."""
    from cbir.plots.retrieval import thumbnail

    label = "subcategory" if "predicted_subcategory" in tags.columns else "category"
    rows = tags.loc[tags["mistag"]].sort_values([f"{label}_probability", "image_id"], ascending=[False, True])
    rows = rows.head(n)
    captions = [f"{r.image_id}\ngiven: {getattr(r, label)}\npredicted: {getattr(r, 'predicted_' + label)} "
                f"{getattr(r, label + '_probability'):.2f}" for r in rows.itertuples(index=False)]
    images = [thumbnail(p, thumb) for p in rows["path"]]
    title = f"{len(rows)} most confident disagreements with the given {label}"
    return plot_image_grid(images, captions, columns=columns, title=title, path=path)
