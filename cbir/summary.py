"""Result tables across feature runs: save one (CSV + store), collect every run's, summarise them.

Each evaluation notebook writes its tables with :func:`save_result`: ``<out_dir>/tables/<name>.csv`` and the
same DataFrame in the store under ``(name, run_id)``. Notebook 08 reads them back for every run in the store
(:func:`summarise`) and writes the cross-model comparison:

* ``summary_match``: category and sub-category match of the top k with 95% bootstrap CIs per (run, measure),
  from each run's ``category_match`` table, or recomputed from its stored neighbours (``source`` says which);
* ``summary_cross_validation``: the study's Table 10 per (run, measure) from ``cross_validation`` tables;
* ``summary_color_texture``: colour correlation and LBP chi-square of the retrieved pairs (``color_texture``);
* ``best_per_analysis``: the study's Table 15, the best (features, measure) per analysis.

A *run* is one feature extraction (model, layer, pooling, weights, image variant); its label ``features``
(e.g. ``"vgg19 / block5_pool / gap"``) marks ROI crops (``[roi]``) and untrained weights
(``(random init)``), so runs differing only in weights never merge. Analyses missing for a run are listed
(``Summary.missing``), never errors.

Also the small helpers notebooks 02-04 share: :func:`ids_with_features`, :func:`neighbour_overview`,
:func:`with_run_columns`, :func:`plot_match_ci_heatmap`, :func:`plot_cv_folds`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.evaluate import (MATCH_COLUMNS, _holm, match_table, neighbours_from_store, paired_test, per_query,
                           save_table)
from cbir.search import METRICS
from cbir.store import FeatureStore, open_store

__all__ = [
    "RUN_COLUMNS", "CV_COLUMNS", "COLOR_TEXTURE_COLUMNS", "SUMMARY_ROI_ABLATION_COLUMNS", "RANDOM_INIT", "SUMMARY_TABLES",
    "ANALYSES", "Summary", "open_store", "save_result",
    "is_random_init", "features_label", "run_table", "with_run_columns", "ids_with_features", "neighbour_overview",
    "collect_tables", "collect_match", "collect_cross_validation", "collect_color_texture", "best_per_analysis",
    "missing_analyses", "summarise", "plot_match_ci_heatmap", "plot_cv_folds",
]

RUN_COLUMNS = ["run_id", "features", "model", "layer", "pooling", "weights", "variant"]
"""Columns naming a feature run in every summary table (``features`` is the display label)."""
CV_COLUMNS = [*RUN_COLUMNS, "metric", "n_folds", "category_match_mean", "category_match_std", "category_match_cv",
              "subcategory_match_mean", "subcategory_match_std", "subcategory_match_cv"]
"""Columns of ``summary_cross_validation`` (the study's Table 10 per run and measure)."""
COLOR_TEXTURE_COLUMNS = [*RUN_COLUMNS, "metric", "n_pairs", "color_corr_mean", "color_corr_min", "color_corr_max",
                         "lbp_chi2_mean", "lbp_chi2_min", "lbp_chi2_max"]
"""Columns of ``summary_color_texture`` (notebook 05's ``color_texture`` per run and measure)."""
SUMMARY_ROI_ABLATION_COLUMNS = [*RUN_COLUMNS, "metric", "measure", "original", "cropped", "difference", "diff_lo", "diff_hi",
                        "p_value", "n_queries", "original_masked"]
"""Columns of ``summary_roi_ablation`` (notebook 06's ``roi_ablation`` per run)."""
RANDOM_INIT = "none (random init)"
"""The weights label of untrained backbones (:data:`cbir.backbones.NONE_LABEL`)."""
SUMMARY_TABLES = {"match": "summary_match", "cross_validation": "summary_cross_validation",
                  "color_texture": "summary_color_texture", "best": "best_per_analysis",
                  "paired": "summary_paired_tests"}
"""Summary attribute -> CSV name (``<out_dir>/tables/<name>.csv``), always written by :func:`summarise`."""

ANALYSES = (
    # (analysis, source table attribute, value column, "max"/"min", criterion)
    ("category match", "match", "category_match", "max", "highest category match of the top k"),
    ("sub-category match", "match", "subcategory_match", "max", "highest sub-category match of the top k"),
    ("CV stability (category)", "cross_validation", "category_match_cv", "min",
     "lowest coefficient of variation of the category match over folds"),
    ("CV stability (sub-category)", "cross_validation", "subcategory_match_cv", "min",
     "lowest coefficient of variation of the sub-category match over folds"),
    ("colour correlation", "color_texture", "color_corr_mean", "max",
     "highest mean colour correlation of query-neighbour pairs"),
    ("texture", "color_texture", "lbp_chi2_mean", "min", "lowest mean LBP chi-square of query-neighbour pairs"),
)
"""The rows of the study's Table 15 (:func:`best_per_analysis`)."""

_CI = {"category_match": ("category_match_lo", "category_match_hi"),
       "subcategory_match": ("subcategory_match_lo", "subcategory_match_hi")}
_TABLE_FOR = {"match": "category_match", "cross_validation": "cross_validation", "color_texture": "color_texture"}


def save_result(store: FeatureStore | str | os.PathLike, name: str, df: pd.DataFrame, *, run_id: int | None,
                out_dir: str | os.PathLike, decimals: int = 4) -> Path:
    """Write ``df`` to ``<out_dir>/tables/<name>.csv`` (floats rounded to ``decimals``) and store it, unrounded,
    as the store's result table ``name`` of ``run_id`` (replacing an earlier one). Returns the CSV path."""
    if not name or any(c in name for c in "/\\"):
        raise ValueError(f"a result name must be a plain file stem, got {name!r}")
    open_store(store).put_table(name, df, run_id=None if run_id is None else int(run_id))
    return save_table(df, out_dir, name, decimals=decimals)


# ------------------------------------------------------------------------------------------------ runs
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
    elif _present(weights) and weights not in ("imagenet", "handcrafted", ""):
        label += f" [weights: {Path(str(weights)).name}]"
    return label


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


def neighbour_overview(neighbours: pd.DataFrame, labels: pd.DataFrame, query_ids: Sequence[str], *,
                       level: str = "subcategory", decimals: int = 3) -> pd.DataFrame:
    """A compact view of some queries' neighbours: one row per (query, its ``level`` label, measure), one
    column per rank holding ``"<mark> <neighbour label> <distance>"`` (mark ``+`` = same label as the query,
    ``-`` = different; distance rounded to ``decimals``)."""
    lab = labels.set_index(labels["image_id"].astype(str))[level]
    nb = neighbours.loc[neighbours["query_id"].astype(str).isin([str(q) for q in query_ids])].copy()
    if nb.empty:
        raise KeyError(f"no neighbours for queries {list(query_ids)[:5]}")
    if "metric" not in nb.columns:
        nb["metric"] = ""
    nb["query"] = nb["query_id"].astype(str)
    nb["query_label"] = nb["query"].map(lab)
    n_label = nb["neighbour_id"].astype(str).map(lab)
    mark = np.where(n_label.to_numpy() == nb["query_label"].to_numpy(), "+", "-")
    nb["cell"] = [f"{m} {lbl} {d:.{decimals}f}" for m, lbl, d in zip(mark, n_label, nb["distance"].astype(float))]
    order = {q: i for i, q in enumerate(str(q) for q in query_ids)}
    metric_order = {m: i for i, m in enumerate(METRICS)}
    wide = nb.pivot(index=["query", "query_label", "metric"], columns="rank", values="cell")
    wide = wide.sort_index(key=lambda s: s.map(order) if s.name == "query"
                           else (s.map(metric_order) if s.name == "metric" else s))
    wide.columns = [f"#{int(r)}" for r in wide.columns]
    wide.index.names = ["query", f"query {level}", "metric"]
    return wide.fillna("")


# ------------------------------------------------------------------------------------------ collecting
def _key_tuple(values: Sequence[Any]) -> tuple:
    return tuple(None if not _present(v) else str(v) for v in values)


def collect_tables(store: FeatureStore | str | os.PathLike, name: str,
                   columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Every stored result table ``name`` (one per run, plus one without run) in one frame, each row
    attributed to a run and given the run's :data:`RUN_COLUMNS`.

    A row belongs to: its ``run_id`` column when the table has one; else the table's run when the row's
    (model, layer, pooling) are the run's (or the table has no such columns); else the one original-image run
    with those (model, layer, pooling) (rows matching none or several runs are dropped). When several tables
    give a row for the same run and keys, the run's own table wins. ``columns``: the result's first columns
    (missing ones added empty; the tables' other columns follow), default :data:`RUN_COLUMNS`.
    """
    store = open_store(store)
    runs = run_table(store)
    stored = store.tables()
    stored = stored.loc[stored["name"] == name]
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in (columns or RUN_COLUMNS)})
    if stored.empty or runs.empty:
        return empty
    info = runs.set_index("run_id")
    originals = runs.loc[runs["variant"] == "original"]
    frames = []
    for owner in stored["run_id"]:
        owner = None if pd.isna(owner) else int(owner)
        table = store.table(name, owner).reset_index(drop=True)
        if table.empty:
            continue
        target = _owners(table, owner, info, originals)
        keep = target.notna().to_numpy() & target.isin(info.index).to_numpy()
        table = table.loc[keep].drop(columns=[c for c in RUN_COLUMNS if c in table.columns])
        table.insert(0, "run_id", target[keep].astype("int64").to_numpy())
        table["_own"] = table["run_id"] == (owner if owner is not None else -1)
        frames.append(table)
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


def _owners(table: pd.DataFrame, owner: int | None, info: pd.DataFrame, originals: pd.DataFrame) -> pd.Series:
    """The run id each row of a stored table belongs to (NaN: none or ambiguous); see :func:`collect_tables`."""
    if "run_id" in table.columns:
        rid = pd.to_numeric(table["run_id"], errors="coerce")
        return rid.where(rid.notna(), np.nan if owner is None else owner)
    key_cols = [c for c in ("model", "layer", "pooling") if c in table.columns]
    if not key_cols:
        return pd.Series(np.nan if owner is None else owner, index=table.index, dtype=float)
    row_keys = [_key_tuple(r) for r in table[key_cols].itertuples(index=False)]
    candidates: dict[tuple, list[int]] = {}
    for r in originals.itertuples(index=False):
        candidates.setdefault(_key_tuple([getattr(r, c) for c in key_cols]), []).append(int(r.run_id))
    own = _key_tuple(info.loc[owner, key_cols].tolist()) if owner is not None else None
    target = [owner if key == own else (candidates[key][0] if len(candidates.get(key, [])) == 1 else np.nan)
              for key in row_keys]
    return pd.Series(target, index=table.index, dtype=float)


def order_by_run_and_metric(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by run id, then measure in :data:`cbir.search.METRICS` order (stable otherwise)."""
    if df.empty:
        return df
    order = {m: i for i, m in enumerate(METRICS)}
    keys = df["metric"].map(order).fillna(len(order)) if "metric" in df.columns else pd.Series(0, index=df.index)
    return df.assign(_m=keys.to_numpy()).sort_values(["run_id", "_m"], kind="stable").drop(columns="_m")


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
    labels = None
    for run_id in runs["run_id"]:
        if int(run_id) in have or int(run_id) not in set(sets["run_id"]):
            continue
        if labels is None:
            labels = store.catalog()
        nb = neighbours_from_store(store, [int(run_id)])
        table = match_table(nb, labels, k=k, n_boot=n_boot, seed=seed)
        frames.append(with_run_columns(table, store, int(run_id)).assign(source="recomputed from neighbours"))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    out = pd.concat(frames, ignore_index=True)
    return order_by_run_and_metric(out.reindex(columns=cols)).reset_index(drop=True)


def collect_cross_validation(store: FeatureStore | str | os.PathLike) -> pd.DataFrame:
    """Every run's ``cross_validation`` table (the study's Table 10) with :data:`RUN_COLUMNS`."""
    return collect_tables(store, "cross_validation", CV_COLUMNS)


def collect_color_texture(store: FeatureStore | str | os.PathLike) -> pd.DataFrame:
    """Every run's ``color_texture`` table (notebook 05) with :data:`RUN_COLUMNS`."""
    return collect_tables(store, "color_texture", COLOR_TEXTURE_COLUMNS)


# ------------------------------------------------------------------------------------------- Table 15
def best_per_analysis(match: pd.DataFrame, cross_validation: pd.DataFrame, color_texture: pd.DataFrame, *,
                      exclude_random_init: bool = True) -> pd.DataFrame:
    """The study's Table 15: per analysis of :data:`ANALYSES` the best (features, measure).

    Columns ``analysis, criterion, run_id, features, model, weights, metric, value, ci_lo, ci_hi
    (match only), n_candidates, note``. Ties go to the first row (run order, then measure order). Runs with
    untrained weights are left out when ``exclude_random_init`` unless they are the only candidates (then
    the note says so). An analysis without data gets a row with ``note = "missing: ..."`` and no pick.
    """
    sources = {"match": match, "cross_validation": cross_validation, "color_texture": color_texture}
    rows = []
    for analysis, source, column, direction, criterion in ANALYSES:
        table = sources[source]
        row = {"analysis": analysis, "criterion": criterion, "run_id": pd.NA, "features": None, "model": None,
               "weights": None, "metric": None, "value": np.nan, "ci_lo": np.nan, "ci_hi": np.nan,
               "n_candidates": 0, "note": ""}
        data = table if (table is not None and column in table.columns) else pd.DataFrame(columns=[column])
        data = data.loc[pd.to_numeric(data[column], errors="coerce").notna()] if len(data) else data
        if data.empty:
            row["note"] = f"missing: no {_TABLE_FOR[source]} results in the store"
            rows.append(row)
            continue
        random = data["weights"].map(is_random_init) if "weights" in data.columns else pd.Series(False, data.index)
        candidates = data
        if exclude_random_init and random.any():
            if random.all():
                row["note"] = "only runs with random-init weights (their features carry no meaning)"
            else:
                candidates = data.loc[~random.to_numpy()]
                row["note"] = f"{int(random.sum())} random-init row(s) left out"
        values = pd.to_numeric(candidates[column]).to_numpy(dtype=float)
        best = int(np.argmax(values) if direction == "max" else np.argmin(values))
        top = candidates.iloc[best]
        row.update({c: top[c] for c in ("run_id", "features", "model", "weights", "metric") if c in top.index})
        row["value"] = float(values[best])
        if column in _CI:
            lo, hi = _CI[column]
            row["ci_lo"], row["ci_hi"] = float(top.get(lo, np.nan)), float(top.get(hi, np.nan))
        row["n_candidates"] = int(len(candidates))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["run_id"] = out["run_id"].astype("Int64")
    return out


def missing_analyses(runs: pd.DataFrame, match: pd.DataFrame, cross_validation: pd.DataFrame,
                     color_texture: pd.DataFrame) -> pd.DataFrame:
    """``run_id, features, analysis, note``: for each run, the analyses without results in the store."""
    rows = []
    present = {"category_match": match, "cross_validation": cross_validation, "color_texture": color_texture}
    for r in runs.itertuples(index=False):
        for analysis, table in present.items():
            if table.empty or int(r.run_id) not in set(pd.to_numeric(table["run_id"]).astype(int)):
                note = {"category_match": "no category_match table and no stored neighbours (run notebook 02/03)",
                        "cross_validation": "no cross_validation table (run notebook 04)",
                        "color_texture": "no color_texture table (run notebook 05)"}[analysis]
                if r.variant != "original" and analysis != "category_match":
                    note = (f"not run on {r.variant} images (notebook 06 compares them with the whole-image run: "
                            "roi_ablation)")
                rows.append({"run_id": int(r.run_id), "features": r.features, "analysis": analysis, "note": note})
    if runs.empty:
        rows.append({"run_id": pd.NA, "features": None, "analysis": "all", "note": "the store holds no feature run"})
    out = pd.DataFrame(rows, columns=["run_id", "features", "analysis", "note"])
    out["run_id"] = out["run_id"].astype("Int64")
    return out


PAIRED_COLUMNS = ["score", "best_features", "best_metric", "other_features", "other_metric", "n_queries",
                  "mean_best", "mean_other", "mean_diff", "diff_lo", "diff_hi", "p_permutation", "p_wilcoxon",
                  "p_holm"]


def paired_tests_across_runs(store: FeatureStore | str | os.PathLike, match: pd.DataFrame, *,
                             score: str = "subcategory_match", k: int | None = None, n_perm: int = 10000,
                             seed: int = 0, exclude_random_init: bool = True) -> pd.DataFrame:
    """The best (run, measure) by ``score`` against every other run's best measure, on their common queries.

    Each comparison is :func:`cbir.evaluate.paired_test` on per-query scores (sign-flip randomisation and
    Wilcoxon p-values, paired bootstrap CI of the difference); ``p_holm`` corrects the randomisation p-values
    over the comparisons. So "model A + cosine beats model B + euclidean" comes with a p-value. Runs that share
    no query with the best one (another catalogue or split) are left out. Columns: :data:`PAIRED_COLUMNS`.
    """
    store = open_store(store)
    candidates = match.loc[match[score].notna()]
    if exclude_random_init and (~candidates["weights"].map(is_random_init)).any():
        candidates = candidates.loc[~candidates["weights"].map(is_random_init)]
    if candidates["run_id"].nunique() < 2:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    per_run = (candidates.sort_values([score, "run_id"], ascending=[False, True], kind="stable")
               .drop_duplicates("run_id"))  # each run's best measure, best run first
    neighbours = neighbours_from_store(store, run_ids=per_run["run_id"].tolist())
    chosen = per_run[["run_id", "metric", "features"]]
    neighbours = neighbours.merge(chosen, on=["run_id", "metric"])
    neighbours["model"] = neighbours["features"]  # one key per run, so variants of one model stay apart
    scores = per_query(neighbours.drop(columns="features"), store.catalog(), k=k)
    by_tuple = {name: g.set_index("query_id")[score] for name, g in scores.groupby("model", sort=False)}
    best = per_run.iloc[0]
    rows = []
    for _, other in per_run.iloc[1:].iterrows():
        a, b = by_tuple.get(best["features"]), by_tuple.get(other["features"])
        common = a.index.intersection(b.index) if a is not None and b is not None else []
        if len(common) == 0:
            continue
        test = paired_test(a.loc[common].to_numpy(), b.loc[common].to_numpy(), n_perm=n_perm, seed=seed)
        rows.append({"score": score, "best_features": best["features"], "best_metric": best["metric"],
                     "other_features": other["features"], "other_metric": other["metric"],
                     "n_queries": len(common), "mean_best": test["mean_a"], "mean_other": test["mean_b"],
                     **{key: test[key] for key in ("mean_diff", "diff_lo", "diff_hi", "p_permutation",
                                                   "p_wilcoxon")}})
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS[:-1])
    out["p_holm"] = _holm(out["p_permutation"].to_numpy(dtype=float)) if len(out) else []
    return out


@dataclass
class Summary:
    """Result of :func:`summarise`: the summary tables and the CSV files written."""

    runs: pd.DataFrame
    match: pd.DataFrame
    cross_validation: pd.DataFrame
    color_texture: pd.DataFrame
    roi_ablation: pd.DataFrame
    best: pd.DataFrame
    missing: pd.DataFrame
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: dict[str, Path] = field(default_factory=dict)


def summarise(store: FeatureStore | str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
              k: int | None = None, n_boot: int = 2000, seed: int = 0,
              exclude_random_init: bool = True) -> Summary:
    """Read every run of ``store`` and build the cross-model comparison (module doc). With ``out_dir`` also
    write ``tables/summary_match.csv``, ``summary_cross_validation.csv``, ``summary_color_texture.csv``,
    ``best_per_analysis.csv`` (always, empty when there is nothing) and ``summary_roi_ablation.csv``
    (when notebook 06 stored ``roi_ablation`` tables)."""
    store = open_store(store)
    runs = run_table(store)
    match = collect_match(store, k=k, n_boot=n_boot, seed=seed)
    cv = collect_cross_validation(store)
    ct = collect_color_texture(store)
    roi = collect_tables(store, "roi_ablation", SUMMARY_ROI_ABLATION_COLUMNS)
    best = best_per_analysis(match, cv, ct, exclude_random_init=exclude_random_init)
    missing = missing_analyses(runs, match, cv, ct)
    paired = pd.concat([paired_tests_across_runs(store, match, score=score, k=k, seed=seed,
                                                 exclude_random_init=exclude_random_init)
                        for score in ("category_match", "subcategory_match")], ignore_index=True)
    result = Summary(runs=runs, match=match, cross_validation=cv, color_texture=ct, roi_ablation=roi, best=best,
                     missing=missing, paired=paired)
    if out_dir is not None:
        for attr, name in SUMMARY_TABLES.items():
            result.files[name] = save_table(getattr(result, attr), out_dir, name)
        if not roi.empty:
            result.files["summary_roi_ablation"] = save_table(roi, out_dir, "summary_roi_ablation")
    return result


# ---------------------------------------------------------------------------------------------- figures
def _metric_columns(values: Sequence[str]) -> list[str]:
    order = {m: i for i, m in enumerate(METRICS)}
    return sorted(set(values), key=lambda m: (order.get(m, len(order)), str(m)))


def plot_match_ci_heatmap(match: pd.DataFrame, *, values: Sequence[str] = ("category_match", "subcategory_match"),
                          row: str = "features", title: str | None = None,
                          path: str | os.PathLike | None = None) -> Any:
    """Heatmaps (one per score in ``values``) of match in % with one row per ``row`` label (a run) and one
    column per measure; each cell shows the value and its 95% CI ``[lo, hi]``. ``match``: a
    :func:`collect_match` / ``category_match`` table (needs ``<value>_lo``, ``<value>_hi``)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    from cbir.plots import save_figure

    if match.empty:
        fig = Figure(figsize=(6, 1.5), layout="constrained")
        fig.text(0.5, 0.5, "no match results in the store", ha="center", va="center")
        return save_figure(fig, path)
    label = match[row].astype(str) if row in match.columns else match["model"].astype(str)
    data = match.assign(_row=label.to_numpy())
    rows = list(pd.unique(data["_row"]))
    cols = _metric_columns(data["metric"])
    fig = Figure(figsize=(2.0 + 1.15 * len(cols) + 0.07 * max(len(r) for r in rows),
                          len(values) * (1.3 + 0.55 * len(rows))), layout="constrained")
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
        sns.heatmap(grid, annot=text, fmt="", cmap="viridis", vmin=0, vmax=100, ax=ax, annot_kws={"fontsize": 8},
                    cbar_kws={"label": "match (%)"})
        ax.set_title(f"{value.replace('_', ' ').replace('subcategory', 'sub-category')} (%), 95% CI")
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=0)
        ax.tick_params(axis="y", rotation=0)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_cv_folds(per_fold: pd.DataFrame, *, values: Sequence[str] = ("category_match", "subcategory_match"),
                  title: str | None = None, path: str | os.PathLike | None = None) -> Any:
    """Per-fold match (%) by measure: a box per measure with one dot per fold, one panel per score, from the
    ``per_fold`` table of :func:`cbir.evaluate.cross_validate`."""
    import seaborn as sns
    from matplotlib.figure import Figure

    from cbir.plots import save_figure

    if per_fold.empty:
        raise ValueError("per_fold is empty: no cross-validation results to plot")
    cols = _metric_columns(per_fold["metric"])
    fig = Figure(figsize=(len(values) * (1.2 + 0.85 * len(cols)), 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(values)))
    for ax, value in zip(axes, values):
        data = per_fold.assign(pct=per_fold[value] * 100)
        sns.boxplot(data=data, x="metric", y="pct", order=cols, color="#dddddd", showfliers=False, ax=ax)
        sns.swarmplot(data=data, x="metric", y="pct", order=cols, color="#1f77b4", size=4, ax=ax)
        low = float(np.nanmin(data["pct"]))
        ax.set_ylim(max(0.0, np.floor(low / 10) * 10 - 5), 101)
        ax.set_xlabel("")
        ax.set_ylabel(f"{value.replace('_', ' ').replace('subcategory', 'sub-category')} (%)")
        ax.set_title(f"{value.replace('_', ' ').replace('subcategory', 'sub-category')} per fold")
        ax.tick_params(axis="x", rotation=30)
    n_folds = per_fold["fold"].nunique()
    fig.suptitle(title or f"{n_folds}-fold cross-validation: one dot per fold", fontsize=10)
    return save_figure(fig, path)
