"""Retrieval figures (notebooks 02-04, 08): match heatmaps by model x measure (with CIs across runs),
precision-recall curves, match per neighbour rank, label confusion heatmap, cross-validation folds and a
static grid of queries with their neighbours.

Inputs are the tidy tables of :mod:`cbir.evaluate`. Each function returns a
``matplotlib.figure.Figure`` (not attached to pyplot, so a notebook shows it once); pass ``path`` to
also save it as PNG (parent folders are created).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cbir.plots import _SHADES, data_range, measure_colour, run_colour, save_figure, shade
from cbir.search import METRICS

__all__ = ["plot_match_heatmap", "plot_match_ci_heatmap", "plot_pr_curves", "plot_match_by_rank", "plot_confusion",
           "plot_cv_folds", "plot_neighbour_grid", "tuple_palette",
           "neighbour_cards", "thumbnail", "image_paths", "tuple_labels", "MATCH_COLOUR", "MISMATCH_COLOUR",
           "QUERY_COLOUR"]

MATCH_COLOUR = "#2ca02c"
MISMATCH_COLOUR = "#d62728"
QUERY_COLOUR = "#1f77b4"
_KEYS = ("model", "layer", "pooling", "metric")


def tuple_labels(df: pd.DataFrame, columns: Sequence[str] = _KEYS) -> pd.Series:
    """One label per row joining the values of ``columns`` that vary across rows (``"vgg19 / cosine"``);
    the metric alone when nothing varies."""
    present = [c for c in columns if c in df.columns]
    varying = [c for c in present if df[c].astype(str).nunique() > 1] or [c for c in present if c == "metric"]
    varying = varying or present[:1]
    if not varying:
        return pd.Series("all", index=df.index)
    parts = df[varying].astype(object).where(df[varying].notna(), None)
    return parts.apply(lambda r: " / ".join(str(v) for v in r if v is not None), axis=1)


def _run_labels(df: pd.DataFrame) -> pd.Series:
    """The feature run of each row: ``features`` when present, else model / layer / pooling joined."""
    if "features" in df.columns:
        return df["features"].astype(str)
    cols = [c for c in ("model", "layer", "pooling") if c in df.columns]
    if not cols:
        return pd.Series("", index=df.index)
    parts = df[cols].astype(object).where(df[cols].notna(), None)
    return parts.apply(lambda r: " / ".join(str(v) for v in r if v is not None), axis=1)


def tuple_palette(df: pd.DataFrame, labels: pd.Series) -> dict[str, tuple[float, float, float, float]]:
    """``{label: RGBA}`` for rows labelled by :func:`tuple_labels`, from the shared palette: the measure's colour
    (:func:`cbir.plots.measure_colour`) when only measures vary, the run's (:func:`cbir.plots.run_colour`) when
    only runs vary, else the measure's colour shaded per run."""
    runs = _run_labels(df)
    metric = df["metric"].astype(str) if "metric" in df.columns else None
    many_runs = runs.nunique() > 1
    order = list(pd.unique(runs))
    out: dict[str, tuple[float, float, float, float]] = {}
    for i, label in enumerate(labels.astype(str)):
        if label in out:
            continue
        run = runs.iloc[i]
        if metric is None:
            out[label] = run_colour(run)
        elif not many_runs:
            out[label] = measure_colour(metric.iloc[i])
        elif metric.nunique() == 1:
            out[label] = run_colour(run)
        else:
            out[label] = shade(measure_colour(metric.iloc[i]), _SHADES[order.index(run) % len(_SHADES)])
    return out


def _metric_sorted(values: Sequence[str]) -> list[str]:
    rank = {m: i for i, m in enumerate(METRICS)}
    return sorted(set(values), key=lambda m: (rank.get(m, len(rank)), str(m)))


