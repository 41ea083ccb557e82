"""Streaming, resumable extraction: values, failures, bounded prefetch, resume after SIGKILL, two
concurrent extractions into one store, export, the CLI, and one real Keras backbone."""
from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cbir.extract import ensure_features, export_features, extract_features, load_run_features
from cbir.images import read_image
from cbir.store import FeatureStore


class TinyExtractor:
    """A deterministic stand-in for a CNN (the Extractor protocol): the 3 channel means and 3 channel
    standard deviations of the image scaled to 0..1, times a fixed seeded 6 x ``dim`` projection.
    ``delay`` (seconds per batch) mimics a slow model and is not part of the identity."""

    layer = None
    pooling = "moments"
    weights_sha1 = None

    def __init__(self, *, name: str = "tiny", input_size: int = 16, dim: int = 8, seed: int = 0,
                 delay: float = 0.0) -> None:
        self.name, self.input_size, self.dim, self.seed, self.delay = name, input_size, dim, seed, delay
        self.weights_label = f"projection seed {seed}"
        self.projection = np.random.default_rng(seed).standard_normal((6, dim)).astype(np.float32)
        self.batch_sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.uint8 and batch.shape[1:] == (self.input_size, self.input_size, 3)
        self.batch_sizes.append(len(batch))
        x = batch.astype(np.float32) / 255.0
        stats = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
        if self.delay:
            time.sleep(self.delay)
        return stats @ self.projection

    def identity(self) -> dict:
        return {"model": self.name, "input_size": self.input_size, "dim": self.dim, "seed": self.seed}


N_GOOD = 200
BAD = {"bad_empty": "empty", "bad_text": "not_an_image", "bad_missing": "missing", "bad_trunc": "truncated"}


