"""cbir.search: exact k-NN for the six measures against scipy, the tie rule, search() options and
approximate search."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from cbir.search import ENGINES, METRICS, ApproximateIndex, ExactIndex, knn, recall_at_k, search, similarity

SCIPY_NAME = {"manhattan": "cityblock"}
ENGINE_CASES = [(m, e) for m in METRICS for e, served in ENGINES.items() if m in served]


def reference(C: np.ndarray, Q: np.ndarray, metric: str, k: int, p: float = 3.0):
    """float64 cdist + stable sort (ties by catalogue index)."""
    kw = {"p": p} if metric == "minkowski" else {}
    full = cdist(Q.astype(np.float64), C.astype(np.float64), SCIPY_NAME.get(metric, metric), **kw)
    order = np.argsort(full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, order, axis=1), order


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    C = rng.standard_normal((300, 37)).astype(np.float32)
    Q = rng.standard_normal((25, 37)).astype(np.float32)
    return C, Q


@pytest.mark.parametrize("metric,engine", ENGINE_CASES)
def test_knn_matches_scipy_cdist(data, metric, engine):
    C, Q = data
    D, I = knn(C, Q, metric, k=7, p=3, engine=engine)
    want_D, want_I = reference(C, Q, metric, 7)
    assert D.shape == I.shape == (25, 7) and I.dtype == np.int64
    np.testing.assert_array_equal(I, want_I)
    np.testing.assert_allclose(D, want_D, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1.5, 4.0])
def test_minkowski_other_p(data, p):
    C, Q = data
    D, I = knn(C, Q, "minkowski", k=4, p=p)
    want_D, want_I = reference(C, Q, "minkowski", 4, p=p)
    np.testing.assert_array_equal(I, want_I)
    np.testing.assert_allclose(D, want_D, rtol=1e-12)


@pytest.mark.parametrize("metric,engine", ENGINE_CASES)
def test_identical_catalogue_vectors_tie_in_index_order(metric, engine):
    # Large offsets and an odd dimension make the float32 BLAS expansion |y|^2 - 2xy round differently
    # for the copies; the exact float64 refinement must still give bit-identical distances.
    rng = np.random.default_rng(3)
    C = (rng.standard_normal((400, 131)) * 3 + 50).astype(np.float32)
    copies = [5, 77, 150, 151, 399]
    C[copies] = C[200]
    Q = np.vstack([C[200], C[200] + rng.standard_normal(131).astype(np.float32) * 1e-3,
                   rng.standard_normal((3, 131)).astype(np.float32) * 3 + 50])
    D, I = knn(C, Q, metric, k=8, engine=engine)
    group = sorted(copies + [200])
    for row in (0, 1):  # the six copies are the six nearest, in index order, with equal distances
        np.testing.assert_array_equal(I[row, :6], group)
        assert len(set(D[row, :6].tolist())) == 1
    if metric not in ("cosine", "correlation"):
        assert D[0, 0] == 0.0
    # k cuts through the tie: the lowest indices win
    _, I2 = knn(C, Q[:2], metric, k=3, engine=engine)
    np.testing.assert_array_equal(I2, [group[:3], group[:3]])
    want_D, want_I = reference(C, Q, metric, 8)
    np.testing.assert_array_equal(I, want_I)


@pytest.mark.parametrize("metric,engine", [("euclidean", "blas"), ("euclidean", "faiss"), ("cosine", "blas")])
def test_near_duplicates_are_ordered_exactly(metric, engine):
    # float32 |y|^2 - 2xy scores of these three are equal or misordered (about 0.03 apart at 3e5);
    # the exact refinement must put the true copy first
    rng = np.random.default_rng(4)
    C = (rng.standard_normal((400, 131)) * 3 + 50).astype(np.float32)
    x = C[20].copy()
    C[10] = x + (rng.standard_normal(131) * 2e-4).astype(np.float32)
    C[30] = x + (rng.standard_normal(131) * 1e-4).astype(np.float32)
    D, I = knn(C, x[None], metric, k=3, engine=engine)
    np.testing.assert_array_equal(I, [[20, 30, 10]])
    assert D[0, 0] == pytest.approx(0.0, abs=1e-15) and D[0, 0] < D[0, 1] < D[0, 2]


def test_equal_distances_of_different_vectors_break_by_index():
    # euclidean: four points at distance exactly 1 from the origin query
    C = np.array([[0, 2], [0, -1], [1, 0], [-1, 0], [0, 1], [3, 3]], dtype=np.float32)
    D, I = knn(C, np.zeros((1, 2), np.float32), "euclidean", k=4)
    np.testing.assert_array_equal(I, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(D, [[1, 1, 1, 1]])
    # cosine: 4x, x, 2x all have cosine distance 0 to x; scaling by powers of 2 is exact
    x = np.array([0.3, -1.7, 2.2], dtype=np.float32)
    C = np.vstack([-x, 4 * x, x, 2 * x])
    D, I = knn(C, x[None], "cosine", k=4)
    np.testing.assert_array_equal(I, [[1, 2, 3, 0]])
    assert D[0, 0] == D[0, 1] == D[0, 2] and D[0, 3] == pytest.approx(2.0)


def test_zero_and_constant_vectors_have_similarity_zero():
    C = np.array([[0, 0, 0], [1, 2, 3], [2, 2, 2]], dtype=np.float32)
    q = np.array([[1, 2, 3.5]], dtype=np.float32)
    D, I = knn(C, q, "cosine", k=3)
    assert I[0, 0] == 1 and D[0, 2] == pytest.approx(1.0)  # zero vector: distance 1
    D, I = knn(C, q, "correlation", k=3)
    np.testing.assert_array_equal(I, [[1, 0, 2]])  # [1,2,3] correlates; constant rows tie at distance 1
    np.testing.assert_allclose(D[0, 1:], [1.0, 1.0])


@pytest.mark.parametrize("metric,engine", [(m, e) for m, e in ENGINE_CASES if e in ("blas", "faiss")])
def test_near_ties_beyond_the_top_k_margin_fall_back_to_the_full_block(metric, engine, monkeypatch):
    # 40 copies of one vector: more equal scores than faiss' top-k' (k' = 2k + 10 = 16) can hold, so the
    # margin is not enough for the first two queries; they must be scored against the whole catalogue
    rng = np.random.default_rng(11)
    C = (rng.standard_normal((500, 29)) + 3).astype(np.float32)
    copies = np.sort(rng.choice(500, 40, replace=False))
    C[copies] = C[copies[0]]
    Q = np.vstack([C[copies[0]], C[copies[0]] + 1e-4, rng.standard_normal((4, 29)).astype(np.float32) + 3])
    calls = []
    original = ExactIndex._candidates_block
    monkeypatch.setattr(ExactIndex, "_candidates_block",
                        lambda self, Qf, err, k, engine=None: calls.append(len(Qf)) or original(self, Qf, err, k, engine))
    D, I = knn(C, Q, metric, k=3, engine=engine)
    assert calls and sum(calls) >= 2  # the tied queries fell back; the others did not need to
    want_D, want_I = reference(C, Q, metric, 3)
    np.testing.assert_array_equal(I, want_I)
    np.testing.assert_array_equal(I[0], copies[:3])  # the tie breaks by catalogue order
    np.testing.assert_allclose(D, want_D, rtol=1e-12, atol=1e-12)


def test_cosine_shares_unit_norm_catalogues_and_chebyshev_keeps_no_float64_copy(data):
    C, Q = data
    U = C / np.linalg.norm(C, axis=1, keepdims=True)  # normalised in float32: norms 1 +- a few 1e-8
    U[7] = U[8] * np.float32(1 + 5e-6)  # a near-copy of row 8, 5e-6 longer: inside the tolerance
    index = ExactIndex(U, "cosine")
    assert np.shares_memory(index._Xf, U) and 0 < index._unit_dev <= 1e-5  # no normalised copy
    want_D, want_I = reference(U, Q, "cosine", 6)
    D, I = index.search(Q, 6)
    np.testing.assert_array_equal(I, want_I)
    np.testing.assert_allclose(D, want_D, rtol=1e-12, atol=1e-12)
    _, I = index.search(U[8:9], 2)  # row 8 and its longer copy are both found (cosine distance ~1e-16)
    assert sorted(I[0]) == [7, 8]
    assert not np.shares_memory(ExactIndex(C, "cosine")._Xf, C)  # other norms: one normalised float32 copy
    assert not np.shares_memory(ExactIndex(U, "correlation")._Xf, U)  # correlation centres: a copy
    cheb = ExactIndex(C, "chebyshev")
    assert cheb.engine == "scipy" and cheb._Xf.dtype == np.float32 and np.shares_memory(cheb._Xf, C)
    np.testing.assert_array_equal(cheb.search(Q, 4)[1], reference(C, Q, "chebyshev", 4)[1])


def test_batching_does_not_change_results(data):
    C, Q = data
    for metric in METRICS:
        a = knn(C, Q, metric, k=5)
        b = knn(C, Q, metric, k=5, batch_size=4)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])


def test_index_reuse_and_input_errors(data):
    C, Q = data
    index = ExactIndex(C, "cosine")
    np.testing.assert_array_equal(index.search(Q, 3)[1], knn(C, Q, "cosine", k=3)[1])
    with pytest.raises(ValueError, match="k must be between 1 and the catalogue size 300"):
        index.search(Q, 301)
    with pytest.raises(ValueError, match="query_X has 5 columns but the catalogue has 37"):
        index.search(Q[:, :5], 3)
    with pytest.raises(ValueError, match="unknown metric 'hamming'"):
        knn(C, Q, "hamming")
    with pytest.raises(ValueError, match="minkowski needs a finite p >= 1"):
        knn(C, Q, "minkowski", p=0.5)
    bad = Q.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"query_X has NaN or infinite values in 1 row\(s\), e.g. rows \[3\]"):
        knn(C, bad, "euclidean")
    with pytest.raises(ValueError, match="engine 'blas' does not serve 'manhattan'"):
        knn(C, Q, "manhattan", engine="blas")


def test_similarity():
    d = np.array([[0.0, 0.25, 1.5]])
    np.testing.assert_allclose(similarity("cosine", d), [[1.0, 0.75, -0.5]])
    np.testing.assert_allclose(similarity("correlation", d), [[1.0, 0.75, -0.5]])
    assert np.isnan(similarity("euclidean", d)).all()


# ------------------------------------------------------------------------------------------ search()


def test_search_tidy_frame_and_exclude_self(line):
    ids, X, _ = line
    out = search(ids, X, ["c3", "c8"], X[[3, 8]], metric="euclidean", k=3)
    assert list(out.columns) == ["query_id", "rank", "neighbour_id", "distance", "similarity"]
    # c3 at x=3: neighbours c2 (1), c4 (1), c1 (2) -- itself excluded, tie c2/c4 by catalogue order
    assert out["query_id"].tolist() == ["c3"] * 3 + ["c8"] * 3
    assert out["rank"].tolist() == [1, 2, 3, 1, 2, 3]
    assert out["neighbour_id"].tolist() == ["c2", "c4", "c1", "c7", "c9", "c6"]
    assert out["distance"].tolist() == [1, 1, 2, 1, 1, 2]
    assert out["similarity"].isna().all()
    kept = search(ids, X, ["c3"], X[[3]], metric="euclidean", k=2, exclude_self=False)
    assert kept["neighbour_id"].tolist() == ["c3", "c2"]
    assert kept["distance"].tolist() == [0, 1]


def test_search_excludes_duplicate_group(line):
    ids, X, _ = line
    X = X.copy()
    X[4] = X[3]  # c4 a byte-identical copy of c3
    groups = {"c3": "c3", "c4": "c3"}  # other ids: no group
    out = search(ids, X, ["c3", "q"], X[[3, 3]], metric="manhattan", k=3, dup_groups=groups)
    # c1 and c5 tie at distance 2: index order
    assert out.loc[out["query_id"] == "c3", "neighbour_id"].tolist() == ["c2", "c1", "c5"]
    # an outside query with no group keeps both copies
    assert out.loc[out["query_id"] == "q", "neighbour_id"].tolist() == ["c3", "c4", "c2"]
    kept = search(ids, X, ["c3"], X[[3]], metric="manhattan", k=3, dup_groups=groups, exclude_duplicates=False)
    assert kept["neighbour_id"].tolist() == ["c4", "c2", "c1"]  # self excluded, its copy kept
    # pair-of-arrays form gives the same result
    arrays = (np.array([groups.get(i) for i in ids], dtype=object), np.array(["c3", None], dtype=object))
    same = search(ids, X, ["c3", "q"], X[[3, 3]], metric="manhattan", k=3, dup_groups=arrays)
    pd.testing.assert_frame_equal(out, same)


def test_search_same_category(line):
    ids, X, cats = line
    out = search(ids, X, ["c4", "c5"], X[[4, 5]], metric="chebyshev", k=2, same_category=True, categories=cats)
    # c4 (category a) may not see c5 (b) although it is nearest; and vice versa
    assert out["neighbour_id"].tolist() == ["c3", "c2", "c6", "c7"]
    everywhere = search(ids, X, ["c4"], X[[4]], metric="chebyshev", k=2)
    assert everywhere["neighbour_id"].tolist() == ["c3", "c5"]
    with pytest.raises(ValueError, match="same_category=True needs categories"):
        search(ids, X, ["c4"], X[[4]], metric="cosine", same_category=True)
    with pytest.raises(KeyError, match="category: no label for 1 image id"):
        search(ids, X, ["zz"], X[[4]], metric="cosine", same_category=True, categories=cats)


def test_search_same_category_small_category_returns_fewer(line):
    ids, X, _ = line
    cats = pd.Series(["a"] * 9 + ["b"], index=ids)
    out = search(ids, X, ["c9"], X[[9]], metric="euclidean", k=3, same_category=True, categories=cats)
    assert out.empty  # c9 is alone in 'b' and excluded as self
    cats = pd.Series(["a"] * 8 + ["b"] * 2, index=ids)
    out = search(ids, X, ["c9"], X[[9]], metric="euclidean", k=3, same_category=True, categories=cats)
    assert out["neighbour_id"].tolist() == ["c8"]


def test_search_matches_knn_on_random_data(data):
    C, Q = data
    ids = np.array([f"i{j}" for j in range(len(C))])
    qids = np.array([f"q{j}" for j in range(len(Q))])
    out = search(ids, C, qids, Q, metric="cosine", k=4)
    D, I = knn(C, Q, "cosine", k=4)
    assert out["neighbour_id"].tolist() == ids[I.ravel()].tolist()
    np.testing.assert_allclose(out["distance"], D.ravel())
    np.testing.assert_allclose(out["similarity"], 1 - D.ravel())


# -------------------------------------------------------------------------------------- approximate
def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "correlation"])
def test_approximate_recall_is_high_on_clustered_data(kind, metric):
    C = clustered(6000, 48, 30, seed=1)
    Q = clustered(200, 48, 30, seed=2)
    index = ApproximateIndex(C, metric=metric, kind=kind)
    D, I = index.search(Q, 10)
    exact_D, exact_I = knn(C, Q, metric, k=10)
    assert recall_at_k(I, exact_I) > 0.9
    hit = I == exact_I  # where the same neighbour is found, the distance is in the measure's own units
    np.testing.assert_allclose(D[hit], exact_D[hit], rtol=1e-4, atol=1e-4)


def test_recall_at_k_by_hand():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [4, 5, 6]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 3 + 1) / 2)
    assert recall_at_k(np.array([[-1, -1, 1]]), np.array([[1, 2, 3]])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        recall_at_k(approx[:, :2], exact)


def test_approximate_index_label_comes_from_its_own_settings():
    C = clustered(400, 8, 4, seed=3)
    hnsw = ApproximateIndex(C, metric="cosine", kind="hnsw")
    assert hnsw.settings == {"M": 32, "efConstruction": 200, "efSearch": 128}  # the defaults, as faiss holds them
    assert hnsw.label == "faiss HNSW (M=32, efSearch=128)"
    other = ApproximateIndex(C, metric="euclidean", kind="hnsw", hnsw_m=8, ef_search=40)
    assert other.index.hnsw.efSearch == 40 and other.label == "faiss HNSW (M=8, efSearch=40)"
    ivf = ApproximateIndex(C, metric="euclidean", kind="ivf", nlist=4, nprobe=2)
    assert ivf.index.nprobe == 2 and ivf.label == "faiss IVF (nlist=4, nprobe=2)"


def test_approximate_rejects_other_metrics():
    with pytest.raises(ValueError, match="supports 'euclidean', 'correlation', 'cosine'"):
        ApproximateIndex(np.ones((10, 3)), metric="manhattan")
