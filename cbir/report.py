"""The report of a run: ``outputs/<run>/report.html``, one self-contained file that a person can open or mail.

A view on what a run left in its output folder: the CSV tables under ``tables/`` that the notebooks write,
the figures under ``figures/`` and ``run.json``. Nothing is recomputed and nothing of the analysis modules
is imported, so analysis code never depends on this module.

- :func:`findings` turns the tables into short, honest statements (a pure function on DataFrames): per
  analysis the best model and measure with its 95% interval, where the paired tests the notebooks saved
  cannot separate it from another the two are reported as a tie, lower ones with their Holm-corrected p,
  and colour/texture agreement with the background caveat from the cropping ablation beside it;
- :func:`render_report` lays out findings first, then the tables (rounded), then the figures (embedded as
  data URIs) with captions, then how the run was made (parameters, versions, timings from ``run.json``).
  No code, no JavaScript, inline CSS only;
- :func:`write_report` does both for an output folder (``cbir run`` calls it after the notebooks).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["ALPHA", "Finding", "findings", "format_p", "load_tables", "render_report", "write_report",
           "findings_lines", "REPORT_NAME"]

ALPHA = 0.05
"""Significance level of the verdicts: a pair with (Holm-corrected) p above it is reported as a tie."""
REPORT_NAME = "report.html"
MAX_TABLE_ROWS = 60
"""Tables longer than this are listed (name and size) instead of shown."""
IMAGE_INLINE_BYTES = 200_000
"""Figures larger than this are embedded as JPEG (photo grids compress ten-fold) at most
:data:`IMAGE_MAX_WIDTH` pixels wide; smaller ones as their PNG."""
IMAGE_MAX_WIDTH = 1400
RUN_SECTION = "This run"
STUDY_SECTION = "Across the runs in the store (notebook 08)"
_IDENTITY = ("run_id", "features", "model", "layer", "pooling", "weights", "variant")


# --------------------------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """One statement of the report.

    ``section``: :data:`RUN_SECTION` or :data:`STUDY_SECTION`; ``analysis``: what it is about;
    ``text``: the statement (plain text, numbers rounded); ``best``: the label of the top candidate
    (None when the analysis names none); ``value`` and ``ci``: its score and 95% interval;
    ``tied``: candidates the paired tests cannot separate from it (p > :data:`ALPHA`); ``lower``:
    ``(label, p)`` of candidates significantly below it; ``untested``: candidates without a paired test;
    ``caveat``: what qualifies the number (the background share of colour agreement).
    """

    section: str
    analysis: str
    text: str
    best: str | None = None
    value: float | None = None
    ci: tuple[float, float] | None = None
    tied: tuple[str, ...] = ()
    lower: tuple[tuple[str, float], ...] = ()
    untested: tuple[str, ...] = ()
    caveat: str | None = None

    @property
    def is_tie(self) -> bool:
        return bool(self.tied)

    def line(self) -> str:
        """``analysis: text`` plus the caveat, one line of plain text."""
        caveat = f" Caveat: {self.caveat}" if self.caveat else ""
        return f"{self.analysis}: {self.text}{caveat}"


def format_p(p: Any) -> str:
    """A p-value for people: ``"< 0.001"`` below 0.001, else three decimals (never ``0.000``); ``"n/a"``
    when missing."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        return "n/a"
    if math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{min(p, 1.0):.3f}"


def _p_clause(p: float, name: str = "p") -> str:
    """``"p = 0.012"`` or ``"p < 0.001"``."""
    text = format_p(p)
    return f"{name} {text}" if text.startswith("<") else f"{name} = {text}"


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return out


def _fmt(value: Any) -> str:
    value = _num(value)
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _signed(value: Any) -> str:
    value = _num(value)
    return "n/a" if math.isnan(value) else f"{value:+.3f}"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _range(values: Iterable[Any], fmt=_fmt) -> str:
    vals = [v for v in (_num(x) for x in values) if not math.isnan(v)]
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} to {fmt(hi)}"


def _norm(value: Any) -> str:
    """A key part: '' for missing values, else the text (so NaN layers compare equal)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return str(value)


def _original(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """Rows of the whole-image variant when the table has a ``variant`` column with such rows."""
    if df is None or df.empty:
        return df
    if "variant" in df.columns and (df["variant"] == "original").any():
        return df.loc[df["variant"] == "original"]
    return df


def _labels(df: pd.DataFrame, *, with_features: bool | None = None) -> pd.Series:
    """One label per row: the measure, prefixed by the features when the table holds several (or asked)."""
    metric = df["metric"].map(_norm) if "metric" in df.columns else pd.Series("", index=df.index)
    if with_features is None:
        with_features = "features" in df.columns and df["features"].nunique(dropna=True) > 1
    if with_features and "features" in df.columns:
        return df["features"].map(_norm) + " · " + metric
    return metric


def _is_random_init(weights: Any) -> bool:
    text = _norm(weights).lower()
    return text.startswith("none") or "random" in text


def _drop_random_init(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with trained weights, unless every row is random-init (their features carry no meaning)."""
    if "weights" not in df.columns:
        return df
    random = df["weights"].map(_is_random_init)
    return df.loc[~random] if (~random).any() else df


