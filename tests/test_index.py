"""cbir.index: faiss indexes of a run's vectors with measured recall, saved beside the store, found again,
extended without a rebuild; `cbir index build` and `cbir search` end to end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cbir.cli import main
from cbir.index import (INDEX_MEASURES, add_to_index, build_from_arrays, build_index, choose_kind, index_dir,
                        load_index, search_plan, search_vectors)
from cbir.search import knn, recall_at_k
from cbir.store import FeatureStore


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """A Gaussian mixture: ``clusters`` centres (spread 4) plus unit noise, float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def make_store(path, X: np.ndarray, n_queries: int = 40) -> tuple[FeatureStore, int, np.ndarray]:
    """A store with one run of ``X``: the first ``n_queries`` images are the query split."""
    ids = np.array([f"img{i:05d}" for i in range(len(X))])
    split = np.where(np.arange(len(X)) < n_queries, "query", "catalog")
    labels = pd.DataFrame({"image_id": ids, "path": [f"/x/{i}.jpg" for i in ids], "split": split,
                           "category": [f"c{i % 3}" for i in range(len(X))],
                           "subcategory": [f"s{i % 7}" for i in range(len(X))]})
    store = FeatureStore(path)
    store.put_catalog(labels)
    run_id = store.start_run({"model": "toy", "layer": None, "pooling": None})
    store.put_run_labels(run_id, labels)
    store.put_features(run_id, ids, X)
    store.finish_run(run_id)
    return store, run_id, ids


@pytest.mark.parametrize("kind,metric", [("ivf", "cosine"), ("ivf", "euclidean"), ("hnsw", "correlation")])
def test_recall_meets_the_target_on_clustered_data(kind, metric):
    X = clustered(3000, 32, 25, seed=1)
    index, info = build_from_arrays(lambda a, b: X[a:b], len(X), 32, metric=metric, kind=kind, target_recall=0.95,
                                    k=5, n_eval_queries=150, chunk=1000, rounds=1)
    assert info.kind == kind and info.met_target and info.recall >= 0.95
    table = info.table()
    assert table["chosen"].sum() == 1 and len(table) >= 1
    assert info.search_param == ("nprobe" if kind == "ivf" else "efSearch")
    # the recall is real: fresh queries, searched at the kept setting, against exact search
    Q = X[::37] + 0.05
    from cbir.index import _search  # the index's own search path, distances in the measure's units
    from cbir.search import faiss_space

    D, I = _search(index, faiss_space(Q, metric), metric, 5)
    exact_D, exact_I = knn(X, Q, metric, k=5)
    assert recall_at_k(I, exact_I) >= 0.9
    hit = I == exact_I
    np.testing.assert_allclose(D[hit], exact_D[hit], rtol=1e-4, atol=1e-4)


def test_a_low_first_setting_is_passed_over_for_the_fastest_that_reaches_the_target():
    X = clustered(3000, 16, 60, seed=2)
    _, info = build_from_arrays(lambda a, b: X[a:b], len(X), 16, metric="euclidean", kind="ivf",
                                target_recall=0.99, k=10, n_eval_queries=120, rounds=1)
    table = info.table()
    assert table.iloc[0]["recall_at_k"] < 0.99  # one cell is not enough on 60 clusters
    chosen = table.loc[table["chosen"]].iloc[0]
    assert chosen["recall_at_k"] >= 0.99 and info.search_value == chosen["value"]
    reaching = table.loc[table["recall_at_k"] >= 0.99]
    smallest = reaching.iloc[0]  # kept unless a larger setting is more than 10% faster
    assert chosen["value"] == smallest["value"] or chosen["ms_per_query"] < 0.9 * smallest["ms_per_query"]
    assert chosen["ms_per_query"] <= reaching["ms_per_query"].min() / 0.9


def test_auto_chooses_from_size_and_memory():
    assert choose_kind(500, 64)[0] == "flat"  # tiny: exact is fast enough
    assert choose_kind(50_000, 128, memory_gb=4)[0] == "hnsw"  # fits, builds in seconds
    kind, why = choose_kind(1_000_000, 256, memory_gb=8)
    assert kind == "ivf" and "to build" in why  # HNSW would fit but its build costs minutes
    kind, why = choose_kind(1_000_000, 1280, memory_gb=2)
    assert kind == "ivfpq" and "do not fit" in why
    X = clustered(300, 8, 4, seed=0)
    _, info = build_from_arrays(lambda a, b: X[a:b], len(X), 8, metric="cosine", rounds=1)
    assert info.kind == "flat" and info.recall == 1.0 and info.search_param is None


