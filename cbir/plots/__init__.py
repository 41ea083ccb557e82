"""Static figures (matplotlib/seaborn), one module per theme.

One palette for every figure: :func:`measure_colour` gives each distance measure its colour from its place
in the registry (:data:`cbir.measures.MEASURES`), :func:`run_colour` each feature run (by model, from the
extractor registry, shaded per run label), so "cosine" or "vgg19 / fc2" look the same in every figure.
:func:`data_range` is the colour range of the match heatmaps: the values' own range, so 92% and 99% differ.

Importing this package inside a Jupyter kernel shows inline figures as JPEG (quality 85) instead of
PNG: the photo grids of the notebooks are then a few hundred kB instead of megabytes, which keeps
the committed notebooks light. Figures saved to files are unaffected (PNG).
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["save_figure", "compact_inline_figures", "measure_colour", "run_colour", "measure_palette",
           "run_palette", "shade", "data_range", "MEASURE_COLOURS", "RUN_COLOURS"]

MEASURE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
"""Measure colours (matplotlib's tab10, then lighter tab20 shades), assigned in registry order."""
RUN_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#377eb8",
               "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#e41a1c", "#666666")
"""Model colours (ColorBrewer Dark2, then Set1, grey last), assigned in extractor-registry order."""


def _rgba(colour: Any) -> tuple[float, float, float, float]:
    from matplotlib.colors import to_rgba

    return tuple(float(v) for v in to_rgba(colour))


def _index(name: str, order: Iterable[str], size: int) -> int:
    """Registry position of ``name``; an unregistered name gets a stable slot from its CRC-32."""
    order = list(order)
    if name in order:
        return order.index(name) % size
    return (len(order) + zlib.crc32(name.encode("utf-8"))) % size


def shade(colour: Any, amount: float) -> tuple[float, float, float, float]:
    """``colour`` mixed towards white (``amount`` > 0) or black (< 0) by ``|amount|`` (0..1), as RGBA."""
    r, g, b, a = _rgba(colour)
    target = 1.0 if amount > 0 else 0.0
    t = min(1.0, abs(float(amount)))
    return (r + (target - r) * t, g + (target - g) * t, b + (target - b) * t, a)


def measure_colour(name: str) -> tuple[float, float, float, float]:
    """RGBA of distance measure ``name``: the same in every figure, by its place in :data:`cbir.measures.MEASURES`."""
    from cbir.measures import MEASURES

    return _rgba(MEASURE_COLOURS[_index(str(name), MEASURES, len(MEASURE_COLOURS))])


_SHADES = (0.0, -0.3, 0.35, -0.5, 0.55)


def run_colour(label: str) -> tuple[float, float, float, float]:
    """RGBA of a feature run from its display label (``"vgg19 / fc2 / gap [roi]"``, :func:`cbir.runs.features_label`):
    the model's colour (extractor-registry order), shaded by a stable hash of the rest of the label so that
    runs of one model differ; the same label gets the same colour in every figure."""
    from cbir.extractors import extractor_names

    label = str(label)
    model = label.split(" / ", 1)[0].split(" ", 1)[0]
    base = RUN_COLOURS[_index(model, extractor_names(), len(RUN_COLOURS))]
    rest = label[len(model):]
    return shade(base, _SHADES[zlib.crc32(rest.encode("utf-8")) % len(_SHADES)] if rest.strip() else 0.0)


def measure_palette(names: Iterable[str]) -> dict[str, tuple[float, float, float, float]]:
    """``{measure: RGBA}`` for seaborn's ``palette=``."""
    return {str(n): measure_colour(n) for n in names}


def run_palette(labels: Iterable[str]) -> dict[str, tuple[float, float, float, float]]:
    """``{run label: RGBA}`` for seaborn's ``palette=``."""
    return {str(n): run_colour(n) for n in labels}


def data_range(values: Any, *, min_span: float = 1.0) -> tuple[float, float]:
    """``(vmin, vmax)`` of a colour scale over the finite ``values``: their own min and max, widened to
    ``min_span`` around their middle when narrower (``(0, min_span)`` when there is none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, float(min_span)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    return lo, hi


def save_figure(fig: Any, path: str | os.PathLike | None, *, dpi: int = 110) -> Any:
    """Save ``fig`` as PNG at ``path`` (if given; parent folders made) and return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def compact_inline_figures(quality: int = 85) -> bool:
    """Show inline figures as JPEG in a running IPython kernel; False (and no change) outside one."""
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    set_matplotlib_formats("jpeg", pil_kwargs={"quality": quality})
    return True


compact_inline_figures()