def plot_match_heatmap(table: pd.DataFrame, *, value: str = "category_match",
                       rows: Sequence[str] = ("model", "layer", "pooling"), cols: str = "metric",
                       title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Heatmap of ``value`` (a share, shown in %) with one row per (model, layer, pooling) and one column per
    measure, from :func:`cbir.evaluate.match_table`."""
    import seaborn as sns

    if value not in table.columns:
        raise ValueError(f"table has no column {value!r} (columns: {list(table.columns)})")
    data = table.assign(_row=tuple_labels(table, rows))
    grid = data.pivot_table(index="_row", columns=cols, values=value, aggfunc="mean", sort=False) * 100
    if cols == "metric":
        grid = grid[_metric_sorted(grid.columns)]
    fig = Figure(figsize=(1.3 + 1.1 * grid.shape[1], 1.4 + 0.5 * grid.shape[0]), layout="constrained")
    ax = fig.subplots()
    vmin, vmax = data_range(grid.to_numpy(float))
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", vmin=vmin, vmax=vmax, ax=ax,
                cbar_kws={"label": "% (scale: data range)"})
    ax.set_xlabel("")
    ax.set_ylabel("")
    blank = "; blank: not evaluated" if grid.isna().to_numpy().any() else ""
    ax.set_title((title or f"{value.replace('_', ' ')} by model and measure (%)")
                 + f"\ncolours span {vmin:.1f} to {vmax:.1f}{blank}")
    return save_figure(fig, path)


def plot_pr_curves(pr: pd.DataFrame, *, level: str = "category", path: str | os.PathLike | None = None) -> Figure:
    """Precision against recall (one line per tuple) from :func:`cbir.evaluate.precision_recall`."""
    import seaborn as sns

    data = pr.loc[pr["level"] == level]
    if data.empty:
        raise ValueError(f"no precision-recall rows for level {level!r}")
    data = data.assign(tuple=tuple_labels(data))
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(data=data, x="recall", y="precision", hue="tuple", marker="o", markersize=4, ax=ax,
                 sort=False, estimator=None, palette=tuple_palette(data, data["tuple"]))
    ax.set_xlim(0, None)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Precision-recall ({level}), cut-offs 1..{int(data['k'].max())}")
    ax.legend(title="", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_match_by_rank(by_rank: pd.DataFrame, *, value: str = "category_match",
                       path: str | os.PathLike | None = None) -> Figure:
    """Bars of ``value`` (%) per neighbour rank, one colour per tuple, from :func:`cbir.evaluate.match_by_rank`."""
    import seaborn as sns

    data = by_rank.assign(tuple=tuple_labels(by_rank), pct=by_rank[value] * 100)
    fig = Figure(figsize=(1.5 + 0.9 * data["rank"].nunique() * max(1, data["tuple"].nunique() / 3), 4),
                 layout="constrained")
    ax = fig.subplots()
    sns.barplot(data=data, x="rank", y="pct", hue="tuple", ax=ax, palette=tuple_palette(data, data["tuple"]),
                saturation=1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("neighbour rank")
    ax.set_ylabel(f"{value.replace('_', ' ')} (%)")
    ax.set_title(f"{value.replace('_', ' ')} per neighbour rank")
    ax.legend(title="", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_confusion(conf: pd.DataFrame, *, title: str | None = None, annot: bool | None = None,
                   path: str | os.PathLike | None = None) -> Figure:
    """Heatmap of a row-normalised label confusion table from :func:`cbir.evaluate.confusion`."""
    import seaborn as sns

    n = max(conf.shape)
    annot = n <= 15 if annot is None else annot
    fig = Figure(figsize=(2.5 + 0.42 * conf.shape[1], 2.0 + 0.36 * conf.shape[0]), layout="constrained")
    FigureCanvasAgg(fig)  # seaborn measures tick labels with the canvas' renderer: without one it peaks at GBs
    ax = fig.subplots()
    sns.heatmap(conf, cmap="Blues", vmin=0, vmax=1 if conf.to_numpy().max() <= 1 else None, annot=annot,
                fmt=".2f", ax=ax, cbar_kws={"label": "share of the query's neighbours"},
                xticklabels=True, yticklabels=True)
    ax.tick_params(labelsize=7 if n > 20 else 9)
    ax.set_title(title or f"{conf.index.name or 'query'} vs {conf.columns.name or 'neighbour'}")
    return save_figure(fig, path)


def image_paths(labels: pd.DataFrame, paths: Mapping[str, str] | pd.Series | None = None) -> pd.Series:
    """image_id -> image file, from ``paths`` or the ``path`` column of a catalogue table."""
    if paths is not None:
        series = pd.Series(paths)
    elif "path" in labels.columns:
        series = labels.set_index(labels["image_id"].astype(str))["path"]
    else:
        raise ValueError("no image paths: pass labels with a 'path' column (a catalogue table) or paths=")
    series.index = series.index.astype(str)
    return series


def thumbnail(path: Any, size: int) -> np.ndarray:
    """``size x size`` RGB thumbnail via :func:`cbir.images.read_image`; a light grey square if unreadable."""
    from cbir.images import ImageError, read_image

    try:
        return read_image(path, size=size)
    except (ImageError, OSError, TypeError, ValueError):
        return np.full((size, size, 3), 220, np.uint8)


def neighbour_cards(neighbours: pd.DataFrame, labels: pd.DataFrame, query_id: str, *,
                    level: str = "subcategory") -> pd.DataFrame:
    """The query and its neighbours (one tuple) as rows: ``role`` (query / neighbour), ``image_id, rank,
    label, distance, match`` (neighbour has the query's ``level`` label)."""
    lab = labels.set_index(labels["image_id"].astype(str))
    if level not in lab.columns:
        raise ValueError(f"labels has no column {level!r}")
    rows = neighbours.loc[neighbours["query_id"].astype(str) == str(query_id)].sort_values("rank")
    if rows.empty:
        raise KeyError(f"no neighbours for query {query_id!r}")
    q_label = lab[level].get(str(query_id))
    n_ids = rows["neighbour_id"].astype(str).to_numpy()
    n_labels = lab[level].reindex(n_ids).to_numpy()
    head = pd.DataFrame({"role": ["query"], "image_id": [str(query_id)], "rank": [0], "label": [q_label],
                         "distance": [np.nan], "match": [True]})
    body = pd.DataFrame({"role": "neighbour", "image_id": n_ids, "rank": rows["rank"].to_numpy(),
                         "label": n_labels, "distance": rows["distance"].to_numpy(dtype=float),
                         "match": n_labels == q_label})
    return pd.concat([head, body], ignore_index=True)


def plot_neighbour_grid(neighbours: pd.DataFrame, labels: pd.DataFrame, *, query_ids: Sequence[str] | None = None,
                        n_queries: int = 6, level: str = "subcategory", thumb: int = 112,
                        paths: Mapping[str, str] | None = None, title: str | None = None,
                        path: str | os.PathLike | None = None) -> Figure:
    """One row per query: the query (blue frame) then its k neighbours with label and distance, framed
    green when the neighbour has the query's ``level`` label and red when not. ``neighbours`` holds one
    tuple; ``labels`` is a catalogue table with ``path`` (or give ``paths``: image_id -> file)."""
    keys = [c for c in _KEYS if c in neighbours.columns]
    if keys and len(neighbours[keys].drop_duplicates()) > 1:
        raise ValueError("plot_neighbour_grid needs neighbours of one tuple; filter with cbir.evaluate.select")
    files = image_paths(labels, paths)
    if query_ids is None:
        query_ids = pd.unique(neighbours["query_id"].astype(str))[:n_queries]
    query_ids = [str(q) for q in query_ids]
    cards = [neighbour_cards(neighbours, labels, q, level=level) for q in query_ids]
    width = max(len(c) for c in cards)
    fig = Figure(figsize=(1.55 * width, 1.95 * len(cards)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(cards), width, squeeze=False))
    for row, card in zip(axes, cards):
        for ax in row:
            ax.set_axis_off()
        for ax, rec in zip(row, card.itertuples(index=False)):
            ax.set_axis_on()
            ax.imshow(thumbnail(files.get(rec.image_id), thumb))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = QUERY_COLOUR if rec.role == "query" else (MATCH_COLOUR if rec.match else MISMATCH_COLOUR)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            text = f"query\n{rec.label}" if rec.role == "query" else f"#{rec.rank} {rec.label}\nd={rec.distance:.3f}"
            ax.set_title(text, fontsize=7, color=colour if rec.role == "query" else "black")
    if title is None and "metric" in neighbours.columns and len(neighbours):
        title = " / ".join(str(neighbours[c].iloc[0]) for c in keys if pd.notna(neighbours[c].iloc[0]))
    if title:
        fig.suptitle(f"{title}  (green: same {level}, red: different)", fontsize=9)
    return save_figure(fig, path)


def plot_match_ci_heatmap(match: pd.DataFrame, *, values: Sequence[str] = ("category_match", "subcategory_match"),
                          row: str = "features", title: str | None = None,
                          path: str | os.PathLike | None = None) -> Figure:
    """Heatmaps (one per score in ``values``) of match in % with one row per ``row`` label (a run) and one
    column per measure; each cell shows the value and its 95% CI ``[lo, hi]``. ``match``: a
    :func:`cbir.results.collect_match` / ``category_match`` table (needs ``<value>_lo``, ``<value>_hi``)."""
    import seaborn as sns

    if match.empty:
        fig = Figure(figsize=(6, 1.5), layout="constrained")
        fig.text(0.5, 0.5, "no match results in the store", ha="center", va="center")
        return save_figure(fig, path)
    label = match[row].astype(str) if row in match.columns else match["model"].astype(str)
    data = match.assign(_row=label.to_numpy())
    rows = list(pd.unique(data["_row"]))
    cols = _metric_sorted(data["metric"])
    fig = Figure(figsize=(2.0 + 1.15 * len(cols) + 0.07 * max(len(r) for r in rows),
                          len(values) * max(2.0, 1.3 + 0.55 * len(rows))), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(values), 1, sharex=True))
    for ax, value in zip(axes, values):
        grid = data.pivot_table(index="_row", columns="metric", values=value, aggfunc="first").reindex(
            index=rows, columns=cols) * 100
        lo = data.pivot_table(index="_row", columns="metric", values=f"{value}_lo", aggfunc="first").reindex(
            index=rows, columns=cols) * 100
        hi = data.pivot_table(index="_row", columns="metric", values=f"{value}_hi", aggfunc="first").reindex(
            index=rows, columns=cols) * 100
        text = np.vectorize(lambda v, a, b: "" if np.isnan(v) else f"{v:.1f}\n[{a:.1f}, {b:.1f}]")(
            grid.to_numpy(float), lo.to_numpy(float), hi.to_numpy(float))
        vmin, vmax = data_range(grid.to_numpy(float))
        sns.heatmap(grid, annot=text, fmt="", cmap="viridis", vmin=vmin, vmax=vmax, ax=ax, annot_kws={"fontsize": 8},
                    cbar_kws={"label": "% (scale: data range)"})
        blank = "; blank: not evaluated" if grid.isna().to_numpy().any() else ""
        ax.set_title(f"{value.replace('_', ' ').replace('subcategory', 'sub-category')} (%), 95% CI; colours span "
                     f"{vmin:.1f} to {vmax:.1f}{blank}")
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=0)
        ax.tick_params(axis="y", rotation=0)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_cv_folds(per_fold: pd.DataFrame, *, values: Sequence[str] = ("category_match", "subcategory_match"),
                  title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Per-fold match (%) by measure: a box per measure with one dot per fold, one panel per score, from the
    ``per_fold`` table of :func:`cbir.evaluate.cross_validate`."""
    import seaborn as sns

    if per_fold.empty:
        raise ValueError("per_fold is empty: no cross-validation results to plot")
    cols = _metric_sorted(per_fold["metric"])
    fig = Figure(figsize=(len(values) * (1.2 + 0.85 * len(cols)), 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(values)))
    for ax, value in zip(axes, values):
        data = per_fold.assign(pct=per_fold[value] * 100)
        sns.boxplot(data=data, x="metric", y="pct", order=cols, color="#dddddd", showfliers=False, ax=ax)
        sns.swarmplot(data=data, x="metric", y="pct", order=cols, hue="metric", hue_order=cols,
                      palette={m: measure_colour(m) for m in cols}, size=4, ax=ax, legend=False)
        low = float(np.nanmin(data["pct"]))
        ax.set_ylim(max(0.0, np.floor(low / 10) * 10 - 5), 101)
        ax.set_xlabel("")
        ax.set_ylabel(f"{value.replace('_', ' ').replace('subcategory', 'sub-category')} (%)")
        ax.set_title(f"{value.replace('_', ' ').replace('subcategory', 'sub-category')} per fold")
        ax.tick_params(axis="x", rotation=30)
    n_folds = per_fold["fold"].nunique()
    fig.suptitle(title or f"{n_folds}-fold cross-validation: one dot per fold", fontsize=10)
    return save_figure(fig, path)
