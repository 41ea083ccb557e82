"""cbir.summary (with cbir.runs, cbir.results and the cross-run figure) on a hand-built store: two fake runs
(one with result tables, one random-init run with only neighbours), run labels, collected result tables,
summary tables, Table 15 picks and save_result. Expected values worked out by hand in comments."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cbir import gallery
from cbir import results
from cbir import runs
from cbir import summary as sm
from cbir.plots import retrieval as plots
from cbir.store import FeatureStore

LABELS = pd.DataFrame({
    "image_id": ["q1", "q2", "n1", "n2", "n3", "n4"],
    "category": ["A", "B", "A", "A", "B", "B"],
    "subcategory": ["a1", "b1", "a1", "a2", "b1", "b2"],
    "split": ["query", "query", "catalog", "catalog", "catalog", "catalog"],
    "is_fashion": True,
})


def _match_row(metric, cat, cat_lo, cat_hi, sub, sub_lo, sub_hi):
    return {"model": "m1", "layer": "l1", "pooling": "gap", "metric": metric, "k": 5, "n_queries": 60,
            "category_match": cat, "category_match_lo": cat_lo, "category_match_hi": cat_hi,
            "subcategory_match": sub, "subcategory_match_lo": sub_lo, "subcategory_match_hi": sub_hi}


def _neighbours(lists):
    return pd.DataFrame([{"query_id": q, "rank": r, "neighbour_id": n, "distance": r / 10}
                         for q, nbrs in lists.items() for r, n in enumerate(nbrs, start=1)])


def _colour_row(model, layer, metric, corr, chi2):
    return {"model": model, "layer": layer, "pooling": "gap", "metric": metric, "n_pairs": 10,
            "color_corr_mean": corr, "color_corr_min": corr - 0.2, "color_corr_max": corr + 0.1,
            "lbp_chi2_mean": chi2, "lbp_chi2_min": chi2 / 2, "lbp_chi2_max": chi2 * 2}


@pytest.fixture()
def store(tmp_path):
    """Run 1 (m1, imagenet): category_match, cross_validation (with a run_id column) and color_texture tables;
    its colour table also holds a row of run 2 (its ``run_id`` column says so); a colour table saved without a
    run and without ``run_id`` has no owner and is dropped (nothing is guessed from model names).
    Run 2 (m2, random init): neighbours only, k = 2:

        cosine:    q1 -> n1 (A a1), n2 (A a2)   category 1,   sub-category 1/2
                   q2 -> n3 (B b1), n4 (B b2)   category 1,   sub-category 1/2
        euclidean: q1 -> n2 (A a2), n3 (B b1)   category 1/2, sub-category 0
                   q2 -> n3 (B b1), n1 (A a1)   category 1/2, sub-category 1/2
    """
    st = FeatureStore(tmp_path / "store.sqlite")
    st.put_catalog(LABELS)
    r1 = st.start_run({"model": "m1", "layer": "l1", "pooling": "gap", "weights": "imagenet", "variant": "original"})
    r2 = st.start_run({"model": "m2", "layer": "l2", "pooling": "gap", "weights": "none (random init)",
                       "variant": "original"})
    assert (r1, r2) == (1, 2)
    for run_id in (r1, r2):
        st.put_run_labels(run_id, LABELS)
    st.put_table("category_match", pd.DataFrame([_match_row("euclidean", 0.85, 0.75, 0.95, 0.55, 0.45, 0.65),
                                                  _match_row("cosine", 0.80, 0.70, 0.90, 0.60, 0.50, 0.70)]),
                 run_id=r1)
    st.put_table("cross_validation", pd.DataFrame({
        "run_id": [r1, r1], "model": "m1", "layer": "l1", "pooling": "gap", "metric": ["euclidean", "cosine"],
        "n_folds": 10, "category_match_mean": [0.8, 0.9], "category_match_std": [0.032, 0.045],
        "category_match_cv": [0.04, 0.05], "subcategory_match_mean": [0.5, 0.6],
        "subcategory_match_std": [0.06, 0.06], "subcategory_match_cv": [0.12, 0.10]}), run_id=r1)
    st.put_table("color_texture", pd.DataFrame([_colour_row("m1", "l1", "euclidean", 0.75, 0.05),
                                                _colour_row("m1", "l1", "cosine", 0.70, 0.03),
                                                _colour_row("m2", "l2", "cosine", 0.90, 0.01)]).assign(
        run_id=[r1, r1, r2]), run_id=r1)
    st.put_table("color_texture", pd.DataFrame([_colour_row("m2", "l2", "euclidean", 0.99, 0.0)]))
    st.put_neighbours(r2, "cosine", _neighbours({"q1": ["n1", "n2"], "q2": ["n3", "n4"]}))
    st.put_neighbours(r2, "euclidean", _neighbours({"q1": ["n2", "n3"], "q2": ["n3", "n1"]}))
    return st


def test_run_table_labels_random_init(store):
    table = runs.run_table(store).set_index("run_id")
    assert table.loc[1, "features"] == "m1 / l1 / gap"
    assert table.loc[2, "features"] == "m2 / l2 / gap (random init)"
    assert table["random_init"].tolist() == [False, True]


def test_features_label_parts():
    assert runs.features_label("vgg19", "block5_pool", "gap", weights="imagenet") == "vgg19 / block5_pool / gap"
    assert runs.features_label("lbp", None, None, weights="handcrafted") == "lbp"
    assert (runs.features_label("m", "l", "gem", weights="none (random init)", variant="roi", l2_normalize=True)
            == "m / l / gem +L2 [roi] (random init)")
    assert runs.features_label("m", None, "gap", weights="/w/ft.weights.h5") == "m / gap [weights: ft.weights.h5]"


def test_summary_match_from_tables_and_neighbours(store, tmp_path):
    result = sm.summarise(store, tmp_path / "out")
    match = result.match.set_index(["run_id", "metric"])
    assert list(result.match[["run_id", "metric"]].itertuples(index=False, name=None)) == [
        (1, "euclidean"), (1, "cosine"), (2, "euclidean"), (2, "cosine")]  # run, then METRICS order
    assert match.loc[(1, "euclidean"), "category_match"] == 0.85
    assert match.loc[(1, "euclidean"), "source"] == "category_match table"
    cos2, euc2 = match.loc[(2, "cosine")], match.loc[(2, "euclidean")]
    assert cos2["source"] == "recomputed from neighbours" and cos2["features"] == "m2 / l2 / gap (random init)"
    assert cos2["k"] == 2 and cos2["n_queries"] == 2
    assert cos2["category_match"] == pytest.approx(1.0) and cos2["subcategory_match"] == pytest.approx(0.5)
    assert (cos2["category_match_lo"], cos2["category_match_hi"]) == pytest.approx((1.0, 1.0))
    # euclidean: category (1/2 + 1/2) / 2, sub-category (0 + 1/2) / 2; bootstrap means of {0, 1/2} are
    # 0, 1/4, 1/2 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5% percentiles are 0 and 1/2
    assert euc2["category_match"] == pytest.approx(0.5) and euc2["subcategory_match"] == pytest.approx(0.25)
    assert (euc2["subcategory_match_lo"], euc2["subcategory_match_hi"]) == pytest.approx((0.0, 0.5))
    csv = pd.read_csv(tmp_path / "out" / "tables" / "summary_match.csv")
    assert len(csv) == 4 and csv.loc[3, "subcategory_match"] == 0.5
    assert set(sm.SUMMARY_TABLES.values()) <= {p.stem for p in (tmp_path / "out" / "tables").glob("*.csv")}


def test_collected_tables_are_attributed_to_runs(store):
    cv = results.collect_cross_validation(store)
    assert cv["run_id"].tolist() == [1, 1] and list(cv.columns[:len(results.CV_COLUMNS)]) == results.CV_COLUMNS
    colour = results.collect_color_texture(store).set_index(["run_id", "metric"])
    # the row stored in run 1's table with run_id 2 belongs to run 2; the ownerless table is dropped
    assert sorted(colour.index) == [(1, "cosine"), (1, "euclidean"), (2, "cosine")]
    assert colour.loc[(2, "cosine"), "weights"] == "none (random init)"
    assert colour.loc[(2, "cosine"), "color_corr_mean"] == 0.90


def test_best_per_analysis_picks(store, tmp_path):
    result = sm.summarise(store, tmp_path / "out")
    best = result.best.set_index("analysis")
    assert list(best.index) == [a[0] for a in sm.ANALYSES]
    # random-init run 2 is left out: category match 0.85 (run 1, euclidean) beats 0.80 (run 1, cosine)
    row = best.loc["category match"]
    assert (row["run_id"], row["metric"], row["value"]) == (1, "euclidean", 0.85)
    assert (row["ci_lo"], row["ci_hi"]) == (0.75, 0.95)
    assert row["note"] == "2 random-init row(s) left out"
    assert (best.loc["sub-category match", "metric"], best.loc["sub-category match", "value"]) == ("cosine", 0.60)
    assert (best.loc["CV stability (category)", "metric"], best.loc["CV stability (category)", "value"]) == (
        "euclidean", 0.04)
    assert best.loc["CV stability (sub-category)", "metric"] == "cosine"
    assert np.isnan(best.loc["CV stability (sub-category)", "ci_lo"])
    # colour: run 2's 0.90 is random init, so run 1 euclidean 0.75; texture: lowest chi-square 0.03 (run 1 cosine)
    assert (best.loc["colour correlation", "run_id"], best.loc["colour correlation", "value"]) == (1, 0.75)
    assert (best.loc["texture", "metric"], best.loc["texture", "value"]) == ("cosine", 0.03)
    csv = pd.read_csv(tmp_path / "out" / "tables" / "best_per_analysis.csv").set_index("analysis")
    assert csv.loc["texture", "features"] == "m1 / l1 / gap"

    everything = sm.best_per_analysis(result.match, result.cross_validation, result.color_texture,
                                      exclude_random_init=False).set_index("analysis")
    assert everything.loc["category match", "run_id"] == 2 and everything.loc["category match", "value"] == 1.0
    assert everything.loc["texture", "value"] == 0.01


def test_missing_analyses_reported_not_raised(store, tmp_path):
    missing = sm.summarise(store).missing
    assert list(missing[["run_id", "analysis"]].itertuples(index=False, name=None)) == [(2, "cross_validation")]

    empty = FeatureStore(tmp_path / "empty.sqlite")
    empty.start_run({"model": "m3", "weights": "imagenet"})
    result = sm.summarise(empty, tmp_path / "empty_out")
    assert result.match.empty and result.cross_validation.empty and result.color_texture.empty
    assert result.best["note"].str.startswith("missing").all() and result.best["run_id"].isna().all()
    assert sorted(result.missing["analysis"]) == ["category_match", "color_texture", "cross_validation"]
    assert pd.read_csv(tmp_path / "empty_out" / "tables" / "summary_cross_validation.csv").empty
    assert sm.summarise(FeatureStore(tmp_path / "none.sqlite")).missing["analysis"].tolist() == ["all"]


def test_save_result_writes_csv_and_store(tmp_path):
    st = FeatureStore(tmp_path / "s.sqlite")
    run_id = st.start_run({"model": "m"})
    df = pd.DataFrame({"metric": ["cosine", "euclidean"], "category_match": [0.123456, 2 / 3]})
    path = results.save_result(st, "category_match", df, run_id=run_id, out_dir=tmp_path / "out")
    assert path == tmp_path / "out" / "tables" / "category_match.csv"
    assert pd.read_csv(path)["category_match"].tolist() == [0.1235, 0.6667]
    pd.testing.assert_frame_equal(st.table("category_match", run_id), df)  # unrounded in the store
    with pytest.raises(ValueError, match="plain file stem"):
        results.save_result(st, "../x", df, run_id=run_id, out_dir=tmp_path)


def test_ids_with_features_and_neighbour_overview(tmp_path):
    st = FeatureStore(tmp_path / "s.sqlite")
    run_id = st.start_run({"model": "m"})
    st.put_features(run_id, ["q1", "n1", "n2", "n3"], np.eye(4, dtype=np.float32))  # q2, n4 failed
    queries, searchable = runs.ids_with_features(st, run_id, LABELS)
    assert queries.tolist() == ["q1"] and searchable.tolist() == ["n1", "n2", "n3"]

    nb = _neighbours({"q1": ["n1", "n3"]}).assign(metric="cosine")
    view = gallery.neighbour_overview(nb, LABELS, ["q1"])
    assert view.loc[("q1", "a1", "cosine")].tolist() == ["+ a1 0.100", "- b1 0.200"]


def test_heatmap_annotates_confidence_intervals(store, tmp_path):
    result = sm.summarise(store)
    fig = plots.plot_match_ci_heatmap(result.match, path=tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "85.0\n[75.0, 95.0]" in texts and "100.0\n[100.0, 100.0]" in texts
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["m1 / l1 / gap", "m2 / l2 / gap (random init)"]


def test_paired_tests_across_runs_compare_each_runs_best_measure_on_common_queries(tmp_path):
    """Three runs on the same two queries (k = 2). Sub-category match per query (worked out by hand):

        run 1 (a, imagenet)  cosine: q1 -> n1 (a1), n2 (a2) = 1/2; q2 -> n3 (b1), n4 (b2) = 1/2  mean 0.5
                             euclidean: q1 -> n2, n3 = 0;      q2 -> n4, n1 = 0               mean 0
        run 2 (b, imagenet)  cosine: q1 -> n1, n3 = 1/2;  q2 -> n3, n1 = 1/2                      mean 0.5
        run 3 (c, imagenet)  cosine: q1 -> n2, n4 = 0;  q2 -> n4, n2 = 0                    mean 0
    Best tuple: run 1 cosine (ties with run 2 go to the earlier run). Differences per query: vs run 2 (0, 0) ->
    mean 0, p = 1; vs run 3 (1/2, 1/2) -> mean 1/2; with 2 queries the exact sign-flip p-value is 2/4 = 0.5.
    """
    st = FeatureStore(tmp_path / "s.sqlite")
    st.put_catalog(LABELS)
    for model in ("a", "b", "c"):
        run_id = st.start_run({"model": model, "layer": "l", "pooling": "gap", "weights": "imagenet",
                               "variant": "original"})
        st.put_run_labels(run_id, LABELS)
    st.put_neighbours(1, "cosine", _neighbours({"q1": ["n1", "n2"], "q2": ["n3", "n4"]}))
    st.put_neighbours(1, "euclidean", _neighbours({"q1": ["n2", "n3"], "q2": ["n4", "n1"]}))
    st.put_neighbours(2, "cosine", _neighbours({"q1": ["n1", "n3"], "q2": ["n3", "n1"]}))
    st.put_neighbours(3, "cosine", _neighbours({"q1": ["n2", "n4"], "q2": ["n4", "n2"]}))
    match = results.collect_match(st, n_boot=200)
    paired = sm.paired_tests_across_runs(st, match, score="subcategory_match")
    assert list(paired.columns) == sm.PAIRED_COLUMNS
    assert paired["best_features"].unique().tolist() == ["a / l / gap"]
    assert paired["best_metric"].unique().tolist() == ["cosine"]
    rows = paired.set_index("other_features")
    assert rows.loc["b / l / gap", "mean_diff"] == pytest.approx(0.0)
    assert rows.loc["b / l / gap", "p_permutation"] == pytest.approx(1.0)
    assert rows.loc["c / l / gap", "mean_diff"] == pytest.approx(0.5)
    assert rows.loc["c / l / gap", "mean_other"] == pytest.approx(0.0)
    assert rows.loc["c / l / gap", "p_permutation"] == pytest.approx(0.5)
    assert (rows["n_queries"] == 2).all()
    assert (rows["p_holm"] >= rows["p_permutation"]).all()


# ------------------------------------------------------------------------- Table 15 verdicts (hand-made tables)
def _t15_match() -> pd.DataFrame:
    """Run 1 ("vgg") with four measures, run 2 ("res") with two; the numbers of notebook 03's demo run."""
    rows = [(1, "vgg", "manhattan", 0.993, 0.983, 1.0), (1, "vgg", "euclidean", 0.983, 0.963, 0.997),
            (1, "vgg", "cosine", 0.980, 0.960, 0.993), (1, "vgg", "chebyshev", 0.917, 0.873, 0.957),
            (2, "res", "cosine", 0.900, 0.850, 0.950), (2, "res", "euclidean", 0.850, 0.800, 0.900)]
    return pd.DataFrame([{"run_id": r, "features": f, "model": f, "weights": "imagenet", "metric": m,
                          "category_match": v, "category_match_lo": lo, "category_match_hi": hi,
                          "subcategory_match": v - 0.1, "subcategory_match_lo": lo - 0.1,
                          "subcategory_match_hi": hi - 0.1} for r, f, m, v, lo, hi in rows])


