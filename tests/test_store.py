"""FeatureStore: schema and migrations, catalogue, runs, vectors, failures, neighbours, result tables,
and two processes writing into one store at the same time."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbir import store as store_module
from cbir.store import SCHEMA_VERSION, FeatureStore, RunNotFoundError, StoreError, canonical_json


@pytest.fixture()
def fs(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "sub" / "features.sqlite")


def _catalog(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": [f"img{i}" for i in range(n)],
        "path": [f"/data/img{i}.jpg" for i in range(n)],
        "category": ["tops", "bottoms"] * (n // 2),
        "subcategory": ["tshirt", "skirt"] * (n // 2),
        "is_fashion": [True, False] * (n // 2),
        "product_id": list(range(100, 100 + n)),
        "dup_group": [pd.NA] * (n - 1) + ["img0"],
        "sha1": [f"{i:040x}" for i in range(n)],
        "year": [2011 + i for i in range(n)],
    })


IDENTITY = {"model": "mobilenet_v2", "layer": "out_relu", "pooling": "gap", "weights": "imagenet",
            "weights_sha1": "abc", "input_size": 224, "dim": 4, "variant": "original", "l2_normalize": False}


# --------------------------------------------------------------------------------------------- schema
def test_new_store_is_wal_with_schema_version(tmp_path):
    path = tmp_path / "a" / "b" / "f.sqlite"
    fs = FeatureStore(path)
    assert path.is_file()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == fs.schema_version
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"images", "runs", "features", "failures", "neighbours", "neighbour_sets", "results"} <= tables
    assert FeatureStore(path).schema_version == SCHEMA_VERSION  # reopening migrates nothing


def test_unusable_files_raise_store_error_naming_the_file(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="junk.sqlite"):
        FeatureStore(junk)
    newer = tmp_path / "newer.sqlite"
    con = sqlite3.connect(newer)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    with pytest.raises(StoreError, match=r"newer.sqlite.*newer than this cbir"):
        FeatureStore(newer)
    with pytest.raises(StoreError, match="folder"):
        FeatureStore(tmp_path)


def test_migration_upgrades_an_existing_store_and_keeps_its_data(tmp_path, monkeypatch):
    path = tmp_path / "f.sqlite"
    old = FeatureStore(path)
    old.put_catalog(_catalog())
    run_id = old.start_run(IDENTITY)
    old.put_features(run_id, ["img0"], np.ones((1, 4)))
    old.close()

    def v2(con):
        con.execute("ALTER TABLE runs ADD COLUMN note TEXT DEFAULT 'migrated'")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(store_module.MIGRATIONS, SCHEMA_VERSION + 1, v2)
    new = FeatureStore(path)
    assert new.schema_version == SCHEMA_VERSION + 1
    assert sqlite3.connect(path).execute("SELECT note FROM runs").fetchall() == [("migrated",)]
    ids, X = new.features(run_id)
    assert ids.tolist() == ["img0"] and X.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_store_pickles_by_path(fs):
    fs.put_catalog(_catalog())
    copy = pickle.loads(pickle.dumps(fs))
    assert copy.path == fs.path
    assert copy.catalog()["image_id"].tolist() == fs.catalog()["image_id"].tolist()


# --------------------------------------------------------------------------------------------- catalogue
def test_catalog_round_trip_keeps_order_values_and_extra_columns(fs):
    df = _catalog()
    assert fs.put_catalog(df) == 6
    got = fs.catalog()
    assert got["image_id"].tolist() == df["image_id"].tolist()
    assert got["is_fashion"].tolist() == [True, False] * 3
    assert got["product_id"].tolist() == [str(i) for i in range(100, 106)]
    assert got["dup_group"].isna().tolist() == [True] * 5 + [False]
    assert got.loc[5, "dup_group"] == "img0"
    assert got["sha1"].tolist() == df["sha1"].tolist()
    assert got["year"].tolist() == list(range(2011, 2017))
    assert got["split"].isna().all()  # a standard column never given stays empty


def test_put_catalog_upserts_only_given_columns_and_appends_new_ids(fs):
    fs.put_catalog(_catalog())
    fs.put_catalog(pd.DataFrame({"image_id": ["img3", "new1"], "split": ["query", "catalog"],
                                 "colour": ["red", "blue"]}))
    got = fs.catalog().set_index("image_id")
    assert list(got.index) == [f"img{i}" for i in range(6)] + ["new1"]  # first-put order kept
    assert got.loc["img3", "split"] == "query" and got.loc["img3", "category"] == "bottoms"
    assert got.loc["img3", "sha1"] == f"{3:040x}" and got.loc["img3", "colour"] == "red"  # extra merged
    assert pd.isna(got.loc["new1", "category"]) and got.loc["new1", "colour"] == "blue"
    with pytest.raises(ValueError, match="duplicate image_id"):
        fs.put_catalog(pd.DataFrame({"image_id": ["a", "a"]}))
    with pytest.raises(ValueError, match="image_id"):
        fs.put_catalog(pd.DataFrame({"path": ["x"]}))


# --------------------------------------------------------------------------------------------- runs
def test_same_identity_gives_the_same_run_and_canonical_json_sorts_keys(fs):
    a = fs.start_run(IDENTITY, versions={"numpy": "2"})
    shuffled = dict(reversed(list(IDENTITY.items())))
    shuffled["input_size"] = np.int64(224)
    assert fs.start_run(shuffled) == a
    b = fs.start_run({**IDENTITY, "pooling": "mac"})
    assert b != a
    assert canonical_json({"b": (1, 2), "a": None}) == '{"a":null,"b":[1,2]}'
    info = fs.run(a)
    assert (info["model"], info["layer"], info["pooling"], info["variant"], info["input_size"], info["dim"]) == (
        "mobilenet_v2", "out_relu", "gap", "original", 224, 4)
    assert info["params"] == IDENTITY and info["versions"] == {"numpy": "2"} and info["status"] == "running"
    assert fs.start_run(IDENTITY, name="renamed") == a and fs.run(a)["name"] == "renamed"
    with pytest.raises(KeyError, match="run 99 not found in"):
        fs.run(99)


def test_find_run_matches_identity_subsets_and_returns_the_latest(fs):
    a = fs.start_run(IDENTITY)
    b = fs.start_run({**IDENTITY, "weights": "none (random init)", "weights_sha1": None})
    c = fs.start_run({**IDENTITY, "model": "vgg19", "dim": 512}, name="big")
    assert fs.find_run(model="mobilenet_v2") == b
    assert fs.find_run(model="mobilenet_v2", weights="imagenet") == a
    assert fs.find_run(weights_sha1=None) == b
    assert fs.find_run(name="big") == c and fs.find_run(model="resnet50") is None
    assert fs.find_run(model="mobilenet_v2", status="complete") is None
    fs.finish_run(a, n_images=10, seconds=1.25)
    assert fs.find_run(model="mobilenet_v2", status="complete") == a
    info = fs.run(a)
    assert info["status"] == "complete" and info["n_images"] == 10 and info["stats"] == {"seconds": 1.25}
    assert info["finished"] is not None
    fs.finish_run(a, images_per_second=3.5)  # stats merge
    assert fs.run(a)["stats"] == {"seconds": 1.25, "images_per_second": 3.5}


def test_runs_table_counts_features_and_failures(fs):
    fs.put_catalog(_catalog())
    a = fs.start_run(IDENTITY)
    b = fs.start_run({**IDENTITY, "pooling": "mac"})
    fs.put_features(a, ["img0", "img1", "img2"], np.zeros((3, 4)), failures=[("img3", "empty", "0 bytes")])
    fs.put_features(b, ["img0"], np.zeros((1, 4)))
    runs = fs.runs()
    assert runs["run_id"].tolist() == [a, b]
    assert runs["n_features"].tolist() == [3, 1] and runs["n_failures"].tolist() == [1, 0]
    assert fs.run(a)["n_features"] == 3


# --------------------------------------------------------------------------------------------- vectors
def test_features_round_trip_exact_float32_little_endian(fs, tmp_path):
    fs.put_catalog(_catalog())
    run_id = fs.start_run(IDENTITY)
    X = np.array([[1.5, -2.25, 3e-8, 1e30], [0.1, 0.2, 0.3, 0.4]], dtype=np.float64)
    fs.put_features(run_id, ["img1", "img0"], X)
    ids, got = fs.features(run_id)
    assert ids.dtype.kind == "U" and ids.tolist() == ["img0", "img1"]  # catalogue order, not insertion order
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, X[[1, 0]].astype(np.float32))
    blob = sqlite3.connect(fs.path).execute("SELECT vector FROM features WHERE image_id = 'img1'").fetchone()[0]
    assert len(blob) == 16 and blob[:8] == b"\x00\x00\xc0\x3f\x00\x00\x10\xc0"  # 1.5, -2.25 as <f4
    assert blob == np.array([1.5, -2.25, 3e-8, 1e30], dtype="<f4").tobytes()


def test_features_follow_the_ids_given_and_name_missing_ones(fs):
    fs.put_catalog(_catalog())
    run_id = fs.start_run(IDENTITY)
    X = np.arange(24, dtype=np.float32).reshape(6, 4)
    fs.put_features(run_id, [f"img{i}" for i in range(6)], X)
    ids, got = fs.features(run_id, ["img5", "img0", "img3", "img0"])
    assert ids.tolist() == ["img5", "img0", "img3", "img0"]
    np.testing.assert_array_equal(got, X[[5, 0, 3, 0]])
    ids, got = fs.features(run_id, [])
    assert ids.shape == (0,) and got.shape == (0, 4)
    with pytest.raises(KeyError, match=r"no vector for 2 id\(s\).*nope"):
        fs.features(run_id, ["img1", "nope", "nada"])


def test_features_of_ids_outside_the_catalogue_come_last(fs):
    fs.put_catalog(_catalog(4))
    run_id = fs.start_run(IDENTITY)
    fs.put_features(run_id, ["zz", "img2", "aa", "img0"], np.arange(16).reshape(4, 4))
    ids, X = fs.features(run_id)
    assert ids.tolist() == ["img0", "img2", "aa", "zz"]
    assert X[:, 0].tolist() == [12, 4, 8, 0]


def test_put_features_replaces_checks_dim_and_is_one_transaction(fs):
    fs.put_catalog(_catalog())
    run_id = fs.start_run({**IDENTITY, "dim": None})
    fs.put_features(run_id, ["img0", "img1"], np.zeros((2, 3)))
    assert fs.run(run_id)["dim"] == 3  # the first write fixes the dimension
    fs.put_features(run_id, ["img1"], np.full((1, 3), 7.0))  # INSERT OR REPLACE: no duplicate row
    ids, X = fs.features(run_id)
    assert ids.tolist() == ["img0", "img1"] and X[1].tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="stores 3-d vectors, got 5-d"):
        fs.put_features(run_id, ["img2"], np.zeros((1, 5)), failures=[("img3", "corrupt")])
    assert fs.done_ids(run_id) == {"img0", "img1"} and fs.failed_ids(run_id) == set()  # nothing half-written
    with pytest.raises(ValueError, match="shape"):
        fs.put_features(run_id, ["img2", "img3"], np.zeros((1, 3)))
    with pytest.raises(KeyError):
        fs.put_features(42, ["img2"], np.zeros((1, 3)))


def test_failures_table_in_catalogue_order_with_paths(fs):
    fs.put_catalog(_catalog())
    run_id = fs.start_run(IDENTITY)
    assert fs.failures(run_id).empty and list(fs.failures(run_id).columns) == ["image_id", "path", "reason", "detail"]
    assert fs.put_failures(run_id, [("img4", "truncated", "image file is truncated"), ("img1", "empty")]) == 2
    fails = fs.failures(run_id)
    assert fails["image_id"].tolist() == ["img1", "img4"]
    assert fails["path"].tolist() == ["/data/img1.jpg", "/data/img4.jpg"]
    assert fails["reason"].tolist() == ["empty", "truncated"]
    assert fails["detail"].isna().tolist() == [True, False]
    assert fs.failed_ids(run_id) == {"img1", "img4"}
    with pytest.raises(ValueError, match="image_id, reason"):
        fs.put_failures(run_id, ["img1"])


def test_reading_many_wide_vectors_is_exact(fs):
    n, d = 3000, 1280
    ids = np.array([f"p{i:05d}" for i in range(n)])
    fs.put_catalog(pd.DataFrame({"image_id": ids, "path": ids}))
    run_id = fs.start_run({**IDENTITY, "dim": d})
    X = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    order = np.random.default_rng(1).permutation(n)
    for start in range(0, n, 500):  # written in shuffled batches
        sel = order[start:start + 500]
        fs.put_features(run_id, ids[sel], X[sel])
    got_ids, got = fs.features(run_id)
    assert (got_ids == ids).all()
    np.testing.assert_array_equal(got, X)


def _wide_run(fs: FeatureStore, n: int, d: int) -> tuple[int, np.ndarray, np.ndarray]:
    """A run of ``n`` x ``d`` vectors written in shuffled batches; the last 5 ids are not in the catalogue."""
    ids = np.array([f"p{i:05d}" for i in range(n)])
    fs.put_catalog(pd.DataFrame({"image_id": ids[:-5], "path": ids[:-5]}))
    run_id = fs.start_run({**IDENTITY, "dim": d})
    X = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    order = np.random.default_rng(1).permutation(n)
    for start in range(0, n, 300):
        sel = order[start:start + 300]
        fs.put_features(run_id, ids[sel], X[sel])
    return run_id, ids, X


def test_features_stream_into_one_array_at_about_the_size_of_the_data(fs, monkeypatch):
    import tracemalloc

    run_id, ids, X = _wide_run(fs, 2000, 1280)
    monkeypatch.setattr(store_module, "READ_CHUNK", 128)  # 16 chunks
    fs.features(run_id, ids[:10])  # the connection and its caches exist before measuring
    tracemalloc.start()
    try:
        got_ids, got = fs.features(run_id)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (got_ids == ids).all()  # catalogue order; the 5 ids outside it last, by id
    np.testing.assert_array_equal(got, X)
    # X itself (10.2 MB) plus one chunk of blobs (128 x 5 kB) and the ids; reading all blobs first was 2x
    assert X.nbytes <= peak < 1.2 * X.nbytes, peak / X.nbytes
    # given ids, repeated and spread over many chunks, come back in their order
    want = np.concatenate([ids[::-7], ids[3:900:2], ids[::-7]])
    got_ids, got = fs.features(run_id, want)
    assert got_ids.tolist() == want.tolist()
    np.testing.assert_array_equal(got, X[[int(i[1:]) for i in want]])


def test_iter_features_yields_the_run_in_catalogue_order_chunk_by_chunk(fs):
    run_id, ids, X = _wide_run(fs, 1000, 64)
    chunks = list(fs.iter_features(run_id, chunk=300))
    assert [len(c[0]) for c in chunks] == [300, 300, 300, 100] and all(c[1].shape[1] == 64 for c in chunks)
    assert np.concatenate([c[0] for c in chunks]).tolist() == fs.features(run_id)[0].tolist() == ids.tolist()
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), X)
    assert chunks[0][1].dtype == np.float32 and chunks[0][1].flags.writeable
    empty = fs.start_run({**IDENTITY, "pooling": "mac"})
    assert list(fs.iter_features(empty)) == []
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        next(fs.iter_features(run_id, chunk=0))
    with pytest.raises(RunNotFoundError, match="run 99 not found"):
        next(fs.iter_features(99))


def test_damaged_vectors_in_different_chunks_are_all_counted_and_named(tmp_path, monkeypatch):
    path = tmp_path / "f.sqlite"
    fs = FeatureStore(path)
    run_id, ids, X = _wide_run(fs, 600, 128)
    fs.close()
    for i in (237, 512):
        _flip_bytes_in_file(path, X[i].tobytes(), 40, 64)
    monkeypatch.setattr(store_module, "READ_CHUNK", 50)
    fs = FeatureStore(path)
    with pytest.raises(StoreError, match=r"f.sqlite: run \d+: 2 stored vector\(s\) are damaged.*'p00237'.*'p00512'"):
        fs.features(run_id)
    with pytest.raises(StoreError, match=r"1 stored vector\(s\).*\['p00512'\]"):
        fs.features(run_id, ids[500:520])
    seen = []
    with pytest.raises(StoreError, match=r"\['p00237'\]"):
        for chunk_ids, _ in fs.iter_features(run_id, chunk=100):
            seen.append(len(chunk_ids))
    assert seen == [100, 100]  # the chunks before the damaged one were delivered whole


def test_delete_run_cascades(fs):
    fs.put_catalog(_catalog())
    run_id = fs.start_run(IDENTITY)
    fs.put_features(run_id, ["img0"], np.zeros((1, 4)), failures=[("img1", "empty")])
    fs.put_neighbours(run_id, "cosine", pd.DataFrame({"query_id": ["img0"], "rank": [1], "neighbour_id": ["img2"],
                                                      "distance": [0.5]}))
    fs.put_table("scores", pd.DataFrame({"a": [1]}), run_id=run_id)
    fs.delete_run(run_id)
    con = sqlite3.connect(fs.path)
    for table in ("runs", "features", "failures", "neighbours", "neighbour_sets", "results"):
        assert con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
    assert len(fs.catalog()) == 6


# --------------------------------------------------------------------------------------------- neighbours
def _neighbours(queries: list[str], k: int, offset: float = 0.0) -> pd.DataFrame:
    rows = [(q, r, f"n{r}", r / 10 + offset, 1 - (r / 10 + offset)) for q in queries for r in range(1, k + 1)]
    return pd.DataFrame(rows, columns=["query_id", "rank", "neighbour_id", "distance", "similarity"])


def test_neighbours_round_trip_replace_and_sets(fs):
    a = fs.start_run(IDENTITY)
    b = fs.start_run({**IDENTITY, "pooling": "mac"})
    first = _neighbours(["q2", "q1"], 3)
    assert fs.put_neighbours(a, "cosine", first, params={"k": 3}) == 6
    pd.testing.assert_frame_equal(fs.neighbours(a, "cosine"), first)
    fs.put_neighbours(a, "cosine", _neighbours(["q1"], 2, offset=1.0))  # replaces the whole set
    got = fs.neighbours(a, "cosine")
    assert got["query_id"].tolist() == ["q1", "q1"] and got["distance"].tolist() == [1.1, 1.2]
    euclid = _neighbours(["q1", "q2", "q3"], 5).drop(columns="similarity")
    fs.put_neighbours(a, "euclidean", euclid)
    assert fs.neighbours(a, "euclidean")["similarity"].isna().all()
    fs.put_neighbours(a, "cosine", _neighbours(["q9"], 4), tag="roi")
    fs.put_neighbours(b, "cosine", _neighbours(["q1"], 1))
    sets = fs.neighbour_sets()
    assert sets[["run_id", "metric", "tag", "n_queries", "k", "n_rows"]].values.tolist() == [
        [a, "cosine", "", 1, 2, 2], [a, "cosine", "roi", 1, 4, 4], [a, "euclidean", "", 3, 5, 15],
        [b, "cosine", "", 1, 1, 1]]
    with pytest.raises(KeyError, match="manhattan"):
        fs.neighbours(a, "manhattan")
    with pytest.raises(ValueError, match="distance"):
        fs.put_neighbours(a, "cosine", pd.DataFrame({"query_id": ["q"], "rank": [1], "neighbour_id": ["n"]}))


# --------------------------------------------------------------------------------------------- result tables
def test_tables_round_trip_exactly_with_dtypes_and_index(fs):
    run_id = fs.start_run(IDENTITY)
    df = pd.DataFrame({
        "metric": ["cosine", "euclidean", "manhattan"],
        "precision": [1 / 3, 2 / 3, float("nan")],
        "tiny": [1e-300, 5e-324, 123456789.123456789],
        "n": np.array([1, 2, 3], dtype=np.int64),
        "ok": [True, False, True],
        "when": pd.to_datetime(["2024-01-02 03:04:05", "2024-02-03 00:00:00", None]),
    }).set_index("metric")
    fs.put_table("scores", df)
    got = fs.table("scores")
    pd.testing.assert_frame_equal(got, df)
    assert got["precision"].iloc[0] == 1 / 3  # full float precision
    multi = pd.DataFrame({"x": [1.5, 2.5]}, index=pd.MultiIndex.from_tuples([("a", 1), ("b", 2)], names=["k", "r"]))
    fs.put_table("scores", multi, run_id=run_id)
    pd.testing.assert_frame_equal(fs.table("scores", run_id=run_id), multi)
    pd.testing.assert_frame_equal(fs.table("scores"), df)  # per-run and global tables are separate
    fs.put_table("scores", df.iloc[:1])  # replaces
    assert len(fs.table("scores")) == 1
    empty = pd.DataFrame({"a": pd.Series([], dtype="float64")})
    fs.put_table("empty", empty)
    pd.testing.assert_frame_equal(fs.table("empty"), empty)
    assert fs.tables()[["name", "run_id"]].astype(object).values.tolist() == [
        ["empty", pd.NA], ["scores", pd.NA], ["scores", run_id]]
    with pytest.raises(KeyError, match="missing"):
        fs.table("missing")


# --------------------------------------------------------------------------------------------- concurrency
N_CONCURRENT, BATCH = 1000, 10


def _expected(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N_CONCURRENT, 16)).astype(np.float32)


def _writer(path: str, model: str, seed: int, barrier) -> None:
    """Child process: what an extraction does, batch by batch, into the shared store."""
    barrier.wait(timeout=60)  # both processes open the (new) store and write at the same time
    fs = FeatureStore(path)
    ids = [f"im{i:04d}" for i in range(N_CONCURRENT)]
    fs.put_catalog(pd.DataFrame({"image_id": ids, "path": [f"/x/{i}.jpg" for i in ids], "category": model}))
    run_id = fs.start_run({**IDENTITY, "model": model, "dim": 16})
    X = _expected(seed)
    for start in range(0, N_CONCURRENT, BATCH):
        fs.put_features(run_id, ids[start:start + BATCH], X[start:start + BATCH],
                        failures=[(f"bad-{model}-{start}", "corrupt")])
        fs.done_ids(run_id)  # readers interleave with the other process's writes
        time.sleep(0.005)  # the model's work between two batches
    fs.finish_run(run_id, n_images=N_CONCURRENT)


def test_two_processes_write_different_runs_into_one_store_concurrently(tmp_path):
    path = tmp_path / "shared.sqlite"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(path), model, seed, barrier))
             for model, seed in (("alpha", 1), ("beta", 2))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    fs = FeatureStore(path)
    runs = fs.runs().set_index("model")
    assert runs.loc[["alpha", "beta"], "status"].tolist() == ["complete", "complete"]
    assert runs.loc[["alpha", "beta"], "n_features"].tolist() == [N_CONCURRENT, N_CONCURRENT]
    assert runs.loc[["alpha", "beta"], "n_failures"].tolist() == [N_CONCURRENT // BATCH] * 2
    for model, seed in (("alpha", 1), ("beta", 2)):
        ids, X = fs.features(int(runs.loc[model, "run_id"]))
        assert ids.tolist() == [f"im{i:04d}" for i in range(N_CONCURRENT)]
        np.testing.assert_array_equal(X, _expected(seed))
    assert len(fs.catalog()) == N_CONCURRENT
    # the writes really interleaved: in commit (rowid) order the run id changes many times
    order = [r[0] for r in sqlite3.connect(path).execute("SELECT run_id FROM features ORDER BY rowid")]
    switches = int(np.count_nonzero(np.diff(order)))
    print(f"run switches in commit order: {switches}")
    assert switches >= 2


def test_an_empty_store_answers_with_empty_tables(fs):
    assert fs.catalog().empty and "image_id" in fs.catalog().columns
    assert fs.runs().empty and "n_features" in fs.runs().columns
    assert fs.neighbour_sets().empty and fs.tables().empty and fs.find_run(model="x") is None
    run_id = fs.start_run(IDENTITY)
    ids, X = fs.features(run_id)
    assert ids.shape == (0,) and X.shape == (0, 4) and fs.done_ids(run_id) == set()


# --------------------------------------------------------------------------------------------- content hashes (issue 10)
def _v1_store(path) -> None:
    """A store as cbir wrote it before schema 2: no sha1/crc32 columns, one vector."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("BEGIN")
    store_module._schema_v1(con)
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO images (image_id, path) VALUES ('img0', '/data/img0.jpg')")
    con.execute("INSERT INTO runs (identity_key, model, dim, params, created) VALUES ('{}', 'm', 2, '{}', 'now')")
    con.execute("INSERT INTO features VALUES (1, 'img0', ?)", (np.array([1, 2], "<f4").tobytes(),))
    con.execute("INSERT INTO failures VALUES (1, 'img1', 'empty', NULL)")
    con.execute("COMMIT")
    con.close()