def test_measures_faiss_cannot_serve_are_refused_and_searched_exactly(tmp_path):
    assert set(INDEX_MEASURES) == {"cosine", "euclidean", "correlation"}
    X = clustered(300, 8, 4, seed=0)
    with pytest.raises(ValueError, match="manhattan is searched exactly"):
        build_from_arrays(lambda a, b: X[a:b], len(X), 8, metric="manhattan")
    store, run_id, ids = make_store(tmp_path / "s.sqlite", X)
    build_index(store, run_id, metric="cosine", kind="flat")
    for metric in ("manhattan", "chebyshev", "minkowski"):
        found = search_vectors(store, run_id, X[100:101], k=4, metric=metric)
        assert found.how == f"exact search ({metric}: no approximate faiss index serves it)" and found.index is None
        assert found.neighbours["image_id"].iloc[0] == ids[100]
    assert "no index built" in search_vectors(store, run_id, X[:1], metric="euclidean").how
    plan = search_plan(store, run_id, ["cosine", "euclidean", "manhattan"]).set_index("metric")
    assert plan.loc["cosine", "how"].startswith("faiss Flat, recall@5 1.000")
    assert plan.loc["cosine", "index"] == "run1-cosine-flat.faiss" and plan.loc["cosine", "recall_at_k"] == 1.0
    assert plan.loc["euclidean", "how"] == "exact search (euclidean: no index built for it)"
    assert plan.loc["manhattan", "how"] == "exact search (manhattan: no approximate faiss index serves it)"


def test_saved_index_is_found_again_and_gives_the_same_results(tmp_path):
    X = clustered(3000, 24, 20, seed=3)
    store, run_id, ids = make_store(tmp_path / "s.sqlite", X)
    info = build_index(store, run_id, metric="euclidean", kind="ivf", n_eval_queries=100)
    folder = index_dir(store)
    assert folder == tmp_path / "s.sqlite.indexes"
    assert sorted(p.name for p in folder.iterdir()) == ["run1-euclidean-ivf.faiss", "run1-euclidean-ivf.ids.npy",
                                                       "run1-euclidean-ivf.json"]
    sidecar = json.loads((folder / "run1-euclidean-ivf.json").read_text())  # plain data
    assert sidecar["recall"] == info.recall and sidecar["search_value"] == info.search_value
    assert sidecar["n"] == 3000 - 40 and sidecar["settings"]["n_eval_query_split"] == 40  # queries held out
    loaded = load_index(FeatureStore(tmp_path / "s.sqlite", readonly=True), run_id, "euclidean")
    assert loaded.info.label == info.label and loaded.index.nprobe == info.search_value
    assert not np.isin(ids[:40], loaded.ids).any()  # the query split is not searchable
    Q = X[:40]
    first = loaded.search(Q, 5)
    again = load_index(store, run_id, "euclidean").search(Q, 5)
    np.testing.assert_array_equal(first[1], again[1])
    exact = knn(store.features(run_id, loaded.ids)[1], Q, "euclidean", k=5)[1]
    assert recall_at_k(first[1], exact) >= 0.9
    assert load_index(store, run_id, "cosine") is None  # none built for cosine
    # the run's vectors change: the index is stale and says so
    store.put_features(run_id, ids[100:101], X[101:102])
    with pytest.raises(ValueError, match="stale.*rebuild"):
        load_index(store, run_id, "euclidean")


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_adding_to_an_index_finds_the_new_items(tmp_path, kind):
    X = clustered(1500, 16, 12, seed=4)
    store, run_id, ids = make_store(tmp_path / "s.sqlite", X[:1200])
    build_index(store, run_id, metric="cosine", kind=kind, n_eval_queries=80)
    new_ids = np.array([f"new{i}" for i in range(300)])
    labels = store.run_labels(run_id)
    more = pd.DataFrame({"image_id": new_ids, "path": [f"/x/{i}.jpg" for i in new_ids], "split": "catalog",
                         "category": "c0", "subcategory": "s0"})
    store.put_catalog(more)
    store.put_run_labels(run_id, pd.concat([labels, more], ignore_index=True))
    store.put_features(run_id, new_ids, X[1200:])
    with pytest.raises(ValueError, match="stale"):  # not indexed yet: the run's content changed
        load_index(store, run_id, "cosine")
    info = add_to_index(store, run_id, "cosine")
    assert info.n == 1200 - 40 + 300 and info.n_added == 300 and "+300 added" in info.label
    loaded = load_index(store, run_id, "cosine")
    assert np.isin(new_ids, loaded.ids).all()
    _, pos = loaded.search(X[1200:1300], 1)
    assert (loaded.ids[pos[:, 0]] == new_ids[:100]).mean() >= 0.95  # each new image finds itself
    found = search_vectors(store, run_id, X[1450:1451], k=3, metric="cosine")
    assert found.neighbours["image_id"].iloc[0] == "new250" and found.how.startswith("faiss")
    assert add_to_index(store, run_id, "cosine").n == info.n  # nothing new: nothing added twice


