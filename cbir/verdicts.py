"""Verdicts that do not overstate: short, honest statements drawn from result tables.

Pure functions on DataFrames (nothing read or written; nothing of cbir imported), shared by the analysis
(:mod:`cbir.summary`'s Table 15), the notebooks (03, 05, 08) and the report (:mod:`cbir.report`, a view):

- :func:`format_p`: a p-value for people (``"< 0.001"``, never ``0.000``); :func:`display_table` rounds a
  table for display and formats its p-value columns (the stored numbers stay raw);
- :func:`paired_lookup` + :func:`tie_verdict`: the top candidate against the others under the paired tests
  the notebooks saved; a candidate the test cannot separate from it (Holm-corrected p > :data:`ALPHA`) is a
  tie, never beaten; "best" only when every other is significantly lower;
- :func:`point_estimate_verdict`: where no paired test exists (colour/texture means, CV), the highest or
  lowest by point estimate, saying so and naming no best;
- :func:`background_caveat`: what the cropping ablation (notebook 06) says about colour/texture agreement;
- :func:`findings`: all of it for the tables of an output folder (:class:`Finding`, :func:`findings_lines`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["ALPHA", "RUN_SECTION", "STUDY_SECTION", "Finding", "PairedResult", "Verdict", "format_p",
           "p_clause", "display_table", "paired_lookup", "tie_verdict", "point_estimate_verdict",
           "background_caveat", "candidate_labels", "findings", "findings_lines", "plain"]

ALPHA = 0.05
"""Significance level of the verdicts: a pair with (Holm-corrected) p above it is reported as a tie."""
RUN_SECTION = "This run"
STUDY_SECTION = "Across the runs in the store (notebook 08)"


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


def p_clause(p: float, name: str = "p") -> str:
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


def plain(value: Any) -> str:
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


def candidate_labels(df: pd.DataFrame, *, with_features: bool | None = None) -> pd.Series:
    """One label per row: the measure, prefixed by the features (``"vgg16 / fc2 · cosine"``) when the table
    holds several feature runs (or when asked)."""
    metric = df["metric"].map(plain) if "metric" in df.columns else pd.Series("", index=df.index)
    if with_features is None:
        with_features = "features" in df.columns and df["features"].nunique(dropna=True) > 1
    if with_features and "features" in df.columns:
        return df["features"].map(plain) + " · " + metric
    return metric


def _is_random_init(weights: Any) -> bool:
    text = plain(weights).lower()
    return text.startswith("none") or "random" in text


def _drop_random_init(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with trained weights, unless every row is random-init (their features carry no meaning)."""
    if "weights" not in df.columns:
        return df
    random = df["weights"].map(_is_random_init)
    return df.loc[~random] if (~random).any() else df


@dataclass(frozen=True)
class PairedResult:
    """One paired test seen from the first key: ``p`` (Holm-corrected when ``holm``) and ``diff``, the mean
    of the first key minus the mean of the second."""

    p: float
    holm: bool
    diff: float


def paired_lookup(tests: pd.DataFrame | None, fields: Sequence[str], score: str, *,
                  prefixes: tuple[str, str] = ("a_", "b_")
                  ) -> dict[tuple[tuple[str, ...], tuple[str, ...]], PairedResult]:
    """Paired tests of ``score`` keyed both ways by ``((a fields), (b fields))``.

    ``tests``: notebook 03's ``paired_tests`` (``a_metric``, ``b_metric``, ...; ``prefixes=("a_", "b_")``) or
    notebook 08's ``summary_paired_tests`` (``best_features``, ``other_features``, ...; ``("best_", "other_")``);
    ``p_holm`` is used where present, else the raw ``p_permutation``. Fields missing on either side are
    ignored (an empty dict when none is left).
    """
    out: dict[tuple[tuple[str, ...], tuple[str, ...]], PairedResult] = {}
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
        a = tuple(plain(row[f"{pa}{f}"]) for f in fields)
        b = tuple(plain(row[f"{pb}{f}"]) for f in fields)
        holm = "p_holm" in row.index and not math.isnan(_num(row["p_holm"]))
        p = _num(row["p_holm"]) if holm else _num(row.get("p_permutation", row.get("p_value", np.nan)))
        diff = _num(row["mean_diff"]) if "mean_diff" in row.index else _num(row.get(mean_a)) - _num(row.get(mean_b))
        out[(a, b)] = PairedResult(p, holm, diff)
        out[(b, a)] = PairedResult(p, holm, -diff)
    return out