def make_catalog(folder: Path, n: int = N_GOOD, *, bad: bool = True, size: int = 24) -> pd.DataFrame:
    """``n`` seeded random PNGs (``size`` px, 2 categories) and, with ``bad``, four broken files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = folder / f"im{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        rows.append((f"im{i:03d}", str(path), "tops" if i % 2 else "shoes"))
    if bad:
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "text.jpg").write_text("not an image, just some text\n")
        good = (folder / "im000.png").read_bytes()
        (folder / "trunc.png").write_bytes(good[: len(good) // 2])
        for at, image_id, name in ((5, "bad_empty", "empty.jpg"), (50, "bad_text", "text.jpg"),
                                   (120, "bad_missing", "gone.jpg"), (180, "bad_trunc", "trunc.png")):
            rows.insert(min(at, len(rows)), (image_id, str(folder / name), "tops"))
    return pd.DataFrame(rows, columns=["image_id", "path", "category"])


@pytest.fixture(scope="module")
def catalog_df(tmp_path_factory) -> pd.DataFrame:
    return make_catalog(tmp_path_factory.mktemp("catalog"))


def reference(df: pd.DataFrame, extractor: TinyExtractor) -> tuple[list[str], np.ndarray]:
    good = df[~df["image_id"].isin(BAD)]
    images = np.stack([read_image(p, size=extractor.input_size) for p in good["path"]])
    return good["image_id"].tolist(), extractor(images)


# --------------------------------------------------------------------------------------------- values
def test_uniform_colour_image_gives_the_hand_computed_vector(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (255, 0, 51)).save(path)
    ext = TinyExtractor(dim=4)
    run_id = extract_features(pd.DataFrame({"image_id": ["red"], "path": [str(path)]}), model=ext,
                              store=tmp_path / "s.sqlite", progress=False)
    ids, X = FeatureStore(tmp_path / "s.sqlite").features(run_id)
    # means (1, 0, 0.2), standard deviations 0: the vector is row 0 plus 0.2 x row 2 of the projection
    np.testing.assert_allclose(X[0], ext.projection[0] + 0.2 * ext.projection[2], atol=1e-6)
    assert ids.tolist() == ["red"]


def test_extraction_stores_every_good_image_and_records_every_bad_one(tmp_path, catalog_df):
    ext = TinyExtractor()
    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(catalog_df, model=ext, store=store, batch_size=16, workers=2, progress=False)
    ids, X = store.features(run_id)
    ref_ids, ref_X = reference(catalog_df, TinyExtractor())
    assert ids.tolist() == ref_ids  # catalogue order, bad rows skipped
    np.testing.assert_allclose(X, ref_X, atol=1e-6)
    fails = store.failures(run_id).set_index("image_id")
    assert set(fails.index) == set(BAD)
    for image_id, reason in BAD.items():
        expected = {"truncated", "corrupt"} if reason == "truncated" else {reason}
        assert fails.loc[image_id, "reason"] in expected, (image_id, fails.loc[image_id].tolist())
    info = store.run(run_id)
    assert info["status"] == "complete" and info["n_features"] == N_GOOD and info["n_failures"] == 4
    assert info["n_images"] == N_GOOD + 4 and info["variant"] == "original" and info["model"] == "tiny"
    assert info["stats"]["n_processed"] == N_GOOD + 4 and info["stats"]["batch_size"] == 16
    # batches thinned by bad images and the last one are padded: the model always sees 16 rows
    assert ext.batch_sizes == [16] * -(-(N_GOOD + 4) // 16)
    assert store.catalog()["image_id"].tolist() == catalog_df["image_id"].tolist()


def test_batch_size_workers_and_padding_do_not_change_the_vectors(tmp_path, catalog_df):
    small = catalog_df.iloc[:50]
    results = []
    for i, (batch_size, workers, pad) in enumerate([(1, 0, True), (7, 1, False), (64, 3, True)]):
        run_id = extract_features(small, model=TinyExtractor(), store=tmp_path / f"s{i}.sqlite",
                                  batch_size=batch_size, workers=workers, pad_batches=pad, progress=False)
        results.append(FeatureStore(tmp_path / f"s{i}.sqlite").features(run_id))
    for ids, X in results[1:]:
        assert ids.tolist() == results[0][0].tolist()
        np.testing.assert_allclose(X, results[0][1], atol=1e-6)


def test_l2_normalize_an_instance_makes_unit_rows_in_a_separate_run(tmp_path, catalog_df):
    store = FeatureStore(tmp_path / "s.sqlite")
    small = catalog_df.iloc[:20]
    raw = extract_features(small, model=TinyExtractor(), store=store, progress=False)
    unit = extract_features(small, model=TinyExtractor(), store=store, l2_normalize=True, progress=False)
    assert raw != unit and store.run(unit)["params"]["l2_normalize"] is True
    X_raw, X_unit = store.features(raw)[1], store.features(unit)[1]
    np.testing.assert_allclose(np.linalg.norm(X_unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(X_unit, X_raw / np.linalg.norm(X_raw, axis=1, keepdims=True), rtol=1e-5)


def test_pca_whitening_is_a_derived_run_fitted_on_the_searchable_rows_only(tmp_path, catalog_df):
    from sklearn.decomposition import PCA

    store = FeatureStore(tmp_path / "s.sqlite")
    df = catalog_df.iloc[:60].copy()
    df["split"] = np.where(np.arange(len(df)) < 10, "query", "catalog")
    raw = ensure_features(df, model=TinyExtractor(), store=store, progress=False)
    white = ensure_features(df, model=TinyExtractor(), store=store, progress=False, pca_whiten=True)
    assert white != raw and store.run(white)["variant"] == "original+pcaw"
    assert ensure_features(df, model=TinyExtractor(), store=store, progress=False, pca_whiten=True) == white
    ids, X = store.features(raw)
    good = df["image_id"].isin(ids)
    fit_ids = sorted(df.loc[good & (df["split"] != "query"), "image_id"])
    # the reference: scikit-learn's whitening PCA fitted on the searchable vectors only, rows L2-normalised
    pca = PCA(whiten=True, svd_solver="full").fit(store.features(raw, fit_ids)[1].astype(np.float64))
    ref = pca.transform(X.astype(np.float64))[:, :store.run(white)["dim"]]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got_ids, W = store.features(white, ids)
    assert W.shape == (len(ids), 6)  # the tiny extractor's vectors have rank 6 (6 statistics)
    np.testing.assert_allclose(np.abs(W), np.abs(ref), atol=1e-4)  # components are defined up to sign
    # whitened searchable vectors are decorrelated with equal variance before the L2 step
    Z = pca.transform(store.features(raw, fit_ids)[1].astype(np.float64))[:, :6]
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(6), atol=1e-6)
    # another fit set makes another run
    df2 = df.assign(split=np.where(np.arange(len(df)) < 20, "query", "catalog"))
    assert ensure_features(df2, model=TinyExtractor(), store=store, progress=False, pca_whiten=True) != white


def test_variant_and_loader_make_their_own_run(tmp_path, catalog_df):
    store = FeatureStore(tmp_path / "s.sqlite")
    small = catalog_df.iloc[:10]
    original = extract_features(small, model=TinyExtractor(), store=store, progress=False)

    def flipped(path: str, size: int) -> np.ndarray:
        return read_image(path, size=size)[:, :, ::-1].copy()  # BGR: means swap channels 0 and 2

    swapped = extract_features(small, model=TinyExtractor(), store=store, variant="bgr", loader=flipped,
                               progress=False)
    assert swapped != original and store.run(swapped)["variant"] == "bgr"
    good = small[~small["image_id"].isin(BAD)]
    images = np.stack([read_image(p, size=16)[:, :, ::-1] for p in good["path"]])
    ext = TinyExtractor()
    np.testing.assert_allclose(store.features(swapped, good["image_id"])[1], ext(images), atol=1e-6)


def test_rerun_is_a_noop_and_new_images_are_added(tmp_path, catalog_df):
    store = FeatureStore(tmp_path / "s.sqlite")
    first = catalog_df.iloc[:30]
    run_id = ensure_features(first, store=store, model=TinyExtractor(), progress=False)
    finished = store.run(run_id)["finished"]
    ext = TinyExtractor()
    assert ensure_features(first, store=store, model=ext, progress=False) == run_id
    assert ext.batch_sizes == [] and store.run(run_id)["finished"] == finished  # nothing recomputed
    # a grown catalogue is another labelling: a run of its own, seeded with the first run's outcomes
    grown = extract_features(catalog_df.iloc[:40], model=ext, store=store, progress=False)
    assert grown != run_id and store.run(grown)["params"]["labels_sha1"] != store.run(run_id)["params"]["labels_sha1"]
    assert ext.batch_sizes == [10]  # only the 10 new images (no padding beyond what is to do)
    ids, X = load_run_features(store, grown, catalog_df.iloc[:40].iloc[::-1])
    expected = [i for i in catalog_df["image_id"].iloc[:40][::-1] if i not in BAD]
    assert ids.tolist() == expected and X.shape == (len(expected), 8)
    np.testing.assert_array_equal(store.features(grown, ids[-25:])[1], store.features(run_id, ids[-25:])[1])
    assert store.run_labels(run_id)["image_id"].tolist() == first["image_id"].tolist()
    assert len(store.run_labels(grown)) == 40


def test_decoding_runs_ahead_of_the_model_but_only_prefetch_batches(tmp_path, catalog_df):
    """The decoders work while the model runs, and never hold more than (prefetch + 1) batches."""
    batch_size, prefetch = 4, 2
    loaded = []
    lock = threading.Lock()

    def counting(path: str, size: int) -> np.ndarray:
        image = read_image(path, size=size)
        with lock:
            loaded.append(path)
        return image

    class Slow(TinyExtractor):
        leads: list[int] = []

        def __call__(self, batch):
            time.sleep(0.02)  # a slow model: unbounded decoders would race through the whole catalogue
            with lock:
                consumed = sum(self.batch_sizes) + len(batch)
                self.leads.append(len(loaded) - consumed)
            return super().__call__(batch)

    good = catalog_df[~catalog_df["image_id"].isin(BAD)].iloc[:80]
    ext = Slow()
    extract_features(good, model=ext, store=tmp_path / "s.sqlite", batch_size=batch_size, workers=3,
                     prefetch=prefetch, loader=counting, progress=False)
    assert len(loaded) == 80
    assert max(ext.leads) <= (prefetch + 1) * batch_size
    assert max(ext.leads) >= batch_size  # decoding did overlap the model


# --------------------------------------------------------------------------------------------- processes
def _extract_child(csv: str, store: str, name: str, seed: int, delay: float, batch_size: int) -> None:
    df = pd.read_csv(csv, dtype=str)
    extract_features(df, model=TinyExtractor(name=name, seed=seed, delay=delay), store=store,
                     batch_size=batch_size, workers=2, progress=False)


def _count(store: Path, table: str = "features") -> int:
    con = sqlite3.connect(store, timeout=30)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # the child has not created the schema yet
        return 0
    finally:
        con.close()


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, catalog_df):
    csv = tmp_path / "catalog.csv"
    catalog_df.to_csv(csv, index=False)
    store = tmp_path / "killed.sqlite"
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_extract_child, args=(str(csv), str(store), "tiny", 0, 0.05, 4))
    child.start()
    deadline = time.monotonic() + 120
    while _count(store) < 3 * 4:  # a few batches committed
        assert child.is_alive() and time.monotonic() < deadline, "the extraction child died or hung"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    done_at_kill = _count(store) + _count(store, "failures")
    assert 0 < _count(store) < N_GOOD  # killed mid-way: some but not all rows

    fs = FeatureStore(store)
    (run_id,) = fs.runs()["run_id"].tolist()
    assert fs.run(run_id)["status"] == "running"  # the killed process never finished the run
    ext = TinyExtractor()
    assert extract_features(catalog_df, model=ext, store=fs, batch_size=4, progress=False) == run_id
    assert fs.run(run_id)["stats"]["n_processed"] == len(catalog_df) - done_at_kill  # resumed, not redone

    fresh = FeatureStore(tmp_path / "fresh.sqlite")
    fresh_id = extract_features(catalog_df, model=TinyExtractor(), store=fresh, batch_size=32, progress=False)
    ids, X = fs.features(run_id)
    ref_ids, ref_X = fresh.features(fresh_id)
    assert ids.tolist() == ref_ids.tolist() and len(set(ids)) == N_GOOD
    np.testing.assert_allclose(X, ref_X, atol=1e-6)
    pd.testing.assert_frame_equal(fs.failures(run_id)[["image_id", "reason"]],
                                  fresh.failures(fresh_id)[["image_id", "reason"]])
    assert _count(store) == N_GOOD and fs.run(run_id)["status"] == "complete"


def test_two_processes_extract_different_models_into_one_store(tmp_path, catalog_df):
    csv = tmp_path / "catalog.csv"
    catalog_df.to_csv(csv, index=False)
    store = tmp_path / "shared.sqlite"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_extract_child, args=(str(csv), str(store), name, seed, 0.005, 2))
             for name, seed in (("tiny_a", 1), ("tiny_b", 2))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    fs = FeatureStore(store)
    runs = fs.runs().set_index("model")
    assert runs.loc[["tiny_a", "tiny_b"], "status"].tolist() == ["complete", "complete"]
    for name, seed in (("tiny_a", 1), ("tiny_b", 2)):
        ids, X = fs.features(int(runs.loc[name, "run_id"]))
        ref_ids, ref_X = reference(catalog_df, TinyExtractor(seed=seed))
        assert ids.tolist() == ref_ids
        np.testing.assert_allclose(X, ref_X, atol=1e-6)
        assert sorted(fs.failures(int(runs.loc[name, "run_id"]))["image_id"]) == sorted(BAD)


# --------------------------------------------------------------------------------------------- export, CLI
def test_export_writes_unicode_ids_and_float32_without_pickle(tmp_path, catalog_df):
    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(catalog_df.iloc[:25], model=TinyExtractor(), store=store, progress=False)
    path = export_features(store, run_id, tmp_path / "out" / "tiny")
    assert path == tmp_path / "out" / "tiny.npz"
    with np.load(path, allow_pickle=False) as data:
        assert data["ids"].dtype.kind == "U" and data["features"].dtype == np.float32
        ids, X = store.features(run_id)
        assert data["ids"].tolist() == ids.tolist()
        np.testing.assert_array_equal(data["features"], X)
        assert '"model": "tiny"' in str(data["run"])


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("manifest")
    df = make_catalog(folder / "images", n=6, bad=False, size=32)
    pd.DataFrame({"image": [f"images/{Path(p).name}" for p in df["path"]], "category": df["category"],
                  "subcategory": "x"}).to_csv(folder / "manifest.csv", index=False)
    (folder / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with open(folder / "manifest.csv", "a") as fh:
        fh.write("images/broken.jpg,tops,x\n")
    return folder


@pytest.mark.slow
def test_cli_extract_and_export_with_a_real_backbone(tmp_path, manifest_dir, capsys):
    pytest.importorskip("keras")
    from cbir.cli import main

    store = tmp_path / "cli.sqlite"
    args = ["extract", "--catalog", str(manifest_dir), "--model", "mobilenet_v2", "--weights", "none",
            "--pooling", "gap", "--store", str(store), "--batch-size", "4", "--workers", "2", "--name", "cli"]
    assert main(args) == 0
    assert "run 1: 6 feature vectors" in capsys.readouterr().out
    fs = FeatureStore(store)
    info = fs.run(1)
    assert (info["name"], info["model"], info["pooling"], info["dim"], info["weights"]) == (
        "cli", "mobilenet_v2", "gap", 1280, "none (random init)")
    assert main(["export", "--store", str(store), "--out", str(tmp_path / "x.npz")]) == 0
    assert "x.npz" in capsys.readouterr().out
    with np.load(tmp_path / "x.npz", allow_pickle=False) as data:
        ids, X = fs.features(1)
        assert data["ids"].tolist() == ids.tolist() == [f"im{i:03d}" for i in range(6)]
        np.testing.assert_array_equal(data["features"], X)
    assert main(args) == 0  # rerun: same run, nothing added
    assert "run 1: 6 feature vectors" in capsys.readouterr().out and len(fs.runs()) == 1


@pytest.mark.slow
def test_real_backbone_by_name_equals_direct_calls(tmp_path, manifest_dir):
    pytest.importorskip("keras")
    from cbir.backbones import build_extractor

    paths = sorted(str(p) for p in (manifest_dir / "images").glob("im*.png"))
    df = pd.DataFrame({"image_id": [Path(p).stem for p in paths] + ["broken"],
                       "path": paths + [str(manifest_dir / "images" / "broken.jpg")]})
    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(df, model="mobilenet_v2", weights="none", pooling="gap", store=store,
                              batch_size=4, progress=False)
    ext = build_extractor("mobilenet_v2", weights="none", pooling="gap")  # seeded: the same random weights
    direct = ext(np.stack([read_image(p, size=ext.input_size) for p in paths]))
    ids, X = store.features(run_id)
    assert ids.tolist() == df["image_id"].tolist()[:-1] and X.shape == (6, 1280)
    np.testing.assert_allclose(X, direct, rtol=1e-4, atol=1e-5)
    assert store.failures(run_id)["image_id"].tolist() == ["broken"]
    assert extract_features(df, model=ext, store=store, progress=False) == run_id  # instance: same identity


# --------------------------------------------------------------------------------------------- cbir.plots.features
def test_feature_stats_hand_computed():
    from cbir.plots.features import feature_stats

    X = np.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # norms 5 and 1
    stats = feature_stats({"a": X, "b": X[:1]})
    assert stats.to_dict("records") == [
        {"features": "a", "n": 2, "dim": 4, "sparsity": 0.625, "mean": 1.0, "norm_mean": 3.0, "norm_std": 2.0,
         "norm_min": 1.0, "norm_max": 5.0},
        {"features": "b", "n": 1, "dim": 4, "sparsity": 0.5, "mean": 1.75, "norm_mean": 5.0, "norm_std": 0.0,
         "norm_min": 5.0, "norm_max": 5.0}]
    assert feature_stats(np.array([[0.001, 1.0]]), zero_tol=0.01)["sparsity"].item() == 0.5


def test_pca_coordinates_match_the_svd_and_the_plot_colours_categories():
    import matplotlib

    matplotlib.use("Agg")
    from cbir.plots.features import pca_coordinates, plot_pca_projection

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5)) * [5.0, 2.0, 1.0, 0.5, 0.1]
    coords, ratio = pca_coordinates(X)
    centred = X - X.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(u[:, :2] * s[:2]), atol=1e-9)
    np.testing.assert_allclose(ratio, s[:2] ** 2 / np.sum(s ** 2), rtol=1e-9)
    np.testing.assert_array_equal(pca_coordinates(X, seed=0)[0], coords)  # deterministic
    labels = np.where(np.arange(60) < 20, "tops", "shoes")
    fig = plot_pca_projection(X, labels)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["shoes (40)", "tops (20)"]
    assert ax.get_xlabel().startswith(f"PC1 ({ratio[0]:.1%}")


def test_throughput_table_reads_the_run_stats(tmp_path, catalog_df):
    from cbir.plots.features import throughput_table

    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(catalog_df.iloc[:40], model=TinyExtractor(), store=store, batch_size=8,
                              progress=False)
    table = throughput_table(store.run(run_id))
    row = table.iloc[0]
    assert (row["run_id"], row["model"], row["images"], row["batch_size"]) == (run_id, "tiny", 40, 8)
    assert row["images_per_second"] == pytest.approx(40 / store.run(run_id)["stats"]["seconds"], rel=1e-2)
    shares = row[["share waiting for decode", "share model", "share store write"]]
    assert (shares >= 0).all() and shares.sum() <= 1.001


def test_extraction_failures_paths_relative_to_the_catalogue_root(tmp_path, catalog_df):
    from cbir.extract import extraction_failures

    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(catalog_df.iloc[:60], model=TinyExtractor(), store=store, progress=False)
    root = Path(catalog_df["path"].iloc[0]).parent
    table = extraction_failures(store, run_id, root=root)
    assert table[["image_id", "path", "reason"]].values.tolist() == [
        ["bad_empty", "empty.jpg", "empty"], ["bad_text", "text.jpg", "not_an_image"]]
    assert extraction_failures(store, run_id)["path"].tolist() == [str(root / "empty.jpg"), str(root / "text.jpg")]


# --------------------------------------------------------------------------------------------- content (issue 10)
def _shop(folder: Path, *, seed: int, n: int = 8, same: int = 0, sha1: bool = True) -> pd.DataFrame:
    """``n`` images ``p0..p{n-1}`` (seeded random colour blocks); the first ``same`` are the seed-0 images,
    so two shops share those files' content. With ``sha1``, the column a validated catalogue has."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([0 if i < same else seed, i])
        image = np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
        path = folder / f"p{i}.png"
        Image.fromarray(image).save(path)
        rows.append({"image_id": f"p{i}", "path": str(path), "sha1": hashlib.sha1(path.read_bytes()).hexdigest()})
    df = pd.DataFrame(rows)
    return df if sha1 else df.drop(columns="sha1")