@dataclass(frozen=True)
class _Test:
    p: float
    holm: bool
    diff: float  # mean of the first key minus mean of the second


def _pairs(tests: pd.DataFrame | None, fields: Sequence[str], score: str, *,
           prefixes: tuple[str, str] = ("a_", "b_")) -> dict[tuple[tuple[str, ...], tuple[str, ...]], _Test]:
    """Paired tests of ``score`` keyed both ways by ``((a fields), (b fields))``."""
    out: dict[tuple[tuple[str, ...], tuple[str, ...]], _Test] = {}
    if tests is None or tests.empty:
        return out
    rows = tests.loc[tests["score"] == score] if "score" in tests.columns else tests
    pa, pb = prefixes
    fields = [f for f in fields if f"{pa}{f}" in rows.columns and f"{pb}{f}" in rows.columns]
    if not fields:
        return out
    mean_a = "mean_a" if "mean_a" in rows.columns else "mean_best"
    mean_b = "mean_b" if "mean_b" in rows.columns else "mean_other"
    for _, row in rows.iterrows():
        a = tuple(_norm(row[f"{pa}{f}"]) for f in fields)
        b = tuple(_norm(row[f"{pb}{f}"]) for f in fields)
        holm = "p_holm" in row.index and not math.isnan(_num(row["p_holm"]))
        p = _num(row["p_holm"]) if holm else _num(row.get("p_permutation", row.get("p_value", np.nan)))
        diff = _num(row["mean_diff"]) if "mean_diff" in row.index else _num(row.get(mean_a)) - _num(row.get(mean_b))
        out[(a, b)] = _Test(p, holm, diff)
        out[(b, a)] = _Test(p, holm, -diff)
    return out


def _verdict(best: str, value: float, ci: tuple[float, float] | None, others: Sequence[tuple[str, tuple]],
             best_key: tuple, tests: Mapping, *, alpha: float, what: str) -> dict[str, Any]:
    """Tie / lower / untested split of ``others`` against ``best`` and the sentence saying so."""
    tied: list[str] = []
    lower: list[tuple[str, float]] = []
    untested: list[str] = []
    holm_any = False
    for label, key in others:
        test = tests.get((best_key, key))
        if test is None or math.isnan(test.p):
            untested.append(label)
            continue
        holm_any |= test.holm
        if test.p > alpha or not test.diff > 0:
            tied.append(label)
        else:
            lower.append((label, test.p))
    pname = "Holm p" if holm_any else "p"
    head = f"{best} {_fmt(value)}" + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci is not None else "")
    if not others:
        text = f"{head}; the only {what}: nothing to compare."
    elif tied:
        text = f"tie: {head} is highest but not separable from {_join(tied)} ({pname} > {alpha:g})"
    elif lower:
        text = f"best: {head}"
    else:
        text = f"highest: {head}"
    parts = [text] if others else []
    if lower:
        parts.append("lower: " + ", ".join(f"{label} ({_p_clause(p, pname)})" for label, p in lower))
    if untested:
        parts.append(f"no paired test against {_join(untested)}")
    if others:
        text = "; ".join(parts) + "."
    return {"text": text, "tied": tuple(tied), "lower": tuple(lower), "untested": tuple(untested)}


def _context(df: pd.DataFrame) -> str:
    bits = []
    if "k" in df.columns and df["k"].nunique() == 1:
        bits.append(f"top {int(_num(df['k'].iloc[0]))}")
    if "n_queries" in df.columns and df["n_queries"].nunique() == 1:
        bits.append(f"{int(_num(df['n_queries'].iloc[0]))} queries")
    return f" ({', '.join(bits)})" if bits else ""


def _match_finding(match: pd.DataFrame | None, tests: pd.DataFrame | None, score: str, analysis: str, *,
                   alpha: float) -> Finding | None:
    """Best measure of one run's match table against the paired tests between its measures (notebook 03)."""
    data = _original(match)
    if data is None or data.empty or score not in data.columns:
        return None
    data = data.loc[pd.to_numeric(data[score], errors="coerce").notna()]
    if data.empty:
        return None
    data = data.reset_index(drop=True)
    labels = _labels(data)
    fields = [f for f in ("model", "layer", "pooling", "metric") if f in data.columns]
    keys = [tuple(_norm(row[f]) for f in fields) for _, row in data.iterrows()]
    tests = _original(tests)
    pairs = _pairs(tests, fields, score)
    values = pd.to_numeric(data[score]).to_numpy(dtype=float)
    best = int(np.argmax(values))
    ci = None
    if f"{score}_lo" in data.columns and f"{score}_hi" in data.columns:
        ci = (_num(data.at[best, f"{score}_lo"]), _num(data.at[best, f"{score}_hi"]))
    others = [(labels[i], keys[i]) for i in range(len(data)) if i != best]
    verdict = _verdict(labels[best], values[best], ci, others, keys[best], pairs, alpha=alpha, what="measure")
    return Finding(RUN_SECTION, analysis + _context(data), verdict["text"], best=labels[best],
                   value=float(values[best]),
                   ci=ci, tied=verdict["tied"], lower=verdict["lower"], untested=verdict["untested"])


