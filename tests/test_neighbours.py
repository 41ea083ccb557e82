"""cbir.neighbours: stored neighbour sets of runs searched, saved, reused and read back through a real
FeatureStore."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cbir import evaluate as ev
from cbir.neighbours import STORED_NEIGHBOUR_COLUMNS, ensure_neighbours, neighbours_from_store, run_search
from cbir.results import save_table
from cbir.search import search
from cbir.store import FeatureStore


def test_run_search_reads_and_writes_the_store(tmp_path, line):
    ids, X, cats = line
    X = X.copy()
    X[4] = X[3]
    store = FeatureStore(tmp_path / "f.sqlite")
    catalogue = pd.DataFrame({"image_id": ids, "path": [f"/x/{i}.jpg" for i in ids],
                              "category": cats.to_numpy(), "subcategory": cats.to_numpy(),
                              "dup_group": [None, None, None, "c3", "c3", None, None, None, None, None]})
    store.put_catalog(catalogue)
    run_id = store.start_run({"model": "toy", "layer": None, "pooling": "gap"})
    store.put_run_labels(run_id, catalogue)  # the run's own labels: categories and duplicate groups
    store.put_features(run_id, ids, X)
    out = run_search(store, run_id, ["c3", "c8"], catalog_ids=ids, metrics=["euclidean", "cosine"], k=2)
    assert list(out.columns) == ["run_id", "metric", "query_id", "rank", "neighbour_id", "distance", "similarity"]
    eu = out[out["metric"] == "euclidean"]
    assert eu["neighbour_id"].tolist() == ["c2", "c1", "c7", "c9"]  # c3's copy c4 excluded
    stored = store.neighbours(run_id, "euclidean")
    pd.testing.assert_frame_equal(stored, eu.drop(columns=["run_id", "metric"]).reset_index(drop=True))
    direct = search(ids, X, ["c3", "c8"], X[[3, 8]], metric="cosine", k=2,
                    dup_groups=store.catalog().set_index("image_id")["dup_group"])
    pd.testing.assert_frame_equal(store.neighbours(run_id, "cosine"), direct)
    sets = store.neighbour_sets()
    assert sorted(sets["metric"]) == ["cosine", "euclidean"] and set(sets["k"]) == {2}
    # same_category through the store's catalogue
    same = run_search(store, run_id, ["c4"], metrics=["euclidean"], k=2, same_category=True, tag="same", save=True)
    assert same["neighbour_id"].tolist() == ["c2", "c1"]  # c3 is c4's copy, c5 is in category b
    assert store.neighbours(run_id, "euclidean", tag="same")["neighbour_id"].tolist() == ["c2", "c1"]


def test_neighbours_from_store_and_save_table(tmp_path, labels):
    store = FeatureStore(tmp_path / "s.sqlite")
    store.put_catalog(labels.assign(path=[f"/p/{i}.jpg" for i in labels["image_id"]]))
    rng = np.random.default_rng(0)
    for model in ("m1", "m2"):
        run_id = store.start_run({"model": model, "layer": None, "pooling": "gap"})
        store.put_features(run_id, labels["image_id"], rng.standard_normal((7, 4)).astype(np.float32))
        run_search(store, run_id, ["q1", "q2"], catalog_ids=["n1", "n2", "n3", "n4", "n5"],
                   metrics=["cosine", "manhattan"], k=2)
    nb = neighbours_from_store(store)
    assert len(nb) == 2 * 2 * 2 * 2
    assert set(map(tuple, nb[["model", "metric"]].drop_duplicates().to_numpy())) == {
        ("m1", "cosine"), ("m1", "manhattan"), ("m2", "cosine"), ("m2", "manhattan")}
    table = ev.match_table(nb, store.catalog(), n_boot=50)
    assert len(table) == 4 and set(table["pooling"]) == {"gap"} and table["layer"].isna().all()
    path = save_table(table, tmp_path / "out", "category_match")
    back = pd.read_csv(path)
    assert path.name == "category_match.csv" and list(back.columns) == ev.MATCH_COLUMNS and len(back) == 4


def test_ensure_neighbours_reuses_a_stored_ranking_set_and_keeps_the_measure_order(tmp_path, line, monkeypatch):
    import cbir.neighbours as nbm

    ids, X, cats = line
    store = FeatureStore(tmp_path / "f.sqlite")
    store.put_catalog(pd.DataFrame({"image_id": ids, "path": [f"/x/{i}.jpg" for i in ids],
                                    "category": cats.to_numpy(), "subcategory": cats.to_numpy()}))
    run_id = store.start_run({"model": "toy", "layer": None, "pooling": "gap"})
    store.put_features(run_id, ids, X)
    searched = []
    monkeypatch.setattr(nbm, "run_search", lambda *a, **kw: searched.append(kw["metrics"]) or run_search(*a, **kw))
    kw = dict(query_ids=["c3", "c8"], catalog_ids=ids, k=4, tag="ranking")
    nb = ensure_neighbours(store, run_id, metrics=["manhattan", "euclidean"], **kw)
    assert searched == [["manhattan", "euclidean"]]
    assert list(nb.columns) == STORED_NEIGHBOUR_COLUMNS
    assert nb["metric"].drop_duplicates().tolist() == ["manhattan", "euclidean"]
    # on a line both measures agree: c3 -> c2, c4 (tie by catalogue order), c1, c5
    assert nb.loc[nb["metric"] == "euclidean", "neighbour_id"].tolist()[:4] == ["c2", "c4", "c1", "c5"]
    again = ensure_neighbours(store, run_id, metrics=["euclidean", "manhattan"], **kw)
    assert searched == [["manhattan", "euclidean"]]  # both sets reused, nothing searched again
    assert again["metric"].drop_duplicates().tolist() == ["euclidean", "manhattan"]
    deeper = ensure_neighbours(store, run_id, metrics=["euclidean"], **{**kw, "k": 5})
    assert searched[-1] == ["euclidean"] and deeper["rank"].max() == 5  # another depth: searched again
    assert set(store.neighbour_sets()["tag"]) == {"ranking"}
