"""Runs whose vectors stay in their Parquet shards (``vectors="shards"``, for catalogues too big to copy into
SQLite): the store records the run and its shard directory and every reader streams from the shards. The
reader alone (no Dask) and the whole path on a 2-worker LocalCluster: the same ids, vectors and failures as
in-process, nothing in the store's vector tables, a rerun that computes nothing, an edited image that redoes
only its partition, a missing or damaged shard named in the error, an index built from the shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbir.catalog import load_catalog
from cbir.datasets import make_demo_catalog
from cbir.extract import ExtractionError, extract_features
from cbir.shards import MANIFEST, ShardError, ShardSet, write_shard
from cbir.store import FeatureStore, StoreError


def _write_run(shard_dir: Path, parts: list[tuple[list[str], np.ndarray, list[int]]], dim: int) -> list[str]:
    """Shards of (ids, vectors of the ok rows, ok rows) plus a manifest; failures have reason 'empty'."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for k, (ids, X, ok) in enumerate(parts):
        name = f"part-{k:06d}-{k:012d}.parquet"
        reasons = [None if j in ok else "empty" for j in range(len(ids))]
        sha1 = [f"sha-{i}" for i in ids]
        write_shard(shard_dir / name, ids, X, ok, sha1, reasons, [None] * len(ids),
                    {"identity_sha1": "abc", "dim": str(dim)}, dim)
        names.append(name)
    (shard_dir / MANIFEST).write_text(json.dumps({"format": "1", "identity_sha1": "abc", "shards": names}))
    return names


def _parts(rng: np.random.Generator, dim: int = 6):
    a_ids, b_ids = ["a0", "a1", "a2", "a3"], ["b0", "b1", "b2"]
    Xa, Xb = rng.standard_normal((3, dim)).astype(np.float32), rng.standard_normal((3, dim)).astype(np.float32)
    return [(a_ids, Xa, [0, 1, 3]), (b_ids, Xb, [0, 1, 2])], Xa, Xb


def test_shard_set_reads_ids_failures_and_vectors_in_any_order(tmp_path):
    parts, Xa, Xb = _parts(np.random.default_rng(0))
    _write_run(tmp_path / "run", parts, 6)
    shards = ShardSet(tmp_path / "run")
    assert shards.ids.tolist() == ["a0", "a1", "a3", "b0", "b1", "b2"] and shards.dim == 6
    assert shards.failures[["image_id", "reason"]].values.tolist() == [["a2", "empty"]]
    assert shards.content_sha1()["b2"] == "sha-b2" and shards.content_sha1(failures=True) == {"a2": "sha-a2"}
    np.testing.assert_array_equal(shards.take(np.arange(6)), np.concatenate([Xa, Xb]))
    # any order, repeats, across shards
    X = shards.take(shards.positions(["b2", "a0", "b2", "a3"]))
    np.testing.assert_array_equal(X, np.stack([Xb[2], Xa[0], Xb[2], Xa[2]]))
    chunks = list(shards.iter_chunks(4))
    assert [c[0].tolist() for c in chunks] == [["a0", "a1", "a3", "b0"], ["b1", "b2"]]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), np.concatenate([Xa, Xb]))
    with pytest.raises(KeyError, match="a2"):  # a failure has no vector
        shards.positions(["a2"])


