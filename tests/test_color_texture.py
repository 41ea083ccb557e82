"""cbir.color_texture: colour/texture tables of retrieved pairs per run and measure, their labels
(cbir.runs.feature_label) and the best neighbour set (cbir.evaluate.best_tuple), on hand-made tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cbir.color_texture import COLOR_TEXTURE_COLUMNS, color_texture_by_rank, color_texture_table, example_pairs
from cbir.evaluate import best_tuple
from cbir.runs import feature_label


# ------------------------------------------------------------------------------------ hand-made tables
def _pairs() -> pd.DataFrame:
    """Two tuples: a CNN (3 pairs, one unreadable) and a handcrafted descriptor without layer/pooling."""
    return pd.DataFrame({
        "model": ["vgg19"] * 3 + ["color_hist"] * 2, "layer": ["block5_pool"] * 3 + [None] * 2,
        "pooling": ["gap"] * 3 + [None] * 2, "metric": ["cosine"] * 3 + ["euclidean"] * 2,
        "query_id": ["q1", "q1", "q2", "q1", "q1"], "rank": [1, 2, 1, 1, 2],
        "neighbour_id": ["a", "b", "c", "a", "d"],
        "color_corr": [0.9, 0.5, np.nan, 0.2, -0.1], "lbp_chi2": [0.01, 0.05, np.nan, 0.3, 0.1]})


def test_color_texture_table_statistics_per_tuple():
    table = color_texture_table(_pairs())
    assert list(table.columns) == COLOR_TEXTURE_COLUMNS
    assert len(table) == 2
    cnn = table.iloc[0]
    assert (cnn["model"], cnn["layer"], cnn["pooling"], cnn["metric"]) == ("vgg19", "block5_pool", "gap", "cosine")
    assert cnn["features"] == "vgg19 / block5_pool / gap" and pd.isna(cnn["run_id"])  # no run columns given
    assert cnn["n_pairs"] == 2  # the unreadable pair is not counted
    assert cnn["color_corr_mean"] == pytest.approx(0.7)
    assert (cnn["color_corr_min"], cnn["color_corr_max"]) == (0.5, 0.9)
    assert cnn["lbp_chi2_mean"] == pytest.approx(0.03)
    hand = table.iloc[1]
    assert pd.isna(hand["layer"]) and pd.isna(hand["pooling"])  # None kept as a group, not dropped
    assert hand["color_corr_mean"] == pytest.approx(0.05)
    assert (hand["lbp_chi2_min"], hand["lbp_chi2_max"]) == (0.1, 0.3)


def _two_runs() -> pd.DataFrame:
    """The same model, layer, pooling and measure in two runs: ImageNet weights (run 1) and untrained (run 2)."""
    one = _pairs().iloc[:2].assign(run_id=1, weights="imagenet", variant="original")
    two = _pairs().iloc[:2].assign(run_id=2, weights="none (random init)", variant="original",
                                   color_corr=[0.1, 0.3], lbp_chi2=[0.2, 0.4])
    return pd.concat([one, two], ignore_index=True)


def test_color_texture_table_keeps_runs_of_one_model_apart():
    table = color_texture_table(_two_runs())
    assert table["run_id"].tolist() == [1, 2]  # two rows: runs differing only in weights are not merged
    assert table["weights"].tolist() == ["imagenet", "none (random init)"]
    assert table["features"].tolist() == ["vgg19 / block5_pool / gap", "vgg19 / block5_pool / gap (random init)"]
    assert table["color_corr_mean"].tolist() == pytest.approx([0.7, 0.2])
    assert table["lbp_chi2_mean"].tolist() == pytest.approx([0.03, 0.3])
    assert color_texture_by_rank(_two_runs())[["run_id", "rank", "color_corr_mean"]].values.tolist() == [
        [1, 1, 0.9], [1, 2, 0.5], [2, 1, 0.1], [2, 2, 0.3]]
    # same weights too (e.g. two l2_normalize settings): the label names the run
    same = _two_runs().assign(weights="imagenet")
    assert feature_label(same).unique().tolist() == ["vgg19 / block5_pool / gap #1", "vgg19 / block5_pool / gap #2"]
    assert len(color_texture_table(same)) == 2
    best = best_tuple(_two_runs().assign(query_id="q", neighbour_id=["a", "b", "b", "b"]), pd.DataFrame({
        "image_id": ["q", "a", "b"], "category": "tops", "subcategory": ["shirt", "dress", "shirt"]}))
    # run 2 finds 2 of 2 shirts, run 1 only 1 of 2 (merged, both would score 3 of 4)
    assert (best["run_id"], best["weights"], best["subcategory_match"]) == (2, "none (random init)", 1.0)
    assert best["features"] == "vgg19 / block5_pool / gap (random init)"


def test_color_texture_by_rank_and_examples():
    by_rank = color_texture_by_rank(_pairs())
    assert by_rank[["metric", "rank", "n_pairs"]].values.tolist() == [  # tuples in order of appearance
        ["cosine", 1, 1], ["cosine", 2, 1], ["euclidean", 1, 1], ["euclidean", 2, 1]]
    hand_rank2 = by_rank.loc[(by_rank["metric"] == "euclidean") & (by_rank["rank"] == 2)].iloc[0]
    assert hand_rank2["color_corr_mean"] == pytest.approx(-0.1)
    ex = example_pairs(_pairs()).set_index("example")
    assert ex.loc["most similar colour", "neighbour_id"] == "a" and ex.loc["most similar colour", "color_corr"] == 0.9
    assert ex.loc["least similar colour", "neighbour_id"] == "d"
    assert ex.loc["most similar texture", "lbp_chi2"] == 0.01
    assert ex.loc["least similar texture", "lbp_chi2"] == 0.3
    assert feature_label(_pairs()).tolist()[::3] == ["vgg19 / block5_pool / gap", "color_hist"]


def test_best_tuple_picks_highest_subcategory_match():
    labels = pd.DataFrame({"image_id": ["q", "a", "b", "c"], "category": ["tops", "tops", "tops", "shoes"],
                           "subcategory": ["shirt", "shirt", "dress", "boot"]})
    nb = pd.DataFrame({"model": "m", "layer": None, "pooling": None,
                       "metric": ["euclidean", "euclidean", "cosine", "cosine"], "query_id": "q",
                       "rank": [1, 2, 1, 2], "neighbour_id": ["b", "c", "a", "c"]})
    best = best_tuple(nb, labels)
    assert best["metric"] == "cosine"
    assert best["subcategory_match"] == 0.5 and best["category_match"] == 0.5
    assert best["layer"] is None
