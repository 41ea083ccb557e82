"""Tagging with a trained model (cbir.tagging, `cbir tag`, the app's within-label search).

The model folder is built by hand in `cbir train`'s format: a Keras model whose input is (32, 32, 3) in 0..255,
``Rescaling(1/255)``, cbir's ``GlobalPool("gap")`` (the mean colour), and a Dense layer set by hand to 10 x the
identity, then softmax: the probabilities of an image are exactly ``softmax(10 * mean_rgb / 255)``, so a red image
is a "Tshirts", a green one a "Jeans", a blue one a "Sneakers". The catalogue holds noisy images of those colours,
two planted label swaps, a grey image (1/3 each: low confidence), a yellow one (a tie of Tshirts and Jeans), a label
the model never learned, a text file named .png and a missing file.
"""
from __future__ import annotations

import io
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.special import softmax

from cbir.cli import main
from cbir.images import read_image
from cbir.tagging import TaggerError, load_tagger, read_classes, tag_catalog, tag_summary, write_tags

CLASSES = ["Tshirts", "Jeans", "Sneakers"]
PARENTS = {"Tshirts": "Apparel", "Jeans": "Apparel", "Sneakers": "Footwear"}
COLOURS = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
CLEAN = {"red": ("Apparel", "Tshirts"), "green": ("Apparel", "Jeans"), "blue": ("Footwear", "Sneakers")}
SCALE = 10.0


def _expected(path: str | Path) -> np.ndarray:
    """The model's probabilities by hand: softmax of 10 x the mean colour (0..1) of the 32 x 32 image."""
    mean = read_image(path, size=32).astype(np.float64).mean(axis=(0, 1)) / 255.0
    return softmax(SCALE * mean)


