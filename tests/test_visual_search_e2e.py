"""The visual search app (cbir.app, notebook 07).

Fast part: :class:`cbir.app.VisualSearchApp` without a browser, on a colour-histogram store (no CNN),
checked against scipy distances. Slow part (end to end): notebook 07 served by Voila and driven in
headless Chromium with Playwright on its own small demo store (synthetic catalogue + EfficientNet-Lite0
features, passed to the notebook with ``CBIR_STORE``): uploading a catalogue photo shows five labelled
results with the photo itself first at distance 0, picking a catalogue image leaves it out, a text file
gets the error message. The browser tests skip when /usr/bin/chromium, Playwright or Voila is missing.
"""
from __future__ import annotations

import html
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.spatial.distance import cdist

from cbir.app import (UploadError, VisualSearchApp, env_overrides, extractor_kwargs, interactive_kernel, resolve_weights,
                      validate_upload)
from cbir.rebuild import RunRefusedError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "07_visual_search.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
VOILA = Path(sys.executable).with_name("voila")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N_IMAGES = 40
SERVER_START_S = 90
APP_LOAD_MS = 120_000
SEARCH_MS = 180_000  # generous: two cores shared with other tests
# Tornado drops websocket messages over 10 MiB (closing the kernel connection), so an upload over the
# app's 10 MiB limit would never reach the kernel: raise Voila's limit so the app can say why it refuses.
VOILA_ARGS = ["--no-browser", "--Voila.ip=127.0.0.1",
              "--Voila.tornado_settings={'websocket_max_message_size': 104857600}"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ the app without a browser
def _png(shape=(30, 40, 3), value=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hist_store(tmp_path_factory):
    """24 demo images + a byte-identical copy of the first, colour histograms (8 bins) in a store."""
    from cbir.backbones import build_extractor
    from cbir.catalog import load_catalog
    from cbir.datasets import make_demo_catalog
    from cbir.extract import extract_features
    from cbir.store import FeatureStore

    root = tmp_path_factory.mktemp("hist")
    manifest = make_demo_catalog(root / "demo", n=24, seed=1)
    table = pd.read_csv(manifest)
    shutil.copy(manifest.parent / table.at[0, "image"], manifest.parent / "images" / "copy.jpg")
    extra = table.iloc[[0]].assign(image="images/copy.jpg", product_id=999999)
    pd.concat([table, extra]).to_csv(manifest, index=False)
    catalog = load_catalog(manifest).usable()
    store = FeatureStore(root / "features.sqlite")
    run_id = extract_features(catalog, model=build_extractor("color_hist", bins=8), store=store,
                              progress=False, workers=0)
    ids, X = store.features(run_id)
    return store, run_id, catalog.df.set_index("image_id"), ids, X


def _reference(X, ids, q, metric, k=5, exclude=()):
    """Top-k ids and distances by scipy (stable sort: ties in catalogue order)."""
    name = {"manhattan": "cityblock"}.get(metric, metric)
    kwargs = {"p": 3} if metric == "minkowski" else {}
    d = cdist(np.asarray(q, np.float64)[None], X.astype(np.float64), name, **kwargs)[0]
    order = [i for i in np.argsort(d, kind="stable") if ids[i] not in exclude][:k]
    return list(ids[order]), d[order]


def _shown_ids(html: str) -> list[str]:
    """Image ids of the result cards in an HTML string, in order."""
    return re.findall(r'class="cbir-id"[^>]*>([^<]*)</div>', html)


def test_validate_upload_accepts_images_and_refuses_everything_else(tmp_path):
    png = _png()
    image = validate_upload(png, "red.png", "image/png")
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8 and tuple(image[0, 0]) == (200, 30, 60)
    assert validate_upload(memoryview(png), "RED.PNG", None, size=16).shape == (16, 16, 3)
    cases = [
        (b"hello", "notes.txt", "text/plain", "extension", "notes.txt: not an image file (.txt); upload a photo"),
        (png, "noext", "image/png", "extension", "noext: not an image file (no extension)"),
        (png, "x.png", "text/plain", "mime", "x.png: the browser says this is text/plain, not an image"),
        (b"", "x.jpg", "image/jpeg", "empty", "x.jpg: the file is empty"),
        (b"just text", "x.jpg", "image/jpeg", "not_an_image", "x.jpg: the file is not an image"),
        (png[: len(png) // 2], "cut.png", "image/png", "truncated", "cut.png: the image file is cut short"),
    ]
    for data, name, mime, reason, message in cases:
        with pytest.raises(UploadError, match=re.escape(message)) as info:
            validate_upload(data, name, mime)
        assert info.value.reason == reason
    with pytest.raises(UploadError, match=r"big.png: 0.0 MB is over the 0 MB upload limit") as info:
        validate_upload(png, "big.png", "image/png", max_bytes=len(png) - 1)
    assert info.value.reason == "too_large"


def test_env_overrides():
    env = {"CBIR_STORE": "/data/x.sqlite", "CBIR_K": "7", "CBIR_LAYER": "null", "CBIR_RUN": "3", "CBIR_MODEL": "",
           "CBIR_CATALOG": "demo", "CBIR_WEIGHTS": "w/m.weights.h5", "PWD": "/home/me/cbir"}
    got = env_overrides(env, store="a", k=5, layer="fc1", model="vgg16", run=None, catalog="x", weights="imagenet")
    assert got == {"store": "/data/x.sqlite", "k": 7, "layer": None, "model": "vgg16", "run": 3, "catalog": "demo",
                   "weights": "/home/me/cbir/w/m.weights.h5"}  # relative: from where the server started
    assert env_overrides({}, store="a") == {"store": "a"}


def test_resolve_weights_and_extractor_kwargs(tmp_path, monkeypatch):
    from cbir.efficientnet_lite import file_sha1

    assert resolve_weights({"weights": "imagenet"}) == "imagenet"
    assert resolve_weights({"weights": "none (random init)"}) == "none"
    assert resolve_weights({"weights": "handcrafted"}) == "none"
    weights = tmp_path / "mine.weights.h5"
    weights.write_bytes(b"0123")
    identity = {"weights": "mine.weights.h5", "weights_file": "mine.weights.h5", "weights_sha1": file_sha1(weights)}
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path / "nowhere"))
    assert resolve_weights(identity, weights=str(weights)) == str(weights)
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path))
    assert resolve_weights(identity) == str(tmp_path / "mine.weights.h5")  # found in the weights folders
    with pytest.raises(RunRefusedError, match="used the weights file 'mine.weights.h5', which was not found"):
        resolve_weights({**identity, "weights_sha1": "0" * 40})  # same name, other content
    assert extractor_kwargs({"model": "color_hist", "layer": None, "pooling": None, "weights": "handcrafted",
                             "params": {"bins": 8, "space": "rgb"}, "l2_normalize": False}) == {
        "name": "color_hist", "layer": None, "pooling": None, "weights": "none", "l2_normalize": False,
        "bins": 8, "space": "rgb"}
    assert extractor_kwargs({"model": "resnet50", "layer": "conv5_block3_out", "pooling": "gem", "gem_p": 4.0,
                             "weights": "imagenet", "l2_normalize": True}) == {
        "name": "resnet50", "layer": "conv5_block3_out", "pooling": "gem", "weights": "imagenet",
        "l2_normalize": True, "gem_p": 4.0}