def test_a_few_rows_are_read_from_their_row_groups_only(tmp_path, monkeypatch):
    """A lookup of a few ids (re-ranking index candidates) reads their row groups, not the whole shard."""
    import pyarrow.parquet as pq

    from cbir import shards as shards_module

    rng = np.random.default_rng(3)
    ids = [f"i{k:04d}" for k in range(2000)]
    X = rng.standard_normal((2000, 128)).astype(np.float32)  # 512 rows per row group
    ok = [k for k in range(2000) if k % 97 != 5]  # a few failures spread over the row groups
    _write_run(tmp_path / "run", [(ids, X[ok], ok)], 128)
    assert pq.ParquetFile(tmp_path / "run" / "part-000000-000000000000.parquet").metadata.num_row_groups == 4
    shard_set = ShardSet(tmp_path / "run")
    read_groups = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read_groups.append(list(groups)) or real(self, groups, **kw))
    want = ["i1999", "i0003", "i1500", "i0004"]
    np.testing.assert_array_equal(shard_set.take(shard_set.positions(want)), X[[1999, 3, 1500, 4]])
    assert read_groups == [[0, 2, 3]] and shard_set._cache is None  # three of four groups; nothing kept
    # a large share of the shard: read whole, once, and kept
    many = [i for k, i in enumerate(ids) if k in set(ok)][::3]
    np.testing.assert_array_equal(shard_set.take(shard_set.positions(many)),
                                  X[[k for k in ok][::3]])
    assert read_groups == [[0, 2, 3]] and shard_set._cache is not None
    assert shards_module.row_group_rows(128) == 512 and shards_module.row_group_rows(1280) == 51


def test_shard_set_names_the_bad_file(tmp_path):
    parts, _, _ = _parts(np.random.default_rng(1))
    names = _write_run(tmp_path / "run", parts, 6)
    # no manifest: an error for a complete run, an empty set for one still being extracted
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no _manifest.json"):
        ShardSet(tmp_path / "empty")
    assert len(ShardSet(tmp_path / "empty", required=False)) == 0
    damaged = tmp_path / "run" / names[1]
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(ShardError, match=names[1]):
        ShardSet(tmp_path / "run")
    damaged.unlink()
    with pytest.raises(ShardError, match=f"{names[1]}: a shard the manifest lists is missing"):
        ShardSet(tmp_path / "run")
    # the same id in two listed shards
    _write_run(tmp_path / "dup", [(["x", "y"], np.ones((2, 3), np.float32), [0, 1]),
                                  (["y"], np.ones((1, 3), np.float32), [0])], 3)
    with pytest.raises(ShardError, match=r"\['y'\] appear in more than one shard"):
        ShardSet(tmp_path / "dup")
    # a NaN vector is refused when read
    _write_run(tmp_path / "nan", [(["x", "y"], np.array([[1, 2, 3], [np.nan, 0, 0]], np.float32), [0, 1])], 3)
    with pytest.raises(ShardError, match=r"\['y'\] hold non-finite values"):
        ShardSet(tmp_path / "nan").take(np.arange(2))


def test_store_serves_a_run_kept_in_shards_and_writes_nothing_of_it(tmp_path):
    parts, Xa, Xb = _parts(np.random.default_rng(2))
    shard_dir = tmp_path / "run"
    store = FeatureStore(tmp_path / "features.sqlite")
    run_id = store.start_run({"model": "m", "dim": 6})
    store.keep_vectors_in_shards(run_id, shard_dir)
    assert store.shard_dir(run_id) == str(shard_dir.resolve())
    # being extracted, no manifest yet: nothing visible
    assert store.done_ids(run_id) == set() and store.features(run_id)[1].shape == (0, 0)
    _write_run(shard_dir, parts, 6)
    store.finish_run(run_id, n_features=6, n_failures=1)
    ids, X = store.features(run_id)
    assert ids.tolist() == ["a0", "a1", "a3", "b0", "b1", "b2"]
    np.testing.assert_array_equal(X, np.concatenate([Xa, Xb]))
    np.testing.assert_array_equal(store.features(run_id, ["b0", "a1"])[1], np.stack([Xb[0], Xa[1]]))
    np.testing.assert_array_equal(np.concatenate([c[1] for c in store.iter_features(run_id, chunk=5)]), X)
    assert store.done_ids(run_id, {"a0": "sha-a0", "b0": "other"}) == {"a0"}
    assert store.failed_ids(run_id) == {"a2"} and store.failures(run_id)["reason"].tolist() == ["empty"]
    assert store.ids_with_vectors(run_id, ["b1", "a2", "zz", "a0"]).tolist() == ["b1", "a0"]
    run = store.run(run_id)
    assert (run["n_features"], run["n_failures"]) == (6, 1)
    assert store.runs().set_index("run_id").loc[run_id, "n_features"] == 6
    with pytest.raises(KeyError, match="no vector for 1 id"):
        store.features(run_id, ["a2"])
    # nothing of it is ever written to the store's tables
    with pytest.raises(StoreError, match="keeps its vectors in its shards"):
        store.put_features(run_id, ["c0"], np.ones((1, 6), np.float32))
    with pytest.raises(StoreError, match="keeps its vectors in its shards"):
        store.put_failures(run_id, [("c0", "empty")])
    with pytest.raises(StoreError, match="keeps its vectors in"):
        store.keep_vectors_in_shards(run_id, tmp_path / "elsewhere")
    # a run holding vectors in the store cannot move to shards
    other = store.start_run({"model": "n", "dim": 6})
    store.put_features(other, ["a0"], np.ones((1, 6), np.float32))
    with pytest.raises(StoreError, match="already holds 1 vector"):
        store.keep_vectors_in_shards(other, tmp_path / "other")
    # a shard rewritten: the fingerprint of its vectors changes (a saved index turns stale)
    before = store.vector_crc32(run_id)
    name = json.loads((shard_dir / MANIFEST).read_text())["shards"][1]
    data = (shard_dir / name).read_bytes()
    (shard_dir / name).unlink()
    with pytest.raises(StoreError, match=f"run {run_id}: .*{name}"):
        store.features(run_id)
    (shard_dir / name).write_bytes(data)
    after = store.vector_crc32(run_id)
    assert {i for i in before if before[i] != after[i]} == {"b0", "b1", "b2"}


