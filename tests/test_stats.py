"""cbir.stats: bootstrap CI, sign-flip and Wilcoxon paired tests, Holm; checked by hand and against
scipy.stats.bootstrap / scipy.stats.permutation_test on the same data."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from cbir.stats import bootstrap_ci, holm, paired_test, sign_flip_p


def _handwritten_bootstrap(v, n_boot=2000, seed=0, ci=0.95):
    """The earlier hand-written percentile bootstrap (kept here as the reference the demo numbers came from)."""
    v = np.asarray(v, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, (1 << 22) // len(v))
    for s in range(0, n_boot, step):
        idx = rng.integers(0, len(v), size=(min(step, n_boot - s), len(v)))
        means[s:s + len(idx)] = v[idx].mean(axis=1)
    alpha = 100 * (1 - ci) / 2
    return tuple(np.percentile(means, [alpha, 100 - alpha]))


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 6, 60) / 5
    lo, hi = bootstrap_ci(v, n_boot=2000, seed=0)
    assert lo < v.mean() < hi
    assert (lo, hi) == bootstrap_ci(v, n_boot=2000, seed=0)
    assert (lo, hi) != bootstrap_ci(v, n_boot=2000, seed=1)
    # about +- 1.96 standard errors
    se = v.std(ddof=1) / np.sqrt(len(v))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4), abs=1e-15)
    assert all(np.isnan(bootstrap_ci([])))


def test_paired_test_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    b = rng.integers(0, 6, 60) / 5
    a = np.clip(b + rng.choice([0.0, 0.2, 0.4], size=60, p=[0.4, 0.4, 0.2]), 0, 1)
    real = paired_test(a, b)
    assert real["mean_diff"] > 0.1 and real["diff_lo"] > 0
    assert real["p_permutation"] < 0.001 and real["p_wilcoxon"] < 0.001
    c = rng.integers(0, 6, 60) / 5
    d = rng.integers(0, 6, 60) / 5
    null = paired_test(c, d)
    assert null["p_permutation"] > 0.05 and null["p_wilcoxon"] > 0.05
    assert null["diff_lo"] < 0 < null["diff_hi"]
    assert paired_test(c, d) == null  # seeded
    same = paired_test(c, c)
    assert same["p_permutation"] == 1.0 and same["p_wilcoxon"] == 1.0


def test_paired_test_exact_enumeration_by_hand():
    # four differences of +1: of the 16 sign patterns only all-plus and all-minus reach |mean| = 1
    assert paired_test([1, 1, 1, 1], [0, 0, 0, 0])["p_permutation"] == pytest.approx(2 / 16)
    # differences (1, -1, 2), observed |sum| = 2; the 8 sign patterns give sums
    # 2, -2, 4, 0, 0, -4, 2, -2 -> |sum| >= 2 in 6 of 8
    assert paired_test([1, 0, 2], [0, 1, 0])["p_permutation"] == pytest.approx(6 / 8)


@pytest.mark.parametrize("n", [2, 7, 60, 333, 2500])  # 2500: resampled in two batches (2**22 // n < n_boot)
def test_bootstrap_ci_equals_the_handwritten_bootstrap_on_the_same_resamples(n):
    rng = np.random.default_rng(n)
    for v in (rng.integers(0, 6, n) / 5, rng.standard_normal(n)):
        for seed, ci in ((0, 0.95), (3, 0.9)):
            got = bootstrap_ci(v, n_boot=2000, seed=seed, ci=ci)
            ref = _handwritten_bootstrap(v, seed=seed, ci=ci)
            # same resamples; only the percentile interpolation's last bits may differ
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert bootstrap_ci([0.7]) == (0.7, 0.7)  # one value: scipy needs two


def _scipy_sign_flip(d, n_perm=10000, rng=0):
    """scipy's sign-flip test with our statistic |mean| (one sample, permutation_type="samples")."""
    return st.permutation_test((d,), lambda x, axis: np.abs(np.mean(x, axis=axis)), permutation_type="samples",
                               alternative="greater", n_resamples=n_perm, vectorized=True, rng=rng).pvalue


@pytest.mark.parametrize("n", [3, 8, 13])
def test_sign_flip_p_is_scipy_permutation_test_when_exhaustive(n):
    rng = np.random.default_rng(n)
    for d in (rng.integers(-2, 3, n) / 5 + 0.01, rng.standard_normal(n), np.zeros(n), np.ones(n)):
        ours = sign_flip_p(d, n_perm=10000)
        # exact for 2^n <= 10000; scipy's default two-sided p (2 x the smaller tail) is the same by symmetry
        two_sided = st.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=10000,
                                        vectorized=True, rng=0).pvalue
        assert ours == pytest.approx(_scipy_sign_flip(d), abs=1e-12) and ours == pytest.approx(two_sided, abs=1e-12)


def test_sign_flip_p_counts_a_mean_that_is_zero_up_to_rounding_as_zero():
    # scores in fifths summing to 0 exactly; in floating point the mean is -6.9e-18, not 0
    d = np.array([0.2, -0.2, -0.2, 0.4, -0.4, -0.2, 0.2, 0.2])
    assert d.mean() != 0
    assert sign_flip_p(d) == 1.0  # every pattern reaches |mean| = 0 (absolute tolerance 1e-12)
    assert _scipy_sign_flip(d) < 1.0  # scipy's tolerance is relative to |mean|: rounding noise decides ties


def test_sign_flip_p_randomised_agrees_with_scipy_within_monte_carlo_error():
    rng = np.random.default_rng(11)
    n_perm = 10000
    for shift in (0.0, 0.05, 0.1):
        d = rng.integers(-2, 3, 60) / 5 + shift
        ours = sign_flip_p(d, n_perm=n_perm, seed=0)
        theirs = _scipy_sign_flip(d, n_perm=n_perm)
        # two independent estimates of one p: difference within 4 standard errors (+ the +1 of each estimate)
        p = (ours + theirs) / 2
        assert abs(ours - theirs) <= 4 * np.sqrt(2 * p * (1 - p) / n_perm) + 2 / n_perm
        assert sign_flip_p(d, n_perm=n_perm, seed=0) == ours  # seeded


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(2 * 0.03, 0.03), max(1 * 0.04, 0.06); back in input order
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03])), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    assert holm([]).shape == (0,)