@pytest.mark.parametrize("sha1", [True, False], ids=["catalogue-sha1", "computed-sha1"])
def test_a_second_catalogue_under_the_same_ids_gets_its_own_vectors(tmp_path, sha1):
    shop_a = _shop(tmp_path / "a", seed=0, sha1=sha1)
    shop_b = _shop(tmp_path / "b", seed=1, same=2, sha1=sha1)  # p0, p1 identical to A's; p2..p7 other files
    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(shop_a, model="color_hist", store=store, progress=False)
    a_X = store.features(run_id)[1]
    store.put_neighbours(run_id, "cosine", pd.DataFrame({"query_id": ["p0"], "rank": [1], "neighbour_id": ["p1"],
                                                         "distance": [0.5]}))
    assert extract_features(shop_b, model="color_hist", store=store, progress=False) == run_id
    stats = store.run(run_id)["stats"]
    assert (stats["n_processed"], stats["n_vectors_replaced"]) == (6, 6)  # p0, p1 kept: same content
    assert store.neighbour_sets().empty  # neighbours computed from A's vectors are gone

    fresh = FeatureStore(tmp_path / "fresh.sqlite")
    fresh_id = extract_features(shop_b, model="color_hist", store=fresh, progress=False)
    ids, X = store.features(run_id)
    assert ids.tolist() == fresh.features(fresh_id)[0].tolist() == [f"p{i}" for i in range(8)]
    np.testing.assert_array_equal(X, fresh.features(fresh_id)[1])  # bit-identical to a fresh extraction of B
    assert not np.array_equal(X[2:], a_X[2:]) and np.array_equal(X[:2], a_X[:2])
    assert store.content_sha1(run_id) == fresh.content_sha1(fresh_id)
    finished = store.run(run_id)["finished"]
    assert extract_features(shop_b, model="color_hist", store=store, progress=False) == run_id
    assert store.run(run_id)["finished"] == finished  # a third call is a no-op