def test_search_catalog_image_matches_scipy_and_leaves_out_duplicates(hist_store):
    store, run_id, catalog, ids, X = hist_store
    app = VisualSearchApp(store, model="color_hist")
    assert app.run_id == run_id and app.problem is None
    first = catalog.index[0]
    copy = catalog.index[catalog["path"].str.endswith("copy.jpg")][0]
    assert catalog.at[copy, "dup_group"] == first
    for metric in ("cosine", "euclidean", "manhattan", "minkowski", "chebyshev", "correlation"):
        found = app.search_catalog_image(first, metric=metric)
        want_ids, want_d = _reference(X, ids, X[list(ids).index(first)], metric, exclude={first, copy})
        assert list(found.columns) == ["rank", "image_id", "category", "subcategory", "distance", "similarity", "path"]
        assert found["image_id"].tolist() == want_ids
        np.testing.assert_allclose(found["distance"], want_d, rtol=1e-5, atol=1e-6)
        assert found["rank"].tolist() == [1, 2, 3, 4, 5]
        assert found["subcategory"].tolist() == catalog.loc[want_ids, "subcategory"].tolist()
        if metric in ("cosine", "correlation"):
            np.testing.assert_allclose(found["similarity"], 1 - found["distance"])
        else:
            assert found["similarity"].isna().all()
    with pytest.raises(KeyError, match="has no vector"):
        app.search_catalog_image("no-such-id")


def test_search_bytes_embeds_like_the_extraction(hist_store):
    store, run_id, catalog, ids, X = hist_store
    app = VisualSearchApp(store, k=3)
    query = catalog.index[5]
    data = Path(catalog.at[query, "path"]).read_bytes()
    found = app.search_bytes(data, "photo.jpg", "image/jpeg")
    want_ids, want_d = _reference(X, ids, X[list(ids).index(query)], "cosine", k=3)
    assert found["image_id"].tolist() == want_ids and want_ids[0] == query
    assert found["distance"].iloc[0] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(found["distance"], want_d, rtol=1e-5, atol=1e-6)
    # the same pixels re-encoded as a lossless PNG: the same vector
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    again = app.search_bytes(buffer.getvalue(), "photo.png", "image/png", metric="euclidean", k=5)
    assert again["image_id"].iloc[0] == query and again["distance"].iloc[0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UploadError, match="notes.txt: not an image file"):
        app.search_bytes(b"hello", "notes.txt", "text/plain")


def test_widget_drives_the_search(hist_store):
    store, run_id, catalog, ids, X = hist_store
    app = VisualSearchApp(store)
    box = app.widget()
    assert "cbir-app" in box._dom_classes
    c = app.controls
    assert c["message"].value == (f'<div class="cbir-info">{len(ids)} catalogue images in run {run_id}: '
                                  'upload a photo or pick one</div>')
    assert c["metric"].value == "cosine" and c["run"].value == run_id
    assert len(c["pick"].options) == len(ids) and c["pick"].value is None

    def upload(name, mime, data):
        c["upload"].value = ({"name": name, "type": mime, "size": len(data), "content": memoryview(data),
                              "last_modified": datetime(2024, 1, 1, tzinfo=timezone.utc)},)

    upload("notes.txt", "text/plain", b"hello")
    assert 'class="cbir-error"' in c["message"].value and "notes.txt: not an image file (.txt)" in c["message"].value
    assert app.shown_html() == "" and c["upload"].value == ()

    query = catalog.index[3]
    upload("p.jpg", "image/jpeg", Path(catalog.at[query, "path"]).read_bytes())
    want_ids, want_d = _reference(X, ids, X[list(ids).index(query)], "cosine")
    html = app.shown_html()
    assert html.count('class="cbir-card cbir-result"') == 5
    assert _shown_ids(html) == want_ids
    assert f"#1 · d = {want_d[0]:.3f}" in html and "cbir-error" not in c["message"].value
    assert "your photo" in c["query"].value

    c["metric"].value = "chebyshev"  # reruns the last query with the new measure
    want_ids, want_d = _reference(X, ids, X[list(ids).index(query)], "chebyshev")
    assert _shown_ids(app.shown_html()) == want_ids
    assert f"#5 · d = {want_d[4]:.3f}" in app.shown_html()
    assert c["message"].value == f'<div class="cbir-info">Top 5 by chebyshev distance in run {run_id}</div>'

    c["pick"].value = query
    want_ids, _ = _reference(X, ids, X[list(ids).index(query)], "chebyshev", exclude={query})
    assert _shown_ids(app.shown_html()) == want_ids
    assert f">{query}</div>" in c["query"].value


