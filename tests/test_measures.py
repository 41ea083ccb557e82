"""The measure registry: every registered measure agrees with scipy, and adding one is one entry."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from cbir import measures, search
from cbir.measures import MEASURES, Measure, get_measure, measure_names, register_measure


def _exact_topk(X, Q, name, k, **kw):
    D = cdist(Q.astype(np.float64), X.astype(np.float64), name, **kw)
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1), order


def test_the_study_six_are_registered_in_order():
    assert measure_names() == ("euclidean", "manhattan", "minkowski", "chebyshev", "correlation", "cosine")
    assert search.METRICS == measure_names()
    assert measure_names(similarity=True) == ("correlation", "cosine")
    assert measure_names(faiss_index=True) == ("euclidean", "correlation", "cosine")
    assert get_measure("minkowski").params == {"p": 3.0}


@pytest.mark.parametrize("name", list(MEASURES))
def test_each_registered_measure_matches_scipy_on_every_engine(name):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 24)).astype(np.float32)
    Q = rng.normal(size=(17, 24)).astype(np.float32)
    m = get_measure(name)
    kw = {"p": 3.0} if "p" in m.params else {}
    D_ref, I_ref = _exact_topk(X, Q, m.scipy_name, 5, **kw)
    for engine in m.engines:
        D, I = search.knn(X, Q, name, k=5, p=3.0, engine=engine)
        np.testing.assert_array_equal(I, I_ref, err_msg=f"{name} via {engine}")
        np.testing.assert_allclose(D, D_ref, rtol=1e-12, atol=1e-12)


def test_adding_a_measure_is_one_entry():
    """The module docstring's example: Canberra, served by scipy, then exactly re-ranked."""
    def canberra(A, B, p):
        den = np.abs(A) + np.abs(B)
        return np.sum(np.divide(np.abs(A - B), den, out=np.zeros_like(A), where=den > 0), axis=1)

    register_measure(Measure(name="canberra", family="lp", engines=("scipy",), scipy_name="canberra",
                             exact=canberra, description="sum |x-y| / (|x|+|y|)"))
    try:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(200, 16)).astype(np.float32)
        Q = rng.normal(size=(9, 16)).astype(np.float32)
        D_ref, I_ref = _exact_topk(X, Q, "canberra", 4)
        D, I = search.knn(X, Q, "canberra", k=4)
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_allclose(D, D_ref, rtol=1e-12)
        assert np.isnan(search.similarity("canberra", D)).all()
        with pytest.raises(ValueError, match="does not serve 'canberra'"):
            search.knn(X, Q, "canberra", k=4, engine="blas")
    finally:
        del MEASURES["canberra"]


def test_registry_refuses_bad_entries_and_names_the_known_measures():
    with pytest.raises(ValueError, match="already registered"):
        register_measure(get_measure("cosine"))
    with pytest.raises(ValueError, match="family must be one of"):
        Measure(name="x", family="graph", exact=lambda a, b, p: a, engines=("scipy",), scipy_name="x")
    with pytest.raises(ValueError, match="blas only for angular or l2"):
        Measure(name="x", family="lp", exact=lambda a, b, p: a, engines=("blas",))
    with pytest.raises(ValueError, match="expected one of .*'euclidean'"):
        get_measure("hamming")
    with pytest.raises(ValueError, match="finite p >= 1"):
        get_measure("minkowski").check(0.5)
    get_measure("cosine").check(0.5)  # no p: nothing to check
    assert measures.FAMILIES == ("angular", "l2", "lp")