def test_cli_index_build_and_search_end_to_end(tmp_path, capsys):
    from cbir.datasets import make_demo_catalog

    manifest = make_demo_catalog(tmp_path / "cat", n=30, seed=0)
    store_path = tmp_path / "s.sqlite"
    assert main(["extract", "--catalog", str(manifest), "--model", "color_hist", "--store", str(store_path)]) == 0
    photo = sorted((tmp_path / "cat").rglob("*.jpg"))[3]
    capsys.readouterr()
    assert main(["index", "build", "--store", str(store_path), "--run", "1", "--target-recall", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "flat index of 30 vectors" in out and "reaches the target recall@5 0.9" in out
    assert main(["search", "--store", str(store_path), "--run", "1", "--image", str(photo), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("cosine, faiss Flat, recall@5 1.000 (index run1-cosine-flat.faiss")
    rows = out.splitlines()[2:]
    assert len(rows) == 3 and rows[0].split()[:2] == ["1", photo.stem]  # the photo finds itself first
    assert main(["search", "--store", str(store_path), "--run", "1", "--image", str(photo), "--k", "3",
                 "--metric", "chebyshev"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "chebyshev, exact search (chebyshev: no approximate faiss index serves it)"
    assert out.splitlines()[2].split()[:2] == ["1", photo.stem]
    assert main(["search", "--store", str(store_path), "--run", "7", "--image", str(photo)]) == 1
    assert "run 7 not found" in capsys.readouterr().err
    assert main(["search", "--store", str(store_path), "--run", "1", "--image", str(tmp_path / "none.jpg")]) == 1
    assert "error:" in capsys.readouterr().err


def test_ivfpq_recall_is_capped_by_its_codes_and_reaches_the_target_by_exact_reranking(tmp_path):
    """IVF-PQ with 4-byte codes of 32-d vectors ranks by coarse codes; the build sweeps `rerank` (k x rerank
    candidates re-ranked by exact distances) and keeps a setting that reaches the target; the search path
    (`search_vectors`, stored vectors) then returns what exact search returns."""
    X = clustered(4000, 32, 20, seed=4)
    store, run_id, ids = make_store(tmp_path / "f.sqlite", X)
    info = build_index(store, run_id, metric="euclidean", kind="ivfpq", memory_gb=4000 * 12 / 0.8 / 2**30,
                       target_recall=0.95, n_eval_queries=150)
    table = info.table()
    assert info.settings["m"] == 4 and set(table["rerank"]) >= {1, 2}
    codes_only = table.loc[table["rerank"] == 1, "recall_at_k"].max()
    assert codes_only < 0.95  # ranked by 4-byte codes alone the target is out of reach
    assert info.met_target and info.rerank > 1 and info.recall >= 0.95
    chosen = table.loc[table["chosen"]].iloc[0]
    assert (chosen["value"], chosen["rerank"]) == (info.search_value, info.rerank)
    assert f"re-ranking {info.rerank}x k" in info.label
    loaded = load_index(store, run_id, "euclidean")
    assert loaded.n_candidates(5) == 5 * info.rerank
    # fresh queries through the search path against exact search over the searchable images
    rng = np.random.default_rng(7)
    searchable = X[40:]
    hits = []
    for q in searchable[rng.choice(len(searchable), 40, replace=False)] + 0.1:
        got = search_vectors(store, run_id, q[None, :], k=5, metric="euclidean", loaded=loaded).neighbours
        _, exact_I = knn(searchable, q[None, :], "euclidean", k=5)
        hits.append(len(set(got["image_id"]) & set(ids[40:][exact_I[0]])) / 5)
    assert np.mean(hits) >= 0.9
