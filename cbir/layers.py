"""Keras layers of cbir: :class:`GlobalPool` (any registered pooling of :mod:`cbir.pooling`),
:class:`L2Normalize`, and for trained models (:mod:`cbir.train`) :class:`CosineClassifier` and
:class:`AffinePreprocess`. All use ``keras.ops`` only, so they run on any Keras 3 backend, and are
registered as Keras serialisable (package ``cbir``) so a saved model reloads without custom code.

This module imports Keras at load time; :mod:`cbir.backbones` imports it only when it builds a model.
"""
from __future__ import annotations

import keras
from keras import ops

from cbir.pooling import PoolSettings, get_pooling, l2_rows


@keras.saving.register_keras_serializable(package="cbir")
class GlobalPool(keras.layers.Layer):
    """Global pooling of ``(N, H, W, C)`` to ``(N, C)`` by the registered pooling ``mode``.

    ``p`` is the GeM exponent, ``eps`` the GeM clamp, ``levels`` the number of R-MAC scales (each
    pooling reads only its own; the R-MAC region grid needs a static H and W).
    """

    def __init__(self, mode: str = "gap", *, p: float = 3.0, eps: float = 1e-6, levels: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.pooling = get_pooling(mode)
        self.settings = PoolSettings(p=float(p), eps=float(eps), levels=int(levels))
        if self.pooling.check is not None:
            self.pooling.check(self.settings)
        self.mode, self.p, self.eps, self.levels = mode, float(p), float(eps), int(levels)

    def call(self, x):
        return self.pooling.fn(ops.cast(x, "float32"), self.settings)

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
        return l2_rows(ops.cast(x, "float32"), eps=self.eps)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "eps": self.eps}


@keras.saving.register_keras_serializable(package="cbir")
class CosineClassifier(keras.layers.Layer):
    """Cosines between L2-normalised rows and ``units`` learned, L2-normalised class proxies: ``(N, D) -> (N,
    units)`` in [-1, 1] (the normalised-softmax / CosFace head of :mod:`cbir.train`)."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, input_shape):
        self.proxies = self.add_weight(shape=(int(input_shape[-1]), self.units), initializer="glorot_uniform",
                                       name="proxies")

    def call(self, x):
        x = l2_rows(ops.cast(x, "float32"))
        w = self.proxies / ops.maximum(ops.sqrt(ops.sum(ops.square(self.proxies), axis=0, keepdims=True)), 1e-12)
        return ops.matmul(x, w)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="cbir")
class AffinePreprocess(keras.layers.Layer):
    """A backbone's per-pixel affine preprocessing inside a saved model: ``x @ matrix + offset`` on RGB 0..255
    (covers scaling to -1..1, mean/std normalisation and Caffe's RGB->BGR with mean subtraction)."""

    def __init__(self, matrix, offset, **kwargs):
        super().__init__(**kwargs)
        self.matrix = [[float(v) for v in row] for row in matrix]
        self.offset = [float(v) for v in offset]
        if len(self.matrix) != 3 or any(len(r) != 3 for r in self.matrix) or len(self.offset) != 3:
            raise ValueError("AffinePreprocess takes a 3x3 matrix and 3 offsets")

    def call(self, x):
        m = ops.convert_to_tensor(self.matrix, dtype="float32")
        b = ops.convert_to_tensor(self.offset, dtype="float32")
        return ops.matmul(ops.cast(x, "float32"), m) + b

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "matrix": self.matrix, "offset": self.offset}