def _run_paired(p_close: float) -> pd.DataFrame:
    """Run 1's notebook-03 paired tests (category match): manhattan against the others."""
    return pd.DataFrame({"run_id": 1, "score": "category_match", "a_metric": "manhattan",
                         "b_metric": ["euclidean", "cosine", "chebyshev"], "mean_diff": [0.01, 0.013, 0.077],
                         "p_permutation": [0.2, 0.1, 0.0001], "p_holm": [p_close, p_close, 0.001]})


_ACROSS = pd.DataFrame({"score": ["category_match"], "best_features": ["vgg"], "best_metric": ["manhattan"],
                        "other_features": ["res"], "other_metric": ["cosine"], "mean_diff": [0.093],
                        "p_permutation": [0.001], "p_holm": [0.002]})


def test_table15_reports_a_tie_under_the_paired_test_as_a_tie():
    best = sm.best_per_analysis(_t15_match(), pd.DataFrame(), pd.DataFrame(), paired=_ACROSS,
                                run_paired=_run_paired(1.0)).set_index("analysis")
    row = best.loc["category match"]
    assert (row["features"], row["metric"], row["ci_lo"], row["ci_hi"]) == ("vgg", "manhattan", 0.983, 1.0)
    assert row["verdict"] == (
        "tie: vgg · manhattan 0.993 [0.983, 1.000] is highest but not separable from vgg · euclidean and "
        "vgg · cosine (Holm p > 0.05); lower: vgg · chebyshev (Holm p = 0.001), res · cosine (Holm p = 0.002). "
        "Other runs are represented by their best measure.")
    # the sub-category level has no paired test in these tables: "highest", never "best"
    assert best.loc["sub-category match", "verdict"].startswith("highest: vgg · manhattan 0.893")
    assert "no paired test against vgg · euclidean, vgg · cosine, vgg · chebyshev and res · cosine" in best.loc[
        "sub-category match", "verdict"]


