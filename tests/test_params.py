"""params/*.yaml and cbir.params: defaults, overrides, validation, path resolution."""
from __future__ import annotations

from pathlib import Path

import pytest

from cbir.params import DEFAULTS_FILE, ParamsError, load_defaults, load_params, notebook_parameters

# the notebook parameters of docs/CONVENTIONS.md with their documented defaults
NOTEBOOK_DEFAULTS = {
    "catalog": "demo", "model": "efficientnet_lite0", "layer": None, "pooling": "gap", "weights": "imagenet",
    "batch_size": 32, "l2_normalize": False,
    "metrics": ["euclidean", "manhattan", "minkowski", "chebyshev", "correlation", "cosine"],
    "k": 5, "minkowski_p": 3, "same_category": False, "n_queries": 60, "seed": 0, "cv_folds": 10,
    "cv_fold_size": 20, "color_bins": 32, "lbp_points": 24, "lbp_radius": 3, "roi_margin": 4, "gallery_queries": 6,
    "subcategory_from": "articleType", "samples_per_subcategory": 4, "pr_depth": 100,
    "pca_whiten": False, "cluster": None, "vectors": "store", "train": None,
}
PATH_KEYS = {"out_dir", "store"}  # defaults null: derived from the run name
STUDY = ("vgg16", "vgg19", "resnet50", "xception", "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
         "efficientnet_lite2", "color_hist", "lbp", "hog")
LEARNED = ("finetune_mobilenet_v2", "metric_mobilenet_v2", "metric_mobilenet_v2_openset", "autoencoder")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_hold_exactly_the_notebook_parameters_plus_name_and_notebooks():
    defaults = load_defaults()
    assert set(defaults) == set(NOTEBOOK_DEFAULTS) | PATH_KEYS | {"name", "notebooks"}
    assert {k: defaults[k] for k in NOTEBOOK_DEFAULTS} == NOTEBOOK_DEFAULTS
    assert defaults["out_dir"] is None and defaults["store"] is None and defaults["name"] is None
    assert defaults["notebooks"] == ["00", "01", "02", "03", "04", "05", "06"]  # no 07 (app), no 08 (summary)


def test_learned_params_train_their_backbone_and_extract_the_trained_model(repo_root):
    weights = str((repo_root.parent / "shared/models/mobilenet_v2_imagenet_notop.weights.h5").resolve())
    methods = {}
    for stem in LEARNED:
        params = load_params(repo_root / "params" / f"{stem}.yaml")
        assert params["model"] == str(repo_root / "outputs" / stem / "model" / "model.keras")
        assert params["layer"] is None and params["pooling"] is None and params["n_queries"] == 500
        assert params["train"]["backbone"] == "mobilenet_v2" and params["train"]["weights"] == weights
        assert params["notebooks"][0] in ("09", "10")
        methods[stem] = (params["train"]["method"], tuple(params["train"]["holdout"]))
    assert methods["finetune_mobilenet_v2"] == ("classifier", ())
    assert methods["metric_mobilenet_v2"] == ("metric", ())
    assert methods["metric_mobilenet_v2_openset"][0] == "metric" and len(methods["metric_mobilenet_v2_openset"][1]) == 7
    assert methods["autoencoder"] == ("autoencoder", ())


def test_train_settings_are_checked_before_any_notebook(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "name: bad\nmodel: mobilenet_v2\ntrain: {method: siamese}\n")
    with pytest.raises(ParamsError, match="bad.yaml: training settings: method must be one of"):
        load_params(bad)
    bad = _write(tmp_path / "bad.yaml", "name: bad\nmodel: lbp\npooling: null\ntrain: {method: metric}\n")
    with pytest.raises(ParamsError, match="with train, model must be the CNN backbone"):
        load_params(bad)
    bad = _write(tmp_path / "bad.yaml", "name: bad\ntrain: {epochs: 2, backbone: vgg19}\n")
    with pytest.raises(ParamsError, match="train.backbone is set by the parameter 'model'"):
        load_params(bad)
    given = _write(tmp_path / "given.yaml", "name: given\nmodel: models/tagger/model.keras\npooling: null\n")
    assert load_params(given, root=tmp_path)["model"] == str(tmp_path / "models/tagger/model.keras")
    pooled = _write(tmp_path / "pooled.yaml", "name: pooled\nmodel: models/tagger/model.keras\n")
    with pytest.raises(ParamsError, match="is a trained model .*pooling must be null"):
        load_params(pooled)