def test_switching_run_reembeds_the_upload_with_that_runs_extractor(hist_store, tmp_path):
    from cbir.backbones import build_extractor
    from cbir.extract import extract_features
    from cbir.store import FeatureStore

    _, _, catalog, _, _ = hist_store
    store = FeatureStore(tmp_path / "two.sqlite")
    frame = catalog.reset_index()
    hist = extract_features(frame, model=build_extractor("color_hist", bins=4), store=store, progress=False, workers=0)
    lbp = extract_features(frame, model=build_extractor("lbp", points=8, radius=1), store=store, progress=False,
                           workers=0)
    app = VisualSearchApp(store)
    assert app.run_id == lbp  # the latest complete run
    app.widget()
    query = catalog.index[7]
    data = Path(catalog.at[query, "path"]).read_bytes()
    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    app.controls["upload"].value = ({"name": "q.jpg", "type": "image/jpeg", "size": len(data),
                                     "content": memoryview(data), "last_modified": when},)
    shown = {}
    for run_id in (lbp, hist):
        if app.controls["run"].value != run_id:
            app.controls["run"].value = run_id  # reruns the upload with the colour-histogram extractor
        ids, X = store.features(run_id)
        want_ids, want_d = _reference(X, ids, X[list(ids).index(query)], "cosine")
        assert app.run_id == run_id
        shown[run_id] = _shown_ids(app.shown_html())
        assert shown[run_id] == want_ids and want_ids[0] == query
        assert f"#1 · d = {want_d[0]:.3f}" in app.shown_html()
    assert X.shape[1] == 12  # bins=4 rebuilt from the stored identity, not the default 32
    assert shown[lbp] != shown[hist]


def test_missing_store_is_shown_not_raised(tmp_path):
    app = VisualSearchApp(tmp_path / "nope.sqlite")
    assert app.problem.startswith(f"No feature store at {tmp_path / 'nope.sqlite'}: run `make demo`")
    app.widget()
    assert 'class="cbir-error"' in app.controls["message"].value
    with pytest.raises(RuntimeError, match="No feature store"):
        app.search_bytes(_png(), "x.png")


def test_damaged_or_read_only_store_is_shown_not_raised(tmp_path, hist_store, shared_dir, as_unprivileged):
    bad = tmp_path / "not_a_store.sqlite"
    bad.write_bytes(b"this is no SQLite database at all" * 100)
    app = VisualSearchApp(bad)
    assert str(bad) in app.problem and "database" in app.problem
    app.widget()
    assert 'class="cbir-error"' in app.controls["message"].value
    # a good store in a read-only folder, read by a user without root rights (root ignores file modes)
    import sqlite3

    store, run_id, *_ = hist_store
    folder = shared_dir / "ro"
    folder.mkdir()
    dst = sqlite3.connect(folder / "features.sqlite")
    sqlite3.connect(store.path).backup(dst)  # a consistent copy, WAL contents included
    dst.close()
    (folder / "features.sqlite").chmod(0o444)
    folder.chmod(0o555)

    def open_app() -> dict:
        app = VisualSearchApp(folder / "features.sqlite")
        return {"problem": app.problem, "run_id": app.run_id,
                "found": len(app.search_catalog_image(app.features()[0][0]))}

    try:
        assert as_unprivileged(open_app) == {"problem": None, "run_id": run_id, "found": 5}
    finally:
        folder.chmod(0o755)


def test_unknown_run_is_shown_not_raised(hist_store):
    store, run_id, *_ = hist_store
    app = VisualSearchApp(store, run=99)
    assert app.problem == f"no complete run 99 with features in this store; runs: {run_id} (color_hist)"
    assert VisualSearchApp(store, run=run_id).run_id == run_id


def test_interactive_kernel_is_voila_or_a_jupyter_session():
    assert interactive_kernel({"VOILA_BASE_URL": "/"})
    assert interactive_kernel({"SERVER_SOFTWARE": "voila/0.5.13"})
    assert interactive_kernel({"JPY_SESSION_NAME": "/work/notebooks/07_visual_search.ipynb"})
    assert not interactive_kernel({})  # papermill, nbconvert and nbval start bare kernels
    assert not interactive_kernel({"SERVER_SOFTWARE": "gunicorn"})