def _study_match_finding(match: pd.DataFrame | None, tests: pd.DataFrame | None, score: str, analysis: str, *,
                         alpha: float) -> Finding | None:
    """Best (features, measure) over the runs in the store against each other run's best measure (notebook 08)."""
    if match is None or match.empty or score not in match.columns:
        return None
    data = match.loc[pd.to_numeric(match[score], errors="coerce").notna()]
    data = _drop_random_init(data)
    if data.empty:
        return None
    if "features" not in data.columns:
        data = data.assign(features="")
    data = (data.assign(_v=pd.to_numeric(data[score]))
            .sort_values("_v", ascending=False, kind="stable").drop_duplicates("features").reset_index(drop=True))
    labels = _labels(data, with_features=True)
    keys = [(_norm(f), _norm(m)) for f, m in zip(data["features"], data["metric"])]
    pairs = _pairs(tests, ("features", "metric"), score, prefixes=("best_", "other_"))
    best = 0
    ci = None
    if f"{score}_lo" in data.columns and f"{score}_hi" in data.columns:
        ci = (_num(data.at[best, f"{score}_lo"]), _num(data.at[best, f"{score}_hi"]))
    others = [(labels[i], keys[i]) for i in range(1, len(data))]
    verdict = _verdict(labels[best], float(data.at[best, "_v"]), ci, others, keys[best], pairs, alpha=alpha,
                       what="run")
    text = verdict["text"]
    if len(data) > 1:
        text += " Each run is represented by its best measure."
    return Finding(STUDY_SECTION, analysis + _context(data), text, best=labels[best], value=float(data.at[best, "_v"]),
                   ci=ci, tied=verdict["tied"], lower=verdict["lower"], untested=verdict["untested"])


def _cv_finding(cv: pd.DataFrame | None, section: str, *, with_features: bool | None = None) -> Finding | None:
    """Cross-validation: highest mean category match over the folds; a tie is "within one fold SD" (no test)."""
    data = _original(cv) if section == RUN_SECTION else cv
    column = "category_match_mean"
    if data is None or data.empty or column not in data.columns:
        return None
    data = _drop_random_init(data.loc[pd.to_numeric(data[column], errors="coerce").notna()]).reset_index(drop=True)
    if data.empty:
        return None
    labels = _labels(data, with_features=with_features)
    mean = pd.to_numeric(data[column]).to_numpy(dtype=float)
    std = pd.to_numeric(data.get("category_match_std", pd.Series(np.nan, index=data.index))).to_numpy(dtype=float)
    best = int(np.argmax(mean))
    folds = f" over {int(_num(data['n_folds'].iloc[0]))} folds" if "n_folds" in data.columns else ""
    head = f"{labels[best]} {_fmt(mean[best])} ± {_fmt(std[best])}{folds}"
    others = [i for i in range(len(data)) if i != best]
    if math.isnan(std[best]):
        near, below = [], []
        text = f"highest: {head}; no fold standard deviation to judge the differences by"
    else:
        near = [labels[i] for i in others if mean[i] >= mean[best] - std[best]]
        below = [i for i in others if mean[i] < mean[best] - std[best]]
        if not others:
            text = f"{head}; the only candidate"
        elif near:
            text = f"tie: {head} is highest, {_join(near)} within one fold standard deviation of it (no paired test)"
        else:
            text = f"best: {head}, every other more than one fold standard deviation lower (no paired test)"
        if below:
            text += "; lower: " + ", ".join(f"{labels[i]} {_fmt(mean[i])}" for i in below)
    if "category_match_cv" in data.columns and len(data) > 1:
        cvs = pd.to_numeric(data["category_match_cv"]).to_numpy(dtype=float)
        if np.isfinite(cvs).any():
            steady = int(np.nanargmin(cvs))
            text += f"; steadiest: {labels[steady]} (coefficient of variation {_fmt(cvs[steady])})"
    return Finding(section, "Cross-validation, category match", text + ".", best=labels[best],
                   value=float(mean[best]), tied=tuple(near))


def _roi_rows(roi: pd.DataFrame | None, measure: str) -> pd.DataFrame:
    if roi is None or roi.empty or "measure" not in roi.columns:
        return pd.DataFrame()
    rows = roi.loc[roi["measure"] == measure]
    return _original(rows) if "variant" in rows.columns else rows