@dataclass(frozen=True)
class Verdict:
    """How the top candidate stands: ``kind`` is ``"best"`` (every other significantly lower), ``"tie"`` (the
    paired test cannot separate it from ``tied``), ``"highest"`` (top by point estimate only: some or all
    others untested) or ``"only"`` (nothing to compare); ``text`` says it in one sentence."""

    kind: str
    text: str
    tied: tuple[str, ...] = ()
    lower: tuple[tuple[str, float], ...] = ()
    untested: tuple[str, ...] = ()


def tie_verdict(best: str, value: float, ci: tuple[float, float] | None, others: Sequence[tuple[str, tuple]],
                best_key: tuple, tests: Mapping, *, alpha: float = ALPHA, what: str = "candidate") -> Verdict:
    """``best`` (label, score ``value``, 95% interval ``ci``) against ``others`` (``(label, key)``) under the
    paired ``tests`` (:func:`paired_lookup`, keyed by ``(best_key, key)``).

    An other is *tied* when its test gives p > ``alpha`` (or the best is not ahead of it), *lower* when
    p <= ``alpha``, *untested* without a test. "best" only when every other is lower; a tie says "tie:" first.
    """
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
        return Verdict("only", f"{head}; the only {what}: nothing to compare.")
    if tied:
        kind, text = "tie", f"tie: {head} is highest but not separable from {_join(tied)} ({pname} > {alpha:g})"
    elif lower and not untested:
        kind, text = "best", f"best: {head}"
    else:
        kind, text = "highest", f"highest: {head}"
    parts = [text]
    if lower:
        parts.append("lower: " + ", ".join(f"{label} ({p_clause(p, pname)})" for label, p in lower))
    if untested:
        parts.append(f"no paired test against {_join(untested)}")
    return Verdict(kind, "; ".join(parts) + ".", tuple(tied), tuple(lower), tuple(untested))


def point_estimate_verdict(labels: Sequence[str], values: Sequence[float], *, higher: bool, what: str) -> str:
    """Where no paired test exists: the range over the candidates and the top one by point estimate, saying
    that none is named best (``"<what>: 0.663 to 0.715 across 6 candidates; highest: chebyshev 0.715 (no
    paired test, so no measure is named best)."``)."""
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).any():
        return f"{what}: no values."
    top = int(np.nanargmax(values) if higher else np.nanargmin(values))
    if len(values) == 1:
        return f"{what}: {labels[top]} {_fmt(values[top])}."
    word = "highest" if higher else "lowest"
    return (f"{what}: {_range(values)} across {len(values)} candidates; {word}: {labels[top]} "
            f"{_fmt(values[top])} (no paired test, so no measure is named best).")


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
    labels = candidate_labels(data)
    fields = [f for f in ("model", "layer", "pooling", "metric") if f in data.columns]
    keys = [tuple(plain(row[f]) for f in fields) for _, row in data.iterrows()]
    tests = _original(tests)
    pairs = paired_lookup(tests, fields, score)
    values = pd.to_numeric(data[score]).to_numpy(dtype=float)
    best = int(np.argmax(values))
    ci = None
    if f"{score}_lo" in data.columns and f"{score}_hi" in data.columns:
        ci = (_num(data.at[best, f"{score}_lo"]), _num(data.at[best, f"{score}_hi"]))
    others = [(labels[i], keys[i]) for i in range(len(data)) if i != best]
    verdict = tie_verdict(labels[best], values[best], ci, others, keys[best], pairs, alpha=alpha, what="measure")
    return Finding(RUN_SECTION, analysis + _context(data), verdict.text, best=labels[best],
                   value=float(values[best]),
                   ci=ci, tied=verdict.tied, lower=verdict.lower, untested=verdict.untested)


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
    labels = candidate_labels(data, with_features=True)
    keys = [(plain(f), plain(m)) for f, m in zip(data["features"], data["metric"])]
    pairs = paired_lookup(tests, ("features", "metric"), score, prefixes=("best_", "other_"))
    best = 0
    ci = None
    if f"{score}_lo" in data.columns and f"{score}_hi" in data.columns:
        ci = (_num(data.at[best, f"{score}_lo"]), _num(data.at[best, f"{score}_hi"]))
    others = [(labels[i], keys[i]) for i in range(1, len(data))]
    verdict = tie_verdict(labels[best], float(data.at[best, "_v"]), ci, others, keys[best], pairs, alpha=alpha,
                       what="run")
    text = verdict.text
    if len(data) > 1:
        text += " Each run is represented by its best measure."
    return Finding(STUDY_SECTION, analysis + _context(data), text, best=labels[best], value=float(data.at[best, "_v"]),
                   ci=ci, tied=verdict.tied, lower=verdict.lower, untested=verdict.untested)