def test_model_is_preloaded_behind_a_progress_bar_not_at_the_first_upload(hist_store, monkeypatch):
    """``widget()`` in an interactive kernel builds the run's extractor at once, in a thread, while the progress
    bar is shown and the upload is disabled; the first upload then reuses it (no second build)."""
    import functools

    import cbir.rebuild as rebuild

    store, run_id, catalog, ids, X = hist_store
    real = rebuild._build_extractor.__wrapped__  # the uncached builder
    seen = []

    @functools.lru_cache(maxsize=4)
    def spy(frozen):
        c = app.controls
        seen.append({"loading": c["loading"].layout.display, "upload_disabled": c["upload"].disabled,
                     "step": c["progress"].value, "text": re.sub("<[^>]+>", "", c["loading_text"].value),
                     "thread": threading.current_thread().name})
        return real(frozen)

    monkeypatch.setattr(rebuild, "_build_extractor", spy)
    monkeypatch.setenv("VOILA_BASE_URL", "/")  # as Voila starts its kernels
    app = VisualSearchApp(store)
    app.widget()  # preload=None: decided by the kernel's environment
    assert app.wait_ready(timeout=60)
    assert seen == [{"loading": "flex", "upload_disabled": True, "step": 1, "thread": "cbir-preload",
                     "text": "Getting ready: loading the model (color_hist) ... (step 2 of 3)"}]
    c = app.controls
    assert c["loading"].layout.display == "none" and not c["upload"].disabled and c["progress"].value == 3
    assert c["message"].value == (f'<div class="cbir-info">{len(ids)} catalogue images in run {run_id}: '
                                  'upload a photo or pick one</div>')
    assert ("cosine", 0.99) in app.vectors()._thresholds  # the no-match threshold is ready too
    data = Path(catalog.at[catalog.index[2], "path"]).read_bytes()
    c["upload"].value = ({"name": "p.jpg", "type": "image/jpeg", "size": len(data), "content": memoryview(data),
                          "last_modified": datetime(2024, 1, 1, tzinfo=timezone.utc)},)
    assert _shown_ids(app.shown_html())[0] == catalog.index[2]
    assert len(seen) == 1 and spy.cache_info().hits >= 1  # the first upload did not build the model again

    monkeypatch.delenv("VOILA_BASE_URL")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    batch = VisualSearchApp(store)
    batch.widget()  # a batch run (papermill, nbval): nothing loaded, nothing shown loading
    assert batch.preload_thread is None and batch.controls["loading"].layout.display == "none"


def test_click_a_result_to_search_from_it_and_choose_k(hist_store):
    store, run_id, catalog, ids, X = hist_store
    app = VisualSearchApp(store, metric="euclidean")
    app.widget(preload=False)
    c = app.controls
    first = catalog.index[4]
    c["pick"].value = first
    assert len(app.buttons) == 5 and _shown_ids(app.shown_html()) == app.shown["image_id"].tolist()
    target = app.shown["image_id"].iloc[2]
    app.buttons[2].click()  # "search from this" under the third result
    assert c["pick"].value == target and f">{target}</div>" in c["query"].value
    want_ids, want_d = _reference(X, ids, X[list(ids).index(target)], "euclidean", exclude={target})
    assert _shown_ids(app.shown_html()) == want_ids
    np.testing.assert_allclose(app.shown["distance"], want_d, rtol=1e-5, atol=1e-6)
    # the frames compare each result with the query's sub-category
    subs = catalog.loc[want_ids, "subcategory"].tolist()
    flags = re.findall(r'class="cbir-card cbir-result" data-id="[^"]*" data-match="(\d)"', app.shown_html())
    assert flags == [str(int(s == catalog.at[target, "subcategory"])) for s in subs]
    c["k"].value = 9  # choose k: the same query, nine results
    want_ids, _ = _reference(X, ids, X[list(ids).index(target)], "euclidean", k=9, exclude={target})
    assert _shown_ids(app.shown_html()) == want_ids and len(app.buttons) == 9
    assert c["message"].value == f'<div class="cbir-info">Top 9 by euclidean distance in run {run_id}</div>'


def _nearest_other(X, ids, groups, metric):
    """Each image's distance to its nearest other image (same dup group left out), by scipy."""
    name = {"manhattan": "cityblock"}.get(metric, metric)
    d = cdist(X.astype(np.float64), X.astype(np.float64), name, **({"p": 3} if metric == "minkowski" else {}))
    g = np.array([groups.get(i) or f"self:{i}" for i in ids], dtype=object)
    d[g[:, None] == g[None, :]] = np.inf
    return d.min(axis=1)


def test_no_close_match_warning_is_calibrated_on_the_catalogue(hist_store):
    store, run_id, catalog, ids, X = hist_store
    app = VisualSearchApp(store, metric="chebyshev")
    groups = catalog["dup_group"].dropna().to_dict()
    for metric in ("chebyshev", "cosine", "euclidean"):
        want = np.quantile(_nearest_other(X, ids, groups, metric), 0.99)
        assert app.no_match_threshold(metric) == pytest.approx(want, rel=1e-6)
    threshold = app.no_match_threshold("chebyshev")
    app.widget(preload=False)
    c = app.controls

    def upload(name, data):
        c["upload"].value = ({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                              "last_modified": datetime(2024, 1, 1, tzinfo=timezone.utc)},)

    green = _png((64, 64, 3), (0, 255, 0))  # nothing in the demo catalogue is pure green
    upload("green.png", green)
    nearest = app.shown["distance"].iloc[0]
    assert nearest > threshold  # 0.95 vs 0.695: a colour histogram of one bin per channel
    assert c["message"].value.startswith('<div class="cbir-warning"')
    assert (f"No close match: the nearest catalogue image is at chebyshev distance {nearest:.3f}, while 99% of "
            f"the catalogue&#x27;s images have a neighbour within {threshold:.3f}.") in c["message"].value
    assert len(app.shown) == 5  # the results are still shown
    upload("catalogue.jpg", Path(catalog.at[catalog.index[6], "path"]).read_bytes())
    assert "cbir-warning" not in c["message"].value and app.shown["distance"].iloc[0] == pytest.approx(0, abs=1e-6)
    assert app.no_match_warning(app.shown) is None