def _background_caveat(roi: pd.DataFrame | None, measure: str, *, alpha: float) -> str:
    """What the cropping ablation says about ``measure`` (``color_corr`` or ``lbp_chi2``)."""
    what = {"color_corr": "colour agreement", "lbp_chi2": "texture distance"}[measure]
    rows = _roi_rows(roi, measure)
    if rows.empty:
        return (f"no ROI ablation in these results (notebook 06), so the share of the background in this "
                f"{what} is unknown.")
    p = pd.to_numeric(rows.get("p_value"), errors="coerce")
    diff = pd.to_numeric(rows["difference"], errors="coerce")
    hi = pd.to_numeric(rows.get("diff_hi", pd.Series(np.nan, index=rows.index)), errors="coerce")
    lo = pd.to_numeric(rows.get("diff_lo", pd.Series(np.nan, index=rows.index)), errors="coerce")
    significant = (p <= alpha) & ((hi < 0) | (lo > 0))
    worst_p = format_p(p.max())
    if measure == "color_corr":
        original = _range(rows["original"])
        masked = pd.to_numeric(rows.get("original_masked", pd.Series(np.nan, index=rows.index)), errors="coerce")
        if masked.notna().any():
            share = (1 - masked / pd.to_numeric(rows["original"], errors="coerce")).median()
            text = f"on the product alone (ROI mask) the same pairs correlate {_range(masked)} instead of {original}"
            if share > 0:
                text += f": about {share:.0%} of this agreement is the studio background, not the product"
        else:
            text = (f"with query and neighbours cropped to the product it is {_range(rows['cropped'])} "
                    f"instead of {original}")
        if significant.all() and (diff < 0).all():
            text += (f" (cropping lowers it for every measure, {_range(diff, _signed)}, "
                     f"{_p_clause(p.max()) if worst_p.startswith('<') else f'p ≤ {worst_p}'})")
        elif not significant.any():
            text += f" (cropping changes it by {_range(diff, _signed)}, not significantly: p > {alpha:g})"
        else:
            text += (f" (cropping changes it by {_range(diff, _signed)}, significantly for {int(significant.sum())} "
                     f"of {len(rows)} measures)")
        return text + "."
    if not significant.any():
        return (f"cropping to the product changes it by {_range(diff, _signed)}, not significantly "
                f"(p > {alpha:g}): the background does not drive it.")
    return (f"cropping to the product changes it by {_range(diff, _signed)} (significant for "
            f"{int(significant.sum())} of {len(rows)} measures, p {format_p(p[significant].min())} at best).")


