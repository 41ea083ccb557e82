"""cbir.train: the data protocol (queries never trained on), the activation cache, the three methods end to end on
a small synthetic catalogue, the saved model as a feature extractor (same vectors after reloading, its file's SHA-1
as the run identity, safe loading), and mis-tag detection of planted label swaps."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbir.catalog import load_catalog, split_queries
from cbir.train import (METHODS, OTHER, TrainConfig, TrainingError, _same_training, backbone_cut, trained_name,
                        training_split)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from cbir.datasets import make_demo_catalog

    return make_demo_catalog(tmp_path_factory.mktemp("train-demo") / "demo", n=168, seed=3, size=96).parent


def _split_catalog(folder: Path, n_queries: int = 28):
    return split_queries(load_catalog(folder / "manifest.csv", progress=False), n_queries=n_queries, seed=0)


# ------------------------------------------------------------------------------------------------ settings
def test_config_refuses_unknown_or_bad_settings():
    with pytest.raises(TrainingError, match="unknown training settings \\['epoch'\\]"):
        TrainConfig.from_mapping({"epoch": 3})
    with pytest.raises(TrainingError, match="method must be one of"):
        TrainConfig(method="siamese")
    with pytest.raises(TrainingError, match="label must be category or subcategory"):
        TrainConfig(label="colour")
    with pytest.raises(TrainingError, match="test_fraction must be in"):
        TrainConfig(test_fraction=1.5)
    assert TrainConfig.from_mapping({"holdout": ["b", "a"]}).holdout == ("a", "b")
    assert set(METHODS) == {"classifier", "metric", "autoencoder"}


def test_same_training_compares_a_weights_file_by_its_sha1(tmp_path):
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"weights")
    import hashlib

    done = {"config": TrainConfig(weights="relative/w.weights.h5").to_dict(),
            "weights_sha1": hashlib.sha1(b"weights").hexdigest()}
    assert _same_training(done, TrainConfig(weights=str(weights)))
    assert not _same_training(done, TrainConfig(weights=str(weights), epochs=3))
    weights.write_bytes(b"other weights")
    assert not _same_training(done, TrainConfig(weights=str(weights)))


def test_backbone_cuts_name_layers_of_the_built_networks():
    from cbir.backbones import build_base_model
    from cbir.efficientnet_lite import train_cuts

    assert backbone_cut("mobilenet_v2", 1) == "block_15_add"
    assert backbone_cut("mobilenet_v2", 0) == "out_relu"
    assert train_cuts("efficientnet_lite0") == ("block6d_add", "block6c_add", "block6b_add")
    with pytest.raises(TrainingError, match="at most 3 block"):
        backbone_cut("mobilenet_v2", 4)
    with pytest.raises(TrainingError, match="not a CNN backbone"):
        backbone_cut("lbp", 1)
    for name in ("mobilenet_v2", "efficientnet_lite0"):
        model, _ = build_base_model(name, include_top=False, weights="none")
        names = {layer.name for layer in model.layers}
        assert {backbone_cut(name, b) for b in (1, 2, 3)} <= names


def test_affine_preprocessing_inside_the_model_equals_the_backbones():
    import keras

    from cbir.efficientnet_lite import preprocess_input as lite
    from cbir.layers import AffinePreprocess
    from cbir.train import _affine_preprocess

    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    for fn in (keras.applications.mobilenet_v2.preprocess_input, keras.applications.vgg19.preprocess_input, lite):
        matrix, offset = _affine_preprocess(fn)
        got = np.asarray(AffinePreprocess(matrix, offset)(x))
        np.testing.assert_allclose(got, fn(x.copy()), atol=1e-3)
    with pytest.raises(TrainingError, match="not a per-pixel affine map"):
        _affine_preprocess(lambda a: np.sqrt(a))


# ----------------------------------------------------------------------------------------- data protocol
def test_queries_and_their_copies_never_enter_training(demo_dir, tmp_path):
    folder = tmp_path / "cat"
    shutil.copytree(demo_dir, folder)
    manifest = pd.read_csv(folder / "manifest.csv")
    cat = _split_catalog(folder)
    query = cat.queries().df.iloc[0]
    copy = manifest.loc[manifest["image"] == Path(query["path"]).relative_to(folder).as_posix()].copy()
    shutil.copy(query["path"], folder / "images" / "copy_of_query.png")
    copy["image"] = "images/copy_of_query.png"
    manifest = pd.concat([manifest, copy], ignore_index=True)
    manifest.to_csv(folder / "manifest.csv", index=False)
    cat = _split_catalog(folder)
    copy_id = cat.df.loc[cat.df["path"].str.endswith("copy_of_query.png"), "image_id"].item()
    assert cat.df.set_index("image_id").loc[copy_id, "split"] == "catalog"  # searchable, but a query's bytes

    split, report = training_split(cat, TrainConfig(min_class_images=5))
    assert not split["image_id"].isin(cat.queries().ids).any()
    assert copy_id not in set(split["image_id"])
    searchable = set(cat.searchable().ids) - {copy_id}
    assert set(split["image_id"]) == searchable
    counts = split["part"].value_counts()
    assert counts["test"] == pytest.approx(0.2 * len(split), abs=len(report) + 1)
    assert counts["val"] == pytest.approx(0.16 * len(split), abs=len(report) + 1)
    assert (split.groupby("class")["part"].apply(set).map(lambda s: "train" in s)).all()


def test_holdout_and_small_classes(demo_dir):
    cat = _split_catalog(demo_dir)
    subs = cat.searchable().df["subcategory"].value_counts()
    held = subs.index[:2].tolist()
    split, report = training_split(cat, TrainConfig(holdout=held, min_class_images=5))
    assert not split["subcategory"].isin(held).any()
    assert set(report["class"]) == set(subs.index) - set(held)
    n = int(subs.iloc[-1]) + 1  # every class below n is small
    small = set(subs.index[subs < n]) - set(held)
    split, report = training_split(cat, TrainConfig(holdout=held, min_class_images=n))
    assert set(report.loc[report["fate"] != "kept", "class"]) == small
    if split["class"].eq(OTHER).any():
        assert set(split.loc[split["class"] == OTHER, "subcategory"]) == small
    split, _ = training_split(cat, TrainConfig(holdout=held, min_class_images=n, small_classes="drop"))
    assert not split["subcategory"].isin(small).any() and OTHER not in set(split["class"])
    with pytest.raises(TrainingError, match="does not have"):
        training_split(cat, TrainConfig(holdout=["no such thing"]))
    with pytest.raises(TrainingError, match="no query split"):
        training_split(load_catalog(demo_dir / "manifest.csv", progress=False), TrainConfig())


def test_a_model_file_with_code_is_refused(tmp_path):
    import keras

    from cbir.train import load_trained

    inp = keras.Input((8, 8, 3))
    out = keras.layers.Lambda(lambda t: t * 2)(keras.layers.GlobalAveragePooling2D()(inp))
    folder = tmp_path / "evil"
    folder.mkdir()
    keras.Model(inp, {"embedding": out}).save(folder / "model.keras")
    with pytest.raises(TrainingError, match="not a loadable Keras model"):
        load_trained(folder)
    (folder / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(TrainingError, match="model.keras: not a loadable"):
        load_trained(folder)
    with pytest.raises(TrainingError, match="no trained model there"):
        load_trained(tmp_path)


def test_trained_names():
    assert trained_name("outputs/metric_mobilenet_v2/model/model.keras") == "trained/metric_mobilenet_v2"
    assert trained_name("outputs/autoencoder/model_scratch/model.keras") == "trained/autoencoder_scratch"
    assert trained_name("models/tagger/model.keras") == "trained/tagger"


# ----------------------------------------------------------------------------------- training end to end
@pytest.fixture(scope="module")
def classifier(demo_dir, tmp_path_factory):
    from cbir.train import train

    out = tmp_path_factory.mktemp("trained") / "tagger"
    cat = _split_catalog(demo_dir)
    config = TrainConfig(method="classifier", backbone="efficientnet_lite0", epochs=6, fine_tune_epochs=2,
                         batch_size=32, min_class_images=5)
    train(cat, config, out, cache_dir=out.parent / "cache", verbose=0)
    return {"dir": out, "catalog": cat, "config": config}


@pytest.mark.slow
def test_classifier_writes_its_folder_and_the_reloaded_model_reproduces_its_test_metrics(classifier):
    from cbir.images import read_image
    from cbir.train import load_trained

    out = classifier["dir"]
    for name in ("model.keras", "metrics.json", "history.csv", "classes.json", "training.json", "split.csv",
                 "per_class.csv", "confusion.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    classes = json.loads((out / "classes.json").read_text())
    history = pd.read_csv(out / "history.csv")
    assert set(history["phase"]) == {"head", "fine_tune"} and {"loss", "val_loss", "accuracy"} <= set(history)
    assert metrics["test"]["accuracy"] > 0.6  # 14 visually distinct classes: far above chance (0.07)
    assert set(classes["parents"]) == set(classes["classes"])

    model, training, _ = load_trained(out)
    split = pd.read_csv(out / "split.csv", dtype={"image_id": str})
    test = split.loc[split["part"] == "test"]
    paths = classifier["catalog"].df.set_index("image_id").loc[test["image_id"], "path"]
    images = np.stack([read_image(p, size=224) for p in paths]).astype(np.float32)
    probs = np.asarray(model.predict(images, verbose=0)["probabilities"])
    accuracy = float(np.mean(np.array(classes["classes"])[probs.argmax(1)] == test["class"].to_numpy()))
    # the saved network is the trained one: the same accuracy (the cache holds float16 activations)
    assert accuracy == pytest.approx(metrics["test"]["accuracy"], abs=1.5 / len(test))
    assert training["config"]["method"] == "classifier" and not set(test["image_id"]) & set(
        classifier["catalog"].queries().ids)


@pytest.mark.slow
def test_a_trained_model_extracts_like_any_model(classifier, demo_dir, tmp_path):
    from cbir.efficientnet_lite import file_sha1
    from cbir.rebuild import RunRefusedError, extractor_kwargs
    from cbir.session import find_complete_run
    from cbir.store import FeatureStore
    from cbir.train import TrainedExtractor

    model_file = classifier["dir"] / "model.keras"
    cat = classifier["catalog"]
    store = tmp_path / "s.sqlite"
    proc = subprocess.run([sys.executable, "-m", "cbir.cli", "extract", "--catalog", str(demo_dir / "manifest.csv"),
                           "--model", str(model_file), "--store", str(store)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fs = FeatureStore(store)
    run = fs.runs().iloc[-1]
    assert run["model"] == f"trained/{classifier['dir'].name}" and run["weights_sha1"] == file_sha1(model_file)
    assert run["params"]["training"]["method"] == "classifier" and run["params"]["layer"] == "embedding"
    ids, X = fs.features(int(run["run_id"]))
    a, b = TrainedExtractor(model_file), TrainedExtractor(model_file)
    from cbir.images import read_image

    paths = cat.df.set_index("image_id").loc[ids[:6], "path"]
    images = np.stack([read_image(p, size=224) for p in paths])
    np.testing.assert_allclose(a(images), X[:6], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(a(images), b(images))

    # the store knows the run without rebuilding the model; the app/search rebuild checks the file's SHA-1
    unsplit = load_catalog(demo_dir / "manifest.csv", progress=False)
    assert find_complete_run(fs, unsplit, model=str(model_file)) == int(run["run_id"])
    kwargs = extractor_kwargs(run["params"] | {"weights_sha1": run["weights_sha1"]})
    assert kwargs["name"] == str(model_file.resolve())
    with pytest.raises(RunRefusedError, match="not found with SHA-1"):
        extractor_kwargs(run["params"] | {"weights_sha1": "0" * 40})


@pytest.mark.slow
def test_a_rerun_reuses_the_model_and_the_cache(classifier, monkeypatch):
    import cbir.train as train_module

    def refuse(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(train_module, "train", refuse)
    assert train_module.ensure_trained(classifier["catalog"], classifier["config"], classifier["dir"]) == \
        classifier["dir"]
    monkeypatch.setattr(train_module.ActivationCache, "_compute", refuse)
    cache = train_module.ActivationCache(classifier["dir"].parent / "cache", "efficientnet_lite0", "imagenet",
                                         "block6d_add", 1, classifier["config"])
    split, _ = training_split(classifier["catalog"], classifier["config"])
    ok, acts, _ = cache.activations(split, 0)
    assert ok.all() and acts.shape == (len(split), 7, 7, 192)
    chunk = sorted(cache.directory.glob("v0-*.npz"))[0]
    other = sorted(cache.directory.glob("v1-*.npz"))[0]
    kept = chunk.read_bytes()
    shutil.copy(other, chunk)  # a chunk file that holds other images than its name says
    try:
        with pytest.raises(TrainingError, match="holds other images"):
            cache.activations(split, 0)
    finally:
        chunk.write_bytes(kept)


@pytest.mark.slow
def test_mistag_detection_finds_planted_label_swaps(classifier):
    from cbir.tagging import tag_catalog

    cat = classifier["catalog"]
    clean = tag_catalog(classifier["dir"], cat, disagree=0.6)
    queries = set(cat.queries().ids)  # never trained on
    sure = clean.loc[clean["image_id"].isin(queries) & (clean["predicted_subcategory"] == clean["subcategory"])
                     & (clean["subcategory_probability"] >= 0.6)]
    planted = sure.drop_duplicates("category").head(3)["image_id"].tolist()
    assert len(planted) == 3, "the trained classifier should be sure of queries of three categories"
    df = cat.df.set_index("image_id")
    labels = df.loc[planted, ["category", "subcategory"]].to_numpy()
    df.loc[planted, ["category", "subcategory"]] = labels[[1, 2, 0]]  # rotate the labels of the three
    tags = tag_catalog(classifier["dir"], cat._replace(df.reset_index()), disagree=0.6)
    flagged = set(tags.loc[tags["mistag"], "image_id"])
    assert flagged == set(clean.loc[clean["mistag"], "image_id"]) | set(planted)
    row = tags.set_index("image_id").loc[planted[0]]
    assert row["given_probability"] < 0.4 and row["predicted_subcategory"] == labels[0][1]


@pytest.mark.slow
def test_metric_and_autoencoders_train_end_to_end(classifier, tmp_path):
    from cbir.train import TrainedExtractor, reconstruct, train

    cat = classifier["catalog"]
    base = dict(backbone="efficientnet_lite0", batch_size=32, min_class_images=5, epochs=2, fine_tune_epochs=1)
    cache = classifier["dir"].parent / "cache"
    metric = train(cat, TrainConfig(method="metric", embedding_dim=32, **base), tmp_path / "metric", cache_dir=cache,
                   verbose=0)
    ae = train(cat, TrainConfig(method="autoencoder", embedding_dim=16, **base), tmp_path / "ae", cache_dir=cache,
               verbose=0)
    scratch = train(cat, TrainConfig(method="autoencoder", encoder="scratch", embedding_dim=16,
                                     **(base | {"fine_tune_epochs": 0})), tmp_path / "scratch", cache_dir=cache,
                    verbose=0)
    pooled = train(cat, TrainConfig(method="classifier", blocks=0, **(base | {"fine_tune_epochs": 0})),
                   tmp_path / "pooled", cache_dir=cache, verbose=0)  # the head alone on pooled features
    assert json.loads((pooled / "training.json").read_text())["cut"] == "top_activation"
    images = np.random.default_rng(0).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    assert TrainedExtractor(pooled / "model.keras")(images).shape == (3, 1280)
    v = TrainedExtractor(metric / "model.keras")(images)
    assert v.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert json.loads((metric / "metrics.json").read_text())["test"]["accuracy"] > 0.3
    assert TrainedExtractor(ae / "model.keras")(images).shape == (3, 16)
    small = TrainedExtractor(scratch / "model.keras")
    assert small.input_size == 64 and small(images[:, :64, :64]).shape == (3, 16)
    for folder in (ae, scratch):
        m = json.loads((folder / "metrics.json").read_text())
        assert 0 < m["test"]["mse"] < 0.2 and m["classes"] == 0
    paths = cat.queries().df["path"].head(2).tolist()
    originals, recon = reconstruct(scratch, paths)
    assert originals.shape == recon.shape == (2, 64, 64, 3) and recon.dtype == np.uint8
    with pytest.raises(TrainingError, match="not an autoencoder"):
        reconstruct(metric, paths)


@pytest.mark.slow
def test_cbir_train_command_end_to_end(classifier, demo_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "cbir.cli", "train", "--catalog", str(demo_dir / "manifest.csv"), "--backbone",
           "efficientnet_lite0", "--method", "classifier", "--label", "category", "--out", str(out), "--epochs", "2",
           "--fine-tune-epochs", "0", "--n-queries", "28", "--cache", str(classifier["dir"].parent / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{out / 'model.keras'}: classifier on" in proc.stdout and "test (" in proc.stdout
    classes = json.loads((out / "classes.json").read_text())
    assert classes["label"] == "category" and classes["parents"] == {}
    assert len(classes["classes"]) == classifier["catalog"].searchable().df["category"].nunique()
    stamp = (out / "model.keras").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the same settings: kept, not retrained
    assert again.returncode == 0 and (out / "model.keras").stat().st_mtime_ns == stamp
    bad = subprocess.run(cmd[:-2] + ["--blocks", "9"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "at most 3 block(s)" in bad.stderr
