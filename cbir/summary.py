"""The cross-run summary (notebook 08): every run in the store compared, and the study's Table 15.

:func:`summarise` reads each run's result tables back (:mod:`cbir.results`) and writes:

* ``summary_match``: category and sub-category match of the top k with 95% bootstrap CIs per (run, measure),
  from each run's ``category_match`` table, or recomputed from its stored neighbours (``source`` says which);
* ``summary_cross_validation``: the study's Table 10 per (run, measure) from ``cross_validation`` tables;
* ``summary_color_texture``: colour correlation and LBP chi-square of the retrieved pairs (``color_texture``);
* ``summary_paired_tests``: the best (run, measure) against every other run's best, paired over queries;
* ``best_per_analysis``: the study's Table 15, the top (features, measure) per analysis with a ``verdict`` that
  reports ties under the paired tests as ties (:mod:`cbir.verdicts`) and, for colour and texture, the
  background ``caveat`` of the cropping ablation.

Runs are labelled by :func:`cbir.runs.run_table` (``features``), so runs differing only in weights or image
variant never merge. Analyses missing for a run are listed (``Summary.missing``), never errors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cbir.evaluate import per_query
from cbir.neighbours import neighbours_from_store
from cbir.results import (collect_color_texture, collect_cross_validation, collect_match, collect_tables,
                          save_table)
from cbir.runs import RUN_COLUMNS, is_random_init, run_table
from cbir.stats import holm, paired_test
from cbir.store import FeatureStore, open_store
from cbir.verdicts import (ALPHA, background_caveat, candidate_labels, paired_lookup, plain, point_estimate_verdict,
                           tie_verdict)

__all__ = [
    "SUMMARY_TABLES", "SUMMARY_ROI_ABLATION_COLUMNS", "ANALYSES", "PAIRED_COLUMNS", "Summary", "summarise",
    "best_per_analysis", "verdict_lines", "missing_analyses", "paired_tests_across_runs", "stored_paired_tests",
]

SUMMARY_TABLES = {"match": "summary_match", "cross_validation": "summary_cross_validation",
                  "color_texture": "summary_color_texture", "best": "best_per_analysis",
                  "paired": "summary_paired_tests"}
"""Summary attribute -> CSV name (``<out_dir>/tables/<name>.csv``), always written by :func:`summarise`."""

SUMMARY_ROI_ABLATION_COLUMNS = [*RUN_COLUMNS, "metric", "measure", "original", "cropped", "difference", "diff_lo",
                                "diff_hi", "p_value", "n_queries", "original_masked"]
"""Columns of ``summary_roi_ablation`` (notebook 06's ``roi_ablation`` per run)."""

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

_ROI_MEASURE = {"color_corr_mean": "color_corr", "lbp_chi2_mean": "lbp_chi2"}

_TABLE_FOR = {"match": "category_match", "cross_validation": "cross_validation", "color_texture": "color_texture"}


def _rank_words(position: int, n: int) -> str:
    """``"the highest of 6"``, ``"the lowest of 6"``, ``"3rd of 6"`` (position 0 = highest)."""
    if n <= 1:
        return "the only one"
    if position == 0:
        return f"the highest of {n}"
    if position == n - 1:
        return f"the lowest of {n}"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get((position + 1) % 10 if (position + 1) % 100 not in (11, 12, 13)
                                             else 0, "th")
    return f"{position + 1}{suffix} highest of {n}"


def _retrieval_note(match: pd.DataFrame | None, run_id, metric) -> str:
    """`` Its category match ...`` for the (run, measure) picked by a colour/texture mean: whether the
    measure that agrees most in colour also retrieves the right category."""
    if match is None or match.empty or "category_match" not in match.columns or pd.isna(run_id):
        return ""
    rows = match.loc[(pd.to_numeric(match["run_id"], errors="coerce") == int(run_id))
                     & match["category_match"].notna()].reset_index(drop=True)
    if rows.empty or metric not in set(rows["metric"]):
        return ""
    order = rows.sort_values("category_match", ascending=False, kind="stable")["metric"].tolist()
    value = float(rows.loc[rows["metric"] == metric, "category_match"].iloc[0])
    return (f" Its category match is {value:.3f}, {_rank_words(order.index(metric), len(order))} "
            f"measures of its run.")


def _match_verdict(candidates: pd.DataFrame, best: int, column: str, labels: pd.Series,
                   paired: pd.DataFrame | None, run_paired: pd.DataFrame | None, alpha: float) -> str:
    """The match pick against the other measures of its run (the run's own paired tests, notebook 03) and each
    other run's best measure (:func:`paired_tests_across_runs`), with :func:`cbir.verdicts.tie_verdict`."""
    data = candidates.reset_index(drop=True)
    top = data.iloc[best]
    key = lambda row: (plain(row["features"]), plain(row["metric"]))  # noqa: E731
    same = data["run_id"] == top["run_id"]
    others = [(labels.iloc[i], key(data.iloc[i])) for i in np.flatnonzero(same.to_numpy()) if i != best]
    rest = (data.loc[~same].assign(_v=pd.to_numeric(data.loc[~same, column]))
            .sort_values("_v", ascending=False, kind="stable").drop_duplicates("run_id"))
    others += [(labels.iloc[i], key(data.iloc[i])) for i in rest.index]
    tests = {}
    if run_paired is not None and not run_paired.empty and "run_id" in run_paired.columns:
        own = run_paired.loc[pd.to_numeric(run_paired["run_id"], errors="coerce") == int(top["run_id"])]
        own = own.assign(a_features=plain(top["features"]), b_features=plain(top["features"]))
        tests.update(paired_lookup(own, ("features", "metric"), column))
    tests.update(paired_lookup(paired, ("features", "metric"), column, prefixes=("best_", "other_")))
    lo, hi = _CI[column]
    ci = (float(top[lo]), float(top[hi])) if pd.notna(top.get(lo)) and pd.notna(top.get(hi)) else None
    verdict = tie_verdict(labels.iloc[best], float(top[column]), ci, others, key(top), tests, alpha=alpha,
                          what="candidate")
    if len(rest):
        return verdict.text + " Other runs are represented by their best measure."
    return verdict.text


def best_per_analysis(match: pd.DataFrame, cross_validation: pd.DataFrame, color_texture: pd.DataFrame, *,
                      exclude_random_init: bool = True, paired: pd.DataFrame | None = None,
                      run_paired: pd.DataFrame | None = None, roi_ablation: pd.DataFrame | None = None,
                      alpha: float = ALPHA) -> pd.DataFrame:
    """The study's Table 15: per analysis of :data:`ANALYSES` the top (features, measure), and how it stands.

    Columns ``analysis, criterion, run_id, features, model, weights, metric, value, ci_lo, ci_hi
    (match only), n_candidates, note, verdict, caveat``. The pick is the top value (ties in value go to the
    first row: run order, then measure order). Runs with untrained weights are left out when
    ``exclude_random_init`` unless they are the only candidates (then the note says so). An analysis without
    data gets a row with ``note = "missing: ..."`` and no pick.

    ``verdict`` (:mod:`cbir.verdicts`, the wording of the report) never calls a pick best that the data cannot
    separate: for the match, the pick against the other measures of its run (``run_paired``: the runs'
    ``paired_tests`` tables of notebook 03) and against each other run's best measure (``paired``:
    :func:`paired_tests_across_runs`), ties under the Holm-corrected paired test reported as ties
    ("tie: ... not separable from ... (Holm p > 0.05)"), with the pick's 95% interval. CV and colour/texture
    have no paired test: the verdict gives the range and the top point estimate and names no best; colour and
    texture also say how the pick ranks in category match within its run. ``caveat``: colour and texture
    only, what the cropping ablation of the pick's run (``roi_ablation``, notebook 06) says about the studio
    background (:func:`cbir.verdicts.background_caveat`).
    """
    sources = {"match": match, "cross_validation": cross_validation, "color_texture": color_texture}
    rows = []
    for analysis, source, column, direction, criterion in ANALYSES:
        table = sources[source]
        row = {"analysis": analysis, "criterion": criterion, "run_id": pd.NA, "features": None, "model": None,
               "weights": None, "metric": None, "value": np.nan, "ci_lo": np.nan, "ci_hi": np.nan,
               "n_candidates": 0, "note": "", "verdict": "", "caveat": ""}
        data = table if (table is not None and column in table.columns) else pd.DataFrame(columns=[column])
        data = data.loc[pd.to_numeric(data[column], errors="coerce").notna()] if len(data) else data
        if data.empty:
            row["note"] = f"missing: no {_TABLE_FOR[source]} results in the store"
            row["verdict"] = "no results: nothing to compare."
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
        candidates = candidates.reset_index(drop=True)
        values = pd.to_numeric(candidates[column]).to_numpy(dtype=float)
        best = int(np.argmax(values) if direction == "max" else np.argmin(values))
        top = candidates.iloc[best]
        row.update({c: top[c] for c in ("run_id", "features", "model", "weights", "metric") if c in top.index})
        row["value"] = float(values[best])
        labels = candidate_labels(candidates)
        if column in _CI:
            lo, hi = _CI[column]
            row["ci_lo"], row["ci_hi"] = float(top.get(lo, np.nan)), float(top.get(hi, np.nan))
            row["verdict"] = _match_verdict(candidates, best, column, labels, paired, run_paired, alpha)
        else:
            what = criterion.split(" ", 1)[1]  # "coefficient of variation ...", "mean colour correlation ..."
            row["verdict"] = point_estimate_verdict(list(labels), values, higher=direction == "max", what=what)
            if source == "color_texture":
                row["verdict"] += _retrieval_note(match, top.get("run_id"), top.get("metric"))
                roi = roi_ablation
                if roi is not None and not roi.empty and "run_id" in roi.columns:
                    roi = roi.loc[pd.to_numeric(roi["run_id"], errors="coerce") == int(top["run_id"])]
                row["caveat"] = background_caveat(roi, _ROI_MEASURE[column], alpha=alpha)
        row["n_candidates"] = int(len(candidates))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["run_id"] = out["run_id"].astype("Int64")
    return out


def verdict_lines(best: pd.DataFrame) -> list[str]:
    """Table 15 as plain lines: ``analysis: verdict`` and, where there is one, ``  caveat: ...``."""
    lines = []
    for row in best.itertuples(index=False):
        lines.append(f"{row.analysis}: {row.verdict}")
        if getattr(row, "caveat", ""):
            lines.append(f"    caveat: {row.caveat}")
    return lines


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

    Each comparison is :func:`cbir.stats.paired_test` on per-query scores (sign-flip randomisation and
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
    scores = pd.concat([per_query(nb.drop(columns="features"), store.run_labels(int(run_id)), k=k)
                        for run_id, nb in neighbours.groupby("run_id", sort=False)], ignore_index=True)
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
    out["p_holm"] = holm(out["p_permutation"].to_numpy(dtype=float)) if len(out) else []
    return out


def stored_paired_tests(store: FeatureStore | str | os.PathLike) -> pd.DataFrame:
    """Every run's ``paired_tests`` table (notebook 03: its measures compared pairwise) in one frame, each row
    with the ``run_id`` it was saved under; empty when no run has one."""
    store = open_store(store)
    stored = store.tables()
    frames = [store.table("paired_tests", int(run_id)).assign(run_id=int(run_id))
              for run_id in stored.loc[(stored["name"] == "paired_tests") & stored["run_id"].notna(), "run_id"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id"])


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
    missing = missing_analyses(runs, match, cv, ct)
    paired = pd.concat([paired_tests_across_runs(store, match, score=score, k=k, seed=seed,
                                                 exclude_random_init=exclude_random_init)
                        for score in ("category_match", "subcategory_match")], ignore_index=True)
    best = best_per_analysis(match, cv, ct, exclude_random_init=exclude_random_init, paired=paired,
                             run_paired=stored_paired_tests(store), roi_ablation=roi)
    result = Summary(runs=runs, match=match, cross_validation=cv, color_texture=ct, roi_ablation=roi, best=best,
                     missing=missing, paired=paired)
    if out_dir is not None:
        for attr, name in SUMMARY_TABLES.items():
            result.files[name] = save_table(getattr(result, attr), out_dir, name)
        if not roi.empty:
            result.files["summary_roi_ablation"] = save_table(roi, out_dir, "summary_roi_ablation")
    return result