def _colour_findings(ct: pd.DataFrame | None, roi: pd.DataFrame | None, section: str, *, alpha: float,
                     with_features: bool | None = None) -> list[Finding]:
    data = _original(ct) if section == RUN_SECTION else ct
    out: list[Finding] = []
    if data is None or data.empty:
        return out
    data = _drop_random_init(data).reset_index(drop=True)
    labels = _labels(data, with_features=with_features)
    for column, measure, analysis, higher in (("color_corr_mean", "color_corr", "Colour agreement", True),
                                              ("lbp_chi2_mean", "lbp_chi2", "Texture distance", False)):
        if column not in data.columns:
            continue
        values = pd.to_numeric(data[column], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(values).any():
            continue
        best = int(np.nanargmax(values) if higher else np.nanargmin(values))
        what = ("colour-histogram correlation of query and neighbour (1 = same colours)" if higher
                else "LBP chi-square distance of query and neighbour (0 = same texture)")
        word = "highest" if higher else "lowest"
        if len(data) > 1:
            text = (f"{what}: {_range(values)} across {len(data)} candidates; {word}: {labels[best]} "
                    f"{_fmt(values[best])} (no paired test, so no measure is named best).")
        else:
            text = f"{what}: {labels[best]} {_fmt(values[best])}."
        out.append(Finding(section, analysis, text, best=None, value=float(values[best]),
                           caveat=_background_caveat(roi, measure, alpha=alpha)))
    return out


def _roi_finding(roi: pd.DataFrame | None, section: str, *, alpha: float) -> Finding | None:
    """Cropping to the product: how retrieval changes, per level, significant or not."""
    parts = []
    for measure, name in (("category_match", "category match"), ("subcategory_match", "sub-category match")):
        rows = _roi_rows(roi, measure)
        if rows.empty:
            continue
        p = pd.to_numeric(rows.get("p_value"), errors="coerce")
        diff = pd.to_numeric(rows["difference"], errors="coerce")
        significant = p <= alpha
        text = f"{name} changes by {_range(diff, _signed)}"
        if not significant.any():
            text += f", for no measure significantly (all p > {alpha:g})"
        else:
            labels = _labels(rows.reset_index(drop=True))
            sig = [f"{labels[i]} {_signed(diff.iloc[i])} ({_p_clause(p.iloc[i])})"
                   for i in range(len(rows)) if bool(significant.iloc[i])]
            text += f"; significant for {', '.join(sig)}"
        parts.append(text)
    if not parts:
        return None
    return Finding(section, "Cropping to the product (ROI ablation)", "; ".join(parts) + ".")


def _data_finding(tables: Mapping[str, pd.DataFrame]) -> Finding | None:
    counts = tables.get("catalog_counts")
    if counts is None or counts.empty or "n_images" not in counts.columns:
        return None
    n = int(pd.to_numeric(counts["n_images"]).sum())
    bits = [f"{n} images"]
    if "category" in counts.columns:
        bits[0] += f" in {counts['category'].nunique()} categories"
        if "subcategory" in counts.columns:
            bits[0] += f" and {counts[['category', 'subcategory']].drop_duplicates().shape[0]} sub-categories"
    if "n_fashion" in counts.columns:
        bits.append(f"{int(pd.to_numeric(counts['n_fashion']).sum())} fashion items")
    for column, name in (("n_problems", "with problems (left out)"), ("n_duplicates", "byte-identical duplicates")):
        if column in counts.columns:
            bits.append(f"{int(pd.to_numeric(counts[column]).sum())} {name}")
    failures = tables.get("extraction_failures")
    if failures is not None:
        bits.append(f"{len(failures)} extraction failures")
    return Finding(RUN_SECTION, "Catalogue", "; ".join(bits) + ".")


def _approximate_finding(recall: pd.DataFrame | None) -> Finding | None:
    """Recall of the approximate indexes against exact search (notebook 02)."""
    if recall is None or recall.empty or "recall_at_k" not in recall.columns:
        return None
    items = []
    index_col = recall["index"] if "index" in recall.columns else pd.Series("approximate index", index=recall.index)
    for index, rows in recall.groupby(index_col, sort=False):
        k = f"@{int(_num(rows['k'].iloc[0]))}" if "k" in rows.columns else ""
        per = ", ".join(f"{_fmt(r['recall_at_k'])} ({_norm(r.get('metric', ''))})" for _, r in rows.iterrows())
        items.append(f"{index}: recall{k} {per}")
    return Finding(RUN_SECTION, "Approximate search", "against exact search, " + "; ".join(items) + ".")


def findings(tables: Mapping[str, pd.DataFrame], *, alpha: float = ALPHA) -> list[Finding]:
    """The report's statements from result tables keyed by file stem (``category_match``, ``paired_tests``,
    ``cross_validation``, ``color_texture``, ``roi_ablation``, ``catalog_counts``, ``extraction_failures``,
    ``approximate_recall``; notebook 08's ``summary_match``, ``summary_paired_tests``,
    ``summary_cross_validation``, ``summary_color_texture``, ``summary_roi_ablation``). Absent tables give
    no finding. Per-run statements first (:data:`RUN_SECTION`), then the cross-run ones (:data:`STUDY_SECTION`).
    """
    t = {name: df for name, df in tables.items() if df is not None}
    out: list[Finding | None] = [_data_finding(t)]
    out.append(_match_finding(t.get("category_match"), t.get("paired_tests"), "category_match", "Category match",
                              alpha=alpha))
    out.append(_match_finding(t.get("category_match"), t.get("paired_tests"), "subcategory_match",
                              "Sub-category match", alpha=alpha))
    out.append(_cv_finding(t.get("cross_validation"), RUN_SECTION))
    out += _colour_findings(t.get("color_texture"), t.get("roi_ablation"), RUN_SECTION, alpha=alpha)
    out.append(_roi_finding(t.get("roi_ablation"), RUN_SECTION, alpha=alpha))
    out.append(_approximate_finding(t.get("approximate_recall")))
    study_roi = t.get("summary_roi_ablation")
    # with a single feature run in the store its CV, colour and ROI tables are this run's: said above already
    single = all(t.get(name) is not None and ("features" not in t[name].columns or t[name]["features"].nunique() <= 1)
                 for name in ("summary_cross_validation", "summary_color_texture")) and "cross_validation" in t
    out.append(_study_match_finding(t.get("summary_match"), t.get("summary_paired_tests"), "category_match",
                                    "Category match", alpha=alpha))
    out.append(_study_match_finding(t.get("summary_match"), t.get("summary_paired_tests"), "subcategory_match",
                                    "Sub-category match", alpha=alpha))
    if not single:
        out.append(_cv_finding(t.get("summary_cross_validation"), STUDY_SECTION, with_features=True))
        out += _colour_findings(t.get("summary_color_texture"), study_roi, STUDY_SECTION, alpha=alpha,
                                with_features=True)
        out.append(_roi_finding(study_roi, STUDY_SECTION, alpha=alpha))
    return [f for f in out if f is not None]


def findings_lines(items: Sequence[Finding]) -> list[str]:
    """Plain-text lines: a section heading when it changes, then one line per finding."""
    lines: list[str] = []
    section = None
    for f in items:
        if f.section != section:
            section = f.section
            lines.append(f"{section}:")
        lines.append(f"  {f.line()}")
    return lines


# ---------------------------------------------------------------------------------------------- inputs
def load_tables(out_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Every readable ``<out_dir>/tables/*.csv`` keyed by file stem (unreadable files are left out)."""
    tables: dict[str, pd.DataFrame] = {}
    for path in sorted((Path(out_dir) / "tables").glob("*.csv")):
        try:
            tables[path.stem] = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            continue
    return tables


def _read_run(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------- rendering
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d232a;
  max-width:1180px;margin:0 auto;padding:24px 28px 64px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:21px;margin:36px 0 10px;border-bottom:2px solid #e3e7ec;
  padding-bottom:4px}h3{font-size:16px;margin:22px 0 6px}
.meta{color:#5b6670;margin:0 0 12px}
.alert{background:#fff4e5;border:1px solid #f0b45b;border-radius:6px;padding:10px 14px;margin:14px 0}
.alert b{color:#8a4b00}
ul.findings{list-style:none;padding:0;margin:0}
ul.findings li{background:#f5f8fb;border-left:4px solid #2f6fb0;border-radius:4px;padding:9px 13px;margin:8px 0}
ul.findings li.tie{border-left-color:#8a8f96}
.analysis{font-weight:600}.caveat{display:block;color:#7a4a00;margin-top:4px}
.note{color:#5b6670;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 4px;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;border-bottom:1px solid #e3e7ec;text-align:right;white-space:nowrap}
th{background:#f0f3f6;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
.scroll{overflow-x:auto;max-width:100%}
figure{margin:18px 0 28px}figure img{max-width:100%;height:auto;border:1px solid #e3e7ec}
figcaption{color:#3d4650;font-size:14px;margin-top:4px}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:14px}
dl.kv dt{color:#5b6670}dl.kv dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
"""

TABLE_CAPTIONS: dict[str, str] = {
    "catalog_counts": "Images per category and sub-category, with problems and duplicates (notebook 00)",
    "feature_stats": "Feature vectors: dimension, sparsity and L2 norms (notebook 01)",
    "category_match": "Share of the top k neighbours in the query's category / sub-category, "
                      "95% bootstrap intervals (notebook 03)",
    "paired_tests": "Paired tests between measures on per-query match: mean difference a - b with its 95% "
                    "interval, sign-flip randomisation p and its Holm correction over all pairs (notebook 03)",
    "map_at_k": "Precision, recall and mean average precision at k (notebook 03)",
    "match_by_rank": "Match per neighbour rank (notebook 03)",
    "match_by_subcategory": "Match per query sub-category (notebook 03)",
    "cross_validation": "Cross-validation: mean, standard deviation and coefficient of variation of the match "
                        "over the folds (notebook 04)",
    "cross_validation_per_fold": "Match per fold (notebook 04)",
    "color_texture": "Colour-histogram correlation and LBP chi-square between queries and their neighbours "
                     "(notebook 05)",
    "color_texture_by_rank": "Colour and texture agreement per neighbour rank (notebook 05)",
    "roi_ablation": "Cropping to the product: original vs cropped per measure, difference with its 95% interval "
                    "and p; original_masked = the original pairs measured inside the product mask (notebook 06)",
    "approximate_recall": "Approximate (faiss) search against exact search: recall at k (notebook 02)",
    "summary_match": "Every run in the store: category and sub-category match (notebook 08)",
    "summary_paired_tests": "The best run against every other run's best measure, paired on common queries "
                            "(notebook 08)",
    "summary_cross_validation": "Every run in the store: cross-validation (notebook 08)",
    "summary_color_texture": "Every run in the store: colour and texture agreement (notebook 08)",
    "summary_roi_ablation": "Every run in the store: cropping ablation (notebook 08)",
    "best_per_analysis": "The study's Table 15: the top candidate per analysis by point estimate "
                         "(see the findings for ties) (notebook 08)",
}
TABLE_ORDER = list(TABLE_CAPTIONS)

FIGURE_CAPTIONS: dict[str, str] = {
    "catalog_counts": "Images per category and sub-category.",
    "catalog_image_sizes": "Image sizes in the catalogue.",
    "catalog_backgrounds": "Image backgrounds (border colour and brightness).",
    "catalog_samples": "Sample images per sub-category.",
    "pca_projection": "Feature vectors projected on their first two principal components, coloured by category.",
    "match_heatmap": "Category and sub-category match per measure.",
    "match_by_rank": "Match per neighbour rank.",
    "confusion_subcategory": "Sub-category confusion: the query's sub-category (rows) against its neighbours'.",
    "pr_category": "Precision-recall, category level.",
    "pr_subcategory": "Precision-recall, sub-category level.",
    "cross_validation": "Match per fold of the cross-validation.",
    "color_texture_heatmaps": "Colour correlation and LBP chi-square per measure.",
    "roi_grid": "Regions of interest found on sample images.",
    "roi_ablation_differences": "Cropped minus original per measure, with 95% intervals.",
    "summary_match_heatmap": "Every run in the store: match with intervals.",
}
_FIGURE_ORDER = ("catalog", "pca", "neighbours", "match", "confusion", "pr_", "cross", "color", "roi", "summary")


def _when(stamp: Any) -> str:
    """``2030-01-01T00:01:00+00:00`` -> ``2030-01-01 00:01 UTC`` (the text as is when it is not ISO)."""
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp)
    if moment.tzinfo is not None:
        return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return moment.strftime("%Y-%m-%d %H:%M")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table_html(df: pd.DataFrame) -> tuple[str, str]:
    """(HTML table, note on constant identity columns left out); floats to 3 decimals, p-values formatted."""
    shown = df.copy()
    constant = []
    if len(shown) > 1:
        for column in _IDENTITY:
            if column in shown.columns and shown[column].map(_norm).nunique() == 1:
                constant.append(f"{column} = {_norm(shown[column].iloc[0]) or '—'}")
                shown = shown.drop(columns=column)
    for column in shown.columns:
        if column.startswith("p_") or column == "p_value":
            shown[column] = shown[column].map(format_p)
        elif pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    body = shown.to_html(index=False, border=0, na_rep="", escape=True)
    return body, "; ".join(constant)


def _figure_sort_key(path: Path) -> tuple[int, str]:
    stem = path.stem
    for i, prefix in enumerate(_FIGURE_ORDER):
        if stem.startswith(prefix):
            return i, stem
    return len(_FIGURE_ORDER), stem


def _figure_caption(stem: str) -> str:
    if stem in FIGURE_CAPTIONS:
        return FIGURE_CAPTIONS[stem]
    if stem.startswith("neighbours_"):
        return f"Queries and their nearest neighbours by {stem.split('_', 1)[1]} distance."
    if stem.startswith("color_texture_"):
        return f"Example pairs: {stem[len('color_texture_'):].replace('_', ' ')}."
    if stem.startswith("roi_"):
        return f"Cropping to the product: {stem[4:].replace('_', ' ')}."
    return stem.replace("_", " ").capitalize() + "."


def _image_uri(path: Path) -> str:
    """``data:`` URI of a figure: PNG as is when small, else a JPEG at most :data:`IMAGE_MAX_WIDTH` wide."""
    data = path.read_bytes()
    if len(data) <= IMAGE_INLINE_BYTES:
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, mask=image.getchannel("A"))
        if canvas.width > IMAGE_MAX_WIDTH:
            canvas = canvas.resize((IMAGE_MAX_WIDTH, round(canvas.height * IMAGE_MAX_WIDTH / canvas.width)),
                                   Image.LANCZOS)
        buffer = io.BytesIO()
        canvas.save(buffer, format="JPEG", quality=82, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _problems(run: Mapping[str, Any]) -> list[str]:
    """Sentences on notebooks that failed, were interrupted, are missing or did not run."""
    out = []
    notebooks = run.get("notebooks", {}) or {}
    for stem, entry in notebooks.items():
        status = entry.get("status")
        if status == "failed":
            error = entry.get("error", {}) or {}
            cell = f" at cell {error['cell']}" if error.get("cell") is not None else ""
            out.append(f"{stem} failed{cell}: {error.get('ename', 'error')}: {str(error.get('evalue', ''))[:300]}. "
                       "Results of the later notebooks are missing or from an earlier run.")
        elif status in ("interrupted", "running"):
            out.append(f"{stem} was interrupted; its results are incomplete.")
        elif status == "missing":
            out.append(f"notebook {stem}_*.ipynb was not found; its analysis is missing.")
    wanted = (run.get("parameters", {}) or {}).get("notebooks") or []
    ran = {str(s)[:2] for s in notebooks}
    absent = [n for n in wanted if n not in ran]
    if absent and run.get("status") == "failed":
        out.append(f"not run: notebooks {', '.join(absent)}.")
    return out


def _how_html(run: Mapping[str, Any]) -> str:
    if not run:
        return "<p>No run.json in this folder.</p>"
    parts = []
    overrides = ", ".join(f"{k}={v}" for k, v in (run.get("overrides") or {}).items()) or "none"
    facts = [("params file", run.get("params_file")), ("overrides", overrides),
             ("started", run.get("started")), ("finished", run.get("finished")),
             ("total seconds", run.get("seconds")), ("status", run.get("status")), ("host", run.get("host"))]
    git = run.get("git") or {}
    if git:
        dirty = " (uncommitted changes)" if git.get("dirty") else ""
        facts.append(("git commit", f"{str(git.get('commit', ''))[:12]}{dirty}"))
    parts.append("<dl class='kv'>" + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts
                                              if v not in (None, "")) + "</dl>")
    notebooks = run.get("notebooks") or {}
    if notebooks:
        started = str(run.get("started") or "")
        rows = []
        for stem, entry in notebooks.items():
            status = entry.get("status", "")
            if status == "ok" and str(entry.get("started") or "") < started:
                status = "ok (earlier run, skipped this time)"
            seconds = entry.get("seconds")
            rows.append(f"<tr><td>{_esc(stem)}</td><td>{_esc(status)}</td>"
                        f"<td>{'' if seconds is None else f'{float(seconds):.1f}'}</td></tr>")
        parts.append("<h3>Notebooks</h3><table><thead><tr><th>notebook</th><th>status</th><th>seconds</th></tr>"
                     "</thead><tbody>" + "".join(rows) + "</tbody></table>")
    params = run.get("parameters") or {}
    if params:
        parts.append("<h3>Parameters</h3><dl class='kv'>" + "".join(
            f"<dt>{_esc(k)}</dt><dd>{_esc(json.dumps(v) if not isinstance(v, str) else v)}</dd>"
            for k, v in params.items()) + "</dl>")
    versions = run.get("versions") or {}
    if versions:
        parts.append("<h3>Versions</h3><dl class='kv'>" + "".join(
            f"<dt>{_esc(k)}</dt><dd>{_esc(v if v is not None else 'not installed')}</dd>"
            for k, v in versions.items()) + "</dl>")
    return "\n".join(parts)


def render_report(tables: Mapping[str, pd.DataFrame], figures: Sequence[Path], run: Mapping[str, Any], *,
                  items: Sequence[Finding] | None = None, title: str | None = None) -> str:
    """The report as one HTML document: findings, tables, figures (embedded), how it was run."""
    items = findings(tables) if items is None else items
    name = run.get("name") or title or "run"
    params = run.get("parameters") or {}
    meta_bits = [str(params[k]) for k in ("model", "layer", "pooling", "weights") if params.get(k) not in (None, "")]
    if params.get("catalog"):
        catalog = params["catalog"]
        meta_bits.append("demo catalogue" if catalog == "demo" else f"catalogue {Path(catalog).name}")
    if run.get("finished"):
        meta_bits.append(f"finished {_when(run['finished'])}")
    if run.get("status"):
        meta_bits.append(f"status {run['status']}")
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           "<meta name='viewport' content='width=device-width, initial-scale=1'>",
           f"<title>cbir report: {_esc(name)}</title><style>{CSS}</style></head><body>",
           f"<header><h1>cbir report: {_esc(name)}</h1><p class='meta'>{_esc(' · '.join(meta_bits))}</p></header>"]
    problems = _problems(run)
    if problems:
        out.append("<div class='alert' id='problems'><b>This run did not finish cleanly.</b><ul>"
                   + "".join(f"<li>{_esc(p)}</li>" for p in problems) + "</ul></div>")

    out.append("<section id='findings'><h2>Findings</h2>")
    if not items:
        out.append("<p>No result tables in this folder yet: nothing to report.</p>")
    section = None
    for f in items:
        if f.section != section:
            if section is not None:
                out.append("</ul>")
            section = f.section
            out.append(f"<h3>{_esc(section)}</h3><ul class='findings'>")
        caveat = f"<span class='caveat'>Caveat: {_esc(f.caveat)}</span>" if f.caveat else ""
        out.append(f"<li class='{'tie' if f.is_tie else 'finding'}'><span class='analysis'>{_esc(f.analysis)}</span>: "
                   f"{_esc(f.text)}{caveat}</li>")
    if section is not None:
        out.append("</ul>")
    out.append(f"<p class='note'>Intervals are 95% bootstrap intervals over queries. \"Not separable\" means the "
               f"paired test between two candidates on the same queries (sign-flip randomisation, Holm-corrected over "
               f"all pairs) gives p &gt; {ALPHA:g}: the data cannot tell them apart, whatever the point estimates "
               f"say.</p></section>")

    out.append("<section id='tables'><h2>Tables</h2>")
    order = [n for n in TABLE_ORDER if n in tables] + sorted(n for n in tables if n not in TABLE_CAPTIONS)
    skipped = []
    for table_name in order:
        df = tables[table_name]
        if len(df) > MAX_TABLE_ROWS or df.empty:
            skipped.append(f"{table_name}.csv ({len(df)} rows)")
            continue
        body, constant = _table_html(df)
        caption = TABLE_CAPTIONS.get(table_name, table_name.replace("_", " ").capitalize())
        note = f" For every row: {_esc(constant)}." if constant else ""
        out.append(f"<h3>{_esc(caption)}</h3><p class='note'>tables/{_esc(table_name)}.csv.{note}</p>"
                   f"<div class='scroll'>{body}</div>")
    if skipped:
        out.append(f"<p class='note'>Not shown (empty or long; see the tables folder): {_esc(', '.join(skipped))}.</p>")
    out.append("</section>")

    out.append("<section id='figures'><h2>Figures</h2>")
    for path in sorted(figures, key=_figure_sort_key):
        try:
            uri = _image_uri(path)
        except Exception:  # noqa: BLE001 - an unreadable figure is listed, not fatal
            out.append(f"<p class='note'>figures/{_esc(path.name)} could not be read.</p>")
            continue
        caption = _figure_caption(path.stem)
        out.append(f"<figure><img src='{uri}' alt='{_esc(caption)}'><figcaption>{_esc(caption)} "
                   f"<span class='note'>(figures/{_esc(path.name)})</span></figcaption></figure>")
    if not figures:
        out.append("<p>No figures.</p>")
    out.append("</section>")

    out.append(f"<section id='how'><h2>How this was run</h2>{_how_html(run)}</section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(out_dir: str | os.PathLike, *, path: str | os.PathLike | None = None
                 ) -> tuple[Path, list[Finding]]:
    """Write ``<out_dir>/report.html`` (or ``path``) from the folder's tables, figures and ``run.json``;
    returns the path and the findings."""
    out_dir = Path(out_dir)
    tables = load_tables(out_dir)
    figures = sorted((out_dir / "figures").glob("*.png"))
    run = _read_run(out_dir)
    items = findings(tables)
    document = render_report(tables, figures, run, items=items, title=out_dir.name)
    target = Path(path) if path is not None else out_dir / REPORT_NAME
    tmp = target.with_suffix(f".html.tmp{os.getpid()}")
    tmp.write_text(document, encoding="utf-8")
    os.replace(tmp, target)
    return target, items
