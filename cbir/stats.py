"""Statistics over per-query scores: bootstrap confidence intervals, the paired sign-flip and Wilcoxon
tests, and Holm's correction for several comparisons.

Arrays in, floats out; seeded, so the same input and seed give the same numbers.

Library or hand-written (checked in ``tests/test_evaluate.py`` against scipy on the same data):

* :func:`bootstrap_ci` is :func:`scipy.stats.bootstrap` (``method="percentile"``) fed the same generator;
  it draws the very resamples the earlier hand-written version drew, so intervals agree to the last
  bits of the percentile interpolation (about 1e-15).
* the sign-flip randomisation test of :func:`paired_test` stays hand-written: see :func:`sign_flip_p`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["bootstrap_ci", "sign_flip_p", "paired_test", "holm"]

_CHUNK = 1 << 22
"""Resampled values per batch (a few million at a time bounds memory)."""


def bootstrap_ci(values: Any, *, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval ``(lo, hi)`` of the mean of ``values`` (1-D).

    :func:`scipy.stats.bootstrap` with ``n_boot`` resamples (with replacement) drawn by
    ``numpy.random.default_rng(seed)`` in batches of ``2**22 // n`` resamples. NaN for no values;
    ``(v, v)`` for one value (scipy needs two).
    """
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=np.float64).ravel()
    if np.isnan(v).any():
        raise ValueError("bootstrap_ci got NaN values")
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float(v[0])
    res = bootstrap((v,), np.mean, n_resamples=int(n_boot), batch=max(1, _CHUNK // len(v)), vectorized=True,
                    confidence_level=ci, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def sign_flip_p(d: Any, *, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided sign-flip randomisation p-value of the mean of paired differences ``d`` (1-D, non-empty).

    The share of sign patterns whose ``|mean(s * d)|`` reaches ``|mean(d)|``: exact over all 2^n patterns
    when ``2^n <= n_perm``, else ``n_perm`` seeded random patterns with the ``(count + 1) / (n_perm + 1)``
    estimate.

    Ties are counted with an absolute tolerance (``1e-12 * max(1, |mean(d)|)``), so a mean difference that
    is 0 up to rounding (per-query scores in fifths) gets p = 1.

    Why not :func:`scipy.stats.permutation_test` (``permutation_type="samples"`` on one sample is this test):
    its exact p-values are the same (``tests/test_stats.py`` checks it), but (1) it draws random sign
    patterns from another random stream (a permutation of the pairs ``(d, -d)``), so the randomised
    p-values, the usual case (more than 13 queries), differ within Monte Carlo error and would change the
    published numbers; (2) its tie tolerance is relative to the observed mean, so a mean that is 0 up to
    rounding gets p < 1; (3) it is 3-6 times slower on 60-200 queries.
    """
    d = np.asarray(d, dtype=np.float64).ravel()
    if len(d) == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)
    if 2 ** len(d) <= n_perm:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
        return float(np.mean(np.abs(signs @ d) / len(d) >= observed - tol))
    rng = np.random.default_rng(seed)
    count = 0
    step = max(1, _CHUNK // len(d))
    for s in range(0, n_perm, step):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(step, n_perm - s), len(d)))
        count += int(np.sum(np.abs(signs @ d) / len(d) >= observed - tol))
    return (count + 1) / (n_perm + 1)


def paired_test(a: Any, b: Any, *, n_perm: int = 10000, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Paired comparison of per-query scores ``a[i]`` vs ``b[i]`` (same queries, same order).

    Returns ``n, mean_a, mean_b, mean_diff`` (a - b), ``diff_lo, diff_hi`` (paired bootstrap 95% CI of the
    mean difference, :func:`bootstrap_ci`), ``p_permutation`` (:func:`sign_flip_p`) and ``p_wilcoxon``
    (:func:`scipy.stats.wilcoxon`, zero differences dropped; 1.0 when all differences are zero).
    """
    from scipy.stats import wilcoxon

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired_test needs two non-empty arrays of equal length, got {a.shape} and {b.shape}")
    d = a - b
    p_perm = sign_flip_p(d, n_perm=n_perm, seed=seed)
    p_wil = 1.0 if np.all(d == 0) else float(wilcoxon(d).pvalue)
    lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return {"n": int(len(d)), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": float(d.mean()),
            "diff_lo": lo, "diff_hi": hi, "p_permutation": float(p_perm), "p_wilcoxon": p_wil}


def holm(p: Any) -> np.ndarray:
    """Holm step-down adjusted p-values of ``p`` (1-D), in the input order."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out