def test_table15_names_a_clear_winner_best():
    best = sm.best_per_analysis(_t15_match(), pd.DataFrame(), pd.DataFrame(), paired=_ACROSS,
                                run_paired=_run_paired(0.01)).set_index("analysis")
    assert best.loc["category match", "verdict"] == (
        "best: vgg · manhattan 0.993 [0.983, 1.000]; lower: vgg · euclidean (Holm p = 0.010), vgg · cosine "
        "(Holm p = 0.010), vgg · chebyshev (Holm p = 0.001), res · cosine (Holm p = 0.002). "
        "Other runs are represented by their best measure.")


def test_table15_colour_names_no_best_and_carries_the_background_caveat():
    """Chebyshev agrees most in colour but retrieves worst; 70% of its colour agreement is background."""
    ct = pd.DataFrame({"run_id": 1, "features": "vgg", "model": "vgg", "weights": "imagenet",
                       "metric": ["manhattan", "euclidean", "cosine", "chebyshev"],
                       "color_corr_mean": [0.663, 0.676, 0.679, 0.715], "lbp_chi2_mean": [0.040, 0.039, 0.039, 0.041]})
    roi = pd.DataFrame({"run_id": 1, "variant": "original", "metric": ["cosine", "chebyshev"], "measure": "color_corr",
                        "original": [0.68, 0.72], "cropped": [0.22, 0.19], "difference": [-0.46, -0.53],
                        "diff_lo": [-0.55, -0.61], "diff_hi": [-0.36, -0.42], "p_value": [0.0001, 0.0001],
                        "original_masked": [0.20, 0.22]})
    best = sm.best_per_analysis(_t15_match(), pd.DataFrame(), ct, roi_ablation=roi).set_index("analysis")
    row = best.loc["colour correlation"]
    assert row["metric"] == "chebyshev"
    assert row["verdict"] == (
        "mean colour correlation of query-neighbour pairs: 0.663 to 0.715 across 4 candidates; highest: chebyshev "
        "0.715 (no paired test, so no measure is named best). Its category match is 0.917, the lowest of 4 "
        "measures of its run.")
    assert row["caveat"].startswith("on the product alone (ROI mask) the same pairs correlate 0.200 to 0.220 "
                                    "instead of 0.680 to 0.720: about 70% of this agreement is the studio background")
    assert best.loc["texture", "verdict"].startswith("mean LBP chi-square of query-neighbour pairs: 0.039 to 0.041 "
                                                     "across 4 candidates; lowest: euclidean 0.039 (no paired test")
    lines = sm.verdict_lines(best.reset_index())
    assert "    caveat: on the product alone" in lines[lines.index(f"colour correlation: {row['verdict']}") + 1]


def test_stored_paired_tests_keep_every_row_of_every_run(tmp_path):
    st = FeatureStore(tmp_path / "s.sqlite")
    r1, r2 = (st.start_run({"model": m}) for m in ("m1", "m2"))
    assert sm.stored_paired_tests(st).empty
    st.put_table("paired_tests", _run_paired(1.0).drop(columns="run_id"), run_id=r1)
    st.put_table("paired_tests", _run_paired(0.01).drop(columns="run_id").iloc[:1], run_id=r2)
    tests = sm.stored_paired_tests(st)
    assert tests["run_id"].tolist() == [r1, r1, r1, r2]
    assert tests.loc[tests["run_id"] == r1, "b_metric"].tolist() == ["euclidean", "cosine", "chebyshev"]
