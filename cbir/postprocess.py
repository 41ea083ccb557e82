"""The registry of post-processing steps applied to feature vectors after extraction.

Each :class:`PostProcess` entry has an optional ``fit(X_fit, **settings) -> state`` (learned on the
searchable catalogue only, never on queries) and an ``apply(state, X) -> X'``. The registered steps:

- ``l2``: each row divided by its Euclidean norm (stateless);
- ``pca_whiten``: PCA whitening (``sklearn.decomposition.PCA(whiten=True)``) keeping
  :func:`whitening_components` components, then L2 normalisation (Jegou & Chum, ECCV 2012).

:func:`cbir.extract.whiten_run` stores a whitened derived run and
:func:`cbir.evaluate.cross_validate` whitens each fold through this registry. Adding a step (for example
query expansion or re-ranking) is one :func:`register_postprocess` call plus its test::

    register_postprocess(PostProcess("centre", lambda X: X.mean(axis=0), lambda mean, X: X - mean,
                                     "subtract the catalogue's mean vector"))

Imports nothing of cbir.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PostProcess", "POSTPROCESSING", "register_postprocess", "get_postprocess", "l2_normalize",
           "fit_pca_whitening", "apply_pca_whitening", "whitening_components", "WHITEN_MAX_COMPONENTS"]

WHITEN_MAX_COMPONENTS = 256
"""At most this many whitened components (and at most a quarter of the fitted images): whitening every
direction of a small catalogue amplifies noise; on the 300 searchable demo images full-rank whitening cut
cosine sub-category match from 0.96 to 0.51, 16 components kept 0.94."""


@dataclass(frozen=True)
class PostProcess:
    """One post-processing step: ``fit(X_fit, **settings) -> state`` (None for a stateless step) and
    ``apply(state, X (N, D)) -> (N, D') float32``."""

    name: str
    fit: Callable[..., Any] | None
    apply: Callable[[Any, np.ndarray], np.ndarray]
    description: str = ""

    def fit_apply(self, X_fit: np.ndarray, X: np.ndarray, **settings: Any) -> np.ndarray:
        """Fit on ``X_fit`` (when the step learns anything) and apply to ``X``."""
        state = self.fit(X_fit, **settings) if self.fit is not None else None
        return self.apply(state, X)


POSTPROCESSING: dict[str, PostProcess] = {}
"""name -> :class:`PostProcess`."""


def register_postprocess(step: PostProcess, *, replace: bool = False) -> PostProcess:
    """Add ``step`` to :data:`POSTPROCESSING` (refusing a second entry of the same name unless ``replace``)."""
    if step.name in POSTPROCESSING and not replace:
        raise ValueError(f"a post-processing step named {step.name!r} is already registered")
    POSTPROCESSING[step.name] = step
    return step


def get_postprocess(name: str) -> PostProcess:
    """The registered step ``name``; ValueError naming the known ones otherwise."""
    try:
        return POSTPROCESSING[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown post-processing step {name!r}; expected one of {', '.join(POSTPROCESSING)}") from None


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows of ``X`` divided by their Euclidean norm, float32 (a zero row stays zero)."""
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def whitening_components(n_fit: int) -> int:
    """The number of whitened components kept for a fit on ``n_fit`` images: ``min(WHITEN_MAX_COMPONENTS,
    n_fit // 4)``, at least 2 (fewer when the features have lower rank)."""
    return max(2, min(WHITEN_MAX_COMPONENTS, int(n_fit) // 4))


def fit_pca_whitening(X: np.ndarray, n_components: int | None = None, seed: int = 0):
    """Fit ``sklearn.decomposition.PCA(whiten=True)`` on catalogue features ``X`` ``(N, D)``.
    ``n_components`` None keeps the numerical rank (components with variance above 1e-10 of the
    largest), and a larger ``n_components`` is capped at it, so whitening never divides by ~0. Returns the fitted PCA."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"fit_pca_whitening needs a 2-d array of at least 2 rows, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("fit_pca_whitening: the features contain NaN or infinite values")
    if X.var(axis=0).sum() == 0:
        raise ValueError("fit_pca_whitening: the features have zero variance")
    pca = PCA(n_components=None, whiten=True, svd_solver="full", random_state=seed).fit(X)
    var = pca.explained_variance_
    rank = int(np.sum(var > var[0] * 1e-10)) if var.size and var[0] > 0 else 0
    if rank == 0:
        raise ValueError("fit_pca_whitening: the features have zero variance")
    keep = rank if n_components is None else min(int(n_components), rank)  # never divide by a ~0 variance
    if keep < pca.n_components_:
        pca = PCA(n_components=keep, whiten=True, svd_solver="full", random_state=seed).fit(X)
    return pca


def apply_pca_whitening(pca: Any, X: np.ndarray, *, l2_normalize: bool = True) -> np.ndarray:
    """Project ``X`` ``(N, D)`` with a fitted whitening PCA -> float32 ``(N, k)``, unit rows if ``l2_normalize``."""
    Z = pca.transform(np.asarray(X, dtype=np.float64))
    if l2_normalize:
        Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return Z.astype(np.float32)


def _fit_whitening(X: np.ndarray, *, n_components: int | None = None, seed: int = 0) -> Any:
    """PCA whitening fitted on ``X`` with ``n_components`` (default :func:`whitening_components` of its rows)."""
    return fit_pca_whitening(X, n_components=whitening_components(len(X)) if n_components is None else n_components,
                             seed=seed)


for _step in (
    PostProcess("l2", None, lambda state, X: l2_normalize(X), "unit-length rows"),
    PostProcess("pca_whiten", _fit_whitening, apply_pca_whitening,
                "PCA whitening fitted on the searchable catalogue, then unit-length rows"),
):
    register_postprocess(_step)
del _step
