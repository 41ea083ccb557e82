"""cbir.plots: one palette for every figure (a measure has the same colour everywhere), heatmap colour scales
over the data's own range, blank cells explained."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba

from cbir.measures import MEASURES
from cbir.plots import colour as colour_plots
from cbir.plots import data_range, measure_colour, run_colour
from cbir.plots import retrieval as plots


def _by_rank(metrics) -> pd.DataFrame:
    return pd.DataFrame([{"model": "m", "layer": "l", "pooling": "gap", "metric": m, "rank": r,
                          "category_match": 0.9, "subcategory_match": 0.8} for m in metrics for r in (1, 2)])


def _per_fold(metrics) -> pd.DataFrame:
    return pd.DataFrame([{"metric": m, "fold": f, "category_match": 0.9 + 0.01 * f, "subcategory_match": 0.8}
                         for m in metrics for f in range(1, 5)])


def _roi(metrics) -> pd.DataFrame:
    return pd.DataFrame([{"metric": m, "measure": "color_corr", "difference": -0.4, "diff_lo": -0.5,
                          "diff_hi": -0.3} for m in metrics])


def test_a_measure_has_the_same_colour_in_every_figure():
    # the registry order gives the colour: euclidean first (tab10 blue), cosine sixth (tab10 brown)
    assert list(MEASURES)[:1] == ["euclidean"] and measure_colour("euclidean") == to_rgba("#1f77b4")
    assert measure_colour("cosine") == to_rgba("#8c564b")
    assert len({measure_colour(m) for m in MEASURES}) == len(MEASURES)
    # bars (match per rank), with the measures in one order ...
    ax = plots.plot_match_by_rank(_by_rank(["cosine", "euclidean"])).axes[0]
    legend = ax.get_legend()
    bars = {t.get_text(): tuple(h.get_facecolor()) for t, h in zip(legend.get_texts(), legend.legend_handles)}
    # ... fold dots (cross-validation) with another set and order ...
    ax = plots.plot_cv_folds(_per_fold(["manhattan", "cosine", "euclidean"])).axes[0]
    order = plots._metric_sorted(["manhattan", "cosine", "euclidean"])
    dots = {m: tuple(col.get_facecolors()[0]) for m, col in zip(order, ax.collections)}
    # ... and ROI-ablation markers
    ax = colour_plots.plot_roi_differences(_roi(["chebyshev", "cosine"])).axes[0]
    filled = [c for c in ax.collections if isinstance(c, PathCollection)][0]  # both CIs exclude 0
    markers = {m: tuple(fc) for m, fc in zip(["chebyshev", "cosine"], filled.get_facecolors())}
    assert bars["cosine"] == dots["cosine"] == markers["cosine"] == measure_colour("cosine")
    assert bars["euclidean"] == dots["euclidean"] == measure_colour("euclidean")
    assert markers["chebyshev"] == measure_colour("chebyshev") != measure_colour("cosine")


def test_a_run_keeps_its_colour_and_runs_of_one_model_differ():
    a = run_colour("efficientnet_lite0 / top_activation / gap")
    assert a == run_colour("efficientnet_lite0 / top_activation / gap")
    assert run_colour("efficientnet_lite0 / top_activation / gap [roi]") != a
    assert run_colour("vgg19 / fc2") != run_colour("resnet50 / avg_pool")
    pr = pd.DataFrame([{"features": f"{m} / {layer}", "model": m, "layer": layer, "metric": "cosine",
                        "level": "category", "k": k, "recall": k / 10, "precision": 1 - k / 20}
                       for m, layer in (("vgg19", "fc2"), ("resnet50", "avg_pool")) for k in (1, 2)])
    lines = {ln.get_label(): ln.get_color() for ln in plots.plot_pr_curves(pr).axes[0].get_legend().get_lines()}
    assert to_rgba(lines["vgg19 / fc2"]) == run_colour("vgg19 / fc2")


def _match(values) -> pd.DataFrame:
    return pd.DataFrame([{"features": "m / l / gap", "metric": m, "category_match": v, "category_match_lo": v - .02,
                          "category_match_hi": min(1.0, v + .02), "subcategory_match": v - 0.05,
                          "subcategory_match_lo": v - .07, "subcategory_match_hi": v - .03}
                         for m, v in values.items()])


def test_match_heatmap_colours_span_the_data_not_0_to_100():
    match = _match({"euclidean": 0.983, "manhattan": 0.993, "chebyshev": 0.917, "cosine": 0.98})
    fig = plots.plot_match_ci_heatmap(match)
    mesh = fig.axes[0].collections[0]
    assert mesh.get_clim() == pytest.approx((91.7, 99.3))
    assert "range" in fig.axes[-2].get_ylabel()  # the first panel's colour bar says what the scale is
    assert "colours span 91.7 to 99.3" in fig.axes[0].get_title()
    # 92% and 99% are far apart on the scale: more than half of it
    norm = mesh.norm
    assert norm(99.3) - norm(92.0) > 0.9
    one = plots.plot_match_heatmap(match.assign(model="m", layer="l", pooling="gap"))
    assert one.axes[0].collections[0].get_clim() == pytest.approx((91.7, 99.3))


def test_blank_heatmap_cells_are_explained():
    match = pd.concat([_match({"euclidean": 0.9, "cosine": 0.95}),
                       _match({"cosine": 0.97}).assign(features="n / l / gap")], ignore_index=True)
    fig = plots.plot_match_ci_heatmap(match)
    assert "blank: not evaluated" in fig.axes[0].get_title()
    assert "blank" not in plots.plot_match_ci_heatmap(_match({"cosine": 0.9})).axes[0].get_title()


def test_data_range():
    assert data_range([92.0, np.nan, 99.0]) == (92.0, 99.0)
    assert data_range([95.0, 95.0]) == (94.5, 95.5)  # a single value still gets a visible scale
    assert data_range([np.nan]) == (0.0, 1.0)
