"""Feature runs of a store: their table, their display labels and the columns that name them.

A *run* is one feature extraction (model, layer, pooling, weights, image variant) with its ``run_id``;
its label ``features`` (e.g. ``"vgg19 / block5_pool / gap"``) marks ROI crops (``[roi]``) and untrained
weights (``(random init)``), so runs differing only in weights never merge. A *neighbour set* is a run
and a measure (:data:`TUPLE_COLUMNS`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.measures import measure_names
from cbir.store import FeatureStore, open_store

__all__ = [
    "RUN_COLUMNS", "TUPLE_COLUMNS", "RANDOM_INIT", "is_random_init", "features_label", "feature_label", "run_table",
    "with_run_columns", "ids_with_features", "order_by_run_and_metric",
]

RUN_COLUMNS = ["run_id", "features", "model", "layer", "pooling", "weights", "variant"]
"""Columns naming a feature run in every result table (``features`` is the display label)."""

TUPLE_COLUMNS = [*RUN_COLUMNS, "metric"]
"""Columns naming one neighbour set: its feature run (:data:`RUN_COLUMNS`) and the measure."""

RANDOM_INIT = "none (random init)"
"""The weights label of untrained backbones (:data:`cbir.backbones.NONE_LABEL`)."""


def is_random_init(weights: Any) -> bool:
    """True for untrained backbone weights (``"none (random init)"`` or ``"none"``)."""
    return isinstance(weights, str) and weights.strip().lower().startswith("none")


def _present(value: Any) -> bool:
    try:
        return not bool(pd.isna(value))
    except (TypeError, ValueError):
        return True


def features_label(model: Any, layer: Any = None, pooling: Any = None, *, weights: Any = None,
                   variant: Any = None, l2_normalize: bool = False) -> str:
    """``"model / layer / pooling"`` (missing parts left out), then ``+L2``, ``[variant]`` for image variants
    other than ``original``, ``(random init)`` for untrained weights, ``[weights: name]`` for a weights file."""
    label = " / ".join(str(v) for v in (model, layer, pooling) if _present(v) and v != "")
    if l2_normalize:
        label += " +L2"
    if _present(variant) and variant not in ("", "original"):
        label += f" [{variant}]"
    if is_random_init(weights):
        label += " (random init)"
    elif _present(weights) and weights not in ("imagenet", "handcrafted", "", "model.keras"):
        label += f" [weights: {Path(str(weights)).name}]"
    return label


def feature_label(df: pd.DataFrame) -> pd.Series:
    """``"model / layer / pooling"`` per row (missing parts left out), e.g. ``"vgg19 / block5_pool / gap"``,
    marked like :func:`features_label` when the table has ``weights`` / ``variant`` columns
    (``(random init)``, ``[roi]``); with a ``run_id`` column, runs that would share a label get ``#run_id``."""
    cols = [c for c in ("model", "layer", "pooling") if c in df.columns]
    if not cols:
        raise ValueError("feature_label needs at least one of the columns model, layer, pooling")
    get = {c: (df[c].astype(object).where(df[c].notna(), None) if c in df.columns
               else pd.Series(None, index=df.index, dtype=object))
           for c in ("model", "layer", "pooling", "weights", "variant")}
    labels = pd.Series([features_label(m, l, p, weights=w, variant=v) for m, l, p, w, v in
                        zip(*(get[c] for c in ("model", "layer", "pooling", "weights", "variant")))],
                       index=df.index, dtype=str)
    if "run_id" in df.columns and df["run_id"].notna().any():
        per_run = pd.DataFrame({"run_id": df["run_id"], "label": labels}).dropna().drop_duplicates("run_id")
        clash = per_run.loc[per_run["label"].duplicated(keep=False), "run_id"]
        hit = df["run_id"].isin(clash).to_numpy()
        labels[hit] = labels[hit] + " #" + df.loc[hit, "run_id"].astype("int64").astype(str)
    return labels


def run_table(store: FeatureStore | str | os.PathLike) -> pd.DataFrame:
    """Every run of the store: :data:`RUN_COLUMNS` + ``random_init, status, n_features, n_failures``, oldest
    first. ``features`` labels are unique (``#run_id`` appended where two runs would share one)."""
    runs = open_store(store).runs()
    cols = [*RUN_COLUMNS, "random_init", "status", "n_features", "n_failures"]
    if runs.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    runs = runs.copy()
    runs["variant"] = runs["variant"].fillna("original")
    runs["features"] = [
        features_label(r.model, r.layer, r.pooling, weights=r.weights, variant=r.variant,
                       l2_normalize=bool((r.params or {}).get("l2_normalize", False)))
        for r in runs.itertuples(index=False)]
    clash = runs["features"].duplicated(keep=False)
    runs.loc[clash, "features"] = runs.loc[clash, "features"] + " #" + runs.loc[clash, "run_id"].astype(str)
    runs["random_init"] = runs["weights"].map(is_random_init)
    runs["run_id"] = runs["run_id"].astype("int64")
    return runs[cols].reset_index(drop=True)


def with_run_columns(df: pd.DataFrame, store: FeatureStore | str | os.PathLike, run_id: int) -> pd.DataFrame:
    """``df`` with the run's :data:`RUN_COLUMNS` first (existing columns of those names are replaced)."""
    store = open_store(store)
    runs = run_table(store).set_index("run_id")
    if int(run_id) not in runs.index:
        raise KeyError(f"{store.path}: no run with id {run_id}")
    info = runs.loc[int(run_id)]
    out = df.drop(columns=[c for c in RUN_COLUMNS if c in df.columns])
    head = pd.DataFrame({"run_id": int(run_id), **{c: info[c] for c in RUN_COLUMNS[1:]}}, index=out.index)
    head["run_id"] = head["run_id"].astype("int64")
    return pd.concat([head, out], axis=1)


def ids_with_features(store: FeatureStore | str | os.PathLike, run_id: int, catalog: Any
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(query_ids, searchable_ids)`` of a split catalogue (:func:`cbir.catalog.split_queries`) that have a
    vector in ``run_id`` (images that failed extraction are left out), in catalogue order."""
    df = getattr(catalog, "df", catalog)
    if "split" not in df.columns:
        raise ValueError("the catalogue has no 'split' column: call cbir.catalog.split_queries first")
    ids = df["image_id"].astype(str).to_numpy()
    has = np.isin(ids, open_store(store).ids_with_vectors(int(run_id), ids))
    query = (df["split"] == "query").to_numpy()
    return ids[has & query], ids[has & ~query]


def order_by_run_and_metric(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by run id, then measure in :data:`cbir.search.METRICS` order (stable otherwise)."""
    if df.empty:
        return df
    order = {m: i for i, m in enumerate(measure_names())}
    keys = df["metric"].map(order).fillna(len(order)) if "metric" in df.columns else pd.Series(0, index=df.index)
    return df.assign(_m=keys.to_numpy()).sort_values(["run_id", "_m"], kind="stable").drop(columns="_m")