def _build_model(folder: Path, *, probabilities: bool = True) -> None:
    import keras

    from cbir.layers import GlobalPool, L2Normalize

    inputs = keras.Input((32, 32, 3))
    pooled = GlobalPool("gap")(keras.layers.Rescaling(1 / 255.0)(inputs))
    outputs = {"embedding": L2Normalize()(pooled)}
    if probabilities:
        logits = keras.layers.Dense(3, name="logits")(pooled)
        outputs["probabilities"] = keras.layers.Softmax()(logits)
    else:  # an autoencoder's outputs: no classes
        outputs["reconstruction"] = keras.layers.UpSampling2D(32)(keras.layers.Reshape((1, 1, 3))(pooled))
    model = keras.Model(inputs, outputs)
    if probabilities:
        model.get_layer("logits").set_weights([SCALE * np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")


def _write_classes(folder: Path, **content) -> None:
    (folder / "classes.json").write_text(json.dumps(content), encoding="utf-8")


def _png(path: Path, colour, *, seed: int, size=(40, 48), noise: float = 12.0) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour, np.float64) + rng.normal(0, noise, (*size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train") / "classifier"
    _build_model(folder)
    _write_classes(folder, label="subcategory", classes=CLASSES, parents=PARENTS)
    pd.DataFrame({"image_id": [], "sha1": [], "class": [], "part": []}).to_csv(folder / "split.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> dict:
    """The catalogue: 4 clean images per colour, planted swaps and the odd cases; ``special`` names them."""
    root = tmp_path_factory.mktemp("shop")
    rows, seed = [], 0
    for colour, (category, subcategory) in CLEAN.items():
        for i in range(4):
            rows.append({"image": f"images/{colour}{i}.png", "category": category, "subcategory": subcategory,
                         "colour": colour})
    special = {
        "swap_red": ("red", "Apparel", "Jeans"),  # a red T-shirt labelled Jeans
        "swap_blue": ("blue", "Apparel", "Tshirts"),  # a blue sneaker labelled Tshirts
        "grey": ((128, 128, 128), "Apparel", "Tshirts"),  # 1/3 each (no noise): low confidence
        "yellow": ((200, 200, 30), "Apparel", "Jeans"),  # Tshirts and Jeans tie (no noise) at 0.4997
        "unknown": ("red", "Apparel", "Dresses"),  # a label the model never learned
    }
    for name, (colour, category, subcategory) in special.items():
        rows.append({"image": f"images/{name}.png", "category": category, "subcategory": subcategory,
                     "colour": colour if isinstance(colour, str) else name})
    for row in rows:
        colour = COLOURS.get(row["colour"]) or special[row["colour"]][0]
        seed += 1
        _png(root / row["image"], colour, seed=seed, noise=0.0 if row["colour"] in ("grey", "yellow") else 12.0)
    (root / "images" / "text.png").write_text("not an image, only text\n", encoding="utf-8")
    rows.append({"image": "images/text.png", "category": "Apparel", "subcategory": "Tshirts", "colour": "text"})
    rows.append({"image": "images/gone.png", "category": "Footwear", "subcategory": "Sneakers", "colour": "gone"})
    table = pd.DataFrame(rows)
    table["image_id"] = [Path(i).stem for i in table["image"]]
    table[["image_id", "image", "category", "subcategory"]].to_csv(root / "manifest.csv", index=False)
    return {"manifest": root / "manifest.csv", "table": table.set_index("image_id"), "root": root}


@pytest.fixture(scope="module")
def tags(model_dir, shop) -> pd.DataFrame:
    return tag_catalog(model_dir, shop["manifest"], batch_size=4)


def test_tagger_reads_the_folder_and_predicts_the_hand_set_probabilities(model_dir, shop):
    tagger = load_tagger(model_dir)
    assert (tagger.label, tagger.classes, tagger.parents, tagger.input_size) == (
        "subcategory", tuple(CLASSES), PARENTS, 32)
    assert tagger.categories == ("Apparel", "Footwear")
    paths = [shop["root"] / f"images/{c}0.png" for c in ("red", "green", "blue")]
    images = np.stack([read_image(p, size=32) for p in paths])
    P = tagger.predict(images, batch_size=2)  # two batches
    assert P.dtype == np.float32 and P.shape == (3, 3)
    np.testing.assert_allclose(P, [_expected(p) for p in paths], rtol=1e-5, atol=1e-6)
    assert P.argmax(axis=1).tolist() == [0, 1, 2]
    assert tagger.predict(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\), got \(1, 40, 40, 3\)"):
        tagger.predict(np.zeros((1, 40, 40, 3), np.uint8))


def test_clean_images_are_predicted_with_their_labels_and_exact_probabilities(tags):
    clean = tags[tags["image_id"].str.fullmatch(r"(red|green|blue)\d")]
    assert len(clean) == 12
    assert (clean["predicted_subcategory"] == clean["subcategory"]).all()
    assert (clean["predicted_category"] == clean["category"]).all()
    assert not clean[["mistag", "low_confidence", "given_unknown"]].to_numpy().any()
    assert clean["error"].isna().all()
    for row in clean.itertuples():
        p = _expected(row.path)
        assert row.subcategory_probability == pytest.approx(p.max(), rel=1e-5)
        assert row.given_probability == pytest.approx(p[CLASSES.index(row.subcategory)], rel=1e-5)
        # a category's probability is the sum of its sub-categories'
        apparel = p[0] + p[1]
        assert row.category_probability == pytest.approx(apparel if row.category == "Apparel" else p[2], rel=1e-5)
        order = np.argsort(-p, kind="stable")
        assert row.top3 == " | ".join(f"{CLASSES[j]} {p[j]:.2f}" for j in order)


def test_columns_and_order_follow_the_catalogue(tags, shop):
    assert list(tags.columns) == ["image_id", "path", "category", "subcategory", "predicted_subcategory",
                                  "subcategory_probability", "predicted_category", "category_probability", "top3",
                                  "low_confidence", "mistag", "given_unknown", "given_probability", "error"]
    assert tags["image_id"].tolist() == shop["table"].index.tolist()
    assert tags["top3"].iloc[0].startswith("Tshirts 1.00 | ")


def test_mistag_finds_exactly_the_planted_swaps(tags):
    flagged = tags.loc[tags["mistag"], ["image_id", "subcategory", "predicted_subcategory"]]
    assert flagged.values.tolist() == [["swap_red", "Jeans", "Tshirts"], ["swap_blue", "Tshirts", "Sneakers"]]
    row = tags.set_index("image_id").loc["swap_red"]
    assert row["given_probability"] == pytest.approx(_expected(row["path"])[1], abs=1e-6)  # float32
    assert row["given_probability"] < 0.01 and row["subcategory_probability"] > 0.99


def test_low_confidence_and_ties(tags):
    t = tags.set_index("image_id")
    assert t.index[t["low_confidence"]].tolist() == ["grey", "yellow"]
    grey = t.loc["grey"]
    assert grey["predicted_subcategory"] == "Tshirts"  # a tie goes to the first class
    assert grey["subcategory_probability"] == pytest.approx(1 / 3, rel=1e-6) and not grey["mistag"]
    assert grey["category_probability"] == pytest.approx(2 / 3, rel=1e-6)
    assert grey["given_probability"] == pytest.approx(1 / 3, rel=1e-6)
    yellow = t.loc["yellow"]
    # Tshirts and Jeans share ~0.5 (< 0.5: low confidence) but the category is sure: their sum
    assert yellow["subcategory_probability"] == pytest.approx(1 / (2 + np.exp(-SCALE * 170 / 255)), rel=1e-6)
    assert yellow["subcategory_probability"] < 0.5 and yellow["category_probability"] > 0.99
    assert yellow["predicted_category"] == "Apparel" and not yellow["mistag"]  # given Jeans, not contradicted


def test_a_label_the_model_never_learned_is_not_a_mistag(tags):
    row = tags.set_index("image_id").loc["unknown"]
    assert row["given_unknown"] and not row["mistag"] and np.isnan(row["given_probability"])
    assert row["predicted_subcategory"] == "Tshirts" and row["subcategory_probability"] > 0.99
    assert tags["given_unknown"].sum() == 1


def test_bad_images_are_error_rows_not_a_crash(tags):
    t = tags.set_index("image_id")
    assert t.index[t["error"].notna()].tolist() == ["text", "gone"]
    assert t.at["text", "error"].startswith("not_an_image: ") and "text.png" in t.at["text", "error"]
    assert t.at["gone", "error"].startswith("missing: ")
    for image_id in ("text", "gone"):
        assert t.loc[image_id, ["predicted_subcategory", "predicted_category", "top3"]].isna().all()
        assert not t.at[image_id, "mistag"] and not t.at[image_id, "low_confidence"]
    assert tag_summary(tags) == {"n_images": 19, "n_tagged": 17, "n_errors": 2, "n_low_confidence": 2,
                                 "n_mistag": 2, "n_given_unknown": 1}


def test_thresholds_move_the_flags(model_dir, shop):
    t = tag_catalog(load_tagger(model_dir), shop["manifest"], low_confidence=0.3, disagree=1.0).set_index("image_id")
    assert t.index[t["low_confidence"]].tolist() == []  # 1/3 and ~0.5 are not under 0.3
    assert not t["mistag"].any()  # nothing is predicted with probability 1
    with pytest.raises(ValueError, match="disagree must be a probability"):
        tag_catalog(model_dir, shop["manifest"], disagree=1.5)


def test_a_category_model_gives_only_category_columns(model_dir, shop, tmp_path):
    folder = tmp_path / "by_category"
    shutil.copytree(model_dir, folder)
    _write_classes(folder, label="category", classes=["Apparel", "Electronics", "Footwear"])
    t = tag_catalog(folder, shop["manifest"])
    assert "predicted_subcategory" not in t and "subcategory_probability" not in t
    t = t.set_index("image_id")
    assert t.at["red0", "predicted_category"] == "Apparel" and not t.at["red0", "mistag"]
    assert t.at["blue0", "predicted_category"] == "Footwear"
    # green is "Electronics" to this model: every green Apparel image is contradicted, and so is the blue
    # sneaker labelled Apparel
    assert t.index[t["mistag"]].tolist() == ["green0", "green1", "green2", "green3", "swap_blue"]
    assert t.at["green0", "category_probability"] == pytest.approx(_expected(t.at["green0", "path"])[1], rel=1e-5)


def test_folders_that_cannot_tag_are_clear_errors(model_dir, tmp_path):
    no_classes = tmp_path / "autoencoder"
    _build_model(no_classes, probabilities=False)
    with pytest.raises(TaggerError, match=rf"{re.escape(str(no_classes))}: no classes.json"):
        load_tagger(no_classes)
    _write_classes(no_classes, label="subcategory", classes=[], parents={})  # what cbir train writes for one
    with pytest.raises(TaggerError, match=rf"{re.escape(str(no_classes))}: classes.json lists no classes "
                                          r"\(an autoencoder\?\): this model cannot tag"):
        load_tagger(no_classes)
    _write_classes(no_classes, label="subcategory", classes=CLASSES, parents=PARENTS)
    with pytest.raises(TaggerError, match=rf"{re.escape(str(no_classes))}: the model has no 'probabilities' "
                                          r"output \(embedding, reconstruction\)"):
        load_tagger(no_classes)
    with pytest.raises(TaggerError, match="no such model folder"):
        load_tagger(tmp_path / "nowhere")
    two = tmp_path / "two"
    shutil.copytree(model_dir, two)
    _write_classes(two, label="category", classes=["Apparel", "Footwear"])
    with pytest.raises(TaggerError, match="gives 3 probabilities, classes.json names 2 classes"):
        load_tagger(two)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"label": "colour", "classes": CLASSES}), "label 'colour' is not one of subcategory, category"),
    (json.dumps({"label": "category", "classes": "Apparel"}), "classes must be a list of names"),
    (json.dumps({"label": "category", "classes": ["Apparel", ""]}), "classes must be a list of names"),
    (json.dumps({"label": "category", "classes": ["A", "B", "A"]}), "classes named twice: A"),
    (json.dumps({"label": "subcategory", "classes": CLASSES, "parents": {"Tshirts": "Apparel"}}),
     "parents gives no category for Jeans, Sneakers"),
])
def test_malformed_classes_json_names_the_file(tmp_path, content, message):
    (tmp_path / "classes.json").write_text(content, encoding="utf-8")
    with pytest.raises(TaggerError, match=rf"{re.escape(str(tmp_path / 'classes.json'))}: .*{re.escape(message)}"):
        read_classes(tmp_path)


