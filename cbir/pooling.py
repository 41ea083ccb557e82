"""Pooling of a convolutional feature map into one vector per image, as Keras layers.

Every layer takes a channels-last map ``(N, H, W, C)`` and returns ``(N, C)`` float32, using
``keras.ops`` only, so it runs on any Keras 3 backend (TensorFlow, JAX, PyTorch).

- ``gap``  global average pooling
- ``mac``  maximum activation of convolutions (global max pooling)
- ``gem``  generalised mean ``(mean(max(x, eps) ** p)) ** (1 / p)``: p = 1 is ``gap``, p -> inf is ``mac``
- ``rmac`` regional MAC (Tolias, Sicre & Jegou, ICLR 2016): square regions at ``L`` scales, the MAC
  of each region L2-normalised, summed over regions, and the sum L2-normalised.

This module imports Keras at load time; :mod:`cbir.backbones` imports it only when it builds a model.
"""
from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

POOLINGS = ("gap", "mac", "gem", "rmac")

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


def _l2(x, axis: int = -1, eps: float = 1e-12):
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True)), eps)


@keras.saving.register_keras_serializable(package="cbir")
class GlobalPool(keras.layers.Layer):
    """Global pooling of ``(N, H, W, C)`` to ``(N, C)``: ``mode`` in gap, mac, gem, rmac.

    ``p`` is the GeM exponent (used by ``gem`` only), ``eps`` the GeM clamp, ``levels`` the number of
    R-MAC scales (used by ``rmac`` only; the region grid needs a static H and W).
    """

    def __init__(self, mode: str = "gap", *, p: float = 3.0, eps: float = 1e-6, levels: int = 3, **kwargs):
        super().__init__(**kwargs)
        if mode not in POOLINGS:
            raise ValueError(f"unknown pooling {mode!r}; expected one of {', '.join(POOLINGS)}")
        if mode == "gem" and not p > 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}")
        self.mode, self.p, self.eps, self.levels = mode, float(p), float(eps), int(levels)

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.mode == "gap":
            return ops.mean(x, axis=(1, 2))
        if self.mode == "mac":
            return ops.max(x, axis=(1, 2))
        if self.mode == "gem":
            x = ops.power(ops.maximum(x, self.eps), self.p)
            return ops.power(ops.mean(x, axis=(1, 2)), 1.0 / self.p)
        height, width = x.shape[1], x.shape[2]
        if height is None or width is None:
            raise ValueError("rmac pooling needs a feature map with a static height and width")
        total = 0.0
        for top, left, h, w in rmac_regions(int(height), int(width), self.levels):
            region = ops.max(x[:, top:top + h, left:left + w, :], axis=(1, 2))
            total = total + _l2(region)
        return _l2(total)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode, "p": self.p, "eps": self.eps, "levels": self.levels}


@keras.saving.register_keras_serializable(package="cbir")
class L2Normalize(keras.layers.Layer):
    """Divide each row by its Euclidean norm (rows of norm 0 stay 0): ``(N, D) -> (N, D)``."""

    def __init__(self, eps: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def call(self, x):
        return _l2(ops.cast(x, "float32"), eps=self.eps)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "eps": self.eps}