def test_every_params_file_loads(repo_root):
    files = sorted(p.stem for p in (repo_root / "params").glob("*.yaml") if p.name != "defaults.yaml")
    assert files == sorted(STUDY + LEARNED + ("demo", "summary"))
    shared_catalog = str((repo_root.parent / "shared/data/fashion-products-224/manifest.csv").resolve())
    for stem in STUDY:
        params = load_params(repo_root / "params" / f"{stem}.yaml")
        assert params["name"] == stem
        assert params["model"] == stem
        assert params["catalog"] == shared_catalog
        assert params["store"] == str(repo_root / "outputs" / "cbir.sqlite")  # one store for the comparison
        assert params["out_dir"] == str(repo_root / "outputs" / stem)
        assert params["metrics"] == NOTEBOOK_DEFAULTS["metrics"]
        assert params["n_queries"] == 500  # a tight answer on the real catalogue: CI half-width about 0.03
    for stem in ("color_hist", "lbp", "hog"):
        params = load_params(repo_root / "params" / f"{stem}.yaml")
        assert params["pooling"] is None and params["weights"] == "none"
    mobilenet = load_params(repo_root / "params" / "mobilenet_v2.yaml")
    assert mobilenet["weights"] == str((repo_root.parent / "shared/models/mobilenet_v2_imagenet_notop.weights.h5")
                                       .resolve())
    for stem in ("vgg16", "vgg19", "resnet50", "xception", "efficientnet_lite0", "efficientnet_lite1",
                 "efficientnet_lite2"):
        assert load_params(repo_root / "params" / f"{stem}.yaml")["weights"] == "imagenet"
    summary = load_params(repo_root / "params" / "summary.yaml")  # notebook 08 over the study's shared store
    assert summary["notebooks"] == ["08"] and summary["store"] == str(repo_root / "outputs" / "cbir.sqlite")
    assert summary["catalog"] == shared_catalog and summary["out_dir"] == str(repo_root / "outputs" / "summary")


def test_demo_params(repo_root):
    params = load_params(repo_root / "params" / "demo.yaml")
    assert params == {
        **NOTEBOOK_DEFAULTS, "name": "demo", "notebooks": ["00", "01", "02", "03", "04", "05", "06", "08"],
        "out_dir": str(repo_root / "outputs" / "demo"),
        "store": str(repo_root / "outputs" / "demo" / "features.sqlite"),
    }


def test_real_params_files_point_at_existing_data(repo_root, real_catalog_dir, mobilenet_v2_notop_weights):
    for stem in STUDY:
        load_params(repo_root / "params" / f"{stem}.yaml", check_paths=True)


def test_file_overrides_defaults_and_overrides_override_the_file(tmp_path):
    params_file = _write(tmp_path / "mine.yaml", "k: 10\nmetrics: [cosine]\nlayer: block5_conv3\n")
    params = load_params(params_file, root=tmp_path)
    assert params["name"] == "mine"  # the file's stem when the file has no name
    assert (params["k"], params["metrics"], params["layer"]) == (10, ["cosine"], "block5_conv3")
    assert params["out_dir"] == str(tmp_path / "outputs" / "mine")
    assert params["store"] == str(tmp_path / "outputs" / "mine" / "features.sqlite")

    params = load_params(params_file, {"k": "3", "layer": "null", "metrics": "[euclidean, cosine]",
                                       "same_category": "true", "minkowski_p": "1.5", "n_queries": "null",
                                       "notebooks": "[00, 01, 08]", "name": "other"}, root=tmp_path)
    assert params["k"] == 3 and params["layer"] is None and params["same_category"] is True
    assert params["metrics"] == ["euclidean", "cosine"] and params["minkowski_p"] == 1.5
    assert params["n_queries"] is None
    assert params["notebooks"] == ["00", "01", "08"]  # YAML reads 00 and 01 as ints: re-padded
    assert params["out_dir"] == str(tmp_path / "outputs" / "other")
    assert notebook_parameters(params).keys() == set(NOTEBOOK_DEFAULTS) | PATH_KEYS


