"""cbir.evaluate on hand-built cases (expected values worked out by hand in the comments), AP@k against
scikit-learn, paired tests between tuples, the ranking table, approximate recall and the cross-validation
protocol. The statistics themselves are tested in test_stats.py."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cbir import evaluate as ev
from cbir.search import ApproximateIndex, knn, recall_at_k, search


@pytest.fixture()
def neighbours():
    """Two measures, two queries, k = 3.

    cosine:    q1 -> n1 (A a1), n2 (A a2), n3 (B b1);  q2 -> n1 (A a1), n4 (B b2), n2 (A a2)
    euclidean: q1 -> n5 (A a1), n1 (A a1), n2 (A a2);  q2 -> n3 (B b1), n4 (B b2), n5 (A a1)
    """
    rows = []
    for metric, lists in (("cosine", {"q1": ["n1", "n2", "n3"], "q2": ["n1", "n4", "n2"]}),
                          ("euclidean", {"q1": ["n5", "n1", "n2"], "q2": ["n3", "n4", "n5"]})):
        for q, nbrs in lists.items():
            for r, n in enumerate(nbrs, start=1):
                rows.append({"model": "toy", "layer": None, "pooling": "gap", "metric": metric,
                             "query_id": q, "rank": r, "neighbour_id": n, "distance": r / 10 + (q == "q2") / 100})
    return pd.DataFrame(rows)


def test_per_query_scores(neighbours, labels):
    pq = ev.per_query(neighbours, labels).set_index(["metric", "query_id"])
    # cosine q1: category 2/3 (n1, n2), sub-category 1/3 (n1); q2: category 1/3 (n4), sub-category 0
    assert pq.loc[("cosine", "q1"), "category_match"] == pytest.approx(2 / 3)
    assert pq.loc[("cosine", "q1"), "subcategory_match"] == pytest.approx(1 / 3)
    assert pq.loc[("cosine", "q2"), "category_match"] == pytest.approx(1 / 3)
    assert pq.loc[("cosine", "q2"), "subcategory_match"] == 0
    assert pq.loc[("cosine", "q2"), "category_hit"] == 1 and pq.loc[("cosine", "q2"), "subcategory_hit"] == 0
    assert pq.loc[("euclidean", "q1"), "category_match"] == 1


def test_match_table_by_hand(neighbours, labels):
    table = ev.match_table(neighbours, labels, n_boot=500, hits=True)
    assert list(table.columns[:12]) == ev.MATCH_COLUMNS
    cos = table.set_index("metric").loc["cosine"]
    assert cos["k"] == 3 and cos["n_queries"] == 2
    assert cos["category_match"] == pytest.approx(0.5)          # (2/3 + 1/3) / 2
    assert cos["subcategory_match"] == pytest.approx(1 / 6)     # (1/3 + 0) / 2
    assert cos["category_hit"] == 1 and cos["subcategory_hit"] == pytest.approx(0.5)
    # two queries: the bootstrap means can only be the two per-query values or their mean
    assert cos["category_match_lo"] == pytest.approx(1 / 3) and cos["category_match_hi"] == pytest.approx(2 / 3)
    eu = table.set_index("metric").loc["euclidean"]
    assert eu["category_match"] == pytest.approx(5 / 6)          # (1 + 2/3) / 2
    assert eu["subcategory_match"] == pytest.approx(0.5)         # (2/3 + 1/3) / 2
    top2 = ev.match_table(neighbours, labels, k=2, n_boot=100).set_index("metric")
    assert top2.loc["cosine", "k"] == 2 and top2.loc["cosine", "category_match"] == pytest.approx(0.75)  # (1 + 1/2)/2
    assert list(ev.match_table(neighbours, labels, n_boot=10).columns) == ev.MATCH_COLUMNS


def test_match_by_rank_by_hand(neighbours, labels):
    t = ev.match_by_rank(neighbours, labels)
    cos = t[t["metric"] == "cosine"].set_index("rank")
    # rank 1: n1 for both: correct for q1 only; rank 2: n2 (A) for q1, n4 (B) for q2: category right, sub wrong
    assert cos["n_cases"].tolist() == [2, 2, 2]
    assert cos["category_correct"].tolist() == [1, 2, 0]
    assert cos["category_match"].tolist() == [0.5, 1.0, 0.0]
    assert cos["subcategory_correct"].tolist() == [1, 0, 0]
    assert cos["mean_distance"].tolist() == pytest.approx([0.105, 0.205, 0.305])


def test_match_by_subcategory_and_confusion(neighbours, labels):
    t = ev.match_by_subcategory(neighbours, labels)
    cos = t[t["metric"] == "cosine"].set_index("subcategory")
    assert cos.loc["a1", "category_match"] == pytest.approx(2 / 3) and cos.loc["a1", "n_queries"] == 1
    assert cos.loc["b1", "subcategory_match"] == 0
    with pytest.raises(ValueError, match="one .* tuple, got 2"):
        ev.confusion(neighbours, labels)
    c = ev.confusion(ev.select(neighbours, metric="cosine"), labels)
    assert list(c.index) == list(c.columns) == ["a1", "a2", "b1", "b2"]
    np.testing.assert_allclose(c.loc["a1"], [1 / 3, 1 / 3, 1 / 3, 0])   # n1, n2, n3
    np.testing.assert_allclose(c.loc["b1"], [1 / 3, 1 / 3, 0, 1 / 3])   # n1, n2, n4
    np.testing.assert_allclose(c.loc["b2"], 0)                           # not a query
    counts = ev.confusion(ev.select(neighbours, metric="cosine"), labels, level="category", normalize=False)
    assert counts.loc["A", "A"] == 2 and counts.loc["B", "A"] == 2 and counts.loc["B", "B"] == 1


def test_precision_recall_and_map_by_hand(neighbours, labels):
    cos = ev.select(neighbours, metric="cosine")
    pr = ev.precision_recall(cos, labels, level="category")
    # relevant searchable (all labelled images but the query itself): q1 (A): n1 n2 n5 -> 3; q2 (B): n3 n4 -> 2
    # q1 rel [1 1 0]: P 1, 1, 2/3; R 1/3, 2/3, 2/3.  q2 rel [0 1 0]: P 0, 1/2, 1/3; R 0, 1/2, 1/2
    np.testing.assert_allclose(pr["precision"], [0.5, 0.75, 0.5])
    np.testing.assert_allclose(pr["recall"], [1 / 6, 7 / 12, 7 / 12])
    m = ev.map_at_k(cos, labels, k=[2, 3], level="category").set_index("k")["map"]
    # AP@3: q1 (1 + 1) / min(3, 3) = 2/3; q2 (1/2) / min(2, 3) = 1/4.  AP@2: q1 2/2 = 1; q2 (1/2)/2 = 1/4
    assert m.loc[3] == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert m.loc[2] == pytest.approx((1 + 1 / 4) / 2)
    pk = ev.precision_at_k(cos, labels, k=2, level="subcategory")
    assert pk["precision"].tolist() == pytest.approx([0.25])  # q1 1/2 (n1), q2 0
    with pytest.raises(ValueError, match="lists stop at rank 3"):
        ev.precision_at_k(cos, labels, k=5)
    # a smaller searchable set changes R: n1..n4 searchable -> q1 R = 2 (n1, n2), q2 R = 2 (n3, n4)
    pr2 = ev.precision_recall(cos, labels, level="category", searchable=["n1", "n2", "n3", "n4"])
    assert pr2.loc[pr2["k"] == 2, "recall"].item() == pytest.approx((2 / 2 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="1 neighbour id.* not in the searchable set, e.g. \\['n4'\\]"):
        ev.precision_recall(cos, labels, searchable=["n1", "n2", "n3"])


def test_average_precision_matches_sklearn_on_full_ranking():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(5)
    n = 80
    ids = np.array([f"i{j}" for j in range(n)])
    X = rng.standard_normal((n, 6)).astype(np.float32)
    sub = rng.choice(["x", "y", "z"], size=n)
    labels = pd.DataFrame({"image_id": ids, "category": "all", "subcategory": sub})
    queries = ids[:10]
    nb = search(ids, X, queries, X[:10], metric="euclidean", k=n - 1)  # full ranking of the others
    ours = ev.map_at_k(nb, labels, k=n - 1, level="subcategory")["map"].item()
    D, I = knn(X, X[:10], "euclidean", k=n)
    aps = []
    for qi in range(10):
        others = I[qi] != qi
        y_true = sub[I[qi][others]] == sub[qi]
        aps.append(average_precision_score(y_true, -D[qi][others]))
    assert ours == pytest.approx(np.mean(aps), rel=1e-12)
    # per query through the public helper
    rel = (sub[I[:, 1:]] == sub[:10, None])
    R = np.array([(sub == sub[q]).sum() - 1 for q in range(10)])
    np.testing.assert_allclose(ev.average_precision_at_k(rel, R, n - 1), aps, rtol=1e-12)


def test_ranking_depth_and_table_by_hand(neighbours, labels):
    # depth raised to k and the deepest cut-off (10), capped at the searchable images
    assert ev.ranking_depth(100, k=5, n_catalog=300) == 100
    assert ev.ranking_depth(3, k=5, n_catalog=300) == 10
    assert ev.ranking_depth(100, k=5, n_catalog=40) == 40
    assert ev.ranking_depth(2, k=1, n_catalog=300, cutoffs=(2, 3)) == 3
    cos = ev.select(neighbours, metric="cosine")
    # lists stop at rank 3: cut-off 5 is left out; category P@2 = (1 + 1/2) / 2, R@2 = (2/3 + 1/2) / 2,
    # AP@2 = (1 + 1/4) / 2 (see test_precision_recall_and_map_by_hand)
    table = ev.ranking_table(cos, labels, k=(2, 5), level="category")
    assert list(table.columns) == [*ev.KEYS, "level", "k", "precision", "recall", "n_queries", "map"]
    assert table["k"].tolist() == [2]
    row = table.iloc[0]
    assert (row["precision"], row["recall"], row["map"]) == pytest.approx((0.75, 7 / 12, (1 + 1 / 4) / 2))
    assert row["n_queries"] == 2
    both = ev.ranking_table(neighbours, labels, k=(2, 3))
    assert len(both) == 2 * 2 * 2  # measures x levels x cut-offs
    with pytest.raises(ValueError, match="no cut-off of \\(5, 10\\) within the neighbour lists"):
        ev.ranking_table(cos, labels, k=(5, 10))


def test_approximate_recall_labels_each_row_with_the_index_settings():
    rng = np.random.default_rng(0)
    C = rng.standard_normal((500, 16)).astype(np.float32)
    Q = rng.standard_normal((20, 16)).astype(np.float32)
    table = ev.approximate_recall(C, Q, k=5)
    assert list(table.columns) == ["metric", "index", "k", "n_catalog", "recall_at_k"]
    assert table["metric"].tolist() == ["cosine", "euclidean"]
    assert set(table["index"]) == {"faiss HNSW (M=32, efSearch=128)"} and set(table["n_catalog"]) == {500}
    assert (table["recall_at_k"] > 0.9).all()  # 500 points: HNSW with efSearch 128 finds almost all
    exact = knn(C, Q, "euclidean", k=5)[1]
    assert table["recall_at_k"].iloc[1] == pytest.approx(
        recall_at_k(ApproximateIndex(C, metric="euclidean").search(Q, 5)[1], exact))
    small = ev.approximate_recall(C, Q, metrics=["euclidean"], k=5, hnsw_m=4, ef_search=5)
    assert small["index"].item() == "faiss HNSW (M=4, efSearch=5)"


def test_average_precision_at_k_definition():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    # row 0: (1/1 + 2/3) / min(5, 3) = 5/9; row 1: 0 / min(2, 3) = 0; row 2: R = 0 -> NaN
    got = ev.average_precision_at_k(rel, [5, 2, 0], 3)
    np.testing.assert_allclose(got[:2], [5 / 9, 0.0])
    assert np.isnan(got[2])


def test_compare_and_paired_tests(neighbours, labels):
    pq = ev.per_query(neighbours, labels)
    res = ev.compare(pq, {"metric": "euclidean"}, {"metric": "cosine"})
    assert res["n"] == 2 and res["mean_diff"] == pytest.approx(5 / 6 - 0.5)
    table = ev.paired_tests(pq, baseline={"metric": "cosine"})
    assert len(table) == 1 and table.loc[0, "a_metric"] == "euclidean" and table.loc[0, "b_metric"] == "cosine"
    assert table.loc[0, "p_holm"] == table.loc[0, "p_permutation"]


def test_paired_tests_with_one_measure_is_an_empty_table_with_the_columns(neighbours, labels):
    pq = ev.per_query(ev.select(neighbours, metric="cosine"), labels)
    for baseline in (None, {"metric": "cosine"}):
        table = ev.paired_tests(pq, baseline=baseline)
        assert table.empty and list(table.columns) == ev.PAIRED_TEST_COLUMNS
        assert table.set_index(["a_metric", "b_metric"])[["mean_diff", "p_holm"]].empty
    assert ev.PAIRED_TEST_COLUMNS[:8] == [f"{s}_{c}" for s in "ab" for c in ev.KEYS]
    # with two measures the table has the same columns
    assert list(ev.paired_tests(ev.per_query(neighbours, labels)).columns) == ev.PAIRED_TEST_COLUMNS

# -------------------------------------------------------------------------------- cross-validation
@pytest.fixture()
def line12():
    """Twelve images at x = 0..11: category A (i0-i5) / B (i6-i11), sub-categories by thirds of six."""
    ids = np.array([f"i{j}" for j in range(12)])
    X = np.stack([np.arange(12.0), np.zeros(12)], axis=1)
    sub = ["A-low"] * 3 + ["A-high"] * 3 + ["B-low"] * 3 + ["B-high"] * 3
    labels = pd.DataFrame({"image_id": ids, "category": [s[0] for s in sub], "subcategory": sub})
    return ids, X, labels


def test_cross_validate_protocol_by_hand(line12):
    ids, X, labels = line12
    folds = [np.array(["i4", "i5"]), np.array(["i0", "i9"]), np.array(["i2", "i7"])]
    per_fold, summary = ev.cross_validate(ids, X, labels, folds, metrics=["euclidean", "manhattan"], k=1,
                                          model="toy", pooling="gap")
    eu = per_fold[per_fold["metric"] == "euclidean"].set_index("fold")
    # fold 1: i4 -> i3 (i5 is in the fold, so not searchable): right; i5 -> i6 (B): wrong on both levels
    # fold 2: i0 -> i1 right; i9 -> i8 (tie with i10, index order): category right, sub-category wrong
    # fold 3: i2 -> i1 (tie with i3), i7 -> i6 (tie with i8): both right
    assert eu["category_match"].tolist() == [0.5, 1.0, 1.0]
    assert eu["subcategory_match"].tolist() == [0.5, 0.5, 1.0]
    assert eu["n_queries"].tolist() == [2, 2, 2]
    s = summary.set_index("metric").loc["euclidean"]
    assert s["n_folds"] == 3 and s["model"] == "toy"
    assert s["category_match_mean"] == pytest.approx(5 / 6)
    assert s["category_match_std"] == pytest.approx(np.sqrt(1 / 12))       # sample std (ddof=1)
    assert s["category_match_cv"] == pytest.approx(np.sqrt(1 / 12) / (5 / 6))
    assert s["subcategory_match_mean"] == pytest.approx(2 / 3)
    assert s["subcategory_match_cv"] == pytest.approx(np.sqrt(1 / 12) / (2 / 3))
    assert list(summary.columns) == ["model", "layer", "pooling", "metric", "n_folds", "category_match_mean",
                                     "category_match_std", "category_match_cv", "subcategory_match_mean",
                                     "subcategory_match_std", "subcategory_match_cv"]


def test_cross_validate_matches_a_brute_force_reference():
    rng = np.random.default_rng(2)
    n = 90
    ids = np.array([f"i{j}" for j in range(n)])
    sub = rng.choice(["s1", "s2", "s3", "s4"], size=n)
    X = rng.standard_normal((n, 5)) + (np.searchsorted(["s1", "s2", "s3", "s4"], sub)[:, None] == np.arange(5))
    labels = pd.DataFrame({"image_id": ids, "category": np.where(np.isin(sub, ["s1", "s2"]), "A", "B"),
                           "subcategory": sub})
    perm = rng.permutation(n)
    folds = [ids[perm[f * 8:(f + 1) * 8]] for f in range(5)]
    per_fold, _ = ev.cross_validate(ids, X, labels, folds, metrics=["cosine"], k=3)
    from scipy.spatial.distance import cdist

    for f, fold in enumerate(folds, start=1):
        keep = ~np.isin(ids, fold)
        full = cdist(X[np.isin(ids, fold)], X[keep], "cosine")
        q_sub = sub[np.isin(ids, fold)]
        top = np.argsort(full, axis=1, kind="stable")[:, :3]
        want = (sub[keep][top] == q_sub[:, None]).mean()
        got = per_fold.loc[per_fold["fold"] == f, "subcategory_match"].item()
        assert got == pytest.approx(want)


def test_cross_validate_rejects_bad_folds(line12):
    ids, X, labels = line12
    with pytest.raises(ValueError, match="not disjoint"):
        ev.cross_validate(ids, X, labels, [np.array(["i1", "i2"]), np.array(["i2", "i3"])], metrics=["cosine"])
    with pytest.raises(KeyError, match="fold ids without features"):
        ev.cross_validate(ids, X, labels, [np.array(["i1", "zz"])], metrics=["cosine"])


# ---------------------------------------------------------------- cross-validation with PCA whitening
def _anisotropic_cv_data():
    """80 images in four sub-categories whose label lives in a low-variance direction; four folds of 8."""
    rng = np.random.default_rng(7)
    n, d = 80, 12
    ids = np.array([f"i{j:02d}" for j in range(n)])
    sub = np.array(["s1", "s2", "s3", "s4"])[np.arange(n) % 4]
    X = rng.standard_normal((n, d)) * np.linspace(5.0, 0.2, d)
    X[:, 8] += 0.8 * (np.arange(n) % 4)
    labels = pd.DataFrame({"image_id": ids, "category": np.where(np.isin(sub, ["s1", "s2"]), "A", "B"),
                           "subcategory": sub})
    folds = [ids[f::5][:8] for f in range(4)]
    return ids, X, labels, folds


def test_cross_validate_without_whitening_is_unchanged():
    ids, X, labels, folds = _anisotropic_cv_data()
    per_fold, _ = ev.cross_validate(ids, X, labels, folds, metrics=["cosine", "euclidean"], k=3)
    # pinned before pca_whiten was added to cross_validate: correct neighbours out of 8 queries x 3
    assert (per_fold["category_match"] * 24).round(9).tolist() == [10, 11, 16, 11, 14, 14, 12, 12]
    assert (per_fold["subcategory_match"] * 24).round(9).tolist() == [7, 7, 12, 7, 10, 9, 7, 6]


def test_cross_validate_whitening_is_fitted_per_fold_without_its_queries(monkeypatch):
    from scipy.spatial.distance import cdist
    from sklearn.decomposition import PCA

    import cbir.postprocess as pp

    ids, X, labels, folds = _anisotropic_cv_data()
    row_id = {row.tobytes(): i for row, i in zip(X.astype(np.float64), ids)}
    fitted: list[set[str]] = []
    real_fit = pp.fit_pca_whitening

    def spy(X_fit, *args, **kwargs):
        fitted.append({row_id[r.tobytes()] for r in np.asarray(X_fit, dtype=np.float64)})
        return real_fit(X_fit, *args, **kwargs)

    monkeypatch.setattr(pp, "fit_pca_whitening", spy)
    per_fold, _ = ev.cross_validate(ids, X, labels, folds, metrics=["cosine"], k=3, pca_whiten=True)
    # one fit per fold, on exactly the images searchable in that fold: never the fold's queries
    assert fitted == [set(ids) - set(fold) for fold in folds]
    for f, fold in enumerate(folds, start=1):
        keep = ~np.isin(ids, fold)
        # reference: scikit-learn's whitening PCA on the 72 searchable rows, min(256, 72 // 4) = 18 -> rank 12
        pca = PCA(whiten=True, svd_solver="full").fit(X[keep])
        top = np.argsort(cdist(pca.transform(X[~keep]), pca.transform(X[keep]), "cosine"), axis=1,
                         kind="stable")[:, :3]
        want = (labels["subcategory"].to_numpy()[keep][top]
                == labels["subcategory"].to_numpy()[~keep][:, None]).mean()
        got = per_fold.loc[per_fold["fold"] == f, "subcategory_match"].item()
        assert got == pytest.approx(want)
    # the leaky version (one whitening fitted on every image, queries included) gives other numbers
    leaky = pp.apply_pca_whitening(real_fit(X, n_components=20), X)
    leaked, _ = ev.cross_validate(ids, leaky, labels, folds, metrics=["cosine"], k=3)
    assert not np.allclose(leaked["subcategory_match"], per_fold["subcategory_match"])


def test_whiten_for_fold_refuses_a_fit_that_holds_a_query():
    ids = np.array(["i01", "i07", "i09", "i11"])
    X = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(AssertionError, match=r"fold 3: .*whitening.*\['i07'\]"):
        ev.whiten_for_fold(ids, X, fit_ids=["i01", "i07", "i11"], query_ids=["i07", "i09"], fold=3)
    Z = ev.whiten_for_fold(ids, X, fit_ids=["i01", "i07", "i11"], query_ids=["i09"], fold=3)
    assert Z.shape == (4, 2) and np.allclose(np.linalg.norm(Z, axis=1), 1)  # cap max(2, 3 // 4) = 2, L2 rows