# ------------------------------------------------------------------ the app through a built faiss index
def _index_store(path, n=600, n_queries=12, seed=0):
    """A store with one colour-histogram run (bins=8: 24-d, so uploads are embedded by the real extractor) whose
    vectors are synthetic: 20 clusters; the first ``n_queries`` images are the query split, each a near copy
    (+0.01) of catalogue image ``img0100 + i``. Returns ``(store, run_id, ids, X)``."""
    from cbir.backbones import build_extractor
    from cbir.store import FeatureStore

    rng = np.random.default_rng(seed)
    centres = rng.random((20, 24)) * 3
    X = (centres[rng.integers(0, 20, n)] + rng.random((n, 24))).astype(np.float32)
    X[:n_queries] = X[100:100 + n_queries] + 0.01
    ids = np.array([f"img{i:04d}" for i in range(n)])
    labels = pd.DataFrame({"image_id": ids, "path": [f"/nowhere/{i}.jpg" for i in ids],
                           "split": np.where(np.arange(n) < n_queries, "query", "catalog"),
                           "category": [f"c{i % 3}" for i in range(n)], "subcategory": [f"s{i % 7}" for i in range(n)]})
    store = FeatureStore(path)
    store.put_catalog(labels)
    run_id = store.start_run(build_extractor("color_hist", bins=8).identity())
    store.put_run_labels(run_id, labels)
    store.put_features(run_id, ids, X)
    store.finish_run(run_id)
    return store, run_id, ids, X


def _noise_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _app_upload(app, name, data):
    app.controls["upload"].value = ({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                                     "last_modified": datetime(2024, 1, 1, tzinfo=timezone.utc)},)


def test_upload_search_goes_through_the_runs_index_and_says_which(tmp_path, monkeypatch):
    import cbir.index
    from cbir.index import build_index, load_index

    store, run_id, ids, X = _index_store(tmp_path / "s.sqlite")
    # timings are noise on a busy machine: timed equal, the build keeps the smallest setting reaching the target
    monkeypatch.setattr(cbir.index, "_timed", lambda fn, rounds=3: (0.0, fn()))
    info = build_index(store, run_id, metric="cosine", kind="ivf", target_recall=0.5, n_eval_queries=200)
    assert info.search_value == 1  # one IVF cell per query: an index that can miss neighbours
    loaded = load_index(store, run_id, "cosine")
    assert not np.isin(ids[:12], loaded.ids).any()  # the index holds the searchable images only
    app = VisualSearchApp(store)
    app.widget(preload=False)
    c = app.controls
    assert app.search_how() == (f"{info.label} (index run{run_id}-cosine-ivf.faiss; distances re-ranked exactly); "
                                "the 12 query-split images it leaves out are searched exactly")
    assert "recall@5 " in info.label and html.escape(f"search: {app.search_how()}") in c["run_info"].value
    # photos where the index (nprobe=1) misses an exact neighbour: the app shows the index's list
    missed = 0
    for seed in range(5):
        data = _noise_png(seed)
        q = app.embed_bytes(data, "p.png").astype(np.float64)
        _, pos = loaded.search(q, 5)
        candidates = np.concatenate([loaded.ids[pos[0]], ids[:12]])  # + the query split, searched exactly
        d = cdist(q, X[np.searchsorted(ids, candidates)].astype(np.float64), "cosine")[0]
        want = list(candidates[np.argsort(d, kind="stable")[:5]])
        exact, _ = _reference(X, ids, q[0], "cosine")
        _app_upload(app, f"p{seed}.png", data)
        assert app.shown["image_id"].tolist() == want and app.shown.attrs["how"] == app.search_how()
        np.testing.assert_allclose(app.shown["distance"], np.sort(d)[:5], rtol=1e-9)  # exact distances
        missed += want != exact
    assert missed >= 1
    # a catalogue image whose nearest neighbour is a query-split image (not in the index) finds it first
    found = app.search_catalog_image("img0100")
    assert found["image_id"].iloc[0] == "img0000" and "img0100" not in found["image_id"].tolist()
    # Manhattan cannot be served by faiss: exact, and the run-info line says so
    c["metric"].value = "manhattan"
    assert "search: exact search (manhattan: no approximate faiss index serves it)" in c["run_info"].value
    data = _noise_png(0)
    _app_upload(app, "p.png", data)
    want, want_d = _reference(X, ids, app.embed_bytes(data, "p.png")[0], "manhattan")
    assert app.shown["image_id"].tolist() == want and app.shown.attrs["how"] == app.search_how("manhattan")
    np.testing.assert_allclose(app.shown["distance"], want_d, rtol=1e-9)


def test_a_stale_index_is_a_warning_and_the_search_exact(tmp_path):
    from cbir.index import build_index

    store, run_id, ids, X = _index_store(tmp_path / "s.sqlite")
    build_index(store, run_id, metric="cosine", kind="flat", n_eval_queries=50)
    X[300] = X[301]
    store.put_features(run_id, ids[300:301], X[300:301])  # re-extracted since the build
    app = VisualSearchApp(store)
    app.widget(preload=False)
    c = app.controls
    assert ("search: exact search (cosine: its saved index is stale; rebuild it with `cbir index build --run "
            f"{run_id} --metric cosine`)") in html.unescape(c["run_info"].value)
    data = _noise_png(1)
    _app_upload(app, "p.png", data)
    want, want_d = _reference(X, ids, app.embed_bytes(data, "p.png")[0], "cosine")
    assert app.shown["image_id"].tolist() == want  # exact, over every image, the changed vector included
    np.testing.assert_allclose(app.shown["distance"], want_d, rtol=1e-5, atol=1e-7)
    lines = re.findall(r'<div class="cbir-warning"[^>]*>([^<]*)</div>', c["message"].value)
    stale = [html.unescape(line) for line in lines if "stale" in line]
    assert len(stale) == 1 and stale[0].endswith(f"rebuild it with `cbir index build --run {run_id} --metric "
                                                 "cosine`. This search was exact.")
    assert f"run{run_id}-cosine-flat.faiss: the index of run {run_id} is stale" in stale[0]