def test_paths_are_relative_to_the_root_in_files_and_to_cwd_in_overrides(tmp_path, monkeypatch):
    params_file = _write(tmp_path / "p.yaml", "catalog: data/manifest.csv\nstore: db/x.sqlite\n"
                                              "weights: w/model.weights.h5\nout_dir: out/p\n")
    params = load_params(params_file, root=tmp_path / "repo")
    assert params["catalog"] == str(tmp_path / "repo" / "data" / "manifest.csv")
    assert params["store"] == str(tmp_path / "repo" / "db" / "x.sqlite")
    assert params["weights"] == str(tmp_path / "repo" / "w" / "model.weights.h5")
    assert params["out_dir"] == str(tmp_path / "repo" / "out" / "p")

    monkeypatch.chdir(tmp_path)
    params = load_params(params_file, {"catalog": "elsewhere/cat.csv", "weights": "imagenet"}, root=tmp_path / "repo")
    assert params["catalog"] == str(tmp_path / "elsewhere" / "cat.csv")
    assert params["weights"] == "imagenet"
    assert load_params(params_file, {"catalog": "demo"}, root=tmp_path)["catalog"] == "demo"


def test_unknown_key_names_the_file_and_suggests_the_closest(tmp_path):
    params_file = _write(tmp_path / "typo.yaml", "name: typo\nmetric: [cosine]\n")
    with pytest.raises(ParamsError, match=r"typo\.yaml: unknown parameter 'metric' \(did you mean 'metrics'\?\)"):
        load_params(params_file)
    good = _write(tmp_path / "good.yaml", "name: good\n")
    with pytest.raises(ParamsError, match=r"-p cv_fold: unknown parameter 'cv_fold' \(did you mean 'cv_folds'\?\)"):
        load_params(good, {"cv_fold": "3"})
    with pytest.raises(ParamsError, match=r"unknown parameter 'zzz'; valid keys: name, notebooks, catalog"):
        load_params(good, {"zzz": "3"})


@pytest.mark.parametrize("key, value, message", [
    ("k", "ten", "parameter 'k' must be an int, got 'ten' (str)"),
    ("k", "2.5", "parameter 'k' must be an int, got 2.5 (float)"),
    ("k", "0", "parameter 'k' must be > 0, got 0"),
    ("same_category", "1", "parameter 'same_category' must be a bool, got 1 (int)"),
    ("metrics", "cosine", "parameter 'metrics' must be a list of strings, got 'cosine' (str)"),
    ("metrics", "[cosine, hamming]", "metrics must be distinct names from euclidean"),
    ("metrics", "[cosine, cosine]", "metrics must be distinct names"),
    ("metrics", "[]", "metrics must be distinct names"),
    ("pooling", "avg", "pooling 'avg' must be one of gap, mac, gem, rmac or null"),
    ("layer", "3", "parameter 'layer' must be null or a str, got 3 (int)"),
    ("model", "null", "parameter 'model' must be a str, got None (null)"),
    ("seed", "-1", "parameter 'seed' must be >= 0, got -1"),
    ("minkowski_p", "0.5", "minkowski_p must be >= 1"),
    ("name", "../escape", "run name '../escape' must be letters"),
    ("notebooks", "[0a]", "notebooks must be two-digit prefixes such as '00', got ['0a']"),
    ("k", "[unclosed", "-p k: value '[unclosed' is not a YAML literal"),
])
def test_bad_values_are_errors_naming_the_key(tmp_path, key, value, message):
    params_file = _write(tmp_path / "p.yaml", "name: p\n")
    with pytest.raises(ParamsError, match=f"^-p {key}: ") as info:
        load_params(params_file, {key: value})
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file not found: .*nope.yaml"):
        load_params(tmp_path / "nope.yaml")
    broken = _write(tmp_path / "broken.yaml", "k: [1, 2\n")
    with pytest.raises(ParamsError, match=r"broken\.yaml: not valid YAML"):
        load_params(broken)
    listing = _write(tmp_path / "list.yaml", "- k\n- 5\n")
    with pytest.raises(ParamsError, match=r"list\.yaml: expected a mapping of parameter names to values, got list"):
        load_params(listing)
    wrong_type = _write(tmp_path / "wt.yaml", "batch_size: big\n")
    with pytest.raises(ParamsError, match=r"wt\.yaml: parameter 'batch_size' must be an int, got 'big'"):
        load_params(wrong_type)
    missing = _write(tmp_path / "missing.yaml", "catalog: no/such/manifest.csv\n")
    assert load_params(missing, root=tmp_path)["catalog"] == str(tmp_path / "no/such/manifest.csv")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml: catalog not found: .*no/such/manifest\.csv"):
        load_params(missing, root=tmp_path, check_paths=True)


