"""cbir.report: findings from hand-made tables (ties, a clear best, p formatting, the background caveat),
the HTML layout, and the report of a real demo run opened in headless Chromium."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cbir import cli
from cbir.report import (RUN_SECTION, STUDY_SECTION, findings, findings_lines, format_p, load_tables,
                         render_report, write_report)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _match(rows: list[tuple[str, float, float, float]], k: int = 5, n: int = 60) -> pd.DataFrame:
    """A notebook-03-style match table: (metric, value, lo, hi) for category and sub-category alike."""
    return pd.DataFrame([{"run_id": 1, "features": "m / l / gap", "model": "m", "layer": "l", "pooling": "gap",
                          "weights": "imagenet", "variant": "original", "metric": metric, "k": k, "n_queries": n,
                          "category_match": v, "category_match_lo": lo, "category_match_hi": hi,
                          "subcategory_match": v - 0.1, "subcategory_match_lo": lo - 0.1,
                          "subcategory_match_hi": hi - 0.1} for metric, v, lo, hi in rows])


def _tests(pairs: list[tuple[str, str, float, float]], score: str = "category_match") -> pd.DataFrame:
    """Paired tests (a, b, mean_diff = a - b, p_holm) with the columns notebook 03 writes."""
    return pd.DataFrame([{"variant": "original", "a_model": "m", "a_layer": "l", "a_pooling": "gap", "a_metric": a,
                          "b_model": "m", "b_layer": "l", "b_pooling": "gap", "b_metric": b, "n": 60,
                          "mean_diff": d, "p_permutation": p / 3, "p_holm": p, "score": score}
                         for a, b, d, p in pairs])


def _one(items, analysis: str, section: str = RUN_SECTION):
    (found,) = [f for f in items if f.analysis.startswith(analysis) and f.section == section]
    return found


# ------------------------------------------------------------------------------------------ p formatting
@pytest.mark.parametrize("p, text", [(0.0, "< 0.001"), (0.0004, "< 0.001"), (0.00099, "< 0.001"),
                                     (0.001, "0.001"), (0.01234, "0.012"), (0.05, "0.050"), (1.0, "1.000"),
                                     (1.0000001, "1.000"), (float("nan"), "n/a"), (None, "n/a"), ("x", "n/a")])
def test_format_p_never_prints_zero(p, text):
    assert format_p(p) == text


# ---------------------------------------------------------------------------------------------- ties
def test_a_tie_under_the_paired_test_is_reported_as_a_tie():
    match = _match([("euclidean", 0.84, 0.77, 0.90), ("cosine", 0.86, 0.80, 0.92),
                    ("correlation", 0.85, 0.79, 0.91), ("chebyshev", 0.70, 0.62, 0.78)])
    # the best is the b side of some rows: mean_diff = a - b is negative there
    tests = _tests([("euclidean", "cosine", -0.02, 0.30), ("cosine", "correlation", 0.01, 0.60),
                    ("chebyshev", "cosine", -0.16, 0.0102), ("euclidean", "correlation", -0.01, 0.9),
                    ("euclidean", "chebyshev", 0.14, 0.02), ("correlation", "chebyshev", 0.15, 0.02)])
    f = _one(findings({"category_match": match, "paired_tests": tests}), "Category match")
    assert f.analysis == "Category match (top 5, 60 queries)"
    assert f.best == "cosine" and f.value == pytest.approx(0.86) and f.ci == (0.80, 0.92)
    assert f.is_tie and f.tied == ("euclidean", "correlation")
    assert f.lower == (("chebyshev", 0.0102),)
    assert f.text == ("tie: cosine 0.860 [0.800, 0.920] is highest but not separable from euclidean and "
                      "correlation (Holm p > 0.05); lower: chebyshev (Holm p = 0.010).")
    # the sub-category level has no tests in this table: nothing is claimed
    sub = _one(findings({"category_match": match, "paired_tests": tests}), "Sub-category match")
    assert sub.best == "cosine" and not sub.is_tie and not sub.lower
    assert sub.untested == ("euclidean", "correlation", "chebyshev")
    assert "no paired test against euclidean, correlation and chebyshev" in sub.text
    assert not sub.text.startswith("best")


def test_a_clearly_better_measure_is_named_best():
    match = _match([("euclidean", 0.70, 0.62, 0.78), ("cosine", 0.95, 0.91, 0.98), ("manhattan", 0.72, 0.64, 0.80)])
    tests = _tests([("euclidean", "cosine", -0.25, 0.0), ("cosine", "manhattan", 0.23, 0.0006),
                    ("euclidean", "manhattan", -0.02, 0.7)])
    f = _one(findings({"category_match": match, "paired_tests": tests}), "Category match")
    assert f.best == "cosine" and not f.is_tie and not f.untested
    assert f.lower == (("euclidean", 0.0), ("manhattan", 0.0006))
    assert f.text == ("best: cosine 0.950 [0.910, 0.980]; lower: euclidean (Holm p < 0.001), "
                      "manhattan (Holm p < 0.001).")
    assert "0.000" not in f.text


def test_without_holm_the_raw_p_is_named_and_one_measure_has_nothing_to_compare():
    match = _match([("euclidean", 0.80, 0.7, 0.9), ("cosine", 0.90, 0.85, 0.95)])
    tests = _tests([("cosine", "euclidean", 0.1, 0.03)]).drop(columns="p_holm").assign(p_permutation=0.03)
    f = _one(findings({"category_match": match, "paired_tests": tests}), "Category match")
    assert f.text == "best: cosine 0.900 [0.850, 0.950]; lower: euclidean (p = 0.030)."
    single = _one(findings({"category_match": _match([("cosine", 0.9, 0.8, 0.95)])}), "Category match")
    assert single.text == "cosine 0.900 [0.800, 0.950]; the only measure: nothing to compare."


def test_only_the_whole_image_variant_of_a_run_is_judged():
    match = pd.concat([_match([("cosine", 0.80, 0.7, 0.9), ("euclidean", 0.78, 0.7, 0.86)]),
                       _match([("cosine", 0.99, 0.98, 1.0)]).assign(variant="roi")], ignore_index=True)
    tests = _tests([("cosine", "euclidean", 0.02, 0.5)])
    f = _one(findings({"category_match": match, "paired_tests": tests}), "Category match")
    assert (f.best, f.value, f.tied) == ("cosine", 0.80, ("euclidean",))


# ------------------------------------------------------------------------------ colour and cross-validation
def _roi(measure: str, rows: list[tuple[str, float, float, float, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": "m", "layer": "l", "pooling": "gap", "metric": metric, "measure": measure,
                          "original": o, "cropped": c, "difference": c - o, "diff_lo": lo, "diff_hi": hi,
                          "p_value": p, "n_queries": 60, "original_masked": masked}
                         for metric, o, c, lo, hi, p, masked in rows])


def test_colour_agreement_carries_the_background_caveat_and_names_no_best():
    ct = pd.DataFrame({"variant": "original", "metric": ["cosine", "chebyshev"], "n_pairs": 300,
                       "color_corr_mean": [0.68, 0.72], "lbp_chi2_mean": [0.038, 0.040]})
    roi = pd.concat([_roi("color_corr", [("cosine", 0.68, 0.22, -0.55, -0.36, 0.0001, 0.20),
                                         ("chebyshev", 0.72, 0.19, -0.61, -0.42, 0.0001, 0.22)]),
                     _roi("lbp_chi2", [("cosine", 0.038, 0.032, -0.017, 0.004, 0.22, 0.03),
                                       ("chebyshev", 0.040, 0.034, -0.016, 0.004, 0.24, 0.03)]),
                     _roi("category_match", [("cosine", 0.98, 0.99, -0.003, 0.027, 0.37, np.nan),
                                             ("chebyshev", 0.91, 0.96, 0.01, 0.09, 0.004, np.nan)])])
    items = findings({"color_texture": ct, "roi_ablation": roi})
    colour = _one(items, "Colour agreement")
    assert colour.best is None  # no paired test: nothing is named best
    assert "0.680 to 0.720 across 2 candidates; highest: chebyshev 0.720 (no paired test" in colour.text
    assert colour.caveat == ("on the product alone (ROI mask) the same pairs correlate 0.200 to 0.220 instead of "
                             "0.680 to 0.720: about 70% of this agreement is the studio background, not the product "
                             "(cropping lowers it for every measure, -0.530 to -0.460, p < 0.001).")
    assert "Caveat: on the product alone" in colour.line()
    texture = _one(items, "Texture distance")
    assert "lowest: cosine 0.038" in texture.text
    assert texture.caveat == ("cropping to the product changes it by -0.006, not significantly (p > 0.05): "
                              "the background does not drive it.")
    ablation = _one(items, "Cropping to the product")
    assert ablation.text == ("category match changes by +0.010 to +0.050; significant for chebyshev +0.050 "
                             "(p = 0.004).")
    # without the ablation the caveat says the background share is unknown
    alone = _one(findings({"color_texture": ct}), "Colour agreement")
    assert "no ROI ablation" in alone.caveat and "unknown" in alone.caveat


def test_cross_validation_calls_means_within_one_fold_sd_a_tie():
    cv = pd.DataFrame({"variant": "original", "metric": ["euclidean", "cosine", "chebyshev"], "n_folds": 10,
                       "category_match_mean": [0.97, 0.98, 0.90], "category_match_std": [0.02, 0.015, 0.03],
                       "category_match_cv": [0.0206, 0.0153, 0.0333]})
    f = _one(findings({"cross_validation": cv}), "Cross-validation")
    assert f.best == "cosine" and f.tied == ("euclidean",)
    assert f.text == ("tie: cosine 0.980 ± 0.015 over 10 folds is highest, euclidean within one fold standard "
                      "deviation of it (no paired test); lower: chebyshev 0.900; steadiest: cosine "
                      "(coefficient of variation 0.015).")


# ------------------------------------------------------------------------------------------- the study
def test_the_study_compares_each_runs_best_measure_with_its_paired_tests():
    match = pd.concat([
        _match([("cosine", 0.90, 0.85, 0.95), ("euclidean", 0.88, 0.82, 0.93)]).assign(features="vgg16 / fc2"),
        _match([("cosine", 0.89, 0.84, 0.94), ("euclidean", 0.70, 0.6, 0.8)]).assign(features="resnet50 / avg_pool",
                                                                                     run_id=2),
        _match([("cosine", 0.60, 0.5, 0.7)]).assign(features="hog", run_id=3, weights="none (random init)"),
        _match([("cosine", 0.99, 0.98, 1.0)]).assign(features="vgg16 / fc2 (untrained)", run_id=4,
                                                     weights="none (random init)"),
    ], ignore_index=True)
    tests = pd.DataFrame({"score": "category_match", "best_features": "vgg16 / fc2", "best_metric": "cosine",
                          "other_features": ["resnet50 / avg_pool"], "other_metric": ["cosine"], "n_queries": 60,
                          "mean_diff": [0.01], "p_permutation": [0.4], "p_holm": [0.4]})
    f = _one(findings({"summary_match": match, "summary_paired_tests": tests}), "Category match", STUDY_SECTION)
    # random-init runs are left out while trained ones exist; each run competes with its best measure
    assert f.best == "vgg16 / fc2 · cosine" and f.tied == ("resnet50 / avg_pool · cosine",)
    assert f.text.startswith("tie: vgg16 / fc2 · cosine 0.900 [0.850, 0.950] is highest but not separable from "
                             "resnet50 / avg_pool · cosine (Holm p > 0.05).")
    lines = findings_lines(findings({"summary_match": match, "summary_paired_tests": tests}))
    assert lines[0] == f"{STUDY_SECTION}:" and lines[1].startswith("  Category match (top 5, 60 queries): tie:")


# ------------------------------------------------------------------------------------------------ HTML
def _folder(tmp_path: Path, *, failed: bool = False) -> Path:
    out = tmp_path / "run"
    (out / "tables").mkdir(parents=True)
    (out / "figures").mkdir()
    _match([("cosine", 0.86, 0.80, 0.92), ("chebyshev", 0.70, 0.62, 0.78)]).to_csv(out / "tables" /
                                                                                    "category_match.csv", index=False)
    _tests([("cosine", "chebyshev", 0.16, 0.0)]).to_csv(out / "tables" / "paired_tests.csv", index=False)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(out / "figures" / "match_heatmap.png")
    rng = np.random.default_rng(0)  # a large noisy figure: embedded as a smaller JPEG
    noise = rng.integers(0, 255, (900, 1800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(out / "figures" / "neighbours_cosine.png")
    notebooks = {"00_catalog_overview": {"status": "ok", "seconds": 3.2, "started": "2030-01-01T00:00:01"},
                 "03_category_evaluation": {"status": "ok", "seconds": 9.0, "started": "2030-01-01T00:00:05"}}
    if failed:
        notebooks["04_cross_validation"] = {"status": "failed", "seconds": 1.0, "started": "2030-01-01T00:00:09",
                                            "error": {"cell": 5, "ename": "ValueError", "evalue": "bad fold"}}
    run = {"name": "demo", "status": "failed" if failed else "ok", "started": "2030-01-01T00:00:00",
           "finished": "2030-01-01T00:01:00", "seconds": 60.0, "notebooks": notebooks,
           "parameters": {"name": "demo", "notebooks": ["00", "03", "04", "05"], "model": "efficientnet_lite0",
                          "catalog": "demo", "k": 5},
           "versions": {"numpy": "2.0", "keras": None}, "git": {"commit": "abc123def4567890", "dirty": True}}
    (out / "run.json").write_text(json.dumps(run))
    return out


def test_report_is_self_contained_findings_first_no_code(tmp_path):
    out = _folder(tmp_path)
    path, items = write_report(out)
    assert path == out / "report.html" and [f.best for f in items] == ["cosine", "cosine"]
    doc = path.read_text(encoding="utf-8")
    order = [doc.index(marker) for marker in ("id='findings'", "id='tables'", "id='figures'", "id='how'")]
    assert order == sorted(order)
    assert doc.index("best: cosine 0.860 [0.800, 0.920]; lower: chebyshev (Holm p &lt; 0.001).") < order[1]
    assert not re.search(r"<(script|pre|code|link|iframe)\b", doc)  # no code cells, no JavaScript, nothing external
    assert not re.search(r"(src|href)=['\"](?!data:)", doc)
    assert doc.count("data:image/png;base64,") == 1 and doc.count("data:image/jpeg;base64,") == 1
    assert "0.000" not in doc.split("id='tables'")[1].split("id='figures'")[0].split("p_holm")[1][:400]
    assert "<td>&lt; 0.001</td>" in doc  # p_holm = 0 in the table
    assert "For every row: run_id = 1; features = m / l / gap" in doc  # constant columns moved to the caption
    assert "problems" not in doc.split("id='findings'")[0]
    assert "abc123def456 (uncommitted changes)" in doc and "keras</dt><dd>not installed" in doc
    assert "efficientnet_lite0 · demo catalogue · finished 2030-01-01 00:01 · status ok" in doc
    assert path.stat().st_size < 1_500_000  # the 4.9 MB noise PNG went in as a JPEG at most 1400 px wide


def test_a_failed_notebook_is_said_at_the_top(tmp_path):
    path, _ = write_report(_folder(tmp_path, failed=True))
    doc = path.read_text(encoding="utf-8")
    alert = doc.index("This run did not finish cleanly")
    assert alert < doc.index("id='findings'")
    assert "04_cross_validation failed at cell 5: ValueError: bad fold." in doc
    assert "not run: notebooks 05." in doc


def test_an_empty_folder_still_gets_a_report(tmp_path):
    doc = render_report({}, [], {})
    assert "nothing to report" in doc and "No figures." in doc and "No run.json" in doc
    assert load_tables(tmp_path) == {}


# ------------------------------------------------------------------------------------- the real demo run
@pytest.mark.slow
def test_demo_run_prints_findings_quietly_and_writes_the_report(demo_run):
    assert demo_run["rc"] == 0, demo_run["stdout"][-3000:] + demo_run["stderr"][-3000:]
    out, stdout, stderr = demo_run["out"], demo_run["stdout"], demo_run["stderr"]
    # one line per notebook with its time, then the findings and the report's path
    assert len(re.findall(r"^\[demo\] \d\d_\w+ ok \(\d+\.\d s\)$", stdout, flags=re.M)) == 8
    tail = stdout.split("[demo] findings:")[1]
    assert re.search(r"Category match \(top 5, 60 queries\): (tie|best): ", tail)
    assert "Caveat: on the product alone (ROI mask)" in tail and "studio background" in tail
    assert f"[demo] report: {out / 'report.html'}" in stdout
    # quiet: no kernel warning, no TensorFlow start-up lines; the extraction's progress bar is on the terminal
    assert "without encryption" not in stderr and "oneDNN" not in stderr and "absl" not in stderr
    assert re.search(r"\[01\] .*100%\|", stderr)
    assert "oneDNN" in (out / "logs" / "01_feature_extraction.log").read_text()
    extraction = nbformat.read(out / "01_feature_extraction.ipynb", as_version=4)
    streams = [o for c in extraction.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type == "stream" and o.name == "stderr"]
    assert streams == []  # no pink block
    # the findings sit at the top of every executed notebook
    first = nbformat.read(out / "03_category_evaluation.ipynb", as_version=4).cells[1]
    assert "cbir-findings" in first.metadata["tags"] and "Category match (top 5, 60 queries)" in first.source


@pytest.mark.slow
def test_demo_report_in_headless_chromium(demo_run, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    report = demo_run["out"] / "report.html"
    assert report.is_file(), demo_run["stdout"][-2000:]
    size = report.stat().st_size
    assert size < 8_000_000, size
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        layout = page.evaluate("""() => {
            const h = document.querySelector('#findings h2');
            const img = document.querySelector('figure img');
            const imgs = [...document.querySelectorAll('img')];
            return {heading: h.textContent, headingTop: h.getBoundingClientRect().top + scrollY,
                    figureTop: img.getBoundingClientRect().top + scrollY,
                    before: !!(h.compareDocumentPosition(img) & Node.DOCUMENT_POSITION_FOLLOWING),
                    images: imgs.length, broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).length,
                    code: document.querySelectorAll('pre, code, script, .jp-Cell, .input_area').length,
                    firstFinding: document.querySelector('ul.findings li').innerText,
                    text: document.body.innerText};
        }""")
        page.screenshot(path=str(tmp_path / "report_top.png"))
        browser.close()
    assert layout["heading"] == "Findings"
    assert layout["before"] and layout["headingTop"] < layout["figureTop"]
    assert layout["headingTop"] < 900  # the findings are on the first screen
    assert layout["images"] >= 20 and layout["broken"] == 0
    assert layout["code"] == 0
    for snippet in ("import ", "In [", "cbir.", "def "):
        assert snippet not in layout["text"]
    assert layout["firstFinding"].startswith("Catalogue: 360 images")
    assert "0.000" not in " ".join(re.findall(r"p [=<] \S+", layout["text"]))
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert (tmp_path / "report_top.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------ shared with notebooks
def test_display_table_formats_p_values_and_explains_nothing_away():
    from cbir.verdicts import display_table

    raw = pd.DataFrame({"metric": ["cosine", "chebyshev"], "mean_diff": [0.01234, 0.0771],
                        "p_permutation": [0.0001, 0.2449], "p_holm": [0.0004, 1.0],
                        "original_masked": [0.2034, np.nan]})
    shown = display_table(raw)
    assert shown["p_holm"].tolist() == ["< 0.001", "1.000"] and shown["p_permutation"].tolist() == ["< 0.001",
                                                                                                     "0.245"]
    assert shown["mean_diff"].tolist() == [0.012, 0.077]
    assert shown["original_masked"].tolist() == ["0.203", "–"]  # a missing cell is a dash, not NaN
    assert raw["p_holm"].tolist() == [0.0004, 1.0]  # the data keeps its numbers


def test_point_estimate_verdict_names_no_best():
    from cbir.verdicts import point_estimate_verdict

    text = point_estimate_verdict(["manhattan", "chebyshev"], [0.663, 0.715], higher=True, what="colour")
    assert text == ("colour: 0.663 to 0.715 across 2 candidates; highest: chebyshev 0.715 (no paired test, so no "
                    "measure is named best).")
    assert point_estimate_verdict(["a", "b"], [0.04, 0.05], higher=False, what="cv").startswith(
        "cv: 0.040 to 0.050 across 2 candidates; lowest: a 0.040")