def _cv_finding(cv: pd.DataFrame | None, section: str, *, with_features: bool | None = None) -> Finding | None:
    """Cross-validation: highest mean category match over the folds; a tie is "within one fold SD" (no test)."""
    data = _original(cv) if section == RUN_SECTION else cv
    column = "category_match_mean"
    if data is None or data.empty or column not in data.columns:
        return None
    data = _drop_random_init(data.loc[pd.to_numeric(data[column], errors="coerce").notna()]).reset_index(drop=True)
    if data.empty:
        return None
    labels = candidate_labels(data, with_features=with_features)
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


def background_caveat(roi: pd.DataFrame | None, measure: str, *, alpha: float = ALPHA) -> str:
    """What the cropping ablation (notebook 06's ``roi_ablation`` rows of the whole-image variant) says about
    ``measure`` (``color_corr`` or ``lbp_chi2``): the share of the agreement that is the studio background."""
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
                     f"{p_clause(p.max()) if worst_p.startswith('<') else f'p ≤ {worst_p}'})")
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
    labels = candidate_labels(data, with_features=with_features)
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
        text = point_estimate_verdict(list(labels), values, higher=higher, what=what)
        out.append(Finding(section, analysis, text, best=None, value=float(values[best]),
                           caveat=background_caveat(roi, measure, alpha=alpha)))
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
            labels = candidate_labels(rows.reset_index(drop=True))
            sig = [f"{labels[i]} {_signed(diff.iloc[i])} ({p_clause(p.iloc[i])})"
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
        per = ", ".join(f"{_fmt(r['recall_at_k'])} ({plain(r.get('metric', ''))})" for _, r in rows.iterrows())
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




def _is_p_column(name: Any) -> bool:
    name = str(name)
    return name.startswith("p_") or name == "p_value"


def display_table(df: pd.DataFrame, *, decimals: int = 3, na: str = "–") -> pd.DataFrame:
    """A copy of ``df`` for showing: p-value columns (``p_*``) as :func:`format_p` text (``"< 0.001"``, never
    ``0.000``), other numbers rounded to ``decimals``, missing cells as ``na``. The stored tables keep their
    raw numbers; use this on what a notebook displays only."""
    out = df.copy()
    for column in out.columns:
        values = out[column]
        if _is_p_column(column):
            out[column] = [na if pd.isna(v) else format_p(v) for v in values]
        elif pd.api.types.is_float_dtype(values) and values.isna().any():  # text, so the decimals stay aligned
            out[column] = [na if pd.isna(v) else f"{v:.{decimals}f}" for v in values]
        elif pd.api.types.is_float_dtype(values):
            out[column] = values.round(decimals)
        elif values.isna().any():
            out[column] = values.astype(object).where(values.notna(), na)
    return out