def test_reading_vectors_of_other_file_content_is_refused(tmp_path):
    from cbir.store import StoreError

    shop_a, shop_b = _shop(tmp_path / "a", seed=0), _shop(tmp_path / "b", seed=1, same=5)
    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(shop_a, model="color_hist", store=store, progress=False)
    assert load_run_features(store, run_id, shop_a)[0].tolist() == [f"p{i}" for i in range(8)]
    with pytest.raises(StoreError, match=r"s.sqlite: run 1: the vectors of 3 image\(s\).*\['p5', 'p6', 'p7'\]"):
        load_run_features(store, run_id, shop_b)
    assert load_run_features(store, run_id, shop_b.drop(columns="sha1"))[0].size == 8  # no sha1: cannot check


def test_a_file_now_broken_or_changed_since_the_check_loses_its_old_vector(tmp_path):
    shop = _shop(tmp_path / "a", seed=0)
    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(shop, model="color_hist", store=store, progress=False)
    import hashlib

    def replace(i: int, write) -> str:
        write(Path(shop.loc[i, "path"]))
        return hashlib.sha1(Path(shop.loc[i, "path"]).read_bytes()).hexdigest()

    checked = shop.copy()  # the catalogue checked again after p3 broke and p4 was edited ...
    checked.loc[3, "sha1"] = replace(3, lambda p: p.write_text("not an image any more"))
    checked.loc[4, "sha1"] = replace(4, lambda p: Image.new("RGB", (32, 32), (9, 9, 9)).save(p))
    replace(4, lambda p: Image.new("RGB", (32, 32), (0, 9, 9)).save(p))  # ... and p4 edited once more since
    extract_features(checked, model="color_hist", store=store, progress=False)
    fails = store.failures(run_id).set_index("image_id")
    assert fails["reason"].to_dict() == {"p3": "not_an_image", "p4": "changed"}
    assert "changed since the catalogue was checked" in fails.loc["p4", "detail"]
    assert sorted(store.done_ids(run_id)) == ["p0", "p1", "p2", "p5", "p6", "p7"]  # old vectors of p3, p4 gone
    assert store.run(run_id)["stats"]["n_vectors_replaced"] == 2