def test_vectors_shards_needs_a_cluster_wherever_it_is_asked_for(tmp_path, capsys):
    from cbir.cli import main
    from cbir.datasets import make_demo_catalog
    from cbir.distributed import ensure_features_cluster
    from cbir.params import ParamsError, load_params
    from cbir.session import open_session

    manifest = make_demo_catalog(tmp_path / "demo", n=12, seed=1)
    assert main(["extract", "--catalog", str(manifest), "--model", "color_hist", "--store",
                 str(tmp_path / "s.sqlite"), "--vectors", "shards"]) == 1
    assert "--vectors shards needs --cluster or --scheduler" in capsys.readouterr().err
    assert not (tmp_path / "s.sqlite").exists()  # refused before a store is made
    params = tmp_path / "p.yaml"
    params.write_text("vectors: shards\n")
    with pytest.raises(ParamsError, match="vectors: shards needs a cluster"):
        load_params(params)
    assert load_params(params, {"cluster": "local:2"})["vectors"] == "shards"
    with pytest.raises(ParamsError, match="vectors must be 'store' or 'shards', got 'sqlite'"):
        load_params(params, {"vectors": "sqlite"})
    with pytest.raises(ValueError, match="needs a cluster"):
        ensure_features_cluster(str(manifest), store=tmp_path / "e.sqlite", model="color_hist", vectors="shards")
    with pytest.raises(ValueError, match="needs a cluster"):
        open_session(catalog=str(make_demo_catalog(tmp_path / "demo48", n=48, seed=1)), out_dir=tmp_path / "out",
                     model="color_hist", pooling=None, n_queries=4, vectors="shards")


# -- on a cluster --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalog_df(tmp_path_factory) -> pd.DataFrame:
    """30 demo images copied (so that they can be edited) without catalogue hashes, plus an empty file."""
    root = tmp_path_factory.mktemp("shard-catalog")
    df = load_catalog(make_demo_catalog(root / "demo", n=30, seed=5), progress=False).df.copy()
    images = root / "images"
    images.mkdir()
    for i, path in enumerate(df["path"]):
        target = images / f"{i}{Path(path).suffix}"
        target.write_bytes(Path(path).read_bytes())
        df.loc[i, "path"] = str(target)
    (images / "empty.jpg").write_bytes(b"")
    row = df.iloc[12].copy()
    row["image_id"], row["path"] = "bad-empty", str(images / "empty.jpg")
    df = pd.concat([df.iloc[:12], row.to_frame().T, df.iloc[12:]], ignore_index=True)
    df["sha1"] = None
    if "dup_group" in df.columns:
        df["dup_group"] = None
    return df.astype({"is_fashion": bool})


