"""cbir.ablation: the region-of-interest cropping ablation, end to end on a small demo store (with the
colour/texture table of both runs' stored neighbours and the ablation's figures)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cbir.ablation import (ROI_ABLATION_COLUMNS, ROI_MEASURES, changed_queries, crop_images, crop_loader,
                           ensure_roi_features, paired_summary, pick_colour_example, roi_ablation, roi_grid_sample,
                           roi_histograms, roi_variant)
from cbir.catalog import load_catalog, split_queries
from cbir.color_texture import color_texture_table
from cbir.datasets import make_demo_catalog
from cbir.descriptors import pair_similarities
from cbir.extract import ensure_features
from cbir.images import ImageError
from cbir.neighbours import ensure_neighbours, stored_neighbours
from cbir.plots.colour import plot_color_texture_heatmaps, plot_roi_differences
from cbir.results import collect_color_texture, save_result
from cbir.store import FeatureStore

RED, BLUE, DARK_RED, GREEN = (200, 30, 40), (40, 100, 210), (190, 40, 50), (40, 150, 60)


# ------------------------------------------------------------------------------------ hand-made tables
def test_paired_summary_on_hand_made_scores():
    per_query = pd.DataFrame({
        "model": "m", "layer": None, "pooling": None, "metric": "cosine",
        "query_id": ["q1", "q2", "q3", "q4"] * 2 + ["q1", "q2", "q3"],
        "measure": ["color_corr"] * 4 + ["category_match"] * 4 + ["lbp_chi2"] * 3,
        "original": [0.2, 0.4, 0.6, 0.8, 1.0, 0.0, 1.0, 0.0, 0.1, np.nan, 0.3],
        "cropped": [0.3, 0.5, 0.7, 0.9, 0.0, 1.0, 0.0, 1.0, 0.2, 0.5, 0.2],
        "original_masked": [0.1, 0.1, 0.1, 0.5] + [np.nan] * 4 + [0.0, 0.0, 0.0]})
    summary = paired_summary(per_query, n_boot=500, n_perm=10000, seed=0)
    assert list(summary.columns) == ROI_ABLATION_COLUMNS
    s = summary.set_index("measure")
    colour = s.loc["color_corr"]
    assert (colour["original"], colour["cropped"]) == (pytest.approx(0.5), pytest.approx(0.6))
    assert colour["difference"] == pytest.approx(0.1)
    assert colour["diff_lo"] == pytest.approx(0.1) and colour["diff_hi"] == pytest.approx(0.1)
    assert colour["p_value"] == pytest.approx(2 / 16)  # exact sign-flip test: only all-+ and all-- reach 0.1
    assert colour["original_masked"] == pytest.approx(0.2)
    match = s.loc["category_match"]
    assert match["difference"] == 0.0 and match["p_value"] == 1.0 and np.isnan(match["original_masked"])
    texture = s.loc["lbp_chi2"]  # q2 has no original value: left out of the pairing
    assert texture["n_queries"] == 2
    assert texture["difference"] == pytest.approx(0.0)
    assert texture["original"] == pytest.approx(0.2)


def test_changed_queries_orders_by_absolute_change():
    pq = pd.DataFrame({"metric": "cosine", "measure": "subcategory_match", "query_id": ["a", "b", "c", "d"],
                       "original": [0.2, 0.8, 0.5, 0.5], "cropped": [0.4, 0.2, 0.5, 0.1]})
    assert changed_queries(pq, metric="cosine", n=3) == ["b", "d", "a"]
    with pytest.raises(KeyError, match="euclidean"):
        changed_queries(pq, metric="euclidean")


def test_roi_variant_and_crop_loader(tmp_path):
    assert roi_variant(4) == "roi" and roi_variant(8) == "roi_m8"
    Image.fromarray(np.full((10, 20, 3), 7, np.uint8)).save(tmp_path / "crop.png")
    load = crop_loader(pd.DataFrame({"source_path": ["/orig/a.jpg"], "path": [str(tmp_path / "crop.png")]}))
    img = load("/orig/a.jpg", 16)
    assert img.shape == (16, 16, 3) and (img == 7).all()
    with pytest.raises(ImageError, match="missing"):
        load("/orig/b.jpg", 16)


# ----------------------------------------------------------------------- hand-made garments on white
def _garment(colour: tuple[int, int, int], size: int = 96) -> np.ndarray:
    img = np.full((size, size, 3), 252, np.uint8)
    img[24:72, 30:66] = colour  # a flat-coloured product on a white studio background
    return img


def test_pick_colour_example_finds_differently_coloured_pair_on_white():
    images = {"red": _garment(RED), "blue": _garment(BLUE), "red2": _garment(DARK_RED), "green": _garment(GREEN)}
    labels = pd.DataFrame({"image_id": list(images), "subcategory": ["shirt", "shirt", "shirt", "boot"],
                           "colour": ["red", "blue", "red", "green"], "is_fashion": True})
    whole, roi = roi_histograms(list(images), images, bins=32, progress=False, workers=1)
    ex = pick_colour_example(whole, roi, labels).iloc[0]
    assert {ex["image_a"], ex["image_b"]} in ({"red", "blue"}, {"red2", "blue"})
    assert ex["colour_a"] != ex["colour_b"]
    assert ex["color_corr_whole"] > 0.9  # the white background dominates every channel's histogram
    # inside the ROI each channel holds one spike in different bins: r = -1/(bins-1)
    assert ex["color_corr_roi"] == pytest.approx(-1 / 31, abs=0.01)
    assert ex["drop"] == pytest.approx(ex["color_corr_whole"] - ex["color_corr_roi"])
    assert ex["criterion"].startswith("different colour")
    # without a colour column the mean ROI colours decide; two reds (close colours) never qualify
    ex2 = pick_colour_example(whole, roi, labels.drop(columns="colour")).iloc[0]
    assert "blue" in (ex2["image_a"], ex2["image_b"]) and ex2["colour_distance"] >= 80


# ------------------------------------------------------------------------ end to end on a demo store
@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    cat = split_queries(load_catalog(make_demo_catalog(root / "cat", n=42, seed=1, size=96), progress=False),
                        n_queries=6, seed=0)
    store = FeatureStore(root / "features.sqlite")
    run_id = ensure_features(cat, store=store, model="color_hist", pooling=None, progress=False)
    return root, cat, store, run_id


def test_ensure_neighbours_searches_once_and_again_when_settings_change(demo_store):
    _, cat, store, run_id = demo_store
    kw = dict(query_ids=cat.queries().ids, catalog_ids=cat.searchable().ids, metrics=["euclidean", "cosine"])
    nb = ensure_neighbours(store, run_id, k=3, tag="t", **kw)
    assert nb["metric"].unique().tolist() == ["euclidean", "cosine"]
    assert nb.groupby("metric")["query_id"].nunique().tolist() == [6, 6]
    assert not nb["neighbour_id"].isin(cat.queries().ids).any()  # queries never search each other
    sets = store.neighbour_sets().query("tag == 't'").set_index("metric")["created"]
    ensure_neighbours(store, run_id, k=3, tag="t", **kw)
    assert store.neighbour_sets().query("tag == 't'").set_index("metric")["created"].equals(sets)  # reused
    nb5 = ensure_neighbours(store, run_id, k=5, tag="t", **kw)
    assert nb5["rank"].max() == 5
    assert (store.neighbour_sets().query("tag == 't'").set_index("metric")["created"] > sets).all()


def test_roi_ablation_end_to_end(demo_store):
    root, cat, store, run_id = demo_store
    crops = crop_images(cat, root / "out", margin=4, progress=False)
    assert len(crops) == len(cat) and crops["path"].str.contains("roi_crops").all()
    roi_run = ensure_roi_features(cat, crops, store=store, model="color_hist", margin=4, progress=False)
    assert roi_run != run_id and store.run(roi_run)["variant"] == "roi"
    assert store.run(roi_run)["n_features"] == len(cat)
    # the store's catalogue keeps the original photos' paths
    assert store.catalog().set_index("image_id")["path"].to_dict() == cat.df.set_index("image_id")["path"].to_dict()

    per_query, summary = roi_ablation(store, cat, run_id=run_id, roi_run_id=roi_run, metrics=["euclidean", "cosine"],
                                      k=3, n_boot=300, n_perm=2000, progress=False, workers=1)
    assert list(summary.columns) == ROI_ABLATION_COLUMNS
    assert summary[["metric", "measure"]].values.tolist() == [
        [m, s] for m in ("euclidean", "cosine") for s in ROI_MEASURES]
    assert (summary["n_queries"] == 6).all() and (summary["model"] == "color_hist").all()
    assert len(per_query) == 2 * 4 * 6
    assert np.allclose(summary["difference"], summary["cropped"] - summary["original"])
    colour = summary.loc[summary["measure"] == "color_corr"]
    # differently coloured products on white: the background inflates the whole-photo correlation
    assert (colour["original"] > 0.8).all()
    assert (colour["original_masked"] < colour["original"] - 0.4).all()  # same pairs, background masked out
    assert (colour["diff_hi"] < 0).all()
    match = per_query.loc[per_query["measure"] == "category_match", ["original", "cropped"]]
    assert match.isin([0, 1 / 3, 2 / 3, 1]).all().all()

    # 05 reads only whole-image neighbour sets; 06's cropped sets are another variant
    assert stored_neighbours(store)["run_id"].unique().tolist() == [run_id]
    assert set(stored_neighbours(store, variant=None)["variant"]) == {"original", "roi"}
    # one colour/texture row per run and measure: the whole-image and the cropped run of one model stay apart,
    # and cbir.results reads the stored table back per run
    both = stored_neighbours(store, variant=None)
    table = color_texture_table(pair_similarities(both, cat.df, bins=16, progress=False, workers=1))
    assert table[["run_id", "variant", "metric"]].values.tolist() == [
        [run_id, "original", "euclidean"], [run_id, "original", "cosine"],
        [roi_run, "roi", "euclidean"], [roi_run, "roi", "cosine"]]
    assert (table["n_pairs"] == 6 * 3).all()
    save_result(store, "color_texture", table, run_id=run_id, out_dir=root / "out")
    collected = collect_color_texture(store)
    assert collected[["run_id", "variant"]].values.tolist() == table[["run_id", "variant"]].values.tolist()
    assert np.allclose(collected["color_corr_mean"], table["color_corr_mean"])
    assert len(roi_grid_sample(crops, n=8)) == 8
    assert len(plot_roi_differences(summary).axes) == 4
    pairs = per_query.assign(color_corr=per_query["original"], lbp_chi2=per_query["cropped"])
    assert len([ax for ax in plot_color_texture_heatmaps(pairs).axes if ax.get_title()]) == 2
