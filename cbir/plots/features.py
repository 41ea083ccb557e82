"""Extraction figures and tables: throughput of a run, feature statistics, 2-D PCA projection."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["throughput_table", "plot_throughput", "feature_stats", "pca_coordinates", "plot_pca_projection"]

_STAGES = (("seconds_decode_wait", "waiting for decode"), ("seconds_model", "model"), ("seconds_write", "store write"))


def throughput_table(runs: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, decimals: int = 3) -> pd.DataFrame:
    """One row per run (``store.run(run_id)`` dicts): ``run_id, model, images, seconds, images_per_second``
    and the share of the wall time spent waiting for decoded images, in the model and writing the store.

    Timings are those of the last extraction session that did work (a resumed run reports its last part).
    """
    runs = [runs] if isinstance(runs, Mapping) else list(runs)
    rows = []
    for run in runs:
        stats = run.get("stats") or {}
        seconds = stats.get("seconds")
        row = {"run_id": run.get("run_id"), "model": run.get("model"), "images": stats.get("n_processed"),
               "seconds": seconds, "images_per_second": stats.get("images_per_second"),
               "batch_size": stats.get("batch_size"), "workers": stats.get("workers")}
        for key, label in _STAGES:
            value = stats.get(key)
            row[f"share {label}"] = value / seconds if value is not None and seconds else np.nan
        rows.append(row)
    return pd.DataFrame(rows).round(decimals)


def plot_throughput(table: pd.DataFrame, *, ax=None):
    """Horizontal stacked bars: where each run's wall time went (decode wait, model, store write, other).

    ``table`` comes from :func:`throughput_table`. Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(table)))
    else:
        fig = ax.figure
    labels = [f"run {r.run_id} {r.model} ({r.images_per_second:.1f} img/s)" for r in table.itertuples()]
    shares = table[[f"share {label}" for _, label in _STAGES]].fillna(0.0).to_numpy()
    shares = np.column_stack([shares, np.clip(1.0 - shares.sum(axis=1), 0.0, None)])
    left = np.zeros(len(table))
    for j, name in enumerate([label for _, label in _STAGES] + ["other"]):
        ax.barh(labels, shares[:, j], left=left, label=name)
        left += shares[:, j]
    ax.invert_yaxis()  # first run on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of wall time")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    fig.tight_layout()
    return fig


def feature_stats(features: np.ndarray | Mapping[str, np.ndarray], *, zero_tol: float = 0.0,
                  decimals: int = 3) -> pd.DataFrame:
    """Statistics of feature matrices ``X[N, D]`` (one, or a mapping label -> X): ``n``, ``dim``,
    ``sparsity`` (share of entries with ``|x| <= zero_tol``), ``mean`` of all entries, and the row L2
    norms' ``norm_mean``, ``norm_std`` (population), ``norm_min``, ``norm_max``; rounded to ``decimals``."""
    items = features.items() if isinstance(features, Mapping) else [(None, features)]
    rows = []
    for label, X in items:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"feature_stats expects a 2-d array (N, D), got shape {X.shape}")
        norms = np.linalg.norm(X, axis=1)
        row = {"features": label} if label is not None else {}
        empty = X.size == 0
        row.update(n=X.shape[0], dim=X.shape[1],
                   sparsity=np.nan if empty else float(np.mean(np.abs(X) <= zero_tol)),
                   mean=np.nan if empty else float(X.mean()),
                   norm_mean=np.nan if empty else float(norms.mean()),
                   norm_std=np.nan if empty else float(norms.std()),
                   norm_min=np.nan if empty else float(norms.min()),
                   norm_max=np.nan if empty else float(norms.max()))
        rows.append(row)
    return pd.DataFrame(rows).round(decimals)


def pca_coordinates(X: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(coords[N, 2], explained_variance_ratio[2])`` of a 2-component PCA of ``X[N, D]`` (centred,
    exact SVD; sklearn fixes the component signs, ``seed`` the solver)."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 2:
        raise ValueError(f"a 2-D PCA needs at least 2 rows and 2 columns, got shape {X.shape}")
    pca = PCA(n_components=2, svd_solver="full", random_state=seed)
    return pca.fit_transform(X), pca.explained_variance_ratio_


def plot_pca_projection(X: np.ndarray, labels: Sequence[Any] | np.ndarray, *, seed: int = 0,
                        title: str | None = None, ax=None, point_size: float = 14.0):
    """Scatter of the 2-D PCA projection of ``X[N, D]`` coloured by ``labels[N]`` (e.g. category).

    Axis labels give each component's share of the variance. Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    labels = np.asarray(labels, dtype=object).astype(str)
    if len(labels) != len(X):
        raise ValueError(f"{len(labels)} labels for {len(X)} feature rows")
    coords, ratio = pca_coordinates(X, seed=seed)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 5))
    else:
        fig = ax.figure
    palette = plt.get_cmap("tab10" if len(set(labels)) <= 10 else "tab20")
    for i, name in enumerate(sorted(set(labels))):
        sel = labels == name
        ax.scatter(coords[sel, 0], coords[sel, 1], s=point_size, alpha=0.75, color=palette(i % palette.N),
                   label=f"{name} ({int(sel.sum())})", edgecolors="none")
    ax.set_xlabel(f"PC1 ({ratio[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.1%} of variance)")
    ax.set_title(title or "2-D PCA projection of the features")
    ax.legend(title="category", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=1.5,
              frameon=False)
    fig.tight_layout()
    return fig