def _stamps(shard_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_dir.glob("part-*.parquet")}


def test_a_cluster_run_kept_in_shards_matches_in_process_resumes_and_redoes_only_an_edited_partition(
        client, catalog_df, tmp_path):
    from cbir.distributed import extract_distributed
    from cbir.index import build_index, search_vectors

    ref = FeatureStore(tmp_path / "ref.sqlite")
    ref_run = extract_features(catalog_df, model="color_hist", store=ref, progress=False)
    store = FeatureStore(tmp_path / "features.sqlite")
    run_id = extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=8,
                                 progress=False, vectors="shards")
    shard_dir = Path(store.shard_dir(run_id))
    assert shard_dir == (tmp_path / "features.sqlite.shards" / f"run-{run_id}").resolve()
    # nothing in the store's vector tables; everything read from the shards equals the in-process run
    con = store._connect()
    assert con.execute("SELECT count(*) FROM features").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM failures").fetchone()[0] == 0
    ids, X = store.features(run_id)
    ref_ids, ref_X = ref.features(ref_run)
    np.testing.assert_array_equal(ids, ref_ids)
    assert float(np.abs(X - ref_X).max()) <= 1e-5
    assert store.failures(run_id)[["image_id", "reason"]].values.tolist() == [["bad-empty", "empty"]]
    assert store.content_sha1(run_id) == ref.content_sha1(ref_run)
    run = store.run(run_id)
    assert (run["status"], run["n_features"], run["n_failures"]) == ("complete", 30, 1)
    assert run["stats"]["n_shards"] == 4
    # a rerun computes nothing and rewrites nothing
    before = _stamps(shard_dir)
    assert extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=8,
                               progress=False, vectors="shards") == run_id
    assert _stamps(shard_dir) == before
    # an index is built by streaming the shards, and searched
    info = build_index(store, run_id, metric="cosine", kind="flat")
    labels = store.run_labels(run_id)
    searchable = set(labels.loc[labels["split"] != "query", "image_id"]) & set(ids)
    assert info.n == len(searchable) and info.recall == 1.0
    q = sorted(searchable)[0]
    result = search_vectors(store, run_id, store.features(run_id, [q])[1], k=3, metric="cosine")
    assert result.neighbours["distance"].iloc[0] == pytest.approx(0.0, abs=1e-6) and "Flat" in result.how
    # in-process extraction cannot write into it; with nothing to do it just returns the run
    assert extract_features(catalog_df, model="color_hist", store=store, progress=False) == run_id
    edited = Path(catalog_df.loc[20, "path"])
    edited.write_bytes(Path(catalog_df.loc[3, "path"]).read_bytes())  # image 20 now shows image 3
    with pytest.raises(ExtractionError, match="keeps its vectors in its shards"):
        extract_features(catalog_df, model="color_hist", store=store, progress=False)
    # on the cluster: only the edited image's partition is computed again, into a new shard
    assert extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=8,
                               progress=False, vectors="shards") == run_id
    after = _stamps(shard_dir)
    assert len(after) == 4 and len(set(after) - set(before)) == 1
    assert {n: s for n, s in after.items() if n in before} == {n: s for n, s in before.items() if n in after}
    stats = store.run(run_id)["stats"]
    assert (stats["n_shards_computed"], stats["n_shards_reused"]) == (1, 0)
    np.testing.assert_array_equal(store.features(run_id, [catalog_df.loc[20, "image_id"]])[1],
                                  store.features(run_id, [catalog_df.loc[3, "image_id"]])[1])
    # the saved index notices the rewritten shard
    from cbir.index import load_index
    with pytest.raises(ValueError, match="stale"):
        load_index(store, run_id, "cosine")
    # the shard directory lost: the next extraction computes the run again
    for path in shard_dir.iterdir():
        path.unlink()
    with pytest.raises(StoreError, match="no _manifest.json"):
        store.features(run_id)
    extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=8,
                        progress=False, vectors="shards")
    assert len(store.features(run_id)[0]) == 30
