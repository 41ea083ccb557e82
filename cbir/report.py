"""The report of a run: ``outputs/<run>/report.html``, one self-contained file that a person can open or mail.

A view on what a run left in its output folder: the CSV tables under ``tables/`` that the notebooks write,
the figures under ``figures/`` and ``run.json``. Nothing is recomputed; of the analysis only the pure
:mod:`cbir.verdicts` is imported (analysis code never depends on this module).

- :func:`findings` (:func:`cbir.verdicts.findings`, re-exported) turns the tables into short, honest
  statements: per analysis the best model and measure with its 95% interval, where the paired tests the
  notebooks saved cannot separate it from another the two are reported as a tie, lower ones with their
  Holm-corrected p, and colour/texture agreement with the background caveat from the cropping ablation;
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
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from cbir.verdicts import (ALPHA, RUN_SECTION, STUDY_SECTION, Finding, findings, findings_lines, format_p,
                           plain)

__all__ = ["ALPHA", "RUN_SECTION", "STUDY_SECTION", "Finding", "findings", "format_p", "load_tables", "render_report", "write_report",
           "findings_lines", "REPORT_NAME"]

REPORT_NAME = "report.html"
MAX_TABLE_ROWS = 60
"""Tables longer than this are listed (name and size) instead of shown."""
IMAGE_INLINE_BYTES = 200_000
"""Figures larger than this are embedded as JPEG (photo grids compress ten-fold) at most
:data:`IMAGE_MAX_WIDTH` pixels wide; smaller ones as their PNG."""
IMAGE_MAX_WIDTH = 1400
_IDENTITY = ("run_id", "features", "model", "layer", "pooling", "weights", "variant")


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
            if column in shown.columns and shown[column].map(plain).nunique() == 1:
                constant.append(f"{column} = {plain(shown[column].iloc[0]) or '—'}")
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
