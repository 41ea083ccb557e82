"""The registry of poolings: a convolutional feature map ``(N, H, W, C)`` -> one vector per image ``(N, C)``.

Each :class:`Pooling` entry is a function on ``keras.ops`` (so it runs on any Keras 3 backend) with the
parameters it reads. The registered entries:

- ``gap``  global average pooling
- ``mac``  maximum activation of convolutions (global max pooling)
- ``gem``  generalised mean ``(mean(max(x, eps) ** p)) ** (1 / p)``: p = 1 is ``gap``, p -> inf is ``mac``
- ``rmac`` regional MAC (Tolias, Sicre & Jegou, ICLR 2016): square regions at ``L`` scales, the MAC
  of each region L2-normalised, summed over regions, and the sum L2-normalised.

The Keras layers that apply them (:class:`cbir.layers.GlobalPool`, :class:`cbir.layers.L2Normalize`)
live in :mod:`cbir.layers`; this module imports Keras only when a pooling runs, so params validation
and the ``cbir`` command can list the poolings without loading it. Adding a pooling is one
:func:`register_pooling` call plus its test::

    register_pooling(Pooling("lse", lambda x, s: ops.log(ops.mean(ops.exp(x), axis=(1, 2))),
                             "log-sum-exp pooling"))
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Pooling", "PoolSettings", "POOLINGS", "register_pooling", "get_pooling", "rmac_regions", "l2_rows"]

#: Desired overlap of neighbouring R-MAC regions and the candidate region counts along the long side
#: (the values of Tolias et al.'s reference ``rmac_regions.m``).
RMAC_OVERLAP = 0.4
RMAC_STEPS = (2, 3, 4, 5, 6, 7)


def rmac_regions(height: int, width: int, levels: int = 3) -> np.ndarray:
    """Square R-MAC regions of a ``height x width`` feature map, as in Tolias et al. 2016.

    At level ``l`` (1..levels) the side is ``floor(2 * min(H, W) / (l + 1))``; ``l`` regions fit
    along the short side and ``l + extra`` along the long one, where ``extra`` makes neighbouring
    regions overlap by about 40 %. Returns int64 ``(R, 4)`` rows ``(top, left, height, width)`` in
    feature-map cells, level 1 first, row-major within a level.
    """
    if height < 1 or width < 1 or levels < 1:
        raise ValueError(f"rmac_regions needs a map of at least 1x1 and levels >= 1, got "
                         f"{height}x{width}, levels={levels}")
    w = min(height, width)
    steps = np.asarray(RMAC_STEPS, dtype=float)
    b = (max(height, width) - w) / (steps - 1)
    idx = int(np.argmin(np.abs((w ** 2 - w * b) / w ** 2 - RMAC_OVERLAP))) + 1  # regions beyond l on the long side
    extra_w = idx if height < width else 0
    extra_h = idx if height > width else 0
    rows = []
    for level in range(1, levels + 1):
        side = int(math.floor(2 * w / (level + 1)))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        n_w, n_h = level + extra_w, level + extra_h
        step_w = (width - side) / (n_w - 1) if n_w > 1 else 0.0
        step_h = (height - side) / (n_h - 1) if n_h > 1 else 0.0
        lefts = np.floor(half + np.arange(n_w) * step_w).astype(int) - half
        tops = np.floor(half + np.arange(n_h) * step_h).astype(int) - half
        rows.extend((int(t), int(l_), side, side) for t in tops for l_ in lefts)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def _ops():
    from keras import ops

    return ops


def l2_rows(x: Any, axis: int = -1, eps: float = 1e-12) -> Any:
    """``x`` divided by its L2 norm along ``axis`` (norms below ``eps`` count as ``eps``), in keras.ops."""
    ops = _ops()
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True)), eps)


@dataclass(frozen=True)
class PoolSettings:
    """The parameters a pooling may read: GeM exponent ``p`` and clamp ``eps``, R-MAC ``levels``."""

    p: float = 3.0
    eps: float = 1e-6
    levels: int = 3


@dataclass(frozen=True)
class Pooling:
    """One pooling: ``fn(x (N, H, W, C) float32 tensor, settings) -> (N, C)`` on ``keras.ops``.

    ``params``: the :class:`PoolSettings` fields it reads (its identity includes them);
    ``check(settings)`` raises ValueError for values it cannot use.
    """

    name: str
    fn: Callable[[Any, PoolSettings], Any]
    description: str = ""
    params: tuple[str, ...] = ()
    check: Callable[[PoolSettings], None] | None = None


POOLINGS: dict[str, Pooling] = {}
"""name -> :class:`Pooling`."""


def register_pooling(pooling: Pooling, *, replace: bool = False) -> Pooling:
    """Add ``pooling`` to :data:`POOLINGS` (refusing a second entry of the same name unless ``replace``)."""
    if pooling.name in POOLINGS and not replace:
        raise ValueError(f"a pooling named {pooling.name!r} is already registered")
    POOLINGS[pooling.name] = pooling
    return pooling


def get_pooling(name: str) -> Pooling:
    """The registered pooling ``name``; ValueError naming the known ones otherwise."""
    try:
        return POOLINGS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pooling {name!r}; expected one of {', '.join(POOLINGS)}") from None


def _gem(x: Any, s: PoolSettings) -> Any:
    ops = _ops()
    return ops.power(ops.mean(ops.power(ops.maximum(x, s.eps), s.p), axis=(1, 2)), 1.0 / s.p)


def _check_gem(s: PoolSettings) -> None:
    if not s.p > 0:
        raise ValueError(f"GeM exponent p must be > 0, got {s.p}")


def _rmac(x: Any, s: PoolSettings) -> Any:
    ops = _ops()
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:
        raise ValueError("rmac pooling needs a feature map with a static height and width")
    total = 0.0
    for top, left, h, w in rmac_regions(int(height), int(width), s.levels):
        total = total + l2_rows(ops.max(x[:, top:top + h, left:left + w, :], axis=(1, 2)))
    return l2_rows(total)


for _p in (
    Pooling("gap", lambda x, s: _ops().mean(x, axis=(1, 2)), "global average pooling"),
    Pooling("mac", lambda x, s: _ops().max(x, axis=(1, 2)), "maximum activation of convolutions"),
    Pooling("gem", _gem, "generalised mean, (mean(max(x, eps)^p))^(1/p)", ("p", "eps"), _check_gem),
    Pooling("rmac", _rmac, "regional MAC (Tolias et al. 2016)", ("levels",)),
):
    register_pooling(_p)
del _p

