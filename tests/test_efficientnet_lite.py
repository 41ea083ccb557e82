"""EfficientNet-Lite0/1/2 in Keras with the pip-shipped ImageNet checkpoints read without torch."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from cbir import efficientnet_lite as el

CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"}
# Strides of the 16 source blocks (_blocks.0 .. _blocks.15), written out independently of el.STAGES.
SOURCE_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
# Lite1 and Lite2: stage repeats 1, 3, 3, 4, 4, 5, 1 (the inner stages' 2, 2, 3, 3, 4 times ceil(1.1 or 1.2)).
SOURCE_STRIDES_21 = [1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1]
STRIDES = {"efficientnet_lite0": SOURCE_STRIDES, "efficientnet_lite1": SOURCE_STRIDES_21,
           "efficientnet_lite2": SOURCE_STRIDES_21}


def _images(size: int = 224) -> np.ndarray:
    """Known photos from scikit-image plus one noise image, resized (PIL bilinear) to size x size, uint8."""
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    resized = [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in photos]
    return np.stack(resized + [noise])


@pytest.fixture(scope="module")
def checkpoint():
    path = el.imagenet_checkpoint()
    assert path.is_file(), f"pip package {el.PIP_PACKAGE} ships no checkpoint at {path}"
    return path


@pytest.fixture(scope="module")
def state_dict(checkpoint):
    return el.load_torch_state_dict(checkpoint)


@pytest.fixture(scope="module")
def logits_model():
    import keras

    model, _ = el.load_efficientnet_lite0("imagenet")
    return keras.Model(model.input, model.get_layer("logits").output)


def test_same_padding_is_tensorflow_same():
    # total = max((ceil(i/s) - 1) * s + k - i, 0), smaller half first
    assert el._same_padding(224, 3, 2) == (0, 1)   # (111*2 + 3 - 224) = 1
    assert el._same_padding(112, 3, 1) == (1, 1)
    assert el._same_padding(56, 5, 2) == (1, 2)    # (27*2 + 5 - 56) = 3
    assert el._same_padding(14, 5, 1) == (2, 2)
    assert el._same_padding(7, 1, 1) == (0, 0)
    assert el._same_padding(225, 3, 2) == (1, 1)   # odd size: (112*2 + 3 - 225) = 2


def test_legacy_checkpoint_reads_as_numpy(state_dict):
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert state_dict["_bn1.num_batches_tracked"].dtype == np.int64
    weights = [v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")]
    assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] and np.isfinite(v).all() for v in weights)
    assert all((v >= 0).all() for k, v in state_dict.items() if k.endswith("running_var"))  # dead channels: 0
    # no squeeze-excite in Lite: 16 blocks, block 0 without expansion
    assert not any("_se_" in k for k in state_dict)
    assert "_blocks.0._expand_conv.weight" not in state_dict and "_blocks.15._expand_conv.weight" in state_dict


@pytest.mark.slow
def test_model_has_exactly_the_checkpoint_parameters(state_dict):
    model = el.build_efficientnet_lite0(include_top=True)
    n_checkpoint = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == n_checkpoint == 4_694_024
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 4_652_008  # the published 4.65M parameters of EfficientNet-Lite0
    assert model.get_layer("top_activation").output.shape[1:] == (7, 7, 1280)
    notop = el.build_efficientnet_lite0(include_top=False, input_size=224)
    assert notop.output.shape[1:] == (7, 7, 1280)


def test_refuses_code_in_pickle(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        for header in (el._LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump(Payload(), f, protocol=2)
    with pytest.raises(el.CheckpointError, match="evil.pth.*refusing to unpickle"):
        el.load_torch_state_dict(evil)
    assert not marker.exists()


def test_bad_checkpoint_files_name_the_file(tmp_path, checkpoint):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:1_000_000])
    with pytest.raises(el.CheckpointError, match="truncated.pth"):
        el.load_torch_state_dict(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(el.CheckpointError, match="notes.pth"):
        el.load_torch_state_dict(text)
    with pytest.raises(el.CheckpointError, match="missing.pth"):
        el.load_torch_state_dict(tmp_path / "missing.pth")


def test_wrong_state_dict_is_refused(state_dict):
    model = el.build_efficientnet_lite0(include_top=True)
    broken = dict(state_dict)
    broken["_conv_head.weight"] = np.zeros((1280, 321, 1, 1), np.float32)
    with pytest.raises(el.CheckpointError, match="top_conv"):
        el.load_state_dict_into(model, broken, source="broken.pth")
    del broken["_blocks.7._bn1.running_var"]
    with pytest.raises(el.CheckpointError, match="broken.pth"):
        el.load_state_dict_into(model, broken, source="broken.pth")


@pytest.mark.slow
def test_conversion_is_cached_by_sha1(tmp_path, monkeypatch, checkpoint, state_dict):
    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))
    sha1 = el.file_sha1(checkpoint)
    first = el.converted_weights(checkpoint)
    assert first.parent == tmp_path / "cache"
    assert first.name == f"efficientnet_lite0-v{el.CACHE_VERSION}-{sha1[:16]}.weights.h5"
    stamp = first.stat().st_mtime_ns
    assert el.converted_weights(checkpoint) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind
    model = el.build_efficientnet_lite0()
    model.load_weights(first)
    np.testing.assert_array_equal(model.get_layer("block2a_dwconv").get_weights()[0],
                                  state_dict["_blocks.1._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(model.get_layer("logits").get_weights()[0], state_dict["_fc.weight"].T)


@pytest.mark.slow
def test_keras_weights_file_round_trip(tmp_path, logits_model):
    import keras

    model, _ = el.load_efficientnet_lite0("imagenet")
    path = tmp_path / "lite0.weights.h5"
    model.save_weights(path)
    again, source = el.load_efficientnet_lite0(path)
    assert source == path
    x = el.preprocess_input(_images()[:2])
    reloaded = keras.Model(again.input, again.get_layer("logits").output)
    np.testing.assert_array_equal(reloaded.predict_on_batch(x), logits_model.predict_on_batch(x))


@pytest.mark.slow
def test_chelsea_is_a_cat(logits_model, imagenet_labels):
    logits = logits_model.predict_on_batch(el.preprocess_input(_images()[:1]))[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top5 = np.argsort(-probs)[:5]
    names = [imagenet_labels[i + 1] for i in top5]  # labels file: line 0 is "background"
    print("efficientnet_lite0 chelsea top-5:", [(n, round(float(probs[i]), 3)) for n, i in zip(names, top5)])
    assert names[0] in CAT_CLASSES
    assert probs[top5[0]] > 0.5


# ------------------------------------------------------------------------------------------
# Agreement with a PyTorch reference (runs only where torch is installed)
# ------------------------------------------------------------------------------------------

def _torch_reference_logits(sd, images_nchw, strides=SOURCE_STRIDES):
    """EfficientNet-Lite forward (blocks of the given ``strides``) as in the source port (lukemelas-style EfficientNet-PyTorch with
    static TF-SAME padding, ReLU6, no squeeze-excite, BN eps 1e-3), from the state dict alone."""
    import torch
    import torch.nn.functional as F

    def pad_same(x, k, s):
        i = x.shape[-1]
        o = -(-i // s)
        p = max((o - 1) * s + k - i, 0)
        return F.pad(x, [p // 2, p - p // 2, p // 2, p - p // 2])

    def conv(x, key, stride=1, groups=1):
        w = sd[key]
        return F.conv2d(pad_same(x, w.shape[-1], stride), w, stride=stride, groups=groups)

    def bn(x, key):
        return F.batch_norm(x, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                            sd[f"{key}.bias"], training=False, eps=1e-3)

    with torch.no_grad():
        x = F.relu6(bn(conv(images_nchw, "_conv_stem.weight", 2), "_bn0"))
        for i, stride in enumerate(strides):
            b, inputs = f"_blocks.{i}.", x
            if f"{b}_expand_conv.weight" in sd:
                x = F.relu6(bn(conv(x, f"{b}_expand_conv.weight"), f"{b}_bn0"))
            x = F.relu6(bn(conv(x, f"{b}_depthwise_conv.weight", stride, groups=x.shape[1]), f"{b}_bn1"))
            x = bn(conv(x, f"{b}_project_conv.weight"), f"{b}_bn2")
            if stride == 1 and inputs.shape[1] == x.shape[1]:
                x = x + inputs
        x = F.relu6(bn(conv(x, "_conv_head.weight"), "_bn1"))
        return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.mark.slow
def test_logits_agree_with_pytorch_reference(checkpoint, logits_model):
    torch = pytest.importorskip("torch")
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    images = _images()
    x = el.preprocess_input(images)
    ref = _torch_reference_logits(sd, torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    ours = logits_model.predict_on_batch(x)
    diff = np.abs(ours - ref).max()
    print(f"max |keras - torch| logit difference: {diff:.2e} (logit range {np.abs(ref).max():.1f})")
    assert diff < 5e-5  # measured 8e-6 on a range of 10.7
    np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1))


def test_zip_checkpoint_written_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    sd = {"transposed": base.t(), "sliced": base[1:, 2:5], "half": base.half(), "bf16": base.bfloat16(),
          "count": torch.tensor(7, dtype=torch.int64), "flags": base > 0}
    path = tmp_path / "zip.pth"
    torch.save(sd, path)
    ours = el.load_torch_state_dict(path)
    assert list(ours) == list(sd)
    for key, ref in sd.items():
        expected = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)
        assert ours[key].shape == tuple(ref.shape)


def test_building_writes_nothing_to_disk(tmp_path, monkeypatch, state_dict):
    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))
    model, source = el.load_efficientnet_lite0("imagenet", include_top=False)
    assert source == el.imagenet_checkpoint() and not (tmp_path / "cache").exists()
    assert model.output.shape[1:] == (7, 7, 1280)
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite1 (240 px) and Lite2 (260 px)
# ------------------------------------------------------------------------------------------

LITE12 = ["efficientnet_lite1", "efficientnet_lite2"]


def test_round_filters_and_stage_tables():
    # round_filters: max(8, int(c*w + 4) // 8 * 8), plus 8 when that lost more than 10 %
    assert [el.round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert el.round_filters(32, 1.2) == 40 and el.round_filters(40, 1.0) == 40
    assert el.stages("efficientnet_lite0") == el.STAGES
    lite1, lite2 = el.stages("efficientnet_lite1"), el.stages("efficientnet_lite2")
    assert [s[-1] for s in lite1] == [s[-1] for s in lite2] == [1, 3, 3, 4, 4, 5, 1]  # first/last fixed
    assert [s[4] for s in lite1] == [16, 24, 40, 80, 112, 192, 320]
    assert [s[3] for s in lite2] == [32, 16, 24, 48, 88, 120, 208]  # each stage's input: the previous output
    assert len(el.block_names("efficientnet_lite2")) == 21 and el.block_names("efficientnet_lite2")[-2] == "block6e_"
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'efficientnet_lite9'"):
        el.stages("efficientnet_lite9")


@pytest.fixture(scope="module")
def lite_state_dicts():
    return {name: el.load_torch_state_dict(el.imagenet_checkpoint(name)) for name in LITE12}


@pytest.fixture(scope="module")
def lite_logits_models():
    import keras

    models = {}
    for name in LITE12:
        model, source = el.load_efficientnet_lite(name, "imagenet")
        models[name] = (keras.Model(model.input, model.get_layer("logits").output), source)
    return models


@pytest.mark.parametrize("name, size, trainable, grid", [("efficientnet_lite1", 240, 5_416_680, 8),
                                                         ("efficientnet_lite2", 260, 6_092_072, 9)])
@pytest.mark.slow
def test_lite12_has_exactly_the_checkpoint_parameters(name, size, trainable, grid, lite_state_dicts):
    sd = lite_state_dicts[name]
    assert el.imagenet_checkpoint(name).name.startswith(name.replace("_", "-"))
    assert len(sd) == 386 and sum(k.endswith("_depthwise_conv.weight") for k in sd) == 21
    assert not any("_se_" in k for k in sd)
    model = el.build_efficientnet_lite(name)
    assert model.input.shape[1:] == (size, size, 3) and el.VARIANTS[name].resolution == size
    assert model.count_params() == sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == trainable  # published 5.4M / 6.1M
    assert model.get_layer("top_activation").output.shape[1:] == (grid, grid, 1280)  # ceil(S / 32)
    assert model.get_layer("top_dropout").rate == el.VARIANTS[name].dropout


@pytest.mark.slow
def test_lite_checkpoints_do_not_load_into_another_variant(lite_state_dicts, state_dict):
    with pytest.raises(el.CheckpointError, match="lite0.pth.*efficientnet_lite1"):
        el.load_state_dict_into(el.build_efficientnet_lite("efficientnet_lite1"), state_dict, source="lite0.pth")
    with pytest.raises(el.CheckpointError, match="lite2.pth"):
        el.load_state_dict_into(el.build_efficientnet_lite("efficientnet_lite1"), lite_state_dicts["efficientnet_lite2"],
                                source="lite2.pth")
    with pytest.raises(el.CheckpointError, match="lite1.pth: a checkpoint of 21 blocks, not efficientnet_lite0"):
        el.load_state_dict_into(el.build_efficientnet_lite0(), lite_state_dicts["efficientnet_lite1"],
                                source="lite1.pth")


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE12)
def test_lite12_chelsea_is_a_cat(name, lite_logits_models, imagenet_labels):
    model, _ = lite_logits_models[name]
    size = el.VARIANTS[name].resolution
    logits = model.predict_on_batch(el.preprocess_input(_images(size)[:1]))[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top5 = np.argsort(-probs)[:5]
    names = [imagenet_labels[i + 1] for i in top5]
    print(f"{name} chelsea top-5:", [(n, round(float(probs[i]), 3)) for n, i in zip(names, top5)])
    assert names[0] in CAT_CLASSES and probs[top5[0]] > 0.5  # measured: Egyptian cat 0.795 (lite1), 0.750 (lite2)


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE12)
def test_lite12_logits_agree_with_pytorch_reference(name, lite_logits_models):
    torch = pytest.importorskip("torch")
    model, source = lite_logits_models[name]
    sd = torch.load(source, map_location="cpu", weights_only=True)
    x = el.preprocess_input(_images(el.VARIANTS[name].resolution))
    ref = _torch_reference_logits(sd, torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                                  STRIDES[name]).numpy()
    ours = model.predict_on_batch(x)
    diff = np.abs(ours - ref).max()
    print(f"{name}: max |keras - torch| logit difference {diff:.2e} (logit range {np.abs(ref).max():.1f})")
    assert diff < 5e-5  # measured 1.2e-5 (lite1) and 1.1e-5 (lite2) on a range of 9.4
    np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1))


@pytest.mark.slow
def test_keras_application_constructor(tmp_path, lite_logits_models):
    """``efficientnet_lite1(include_top=, weights=, input_shape=)`` as keras.applications: random init, the
    pip ImageNet weights, or a saved ``.weights.h5``; without top it ends at top_activation."""
    notop = el.efficientnet_lite1(include_top=False, weights="imagenet", input_shape=(240, 240, 3))
    assert notop.output.shape[1:] == (8, 8, 1280) and "logits" not in [layer.name for layer in notop.layers]
    full = el.efficientnet_lite1(weights="imagenet")
    path = tmp_path / "lite1.weights.h5"
    full.save_weights(path)
    again = el.efficientnet_lite1(weights=path)
    x = el.preprocess_input(_images(240)[:2])
    np.testing.assert_array_equal(again.predict_on_batch(x), full.predict_on_batch(x))
    random = el.efficientnet_lite1(weights=None)
    assert not np.array_equal(random.get_layer("stem_conv").get_weights()[0],
                              full.get_layer("stem_conv").get_weights()[0])
    with pytest.raises(el.CheckpointError, match="lite1.weights.h5: not efficientnet_lite2 Keras weights"):
        el.efficientnet_lite2(weights=path)