def test_thumbnails_are_found_after_the_outputs_folder_moves(tmp_path):
    """The store records absolute image paths; moving the whole outputs folder (catalogue inside) must not
    lose the thumbnails: the app finds the images next to the store."""
    from cbir.backbones import build_extractor
    from cbir.catalog import load_catalog
    from cbir.datasets import make_demo_catalog
    from cbir.extract import extract_features
    from cbir.store import FeatureStore

    demo = tmp_path / "outputs" / "demo"
    catalog = load_catalog(make_demo_catalog(demo / "demo_catalog", n=12, seed=2)).usable()
    with FeatureStore(demo / "features.sqlite") as store:
        extract_features(catalog, model=build_extractor("color_hist", bins=4), store=store, progress=False,
                         workers=0)
    shutil.move(tmp_path / "outputs", tmp_path / "moved" / "elsewhere")
    store_path = tmp_path / "moved" / "elsewhere" / "demo" / "features.sqlite"
    stored = FeatureStore(store_path, readonly=True).run_labels(1)["path"]
    assert not any(Path(p).exists() for p in stored)  # the absolute paths in the store are stale

    app = VisualSearchApp(store_path)
    assert app.problem is None
    moved_root = tmp_path / "moved" / "elsewhere" / "demo" / "demo_catalog"
    paths = app.vectors().labels["path"]
    assert all(Path(p).is_file() and Path(p).is_relative_to(moved_root) for p in paths)
    app.widget(preload=False)
    query = app.features()[0][3]
    app.controls["pick"].value = query
    html = app.shown_html()
    assert html.count('src="data:image/jpeg;base64,') == 5 and "no image" not in html
    assert 'src="data:image/jpeg;base64,' in app.controls["query"].value


# ------------------------------------------------------------------ end to end in a browser
@pytest.fixture(scope="module")
def lite0_store(tmp_path_factory):
    """One complete efficientnet_lite0/gap run over a 40-image demo catalogue, made in ``outputs/demo`` (store
    and catalogue side by side, as ``make demo`` leaves them) and then moved with its outputs folder, so the
    image paths stored in it are stale: ``(store path, catalogue by image_id with the paths as moved)``."""
    for module in ("cbir.datasets", "cbir.catalog", "cbir.extract", "cbir.search", "cbir.backbones"):
        pytest.importorskip(module, reason=f"{module} not written yet")
    from cbir.backbones import WeightsUnavailableError
    from cbir.catalog import load_catalog
    from cbir.datasets import make_demo_catalog
    from cbir.extract import extract_features
    from cbir.store import FeatureStore

    root = tmp_path_factory.mktemp("e2e")
    demo = root / "outputs" / "demo"
    catalog = load_catalog(make_demo_catalog(demo / "demo_catalog", n=N_IMAGES, seed=0)).usable()
    with FeatureStore(demo / "features.sqlite") as store:
        try:
            run_id = extract_features(catalog, model="efficientnet_lite0", pooling="gap", weights="imagenet",
                                      store=store, progress=False)
        except WeightsUnavailableError as exc:
            pytest.skip(f"efficientnet_lite0 weights unavailable: {exc}")
        assert store.run(run_id)["n_features"] == N_IMAGES
    shutil.move(root / "outputs", root / "moved")
    df = catalog.df.set_index("image_id")
    df["path"] = [p.replace(str(root / "outputs"), str(root / "moved")) for p in df["path"]]
    assert not Path(catalog.df["path"].iloc[0]).exists() and Path(df["path"].iloc[0]).is_file()
    return root / "moved" / "demo" / "features.sqlite", df