def test_non_finite_model_outputs_are_failures_not_vectors(tmp_path):
    class Broken(TinyExtractor):
        def __call__(self, batch):
            X = super().__call__(batch)
            X[batch[:, 0, 0, 0] == 7] = np.nan  # the model blows up on one image
            return X

    shop = _shop(tmp_path / "a", seed=0, n=4)
    Image.new("RGB", (32, 32), (7, 0, 0)).save(shop.loc[2, "path"])
    store = FeatureStore(tmp_path / "s.sqlite")
    run_id = extract_features(shop.drop(columns="sha1"), model=Broken(), store=store, progress=False)
    assert sorted(store.done_ids(run_id)) == ["p0", "p1", "p3"]
    fails = store.failures(run_id)
    assert fails[["image_id", "reason"]].values.tolist() == [["p2", "non_finite"]]
    assert "NaN or infinite" in fails["detail"].iloc[0]


def test_an_unusable_catalogue_makes_no_run_and_an_all_failed_run_is_failed(tmp_path):
    from cbir.catalog import CatalogError
    from cbir.extract import ExtractionError

    empty = pd.DataFrame({"image_id": pd.Series([], dtype=str), "path": pd.Series([], dtype=str)})
    with pytest.raises(CatalogError, match="no usable image to extract"):
        extract_features(empty, model=TinyExtractor(), store=tmp_path / "s.sqlite", progress=False)
    assert not (tmp_path / "s.sqlite").exists()  # refused before any store or run was made

    (tmp_path / "a.jpg").write_text("text")
    bad = pd.DataFrame({"image_id": ["a", "b"], "path": [str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg")]})
    store = FeatureStore(tmp_path / "s.sqlite")
    for _ in range(2):  # a rerun of a failed run stays failed
        with pytest.raises(ExtractionError, match=r"s.sqlite: run 1: all 2 images failed.*missing: 1.*not_an_image: 1"):
            extract_features(bad, model=TinyExtractor(), store=store, progress=False)
        assert store.run(1)["status"] == "failed"


def test_runs_with_other_labels_or_splits_in_one_store_keep_their_own_labels(tmp_path, catalog_df):
    """Issue 9's labels bug: a second run with another label source or query split used to relabel the
    images of every run in the shared store (one ``images`` table). Each run now keeps its own."""
    store = FeatureStore(tmp_path / "s.sqlite")
    good = catalog_df[~catalog_df["image_id"].isin(BAD)].reset_index(drop=True)
    a = good.assign(subcategory=good["category"] + "/a", split=np.where(np.arange(len(good)) < 5, "query", "catalog"))
    b = good.assign(subcategory=good["category"] + "/b", split=np.where(np.arange(len(good)) >= len(good) - 5,
                                                                         "query", "catalog"))
    ext = TinyExtractor()
    run_a = ensure_features(a, store=store, model=ext, progress=False)
    calls = len(ext.batch_sizes)
    assert calls == -(-len(good) // 32)
    run_b = ensure_features(b, store=store, model=ext, progress=False)
    assert run_a != run_b
    for run_id, frame in ((run_a, a), (run_b, b)):
        labels = store.run_labels(run_id)
        assert labels["image_id"].tolist() == frame["image_id"].tolist()
        assert labels["subcategory"].tolist() == frame["subcategory"].tolist()
        assert labels["split"].tolist() == frame["split"].tolist()
    # b's vectors were copied from a's (same model, same files), not computed again
    assert len(ext.batch_sizes) == calls
    np.testing.assert_array_equal(store.features(run_b)[1], store.features(run_a)[1])
    # running a again finds its own run, labels unchanged by b
    assert ensure_features(a, store=store, model=ext, progress=False) == run_a
    assert store.run_labels(run_a)["subcategory"].str.endswith("/a").all()