def test_a_schema_1_store_is_migrated_and_its_vectors_have_unknown_content(tmp_path):
    path = tmp_path / "old.sqlite"
    _v1_store(path)
    fs = FeatureStore(path)
    assert fs.schema_version == SCHEMA_VERSION >= 2
    ids, X = fs.features(1)
    assert ids.tolist() == ["img0"] and X.tolist() == [[1.0, 2.0]]  # old vectors stay readable
    assert fs.content_sha1(1) == {"img0": None}  # unknown content: re-extracted by the next extraction
    assert fs.content_sha1(1, failures=True) == {"img1": None}


def test_vectors_keep_the_sha1_of_their_file_and_a_new_outcome_replaces_the_old(fs):
    fs.put_catalog(_catalog())
    run_id = fs.start_run(IDENTITY)
    fs.put_features(run_id, ["img0", "img1"], np.ones((2, 4)), sha1=["a" * 40, "b" * 40],
                    failures=[("img2", "empty", "0 bytes", None)])
    assert fs.content_sha1(run_id) == {"img0": "a" * 40, "img1": "b" * 40}
    assert fs.content_sha1(run_id, failures=True) == {"img2": None}
    assert fs.done_ids(run_id, sha1={"img0": "a" * 40, "img1": "c" * 40}) == {"img0"}  # img1's file changed
    # img1 now fails (its new file is broken) and img2 now works: each id keeps only its latest outcome
    fs.put_features(run_id, ["img2"], np.zeros((1, 4)), sha1=["d" * 40], failures=[("img1", "truncated", "x", "e" * 40)])
    assert fs.done_ids(run_id) == {"img0", "img2"} and fs.failed_ids(run_id) == {"img1"}
    assert fs.content_sha1(run_id, failures=True) == {"img1": "e" * 40}
    with pytest.raises(ValueError, match="sha1"):
        fs.put_features(run_id, ["img3"], np.zeros((1, 4)), sha1=["a" * 40, "b" * 40])