def test_defaults_file_is_the_repository_one(repo_root):
    assert DEFAULTS_FILE == repo_root / "params" / "defaults.yaml"


def test_duplicate_key_is_refused_naming_file_key_and_lines(tmp_path):
    dup = _write(tmp_path / "dup.yaml", "model: vgg16\nk: 5\n# a comment\nmodel: resnet50\n")
    with pytest.raises(ParamsError, match=r"dup\.yaml: duplicate key 'model' on lines 1 and 4$"):
        load_params(dup)
    defaults = _write(tmp_path / "defaults.yaml", "k: 5\nseed: 0\nk: 7\n")
    with pytest.raises(ParamsError, match=r"defaults\.yaml: duplicate key 'k' on lines 1 and 3"):
        load_defaults(defaults)
    with pytest.raises(ParamsError, match=r"-p metrics: .*duplicate key 'a' on lines 1 and 1"):
        load_params(_write(tmp_path / "p.yaml", "name: p\n"), {"metrics": "{a: 1, a: 2}"})
    # the same key in two different mappings is fine
    nested = _write(tmp_path / "nested.yaml", "a: {x: 1}\nb:\n  x: 2\n")
    assert load_defaults(nested) == {"a": {"x": 1}, "b": {"x": 2}}


# ------------------------------------------------------------------ validation against the registries
@pytest.mark.parametrize("key, value, message", [
    ("model", "vgg16x", "model 'vgg16x' is not known (did you mean 'vgg16'?); backbones: vgg16, vgg19, resnet50"),
    ("model", "alexnet", "handcrafted descriptors: color_hist, lbp, hog"),
    ("pooling", "gemm", "pooling 'gemm' must be one of gap, mac, gem, rmac or null (did you mean 'gem'?)"),
    ("metrics", "[cosine, cosin]", "metrics must be distinct names from euclidean, manhattan, minkowski, chebyshev, "
                                   "correlation, cosine; got ['cosine', 'cosin'] (did you mean 'cosine'?)"),
    ("subcategory_from", "masterCategory", "subcategory_from 'masterCategory' must be one of articleType, subCategory"),
])
def test_unknown_registry_names_are_errors_naming_the_key_and_the_allowed_values(tmp_path, key, value, message):
    params_file = _write(tmp_path / "p.yaml", "name: p\n")
    with pytest.raises(ParamsError, match=f"^-p {key}: ") as info:
        load_params(params_file, {key: value})
    assert message in str(info.value)


def test_the_allowed_values_are_the_registries(tmp_path):
    from cbir.backbones import BACKBONES, DESCRIPTORS
    from cbir.measures import MEASURES
    from cbir.pooling import POOLINGS

    params_file = _write(tmp_path / "p.yaml", "name: p\n")
    with pytest.raises(ParamsError) as info:
        load_params(params_file, {"model": "nope"})
    assert f"backbones: {', '.join(BACKBONES)}; handcrafted descriptors: {', '.join(DESCRIPTORS)}" in str(info.value)
    for name in list(BACKBONES) + list(DESCRIPTORS):
        extra = {"pooling": "null"} if name in DESCRIPTORS else {}
        assert load_params(params_file, {"model": name, **extra})["model"] == name
    for pooling in POOLINGS:
        assert load_params(params_file, {"pooling": pooling})["pooling"] == pooling
    assert load_params(params_file, {"metrics": f"[{', '.join(MEASURES)}]"})["metrics"] == list(MEASURES)


