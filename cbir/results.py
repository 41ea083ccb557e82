"""Result tables of feature runs: save one (CSV + store), collect every run's from the store.

Each evaluation notebook writes its tables with :func:`save_result`: ``<out_dir>/tables/<name>.csv`` and the
same DataFrame in the store under ``(name, run_id)``. :func:`collect_tables` reads one table back for every
run in the store, each row attributed to a run with the run's :data:`cbir.runs.RUN_COLUMNS`;
:func:`collect_match` also recomputes the match table of runs that only have stored neighbours.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.color_texture import COLOR_TEXTURE_COLUMNS
from cbir.evaluate import MATCH_COLUMNS, match_table
from cbir.neighbours import neighbours_from_store
from cbir.runs import RUN_COLUMNS, order_by_run_and_metric, run_table, with_run_columns
from cbir.store import FeatureStore, open_store

__all__ = [
    "CV_COLUMNS", "save_table", "save_result", "collect_tables", "collect_match", "collect_cross_validation",
    "collect_color_texture",
]

CV_COLUMNS = [*RUN_COLUMNS, "metric", "n_folds", "category_match_mean", "category_match_std", "category_match_cv",
              "subcategory_match_mean", "subcategory_match_std", "subcategory_match_cv"]
"""Columns of ``summary_cross_validation`` (the study's Table 10 per run and measure)."""


def save_table(df: pd.DataFrame, out_dir: str | os.PathLike, name: str, *, decimals: int = 4) -> Path:
    """Write ``df`` (floats rounded to ``decimals``) to ``<out_dir>/tables/<name>.csv``; returns the path."""
    path = Path(out_dir) / "tables" / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    df.round(decimals).to_csv(path, index=not isinstance(df.index, pd.RangeIndex))
    return path


def save_result(store: FeatureStore | str | os.PathLike, name: str, df: pd.DataFrame, *, run_id: int | None,
                out_dir: str | os.PathLike, decimals: int = 4) -> Path:
    """Write ``df`` to ``<out_dir>/tables/<name>.csv`` (floats rounded to ``decimals``) and store it, unrounded,
    as the store's result table ``name`` of ``run_id`` (replacing an earlier one). Returns the CSV path."""
    if not name or any(c in name for c in "/\\"):
        raise ValueError(f"a result name must be a plain file stem, got {name!r}")
    open_store(store).put_table(name, df, run_id=None if run_id is None else int(run_id))
    return save_table(df, out_dir, name, decimals=decimals)


def collect_tables(store: FeatureStore | str | os.PathLike, name: str,
                   columns: Sequence[str] | None = None, *, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every stored result table ``name`` in one frame, each row given its run's :data:`RUN_COLUMNS`.

    A row belongs to the run in its own ``run_id`` column when the table has one, else to the run the table
    was saved under; rows of neither (a table saved without a run and without a ``run_id`` column) and rows
    of runs no longer in the store are left out: nothing is guessed from model names. ``columns``: the
    result's first columns (missing ones added empty; the tables' other columns follow), default
    :data:`RUN_COLUMNS`. ``runs``: :func:`cbir.runs.run_table` of the store when the caller has it.
    """
    store = open_store(store)
    runs = run_table(store) if runs is None else runs
    stored = store.tables()
    stored = stored.loc[stored["name"] == name]
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in (columns or RUN_COLUMNS)})
    if stored.empty or runs.empty:
        return empty
    info = runs.set_index("run_id")
    frames = []
    for owner in stored["run_id"]:
        owner = None if pd.isna(owner) else int(owner)
        table = store.table(name, owner).reset_index(drop=True)
        if "run_id" in table.columns:
            target = pd.to_numeric(table["run_id"], errors="coerce")
        else:
            target = pd.Series(np.nan if owner is None else owner, index=table.index, dtype=float)
        keep = target.notna().to_numpy() & target.isin(info.index).to_numpy()
        table = table.loc[keep].drop(columns=[c for c in RUN_COLUMNS if c in table.columns])
        table.insert(0, "run_id", target[keep].astype("int64").to_numpy())
        table["_own"] = table["run_id"] == (owner if owner is not None else -1)
        frames.append(table)
    frames = [f for f in frames if not f.empty]
    if not frames:
        return empty
    out = pd.concat(frames, ignore_index=True)
    dedupe = [c for c in ("run_id", "metric", "measure", "level", "k", "fold", "rank") if c in out.columns]
    out = (out.sort_values("_own", ascending=False, kind="stable").drop_duplicates(dedupe)
           .drop(columns="_own"))
    for col in RUN_COLUMNS[1:]:
        out.insert(RUN_COLUMNS.index(col), col, out["run_id"].map(info[col]).to_numpy())
    if columns is not None:
        out = out.reindex(columns=[*columns, *(c for c in out.columns if c not in columns)])
    return order_by_run_and_metric(out).reset_index(drop=True)


def collect_match(store: FeatureStore | str | os.PathLike, *, k: int | None = None, n_boot: int = 2000,
                  seed: int = 0) -> pd.DataFrame:
    """Category and sub-category match with CIs for every run: :data:`RUN_COLUMNS` + ``metric, k, n_queries,
    category_match[_lo, _hi], subcategory_match[_lo, _hi], source``.

    From the run's ``category_match`` table (``source = "category_match table"``); for a run without one
    but with stored neighbours (tag ``""``), recomputed with :func:`cbir.evaluate.match_table` (top ``k``,
    default each set's own k; ``source = "recomputed from neighbours"``)."""
    store = open_store(store)
    runs = run_table(store)
    value_cols = MATCH_COLUMNS[MATCH_COLUMNS.index("metric"):]
    cols = [*RUN_COLUMNS, *value_cols, "source"]
    tables = collect_tables(store, "category_match")
    if not tables.empty:
        tables = tables[[c for c in cols[:-1] if c in tables.columns]].assign(source="category_match table")
    have = set(tables["run_id"]) if not tables.empty else set()
    sets = store.neighbour_sets()
    sets = sets.loc[sets["tag"] == ""]
    frames = [tables] if not tables.empty else []
    for run_id in runs["run_id"]:
        if int(run_id) in have or int(run_id) not in set(sets["run_id"]):
            continue
        nb = neighbours_from_store(store, [int(run_id)])
        table = match_table(nb, store.run_labels(int(run_id)), k=k, n_boot=n_boot, seed=seed)
        frames.append(with_run_columns(table, store, int(run_id)).assign(source="recomputed from neighbours"))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    out = pd.concat(frames, ignore_index=True)
    return order_by_run_and_metric(out.reindex(columns=cols)).reset_index(drop=True)


def collect_cross_validation(store: FeatureStore | str | os.PathLike) -> pd.DataFrame:
    """Every run's ``cross_validation`` table (the study's Table 10) with :data:`RUN_COLUMNS`."""
    return collect_tables(store, "cross_validation", CV_COLUMNS)


def collect_color_texture(store: FeatureStore | str | os.PathLike) -> pd.DataFrame:
    """Every run's ``color_texture`` table (:func:`cbir.color_texture.color_texture_table`, notebook 05)
    with :data:`RUN_COLUMNS`."""
    return collect_tables(store, "color_texture", COLOR_TEXTURE_COLUMNS)
