"""The registry of distance measures: one :class:`Measure` entry per measure.

Each entry knows everything the rest of cbir asks of a measure: its exact float64 distance, whether
it has a similarity (``1 - distance``), its family (which decides how :class:`cbir.search.ExactIndex`
scores it quickly and bounds the rounding error of that fast pass), the fast engines that serve it,
the faiss and scipy names, whether faiss *indexes* (Flat, HNSW, IVF) can serve it, and its
parameters with their defaults (Minkowski's ``p``). :data:`cbir.search.METRICS`, params validation,
the ``cbir`` command's choices and the figures' measure order are all derived from :data:`MEASURES`.

Adding a measure is one :func:`register_measure` call plus its test. For example, the Canberra
distance served by scipy (the fast pass is ``cdist`` in float64, then the exact float64 re-ranking)::

    register_measure(Measure(
        name="canberra", family="lp", engines=("scipy",), scipy_name="canberra",
        exact=lambda A, B, p: np.sum(np.divide(np.abs(A - B), np.abs(A) + np.abs(B),
                                               out=np.zeros_like(A), where=(np.abs(A) + np.abs(B)) > 0), axis=1),
        description="sum |x-y| / (|x|+|y|)"))

Imports nothing of cbir.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Measure", "MEASURES", "register_measure", "get_measure", "measure_names", "FAMILIES"]

FAMILIES = ("angular", "l2", "lp")
"""How :class:`cbir.search.ExactIndex` scores a measure in its fast pass:

- ``angular``: rows normalised (centred first when ``centre``), one float32 matrix product;
- ``l2``: ``|y|^2 - 2 x.y`` by one float32 matrix product;
- ``lp``: element-wise differences (faiss or scipy / scikit-learn kernels), relative error
  bounded by :meth:`Measure.rel_err`.