def test_replacing_vectors_drops_what_was_computed_from_the_old_ones(fs):
    fs.put_catalog(_catalog())
    run_id = fs.start_run(IDENTITY)
    derived = fs.start_run({**IDENTITY, "variant": "original+pcaw", "whiten_source_run": run_id})
    other = fs.start_run({**IDENTITY, "pooling": "mac"})
    for r in (run_id, derived, other):
        fs.put_features(r, ["img0"], np.ones((1, 4)))
        fs.put_neighbours(r, "cosine", _neighbours(["img0"], 1))
        fs.put_table("scores", pd.DataFrame({"a": [1]}), run_id=r)
    assert fs.invalidate_derived(run_id) == {"neighbour_sets": 1, "tables": 1, "derived_runs": 1}
    assert fs.runs()["run_id"].tolist() == [run_id, other]  # the whitened run of the old vectors is gone
    assert fs.neighbour_sets()["run_id"].tolist() == [other]
    assert fs.tables()["run_id"].tolist() == [other]
    assert fs.features(run_id)[0].tolist() == ["img0"]  # the vectors themselves stay until replaced


# --------------------------------------------------------------------------------------------- damaged vectors (issue 10)
def _flip_bytes_in_file(path, needle: bytes, offset: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the vector bytes must occur exactly once in the file"
    data[at + offset:at + offset + length] = bytes(b ^ 0x5A for b in data[at + offset:at + offset + length])
    path.write_bytes(bytes(data))


def test_a_damaged_vector_blob_is_refused_naming_the_store_run_and_ids(tmp_path):
    path = tmp_path / "f.sqlite"
    fs = FeatureStore(path)
    ids = [f"img{i}" for i in range(6)]
    fs.put_catalog(pd.DataFrame({"image_id": ids, "path": ids}))
    run_id = fs.start_run({**IDENTITY, "dim": 128})
    X = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    fs.put_features(run_id, ids, X)
    fs.close()
    _flip_bytes_in_file(path, X[3].tobytes(), 100, 256)  # 256 bytes of garbage inside img3's vector
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"  # SQLite sees nothing
    fs = FeatureStore(path)
    with pytest.raises(StoreError, match=rf"f.sqlite.*run {run_id}.*damaged.*\['img3'\]"):
        fs.features(run_id)
    with pytest.raises(StoreError, match=r"\['img3'\]"):
        fs.features(run_id, ["img3", "img0"])
    got_ids, got = fs.features(run_id, ["img5", "img0"])  # the intact vectors stay readable
    np.testing.assert_array_equal(got, X[[5, 0]])


def test_a_non_finite_vector_is_refused_on_write_and_on_read(tmp_path):
    path = tmp_path / "f.sqlite"
    fs = FeatureStore(path)
    fs.put_catalog(_catalog())
    run_id = fs.start_run(IDENTITY)
    bad = np.ones((3, 4), np.float32)
    bad[1, 2] = np.nan
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"non-finite.*\['img1', 'img2'\]"):
        fs.put_features(run_id, ["img0", "img1", "img2"], bad)
    assert fs.done_ids(run_id) == set()
    # a legacy row (no checksum) turned into NaN on disk: the finiteness check still catches it
    fs.put_features(run_id, ["img0"], np.full((1, 4), 0.5))
    con = sqlite3.connect(path)
    con.execute("UPDATE features SET crc32 = NULL, vector = ?", (np.array([1, np.nan, 2, 3], "<f4").tobytes(),))
    con.commit()
    with pytest.raises(StoreError, match=r"run \d+.*img0.*non-finite"):
        fs.features(run_id)


