"""The notebook session: one call for catalogue, split, store, run and labels; one way to save."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from cbir import extract  # noqa: E402
from cbir.session import find_complete_run, open_session  # noqa: E402

SETTINGS = dict(model="color_hist", layer=None, pooling=None, weights="imagenet")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


def test_a_session_extracts_once_then_finds_the_run_without_building_the_model(out, monkeypatch):
    first = open_session(catalog="demo", out_dir=out, n_queries=30, seed=1, extract=True, **SETTINGS)
    assert (out / "tables").is_dir() and (out / "figures").is_dir()
    assert first.run["status"] == "complete" and first.run["n_features"] == len(first.catalog)
    q, c = first.query_ids, first.searchable_ids
    assert len(q) == 30 and not set(q) & set(c) and len(q) + len(c) == len(first.catalog)
    assert set(q) == set(first.catalog.queries().ids)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built although the run is complete")

    monkeypatch.setattr(extract, "_resolve_extractor", no_model)
    again = open_session(catalog="demo", out_dir=out, n_queries=30, seed=1, **SETTINGS)
    assert again.run_id == first.run_id
    ids, X = again.features()
    assert X.shape == (len(first.catalog), first.run["dim"])


def test_another_split_is_another_run_with_its_own_labels(out):
    a = open_session(catalog="demo", out_dir=out, n_queries=30, seed=1, **SETTINGS)
    b = open_session(catalog="demo", out_dir=out, n_queries=20, seed=2, **SETTINGS)
    c = open_session(catalog="demo", out_dir=out, n_queries=30, seed=3, **SETTINGS)
    # (a manifest's labels do not depend on subcategory_from, so that setting alone is the same run)
    same = open_session(catalog="demo", out_dir=out, n_queries=30, seed=1, subcategory_from="category", **SETTINGS)
    assert len({a.run_id, b.run_id, c.run_id}) == 3 and same.run_id == a.run_id
    for s in (a, b, c):
        labels = s.labels.set_index("image_id")
        frame = s.catalog.df.set_index("image_id")
        assert labels["split"].eq(frame.loc[labels.index, "split"]).all()
        assert labels["subcategory"].eq(frame.loc[labels.index, "subcategory"]).all()
    assert (a.labels["split"] == "query").sum() == 30 and (b.labels["split"] == "query").sum() == 20
    # b and c got a's vectors copied (same files, same model): identical features
    np.testing.assert_array_equal(b.features()[1], a.features()[1])
    assert find_complete_run(a.store, b.catalog, **SETTINGS) == b.run_id


def test_save_table_and_figure_go_to_the_run_and_the_output_folder(out):
    s = open_session(catalog="demo", out_dir=out, n_queries=30, seed=1, **SETTINGS)
    table = pd.DataFrame({"metric": ["cosine"], "value": [0.123456789]})
    path = s.save_table("example", table)
    assert path == out / "tables" / "example.csv"
    assert pd.read_csv(path)["value"].tolist() == [0.1235]
    assert s.store.table("example", s.run_id)["value"].tolist() == [0.123456789]
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert s.save_figure(fig, "line") is fig and (out / "figures" / "line.png").stat().st_size > 1000