def test_model_layer_and_pooling_must_fit_together(tmp_path):
    # a handcrafted descriptor takes no pooling or layer (build_extractor would refuse it inside notebook 01)
    in_file = _write(tmp_path / "hog.yaml", "name: hog\nmodel: hog\n")  # pooling defaults to gap
    with pytest.raises(ParamsError, match=r"hog\.yaml: model 'hog' is a handcrafted descriptor: pooling must be null, "
                                          r"got 'gap'"):
        load_params(in_file)
    with pytest.raises(ParamsError, match=r"^-p layer: model 'lbp' is a handcrafted descriptor: layer must be null"):
        load_params(in_file, {"model": "lbp", "pooling": "null", "layer": "fc2"})
    # without pooling the layer must be one of the backbone's named feature layers
    with pytest.raises(ParamsError, match=r"^-p layer: vgg16 has no feature layer 'fc_2' \(did you mean 'fc2'\?\); "
                                          r"with pooling null the layer must be one of fc1, fc2, predictions"):
        load_params(in_file, {"model": "vgg16", "pooling": "null", "layer": "fc_2"})
    assert load_params(in_file, {"model": "vgg16", "pooling": "null", "layer": "fc1"})["layer"] == "fc1"
    # with a pooling any layer name may be pooled (checked against the built model in notebook 01)
    pooled = load_params(in_file, {"model": "vgg16", "pooling": "gem", "layer": "block4_conv3"})
    assert pooled["layer"] == "block4_conv3"


@pytest.mark.parametrize("spelling", ["none", "None", "null"])
def test_pooling_none_means_no_pooling(tmp_path, spelling):
    params_file = _write(tmp_path / "p.yaml", f"name: p\nmodel: color_hist\npooling: {spelling}\n")
    assert load_params(params_file)["pooling"] is None
    assert load_params(_write(tmp_path / "q.yaml", "name: q\n"), {"pooling": spelling})["pooling"] is None


def test_missing_catalogue_names_the_key_the_file_and_what_is_allowed(tmp_path):
    params_file = _write(tmp_path / "p.yaml", "name: p\ncatalog: no/such.csv\nweights: w/missing.h5\n")
    with pytest.raises(FileNotFoundError) as info:
        load_params(params_file, root=tmp_path, check_paths=True)
    assert str(info.value) == (f"{params_file}: catalog not found: {tmp_path / 'no/such.csv'} (expected 'demo', a "
                               "manifest CSV, a Kaggle folder (styles.csv + images/) or a folder tree "
                               "<category>/<subcategory>/*.jpg)")
    (tmp_path / "no").mkdir()
    (tmp_path / "no" / "such.csv").write_text("image,category,subcategory\n")
    with pytest.raises(FileNotFoundError, match=r"p\.yaml: weights not found: .*w/missing\.h5 \(expected 'imagenet', "
                                                r"'none' or a \.weights\.h5 / \.h5 / \.pth file\)"):
        load_params(params_file, root=tmp_path, check_paths=True)


def test_cbir_run_refuses_bad_parameters_in_seconds_without_keras(tmp_path):
    """The whole command, in a fresh interpreter: error line naming key and allowed values, no notebook started."""
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    probe = ("import sys, time; t = time.perf_counter(); from cbir import cli; rc = cli.main(sys.argv[1:]); "
             "print('keras' in sys.modules or 'tensorflow' in sys.modules, round(time.perf_counter() - t, 2)); "
             "sys.exit(rc)")
    for args, message in (
        (["-p", "model", "resnet5"], "error: -p model: model 'resnet5' is not known (did you mean 'resnet50'?)"),
        (["-p", "pooling", "avg"], "error: -p pooling: pooling 'avg' must be one of gap, mac, gem, rmac or null"),
        (["-p", "k", "five"], "error: -p k: parameter 'k' must be an int, got 'five' (str)"),
    ):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe, "run", "params/demo.yaml", "-p", "out_dir", str(out),
                               *args], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              timeout=60)
        elapsed = time.perf_counter() - t0
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith(message), proc.stderr
        keras_loaded, _ = proc.stdout.split()
        assert keras_loaded == "False"
        assert elapsed < 5, elapsed
    assert not out.exists()  # no notebook (nor folder) was started