# --------------------------------------------------------------------------------------------- errors (issue 10)
def test_missing_store_unknown_run_and_sqlite_errors_are_store_errors(tmp_path):
    missing = tmp_path / "no" / "such" / "f.sqlite"
    with pytest.raises(StoreError, match=r"f.sqlite: no such feature store"):
        FeatureStore(missing, readonly=True)
    assert not (tmp_path / "no").exists()  # nothing created
    fs = FeatureStore(tmp_path / "f.sqlite")
    a, b = fs.start_run(IDENTITY), fs.start_run({**IDENTITY, "pooling": "mac"})
    with pytest.raises(StoreError, match=rf"run 99 not found in .*f.sqlite; runs: {a}, {b}$") as info:
        fs.run(99)
    assert isinstance(info.value, KeyError)  # still a KeyError for callers that look ids up
    fs.put_catalog(_catalog())
    wide = fs.start_run({**IDENTITY, "dim": 20000})
    fs._connect().execute("PRAGMA max_page_count = 12")  # the disk is full from here on
    with pytest.raises(StoreError, match=r"f.sqlite: .*full.*free some disk space"):
        fs.put_features(wide, [f"img{i}" for i in range(6)], np.ones((6, 20000)))
    assert fs.done_ids(wide) == set()  # rolled back, and the store still answers


