"""cbir.learned: a trained run against the other runs of the same labelling, on the same queries, paired."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cbir.learned import comparable_runs, open_set_queries, retrieval_comparison, verdict_line
from cbir.store import FeatureStore


@pytest.fixture()
def three_runs(tmp_path):
    """40 queries and 200 searchable images in 4 sub-categories; a "trained" run whose vectors sit on their
    class centre (every neighbour right), an ImageNet-like run with half of the classes mixed, and a noise run."""
    rng = np.random.default_rng(0)
    subs = np.repeat(["a", "b", "c", "d"], 60)
    ids = np.array([f"i{n:03d}" for n in range(len(subs))])
    split = np.where(np.arange(len(subs)) % 6 == 0, "query", "catalog")
    labels = pd.DataFrame({"image_id": ids, "path": [f"/x/{i}.jpg" for i in ids], "category": "c",
                           "subcategory": subs, "split": split, "is_fashion": True})
    store = FeatureStore(tmp_path / "s.sqlite")
    store.put_catalog(labels)
    centres = np.eye(8, dtype=np.float32)[:4] * 10
    mixed = centres.copy()
    mixed[1] = mixed[0]  # classes a and b look alike to this run
    vectors = {"trained/toy": centres[pd.factorize(subs, sort=True)[0]],
               "imagenet_toy": mixed[pd.factorize(subs, sort=True)[0]],
               "noise_toy": np.zeros((len(subs), 8), np.float32)}
    run_ids = {}
    for model, base in vectors.items():
        run_id = store.start_run({"model": model, "layer": None, "pooling": None, "labels_sha1": "L"})
        store.put_run_labels(run_id, labels)
        store.put_features(run_id, ids, base + rng.normal(0, 0.5, base.shape).astype(np.float32))
        store.finish_run(run_id)
        run_ids[model] = run_id
    other = store.start_run({"model": "elsewhere", "layer": None, "pooling": None, "labels_sha1": "other split"})
    store.finish_run(other)
    return store, labels, run_ids


def test_comparable_runs_are_the_complete_runs_of_one_labelling(three_runs):
    store, _, run_ids = three_runs
    runs = comparable_runs(store, "L")
    assert runs["run_id"].tolist() == list(run_ids.values())
    assert runs["trained"].tolist() == [True, False, False]


def test_the_trained_run_against_the_best_untrained_one(three_runs):
    store, labels, run_ids = three_runs
    queries = labels.loc[labels["split"] == "query", "image_id"]
    searchable = labels.loc[labels["split"] != "query", "image_id"]
    table, test = retrieval_comparison(store, list(run_ids.values()), query_ids=queries, catalog_ids=searchable,
                                       labels=labels, focus=run_ids["trained/toy"], k=5, n_perm=2000)
    assert table["run_id"].tolist() == [run_ids["trained/toy"], run_ids["imagenet_toy"], run_ids["noise_toy"]]
    assert table.iloc[0]["subcategory_match"] == 1.0 and table.iloc[0]["n_queries"] == len(queries)
    # classes a and b mixed: their queries get about half of their neighbours right, c and d all
    assert table.iloc[1]["subcategory_match"] == pytest.approx(0.75, abs=0.08)
    assert test["rival"] == run_ids["imagenet_toy"] and test["verdict"] == "better" and test["p_permutation"] < 0.01
    assert test["mean_diff"] == pytest.approx(1.0 - table.iloc[1]["subcategory_match"])
    assert "better" in verdict_line(test) and "p < 0.001" in verdict_line(test)

    # on the queries of c and d the two runs agree: a tie, said as such
    cd = queries[labels.set_index("image_id").loc[queries, "subcategory"].isin(["c", "d"]).to_numpy()]
    assert set(open_set_queries(labels, queries, ["c", "d"])) == set(cd)
    table_cd, test_cd = retrieval_comparison(store, list(run_ids.values()), query_ids=queries,
                                             catalog_ids=searchable, labels=labels, focus=run_ids["trained/toy"],
                                             k=5, subset=cd, n_perm=2000)
    assert set(table_cd["n_queries"]) == {len(cd)}
    assert test_cd["verdict"] == "tie" and test_cd["mean_diff"] == 0.0

    # against="all" may pick another trained run; with one run alone there is nothing to compare
    alone, solo = retrieval_comparison(store, [run_ids["trained/toy"]], query_ids=queries, catalog_ids=searchable,
                                       labels=labels, focus=run_ids["trained/toy"], k=5)
    assert len(alone) == 1 and "rival" not in solo and "nothing to compare" in verdict_line(solo)
