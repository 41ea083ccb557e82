"""The post-processing registry: L2 and PCA whitening, and adding a step is one entry."""
from __future__ import annotations

import numpy as np
import pytest

from cbir import postprocess as pp
from cbir.postprocess import POSTPROCESSING, PostProcess, get_postprocess, register_postprocess


def test_pca_whitening():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 5.0  # correlated, off-centre
    pca = pp.fit_pca_whitening(X, seed=0)
    assert pca.whiten and pca.n_components_ == 6
    Z = pp.apply_pca_whitening(pca, X, l2_normalize=False)
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(6), atol=1e-4)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-5)
    U = pp.apply_pca_whitening(pca, X[:10])
    assert U.dtype == np.float32 and U.shape == (10, 6)
    np.testing.assert_allclose(np.linalg.norm(U, axis=1), 1.0, rtol=1e-5)
    assert pp.fit_pca_whitening(X, n_components=3).n_components_ == 3


def test_pca_whitening_keeps_numerical_rank():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(8, 50))  # 8 rows: centred rank 7
    pca = pp.fit_pca_whitening(X)
    assert pca.n_components_ == 7
    Z = pp.apply_pca_whitening(pca, X, l2_normalize=False)
    assert np.isfinite(Z).all() and np.abs(Z).max() < 10
    with pytest.raises(ValueError, match="zero variance"):
        pp.fit_pca_whitening(np.ones((5, 3)))


def test_registered_steps_and_a_new_step_is_one_entry():
    assert list(POSTPROCESSING) == ["l2", "pca_whiten"]
    X = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(get_postprocess("l2").apply(None, X), [[0.6, 0.8], [0, 0], [1, 0]], rtol=1e-6)
    register_postprocess(PostProcess("centre", lambda X: X.mean(axis=0), lambda mean, X: X - mean, "minus the mean"))
    try:
        out = get_postprocess("centre").fit_apply(X[:2], X)  # fitted on the first two rows only
        np.testing.assert_allclose(out, X - np.array([1.5, 2.0]))
    finally:
        del POSTPROCESSING["centre"]
    with pytest.raises(ValueError, match="already registered"):
        register_postprocess(get_postprocess("l2"))
    with pytest.raises(ValueError, match="unknown post-processing step 'zca'; expected one of l2, pca_whiten"):
        get_postprocess("zca")


def test_pca_whiten_step_keeps_a_quarter_of_the_fitted_images_at_most():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 30))
    assert [pp.whitening_components(n) for n in (4, 40, 400, 4000)] == [2, 10, 100, 256]
    Z = get_postprocess("pca_whiten").fit_apply(X[:40], X[:5], seed=0)
    assert Z.shape == (5, 10) and Z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)