# --------------------------------------------------------------------------------------------- read-only (issue 10)
@pytest.mark.parametrize("locked", ["folder", "file", "both"])
def test_a_store_on_read_only_storage_is_readable_in_readonly_mode(shared_dir, locked, as_unprivileged):
    path = shared_dir / "store" / "f.sqlite"
    fs = FeatureStore(path)
    fs.put_catalog(_catalog())
    run_id = fs.start_run(IDENTITY)
    X = np.arange(24, dtype=np.float32).reshape(6, 4)
    fs.put_features(run_id, [f"img{i}" for i in range(6)], X)
    fs.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.sqlite"]  # WAL checkpointed on close
    if locked in ("file", "both"):
        path.chmod(0o444)
    if locked in ("folder", "both"):
        path.parent.chmod(0o555)
    assert os.access(path.parent, os.W_OK) or os.geteuid() == 0  # root: the child drops its rights

    def read() -> dict:
        ro = FeatureStore(path, readonly=True)
        ids, got = ro.features(run_id)
        out = {"ids": ids.tolist(), "X": got.tolist(), "n": len(ro.catalog()), "runs": ro.runs()["run_id"].tolist()}
        try:
            ro.put_catalog(_catalog())
        except StoreError as exc:
            out["write"] = str(exc)
        try:
            FeatureStore(path)
        except StoreError as exc:
            out["writable_open"] = str(exc)
        return out

    got = as_unprivileged(read)
    assert "error" not in got, got["error"] if "error" in got else ""
    assert got["ids"] == [f"img{i}" for i in range(6)] and got["X"] == X.tolist()
    assert got["n"] == 6 and got["runs"] == [run_id]
    assert "f.sqlite: opened read-only" in got["write"]
    assert "f.sqlite" in got["writable_open"] and "read-only" in got["writable_open"]
    assert "readonly=True" in got["writable_open"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.sqlite"] or locked == "file"


def test_unsaved_wal_changes_on_read_only_storage_are_read_or_refused_never_skipped(shared_dir, as_unprivileged):
    path = shared_dir / "f.sqlite"
    with FeatureStore(path) as fs:
        fs.put_catalog(_catalog())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a writer that dies before checkpointing: its run is only in the -wal file
        fs = FeatureStore(path)
        fs.put_features(fs.start_run(IDENTITY), ["img0"], np.ones((1, 4)))
        os._exit(0)
    os.waitpid(pid, 0)
    assert (shared_dir / "f.sqlite-wal").stat().st_size > 0
    shared_dir.chmod(0o555)

    def runs() -> dict:
        return {"runs": FeatureStore(path, readonly=True).runs()["run_id"].tolist()}

    assert as_unprivileged(runs) == {"runs": [1]}  # the -shm file is there: SQLite reads the WAL
    shared_dir.chmod(0o755)
    (shared_dir / "f.sqlite-shm").unlink()
    shared_dir.chmod(0o555)
    got = as_unprivileged(runs)  # reading the file alone (immutable) would silently miss run 1
    assert "f.sqlite-wal holds changes not yet written into the store" in got["error"]
    assert got["error"].startswith("StoreError: ")


def test_run_labels_are_per_run_and_a_schema_2_store_gets_the_labels_it_knew(tmp_path):
    path = tmp_path / "f.sqlite"
    with FeatureStore(path) as fs:
        fs.put_catalog(_catalog())
        one = fs.start_run(IDENTITY)
        two = fs.start_run({**IDENTITY, "labels_sha1": "other"})
        fs.put_run_labels(two, _catalog().assign(subcategory="relabelled", split="query"))
        assert fs.run_labels(two)["subcategory"].eq("relabelled").all()
        with pytest.raises(RunNotFoundError, match="run 9 not found"):
            fs.run_labels(9)
        with pytest.raises(ValueError, match="duplicate image_id"):
            fs.put_run_labels(two, pd.concat([_catalog(), _catalog()]))
    # back to schema 2 (no run_labels): the migration gives every run the labels of the images table
    con = sqlite3.connect(path)
    con.executescript("DROP TABLE run_labels; PRAGMA user_version = 2;")
    con.close()
    with FeatureStore(path) as fs:
        assert fs.schema_version == SCHEMA_VERSION
        for run_id in (one, two):
            labels = fs.run_labels(run_id)
            assert labels["image_id"].tolist() == _catalog()["image_id"].tolist()
            assert labels["subcategory"].tolist() == _catalog()["subcategory"].tolist()
            assert labels["is_fashion"].tolist() == _catalog()["is_fashion"].tolist()