"""

PairFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class Measure:
    """One distance measure.

    ``exact(A, B, p)``: float64 distances between rows ``A[i]`` and ``B[i]`` (both (M, D) float64),
    with the same arithmetic for every pair (so identical pairs give bit-identical results).
    ``engines``: the fast engines that may serve it, the first being the default (see
    :data:`cbir.search.ENGINES`). ``faiss``: the name of the ``faiss.METRIC_*`` constant of its fast
    pass, or None. ``faiss_index``: True when faiss indexes (Flat, HNSW, IVF) serve it.
    ``params``: its parameters and their defaults. ``sklearn_name`` / ``scipy_name``: its name there.
    """

    name: str
    family: str
    exact: PairFn
    engines: tuple[str, ...]
    similarity: bool = False
    centre: bool = False
    faiss: str | None = None
    faiss_index: bool = False
    scipy_name: str | None = None
    sklearn_name: str | None = None
    params: Mapping[str, float] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"measure {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        needs = {"faiss": self.faiss, "scipy": self.scipy_name, "sklearn": self.sklearn_name,
                 "sklearn_nn": self.sklearn_name, "blas": self.family != "lp" or None}
        unknown = [e for e in self.engines if e not in needs]
        missing = [e for e in self.engines if e in needs and not needs[e]]
        if not self.engines or unknown or missing:
            raise ValueError(f"measure {self.name!r}: engines {self.engines} must be some of {tuple(needs)}, each "
                             f"with its name set (faiss, scipy_name, sklearn_name; blas only for angular or l2)")

    @property
    def default_engine(self) -> str:
        return self.engines[0]

    def check(self, p: float | None = None) -> None:
        """Raise ValueError when a parameter is out of range (Minkowski's ``p`` must be finite and >= 1)."""
        if "p" in self.params:
            p = self.params["p"] if p is None else p
            if not (np.isfinite(p) and p >= 1):
                raise ValueError(f"{self.name} needs a finite p >= 1, got p={p!r}")

    def rel_err(self, d: int, p: float, unit: float) -> float:
        """Relative error bound of an ``lp`` fast score of ``d`` terms computed with unit roundoff ``unit``."""
        if self.name == "chebyshev":  # a maximum: one rounding per difference, none accumulated
            return 4 * unit
        return (d + 2 * (p if "p" in self.params else 1.0) + 8) * unit


MEASURES: dict[str, Measure] = {}
"""name -> :class:`Measure`, in the study's order (the order tables and figures use)."""


def register_measure(measure: Measure, *, replace: bool = False) -> Measure:
    """Add ``measure`` to :data:`MEASURES` (refusing a second entry of the same name unless ``replace``)."""
    if measure.name in MEASURES and not replace:
        raise ValueError(f"a measure named {measure.name!r} is already registered")
    MEASURES[measure.name] = measure
    return measure


def get_measure(name: str) -> Measure:
    """The registered measure ``name``; ValueError naming the known ones otherwise."""
    try:
        return MEASURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {name!r}; expected one of {tuple(MEASURES)}") from None


def measure_names(**where: Any) -> tuple[str, ...]:
    """Names of the registered measures whose attributes equal ``where`` (all of them by default)."""
    return tuple(n for n, m in MEASURES.items() if all(getattr(m, k) == v for k, v in where.items()))


# ------------------------------------------------------------------------------- exact distances
def _centred(A: np.ndarray) -> np.ndarray:
    """Rows minus their mean; a constant row becomes the zero vector."""
    return np.where((A.max(axis=1) == A.min(axis=1))[:, None], 0.0, A - A.mean(axis=1, keepdims=True))


def _cosine(A: np.ndarray, B: np.ndarray, p: float = 0.0) -> np.ndarray:
    dot = np.sum(A * B, axis=1)
    norm = np.sqrt(np.sum(A * A, axis=1)) * np.sqrt(np.sum(B * B, axis=1))
    sim = np.divide(dot, norm, out=np.zeros_like(dot), where=norm > 0)
    return 1.0 - np.clip(sim, -1.0, 1.0)


def _correlation(A: np.ndarray, B: np.ndarray, p: float = 0.0) -> np.ndarray:
    return _cosine(_centred(A), _centred(B))


def _euclidean(A: np.ndarray, B: np.ndarray, p: float = 0.0) -> np.ndarray:
    diff = np.abs(A - B)
    return np.sqrt(np.sum(diff * diff, axis=1))


def _manhattan(A: np.ndarray, B: np.ndarray, p: float = 0.0) -> np.ndarray:
    return np.sum(np.abs(A - B), axis=1)


def _chebyshev(A: np.ndarray, B: np.ndarray, p: float = 0.0) -> np.ndarray:
    diff = np.abs(A - B)
    return np.max(diff, axis=1) if diff.shape[1] else np.zeros(len(diff))


def _minkowski(A: np.ndarray, B: np.ndarray, p: float = 3.0) -> np.ndarray:
    return np.sum(np.abs(A - B) ** p, axis=1) ** (1.0 / p)


for _m in (
    Measure("euclidean", "l2", _euclidean, ("blas", "faiss"), faiss="METRIC_L2", faiss_index=True,
            scipy_name="euclidean", sklearn_name="euclidean", description="sqrt(sum (x-y)^2)"),
    Measure("manhattan", "lp", _manhattan, ("faiss", "scipy", "sklearn", "sklearn_nn"), faiss="METRIC_L1",
            scipy_name="cityblock", sklearn_name="manhattan", description="sum |x-y|"),
    Measure("minkowski", "lp", _minkowski, ("faiss", "scipy", "sklearn", "sklearn_nn"), faiss="METRIC_Lp",
            scipy_name="minkowski", sklearn_name="minkowski", params={"p": 3.0},
            description="(sum |x-y|^p)^(1/p)"),
    Measure("chebyshev", "lp", _chebyshev, ("scipy", "faiss", "sklearn", "sklearn_nn"), faiss="METRIC_Linf",
            scipy_name="chebyshev", sklearn_name="chebyshev", description="max |x-y|"),
    Measure("correlation", "angular", _correlation, ("blas", "faiss"), similarity=True, centre=True,
            faiss="METRIC_INNER_PRODUCT", faiss_index=True, scipy_name="correlation", sklearn_name="correlation",
            description="1 - Pearson correlation of the two vectors"),
    Measure("cosine", "angular", _cosine, ("blas", "faiss"), similarity=True, faiss="METRIC_INNER_PRODUCT",
            faiss_index=True, scipy_name="cosine", sklearn_name="cosine", description="1 - cos(angle)"),
):
    register_measure(_m)
del _m