def test_write_tags_creates_the_folder_and_refuses_a_directory(tags, tmp_path):
    out = write_tags(tags, tmp_path / "new" / "tags.csv")
    back = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert back["image_id"].astype(str).tolist() == tags["image_id"].tolist()
    assert back["mistag"].tolist() == tags["mistag"].tolist()
    np.testing.assert_allclose(back["subcategory_probability"], tags["subcategory_probability"], rtol=1e-5)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_tags(tags, tmp_path / "new")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["tags.csv"]  # no temporary file left


# ---------------------------------------------------------------------------------------------- cbir tag
def test_cbir_tag_writes_the_csv_and_prints_the_summary(model_dir, shop, tmp_path, capsys, tags):
    out = tmp_path / "out" / "tags.csv"
    assert main(["tag", "--model", str(model_dir), "--catalog", str(shop["manifest"]), "--out", str(out),
                 "--batch-size", "5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == [f"tagged 17 images (2 unreadable): 2 low-confidence, 2 likely mis-tags; wrote {out}"]
    back = pd.read_csv(out)
    assert back.loc[back["mistag"], "image_id"].tolist() == ["swap_red", "swap_blue"]
    assert back["predicted_subcategory"].fillna("").tolist() == tags["predicted_subcategory"].fillna("").tolist()

    assert main(["tag", "--model", str(model_dir), "--catalog", str(shop["manifest"]), "--out", str(out),
                 "--disagree", "0.5", "--low-confidence", "0.4"]) == 0
    # the yellow tie (~0.5 < 0.5) is no mis-tag; grey (1/3) is the only low confidence
    assert capsys.readouterr().out.strip().endswith("1 low-confidence, 2 likely mis-tags; wrote " + str(out))


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    return lines[-1]


def test_cbir_tag_errors_are_one_line(model_dir, shop, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["tag", "--model", str(bare), "--catalog", str(shop["manifest"]), "--out",
                 str(tmp_path / "t.csv")]) == 1
    assert _error(capsys) == f"error: {bare}: no classes.json: this model has no classes (an autoencoder?), " \
                             f"it cannot tag"
    assert main(["tag", "--model", str(model_dir), "--catalog", str(shop["manifest"]), "--out", str(tmp_path)]) == 1
    assert "is a folder" in _error(capsys)
    assert not (tmp_path / "t.csv").exists()
    with pytest.raises(SystemExit):
        main(["tag", "--model", str(model_dir), "--catalog", str(shop["manifest"]), "--out", "x.csv",
              "--disagree", "2"])
    assert "expected a probability between 0 and 1, got '2'" in capsys.readouterr().err


def test_cbir_tag_help_has_examples(capsys):
    from cbir.cli import EXAMPLES

    with pytest.raises(SystemExit) as exit_:
        main(["tag", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "\nexamples:\n" in text and EXAMPLES["tag"].splitlines()[1] in text
    examples = [line.strip() for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.startswith("  cbir ")]
    assert len(examples) >= 2 and all(e.startswith("cbir tag --model ") for e in examples)


# ---------------------------------------------------------------------------------------------- the app
@pytest.fixture(scope="module")
def shop_store(shop, tmp_path_factory):
    """Colour histograms (8 bins) of the shop's usable images in a store."""
    from cbir.catalog import load_catalog
    from cbir.extract import extract_features
    from cbir.extractors import build_extractor
    from cbir.store import FeatureStore

    catalog = load_catalog(shop["manifest"], progress=False).usable()
    store = FeatureStore(tmp_path_factory.mktemp("store") / "features.sqlite")
    run_id = extract_features(catalog, model=build_extractor("color_hist", bins=8), store=store, progress=False,
                              workers=0)
    return store, run_id, catalog.df.set_index("image_id")


def _bytes(colour, seed=99, noise: float = 12.0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour, np.float64) + rng.normal(0, noise, (36, 36, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_app_tags_an_upload_and_searches_within_the_predicted_label(shop_store, model_dir):
    from cbir.app import VisualSearchApp

    store, run_id, labels = shop_store
    app = VisualSearchApp(store, tagger=model_dir, k=50)
    assert app.problem is None and app.tagger_label == "subcategory"
    data = _bytes(COLOURS["red"])
    everything = app.search_bytes(data, "red.png", "image/png")
    assert len(everything) == len(labels)  # unrestricted by default: every label
    label, probability = app.last_tag
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert label == "Tshirts"
    assert probability == pytest.approx(softmax(SCALE * decoded.mean(axis=(0, 1)) / 255.0)[0], rel=1e-4)
    within = app.search_bytes(data, "red.png", "image/png", within_predicted=True)
    # the run's labels decide: the blue sneaker labelled Tshirts is in, the red one labelled Jeans is out
    want = labels.index[labels["subcategory"] == "Tshirts"]
    assert sorted(within["image_id"]) == sorted(want) and "swap_blue" in set(within["image_id"])
    assert (within["subcategory"] == "Tshirts").all()
    # nearest first, in the order of the unrestricted search
    assert within["image_id"].tolist() == [i for i in everything["image_id"] if i in set(want)]
    np.testing.assert_allclose(within["distance"], everything.set_index("image_id").loc[within["image_id"],
                                                                                         "distance"])
    assert within["rank"].tolist() == list(range(1, len(want) + 1))


def test_app_widget_shows_the_tag_and_the_checkbox_restricts_the_results(shop_store, model_dir):
    from cbir.app import VisualSearchApp

    store, run_id, labels = shop_store
    app = VisualSearchApp(store, tagger=model_dir, k=5)
    app.widget(preload=False)
    c = app.controls
    assert c["within"].description == "search within the predicted sub-category" and c["within"].value is False

    def upload(name, data):
        c["upload"].value = ({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                              "last_modified": datetime(2024, 1, 1, tzinfo=timezone.utc)},)

    upload("blue.png", _bytes(COLOURS["blue"]))
    assert re.fullmatch(r'<div class="cbir-tag">Predicted sub-category: <b>Sneakers</b> \(probability 1\.00\) '
                        r'· category Footwear</div>', c["tag"].value), c["tag"].value
    shown = re.findall(r'class="cbir-id"[^>]*>([^<]*)</div>', app.shown_html())
    assert len(shown) == 5 and set(labels.loc[shown, "subcategory"]) != {"Sneakers"}  # blue things of all labels
    c["within"].value = True  # reruns the upload within Sneakers
    shown = re.findall(r'class="cbir-id"[^>]*>([^<]*)</div>', app.shown_html())
    sneakers = labels.index[labels["subcategory"] == "Sneakers"]
    assert sorted(shown) == sorted(sneakers) and len(sneakers) == 4  # the missing fifth has no vector
    assert "among the 4 catalogue images of sub-category Sneakers" in c["message"].value
    upload("grey.png", _bytes((128, 128, 128), noise=0.0))
    assert "<b>Tshirts</b> (probability 0.33)" in c["tag"].value  # the weak tie is shown as such
    c["pick"].value = "red1"  # a catalogue image: no tag
    assert c["tag"].value == "" and app.last_tag is None


def test_app_within_a_label_the_catalogue_lacks_says_so(shop_store, model_dir, tmp_path):
    from cbir.app import VisualSearchApp

    store, run_id, labels = shop_store
    folder = tmp_path / "by_category"
    shutil.copytree(model_dir, folder)
    _write_classes(folder, label="category", classes=["Apparel", "Electronics", "Footwear"])
    app = VisualSearchApp(store, tagger=str(folder), within_predicted=True)
    assert app.search_bytes(_bytes(COLOURS["green"]), "g.png").empty and app.last_tag[0] == "Electronics"
    app.widget(preload=False)
    assert app.controls["within"].description == "search within the predicted category"
    data = _bytes(COLOURS["green"])
    app.controls["upload"].value = ({"name": "g.png", "type": "image/png", "size": len(data), "content": data,
                                     "last_modified": datetime(2024, 1, 1, tzinfo=timezone.utc)},)
    assert "No catalogue image of the predicted category Electronics" in app.controls["message"].value


def test_app_without_a_tagger_is_unchanged_and_a_bad_tagger_is_shown(shop_store, tmp_path):
    from cbir.app import VisualSearchApp, env_overrides

    store, run_id, labels = shop_store
    app = VisualSearchApp(store)
    app.widget(preload=False)
    assert "within" not in app.controls and "tag" not in app.controls
    app.search_bytes(_bytes(COLOURS["red"]), "r.png")
    assert app.last_tag is None
    with pytest.raises(ValueError, match="needs a tagger"):
        app.search_bytes(_bytes(COLOURS["red"]), "r.png", within_predicted=True)
    (tmp_path / "bare").mkdir()
    bad = VisualSearchApp(store, tagger=tmp_path / "bare")
    assert bad.problem == f"{tmp_path / 'bare'}: no classes.json: this model has no classes (an autoencoder?), " \
                          f"it cannot tag"
    assert env_overrides({"CBIR_TAGGER": "models/cls", "PWD": "/srv"}, store="s") == {"store": "s",
                                                                                        "tagger": "/srv/models/cls"}
