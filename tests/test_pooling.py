"""The pooling registry: names without Keras, a new pooling is one entry, bad names are refused."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cbir.pooling import POOLINGS, Pooling, get_pooling, register_pooling


def test_registry_lists_the_poolings_without_loading_keras():
    code = "import sys, cbir.pooling as p; print(','.join(p.POOLINGS), 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["gap,mac,gem,rmac", "False"]


def test_adding_a_pooling_is_one_entry():
    """Log-sum-exp pooling, registered once, is served by the Keras layer like the built-in ones."""
    from keras import ops

    from cbir.layers import GlobalPool

    register_pooling(Pooling("lse", lambda x, s: ops.log(ops.mean(ops.exp(x), axis=(1, 2))), "log-sum-exp"))
    try:
        x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
        out = np.asarray(GlobalPool("lse")(x))
        np.testing.assert_allclose(out, np.log(np.exp(x).mean(axis=(1, 2))), rtol=1e-5)
        assert GlobalPool("lse").get_config()["mode"] == "lse"
    finally:
        del POOLINGS["lse"]


def test_unknown_and_duplicate_poolings_are_refused():
    with pytest.raises(ValueError, match="unknown pooling 'avg'; expected one of gap, mac, gem, rmac"):
        get_pooling("avg")
    with pytest.raises(ValueError, match="already registered"):
        register_pooling(get_pooling("gap"))
    assert get_pooling("gem").params == ("p", "eps")