@pytest.fixture(scope="module")
def demo_store(lite0_store):
    """:func:`lite0_store` for the browser tests (skipped when Chromium, Playwright or Voila is missing)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    if not VOILA.exists():
        pytest.skip(f"voila not installed next to {sys.executable}")
    return lite0_store


def _photo_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.slow
def test_astronaut_gets_no_close_match_a_catalogue_photo_does_not(lite0_store):
    """EfficientNet-Lite0 on the demo catalogue: an unrelated photo (skimage's astronaut) is far beyond the
    catalogue's own nearest-neighbour distances under every measure; a catalogue photo re-encoded as JPEG is not."""
    from skimage import data as skdata

    store_path, catalog = lite0_store
    app = VisualSearchApp(store_path)
    astronaut = _photo_bytes(skdata.astronaut())
    photo = np.asarray(Image.open(catalog["path"].iloc[7]).convert("RGB"))
    for metric in ("cosine", "correlation", "euclidean", "manhattan", "minkowski", "chebyshev"):
        threshold = app.no_match_threshold(metric)
        far = app.search_bytes(astronaut, "astronaut.png", "image/png", metric=metric)
        near = app.search_bytes(_photo_bytes(photo, "JPEG"), "photo.jpg", "image/jpeg", metric=metric)
        # measured: 1.68x the threshold under cosine, 1.83x correlation, 1.21-1.32x the Lp measures, 1.08x chebyshev
        assert far["distance"].iloc[0] > (1.5 if metric in ("cosine", "correlation") else 1.0) * threshold, metric
        assert near["image_id"].iloc[0] == catalog.index[7] and near["distance"].iloc[0] < 0.5 * threshold, metric
        assert app.no_match_warning(far, metric=metric).startswith("No close match")
        assert app.no_match_warning(near, metric=metric) is None


@pytest.fixture(scope="module")
def voila_url(demo_store, tmp_path_factory):
    """Voila serving notebook 07 on a free localhost port; always terminated (with its kernels)."""
    store_path, _ = demo_store
    port = _free_port()
    log_path = tmp_path_factory.mktemp("voila") / "voila.log"
    env = {**os.environ, "CBIR_STORE": str(store_path), "PYTHONUNBUFFERED": "1"}
    env.pop("CBIR_RUN", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(VOILA), str(NOTEBOOK), f"--port={port}", *VOILA_ARGS],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"voila exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"voila not listening on {port} after {SERVER_START_S} s:\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()  # voila shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture()
def page(voila_url, tmp_path):
    """A fresh headless Chromium (own user-data-dir) with notebook 07 loaded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = context.new_page()
            page.goto(voila_url, timeout=APP_LOAD_MS)
            page.wait_for_selector(".cbir-app .cbir-upload", timeout=APP_LOAD_MS)
            # the model loads as the page opens (behind the progress bar), then the app says it is ready
            page.wait_for_function(
                f"document.querySelector('.cbir-message')?.textContent.startsWith('{N_IMAGES} catalogue images')",
                timeout=SEARCH_MS)
            yield page
        finally:
            context.close()


def _upload(page, path: Path) -> None:
    """Choose ``path`` in the FileUpload widget (its <input type=file> is created off-DOM by ipywidgets 8)."""
    with page.expect_file_chooser() as chooser:
        page.click(".cbir-upload")
    chooser.value.set_files(str(path))


def _cards(page) -> list[tuple[str, str, str]]:
    """(image id, sub-category label, distance text) of each result card, in rank order."""
    ids = page.locator(".cbir-result .cbir-id").all_inner_texts()
    labels = page.locator(".cbir-result .cbir-label").all_inner_texts()
    distances = page.locator(".cbir-result .cbir-distance").all_inner_texts()
    return list(zip(ids, labels, distances))


@pytest.mark.slow
def test_upload_a_catalogue_photo_then_pick_one(page, demo_store):
    _, catalog = demo_store
    assert page.locator(".cbir-message").inner_text().startswith(f"{N_IMAGES} catalogue images in run 1")
    query_id = catalog.index[0]
    _upload(page, Path(catalog.at[query_id, "path"]))
    page.wait_for_function("document.querySelectorAll('.cbir-result').length === 5", timeout=SEARCH_MS)
    cards = _cards(page)
    assert len(cards) == 5
    # the uploaded photo is embedded exactly like the stored catalogue: itself first at distance 0
    assert cards[0][0] == query_id and cards[0][2] == "#1 · d = 0.000"
    for rank, (image_id, label, distance) in enumerate(cards, start=1):
        assert label == catalog.at[image_id, "subcategory"]  # the label shown is the catalogue's
        assert distance.startswith(f"#{rank} · d = ")
    shown = [float(d.split("= ")[1]) for _, _, d in cards]
    assert shown == sorted(shown) and shown[1] > 0
    assert page.locator(".cbir-error").count() == 0
    assert page.locator(".cbir-query .cbir-id").inner_text() == Path(catalog.at[query_id, "path"]).name
    assert page.locator(".cbir-warning").count() == 0  # a catalogue photo has a close match
    assert not page.locator(".cbir-loading").is_visible() and page.locator(".cbir-upload").is_enabled()
    # the thumbnails are found although the outputs folder moved after the run was made
    assert page.evaluate("[...document.querySelectorAll('.cbir-card img')].map(i => i.naturalWidth > 0)") == [True] * 6

    # picking the same image from the catalogue leaves it out and shows the next five
    option = f"{query_id} · {catalog.at[query_id, 'subcategory']} ({catalog.at[query_id, 'category']})"
    page.select_option(".cbir-pick select", label=option)
    page.wait_for_function(
        f"document.querySelector('.cbir-query .cbir-id')?.textContent === '{query_id}'", timeout=SEARCH_MS)
    page.wait_for_function("document.querySelectorAll('.cbir-result').length === 5", timeout=SEARCH_MS)
    picked = [c[0] for c in _cards(page)]
    assert query_id not in picked
    assert {c[0] for c in cards[1:]} <= set(picked)  # the upload's ranks 2-5 (up to float ties)

    # click "search from this" under the second result: it becomes the query
    target = picked[1]
    page.locator(".cbir-search-from").nth(1).click()
    page.wait_for_function(
        f"document.querySelector('.cbir-query .cbir-id')?.textContent === '{target}'", timeout=SEARCH_MS)
    page.wait_for_function("document.querySelectorAll('.cbir-result').length === 5", timeout=SEARCH_MS)
    assert target not in [c[0] for c in _cards(page)]
    assert page.evaluate("(() => {const s = document.querySelector('.cbir-pick select'); "
                         "return s.options[s.selectedIndex].text})()").replace("\xa0", " ").startswith(f"{target} · ")

    # choose k: eight results
    page.fill(".cbir-k input", "8")
    page.press(".cbir-k input", "Enter")
    page.wait_for_function("document.querySelectorAll('.cbir-result').length === 8", timeout=SEARCH_MS)
    assert [c[2].split(" · ")[0] for c in _cards(page)] == [f"#{r}" for r in range(1, 9)]


@pytest.mark.slow
def test_astronaut_photo_gets_the_no_close_match_warning_and_controls_are_readable(page, tmp_path):
    from skimage import data as skdata

    astronaut = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(astronaut)
    _upload(page, astronaut)
    page.wait_for_selector(".cbir-warning", timeout=SEARCH_MS)
    assert page.locator(".cbir-warning").inner_text().startswith(
        "No close match: the nearest catalogue image is at cosine distance ")
    assert page.locator(".cbir-result").count() == 5  # the least far are still shown
    # the run dropdown shows its whole text: the option text is narrower than the select
    fits = page.evaluate("""() => {
        const s = document.querySelector('.cbir-run select');
        const ctx = document.createElement('canvas').getContext('2d');
        const st = getComputedStyle(s);
        ctx.font = `${st.fontWeight} ${st.fontSize} ${st.fontFamily}`;
        return [ctx.measureText(s.options[s.selectedIndex].text).width, s.clientWidth - 30];
    }""")
    assert fits[0] < fits[1], fits
    assert "CBIR_" not in page.content() and "voila notebooks" not in page.content()  # no start-up text on the page


@pytest.mark.slow
def test_text_file_and_oversized_uploads_show_the_error(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    _upload(page, notes)
    page.wait_for_selector(".cbir-error", timeout=SEARCH_MS)
    assert page.locator(".cbir-error").inner_text() == (
        "notes.txt: not an image file (.txt); upload a photo (JPG, JPEG, PNG, WEBP)")
    assert page.locator(".cbir-result").count() == 0

    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + bytes(11_000_000 - 3))  # 10.5 MiB, over the 10 MiB limit
    _upload(page, big)
    page.wait_for_function("document.querySelector('.cbir-error')?.textContent.startsWith('big.jpg')",
                           timeout=SEARCH_MS)
    assert page.locator(".cbir-error").inner_text() == "big.jpg: 10.5 MB is over the 10 MB upload limit"


@pytest.mark.slow
def test_html_export_of_a_saved_notebook_shows_the_neighbour_browser(demo_store, tmp_path, monkeypatch):
    """The browser's outputs as a saved notebook holds them, exported by nbconvert and opened in Chromium: the
    static grid is visible (the widget cannot render without its JavaScript and state), and hidden once a live
    widget is rendered after it (as in JupyterLab and Voila, which share the output-area class names)."""
    import IPython.display
    import nbformat
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright

    from cbir.gallery import neighbour_browser
    from cbir.store import FeatureStore

    store_path, catalog = demo_store
    browser = neighbour_browser(FeatureStore(store_path, readonly=True), 1, k=5, compare_metric="euclidean")
    outputs = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False, **kw: outputs.append(
        obj if raw else {"text/html": obj.data}))
    browser._ipython_display_()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("neighbour_browser(store, run_id)")]
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data=data) for data in outputs]
    page_file = tmp_path / "02.html"
    page_file.write_text(HTMLExporter(template_name="lab").from_notebook_node(nb)[0])
    want = browser.panes[0].shown["image_id"].tolist() + browser.panes[1].shown["image_id"].tolist()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = chromium.new_page()
            page.goto(page_file.as_uri(), wait_until="load", timeout=APP_LOAD_MS)
            assert page.locator(".cbir-snapshot").is_visible()
            cards = page.locator(".cbir-snapshot .cbir-result")
            assert cards.count() == 10 and all(cards.nth(i).is_visible() for i in range(10))
            assert page.locator(".cbir-snapshot .cbir-result .cbir-id").all_inner_texts() == want
            assert page.evaluate("[...document.querySelectorAll('.cbir-snapshot img')].every(i => i.naturalWidth > 0)")
            page.evaluate("""() => { const out = document.querySelectorAll('.jp-OutputArea-child');
                const live = document.createElement('div'); live.className = 'cbir-browser';
                out[out.length - 1].querySelector('.jp-OutputArea-output').appendChild(live); }""")
            assert not page.locator(".cbir-snapshot").is_visible()  # a live widget replaces the static copy
        finally:
            chromium.close()


def test_default_run_matches_stored_weight_labels_and_refuses_a_missing_model():
    """Stored labels are "handcrafted" for descriptors and "none (random init)" for untrained models: asking
    for lbp (whatever ``weights`` says) or for mobilenet_v2 with weights "none" must find those runs, and a
    model with no run must be an error, never silently another model's run."""
    runs = pd.DataFrame({"run_id": [1, 2, 3], "name": [None, None, None],
                         "model": ["lbp", "mobilenet_v2", "efficientnet_lite0"], "layer": [None, "out_relu", "top"],
                         "pooling": [None, "gap", "gap"],
                         "weights": ["handcrafted", "none (random init)", "imagenet"]})
    pick = VisualSearchApp._default_run
    assert pick(runs, None, model="lbp", layer=None, pooling=None, weights="imagenet") == 1
    assert pick(runs, None, model="mobilenet_v2", layer=None, pooling="gap", weights="none") == 2
    assert pick(runs, None, model="efficientnet_lite0", layer=None, pooling="gap", weights="imagenet") == 3
    assert pick(runs, None, model=None, layer=None, pooling=None, weights=None) == 3
    with pytest.raises(ValueError, match="no complete run of model 'vgg19'"):
        pick(runs, None, model="vgg19", layer=None, pooling=None, weights="imagenet")
    with pytest.raises(ValueError, match="no complete run of model 'mobilenet_v2'"):
        pick(runs, None, model="mobilenet_v2", layer=None, pooling="gap", weights="imagenet")
