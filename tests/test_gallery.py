"""cbir.gallery (ipywidgets gallery, static twin) and cbir.plots.retrieval figures on tiny real JPEGs."""
from __future__ import annotations

import base64
import html
import io

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.spatial.distance import cdist

from cbir import evaluate as ev
from cbir.gallery import NeighbourGallery, neighbour_gallery, static_gallery, thumbnail_base64
from cbir.plots import retrieval as rp

COLOURS = {"q1": (200, 30, 30), "q2": (30, 30, 200), "n1": (210, 40, 40), "n2": (220, 90, 90),
           "n3": (40, 40, 210), "n4": (60, 60, 180)}


@pytest.fixture()
def catalog(tmp_path):
    rows = []
    for image_id, rgb in COLOURS.items():
        path = tmp_path / f"{image_id}.jpg"
        Image.new("RGB", (40, 30), rgb).save(path, quality=95)
        rows.append({"image_id": image_id, "path": str(path)})
    df = pd.DataFrame(rows)
    df["category"] = ["A", "B", "A", "A", "B", "B"]
    df["subcategory"] = ["red", "blue", "red", "pink", "blue", "navy"]
    return df


@pytest.fixture()
def neighbours():
    lists = {"cosine": {"q1": ["n1", "n2", "n3"], "q2": ["n3", "n4", "n1"]},
             "euclidean": {"q1": ["n2", "n1", "n4"], "q2": ["n4", "n3", "n2"]}}
    rows = [{"model": "toy", "layer": None, "metric": m, "query_id": q, "rank": r, "neighbour_id": n,
             "distance": 0.1 * r}
            for m, per in lists.items() for q, ns in per.items() for r, n in enumerate(ns, start=1)]
    return pd.DataFrame(rows)


def _ids(gallery: NeighbourGallery) -> list[str]:
    return [child.value.split('data-id="')[1].split('"')[0] for child in gallery.cards.children]


def _matches(gallery: NeighbourGallery) -> list[int]:
    return [int(child.value.split('data-match="')[1][0]) for child in gallery.cards.children]


def test_gallery_builds_and_follows_the_dropdowns(neighbours, catalog):
    g = neighbour_gallery(neighbours, catalog)
    assert isinstance(g, NeighbourGallery)
    assert [label for label, _ in g.measure.options] == ["cosine", "euclidean"]
    assert [v for _, v in g.query.options] == ["q1", "q2"]
    assert g.query.options[0][0] == "q1 (red)"
    assert _ids(g) == ["q1", "n1", "n2", "n3"]
    assert _matches(g)[1:] == [1, 0, 0]  # n1 red = query's sub-category; n2 pink, n3 blue
    first = g.cards.children[1].value
    assert rp.MATCH_COLOUR in first and "#1</b> red" in first and "d = 0.100" in first
    assert rp.MISMATCH_COLOUR in g.cards.children[3].value
    g.measure.value = 1  # euclidean: the same query keeps its place
    assert g.query.value == "q1"
    assert _ids(g) == ["q1", "n2", "n1", "n4"]
    assert _matches(g)[1:] == [0, 1, 0]
    g.query.value = "q2"
    assert _ids(g) == ["q2", "n4", "n3", "n2"]
    assert _matches(g)[1:] == [0, 1, 0]  # q2 blue: n4 navy, n3 blue, n2 pink
    assert g.shown()["distance"].tolist()[1:] == pytest.approx([0.1, 0.2, 0.3])


def test_gallery_thumbnails_are_jpegs_of_the_images(catalog):
    data = base64.b64decode(thumbnail_base64(catalog.loc[0, "path"], 32))
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (32, 32)
    assert np.abs(np.asarray(image).mean(axis=(0, 1)) - COLOURS["q1"]).max() < 8
    grey = Image.open(io.BytesIO(base64.b64decode(thumbnail_base64("/no/such/file.jpg", 16))))
    assert np.abs(np.asarray(grey).astype(int) - 220).max() < 4  # unreadable -> placeholder, no crash


def test_gallery_max_queries_and_paths_argument(neighbours, catalog):
    paths = dict(zip(catalog["image_id"], catalog["path"]))
    g = neighbour_gallery(neighbours, catalog.drop(columns="path"), paths=paths, max_queries=1, level="category")
    assert [v for _, v in g.query.options] == ["q1"]
    assert _matches(g)[1:] == [1, 1, 0]  # category level: n1, n2 in A; n3 in B
    with pytest.raises(ValueError, match="no image paths"):
        neighbour_gallery(neighbours, catalog.drop(columns="path"))


def _spine_colour(ax) -> str:
    return mcolors.to_hex(ax.spines["left"].get_edgecolor())


def test_static_gallery_grid(neighbours, catalog, tmp_path):
    fig = static_gallery(neighbours, catalog, metric="cosine", path=tmp_path / "fig" / "grid.png")
    assert (tmp_path / "fig" / "grid.png").stat().st_size > 1000
    axes = np.array(fig.axes).reshape(2, 4)
    assert [_spine_colour(ax) for ax in axes[0]] == [rp.QUERY_COLOUR, rp.MATCH_COLOUR, rp.MISMATCH_COLOUR,
                                                     rp.MISMATCH_COLOUR]
    assert [_spine_colour(ax) for ax in axes[1]] == [rp.QUERY_COLOUR, rp.MATCH_COLOUR, rp.MISMATCH_COLOUR,
                                                     rp.MISMATCH_COLOUR]  # q2 blue: n3 blue, n4 navy, n1 red
    assert axes[0, 1].get_title() == "#1 red\nd=0.100"
    assert axes[1, 0].get_title() == "query\nblue"
    assert "toy / cosine" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="one tuple"):
        rp.plot_neighbour_grid(neighbours, catalog)
    with pytest.raises(ValueError, match="no neighbours for"):
        static_gallery(neighbours, catalog, metric="chebyshev")


def test_retrieval_figures(neighbours, catalog, tmp_path):
    q2_eu = (neighbours["metric"] == "euclidean") & (neighbours["query_id"] == "q2")
    neighbours.loc[q2_eu, "neighbour_id"] = ["n1", "n2", "n4"]  # categories A, A, B for the B query
    table = ev.match_table(neighbours, catalog, n_boot=50)
    fig = rp.plot_match_heatmap(table, path=tmp_path / "heat.png")
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    # category match: cosine (2/3 + 2/3)/2 = 66.7 %, euclidean (2/3 + 1/3)/2 = 50.0 %
    assert texts == ["50.0", "66.7"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["euclidean", "cosine"]
    pr = ev.precision_recall(neighbours, catalog, level="category")
    fig = rp.plot_pr_curves(pr, level="category", path=tmp_path / "pr.png")
    assert len([line for line in fig.axes[0].lines if len(line.get_xdata()) == 3]) == 2
    by_rank = ev.match_by_rank(neighbours, catalog)
    fig = rp.plot_match_by_rank(by_rank, path=tmp_path / "rank.png")
    heights = sorted(round(p.get_height(), 1) for p in fig.axes[0].patches if p.get_height() > 0)
    # cosine: ranks 1, 2 both right (100 %), rank 3 both wrong (0); euclidean: one of two right at each rank
    assert heights == [50.0, 50.0, 50.0, 100.0, 100.0]
    conf = ev.confusion(ev.select(neighbours, metric="cosine"), catalog)
    fig = rp.plot_confusion(conf, path=tmp_path / "conf.png")
    assert len(fig.axes[0].texts) == conf.size
    for name in ("heat", "pr", "rank", "conf"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


# ------------------------------------------------------------------ the neighbour browser over a run's vectors
@pytest.fixture(scope="module")
def run_store(tmp_path_factory):
    """36 demo images (4 queries) + a byte-identical copy of a catalogue image; colour histograms in a store."""
    import shutil

    from cbir.backbones import build_extractor
    from cbir.catalog import load_catalog, split_queries
    from cbir.datasets import make_demo_catalog
    from cbir.extract import extract_features
    from cbir.store import FeatureStore

    root = tmp_path_factory.mktemp("browse")
    manifest = make_demo_catalog(root / "demo", n=36, seed=3)
    table = pd.read_csv(manifest)
    shutil.copy(manifest.parent / table.at[1, "image"], manifest.parent / "images" / "copy.jpg")
    pd.concat([table, table.iloc[[1]].assign(image="images/copy.jpg", product_id=999999)]).to_csv(manifest,
                                                                                                  index=False)
    catalog = split_queries(load_catalog(manifest).usable(), n_queries=4, seed=0)
    store = FeatureStore(root / "features.sqlite")
    hist = extract_features(catalog, model=build_extractor("color_hist", bins=8), store=store, progress=False,
                            workers=0)
    lbp = extract_features(catalog, model=build_extractor("lbp", points=8, radius=1), store=store, progress=False,
                           workers=0)
    return store, hist, lbp, catalog.df.set_index("image_id")


def _scipy_top(store, run_id, query, metric, k, exclude, searchable):
    from scipy.spatial.distance import cdist

    ids, X = store.features(run_id)
    keep = np.array([i in searchable and i not in exclude for i in ids])
    name = {"manhattan": "cityblock"}.get(metric, metric)
    d = cdist(X[list(ids).index(query)][None].astype(np.float64), X[keep].astype(np.float64), name,
              **({"p": 3} if metric == "minkowski" else {}))[0]
    order = np.argsort(d, kind="stable")[:k]
    return list(ids[keep][order]), d[order]


def test_run_vectors_search_from_any_catalogue_image(run_store):
    from cbir.gallery import RunVectors
    from cbir.search import search

    store, hist, _, cat = run_store
    queries = set(cat.index[cat["split"] == "query"])
    searchable = set(cat.index) - queries
    rv = RunVectors(store, hist, searchable="catalog")
    assert set(rv.catalog_ids) == searchable and rv.label == "run 1: color_hist"
    copy = cat.index[cat["path"].str.endswith("copy.jpg")][0]
    original = cat.at[copy, "dup_group"]
    assert rv.excluded(original) == {original, copy}
    ids, X = store.features(hist)
    for metric in ("cosine", "chebyshev", "minkowski"):
        q = sorted(queries)[0]  # a query: the same neighbours as notebook 02's search (cbir.search.search)
        found = rv.search_image(q, metric=metric, k=5)
        cat_ids = np.array(sorted(searchable, key=list(ids).index))
        ref = search(cat_ids, store.features(hist, cat_ids)[1], [q], X[[list(ids).index(q)]], metric=metric, k=5,
                     dup_groups=cat["dup_group"].dropna())
        assert found["image_id"].tolist() == ref["neighbour_id"].tolist()
        np.testing.assert_allclose(found["distance"], ref["distance"], rtol=1e-12)
        # a catalogue image (not a query): itself and its byte-identical copy are left out
        found = rv.search_image(original, metric=metric, k=6)
        want_ids, want_d = _scipy_top(store, hist, original, metric, 6, {original, copy}, searchable)
        assert found["image_id"].tolist() == want_ids and found["rank"].tolist() == [1, 2, 3, 4, 5, 6]
        np.testing.assert_allclose(found["distance"], want_d, rtol=1e-5, atol=1e-7)
        assert found["subcategory"].tolist() == cat.loc[want_ids, "subcategory"].tolist()
    with pytest.raises(KeyError, match="has no vector in run 1"):
        rv.search_image("nope", metric="cosine")


def test_relocate_paths_finds_a_moved_catalogue(tmp_path):
    from cbir.gallery import relocate_paths

    old = tmp_path / "old" / "outputs" / "demo" / "demo_catalog"
    new = tmp_path / "new" / "demo" / "demo_catalog"
    (new / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (new / "images" / name).write_bytes(b"x")
    (new / "c.jpg").write_bytes(b"x")
    paths = pd.Series([str(old / "images" / "a.jpg"), str(old / "images" / "b.jpg"), str(old / "c.jpg"), None])
    got = relocate_paths(paths, bases=[tmp_path / "nowhere", tmp_path / "new" / "demo"])
    assert got[:3].tolist() == [str(new / "images" / "a.jpg"), str(new / "images" / "b.jpg"), str(new / "c.jpg")]
    assert pd.isna(got[3])  # no path stays no path
    assert relocate_paths(paths, bases=[new])[:3].tolist() == got[:3].tolist()  # the catalogue root itself
    assert relocate_paths(paths, bases=[tmp_path / "nowhere"])[:3].tolist() == paths[:3].tolist()  # not found
    assert relocate_paths(got, bases=[])[:3].tolist() == got[:3].tolist()  # present: unchanged


def _card_ids(pane) -> list[str]:
    return [box.children[0].value.split('data-id="')[1].split('"')[0] for box in pane.cards.children]


def test_browser_click_k_compare_mistakes_and_back(run_store):
    from cbir.gallery import NeighbourBrowser, RunVectors

    store, hist, lbp, cat = run_store
    runs = [RunVectors(store, hist, searchable="catalog"), RunVectors(store, lbp, searchable="catalog")]
    b = NeighbourBrowser(runs, metrics=["euclidean", "cosine", "chebyshev"], k=4)
    first_query = [i for i in runs[0].ids if cat.at[i, "split"] == "query"][0]
    assert b.image.value == first_query and len(b.image.options) == len(cat)  # every image, queries marked
    assert sum(label.endswith(" · query") for label, _ in b.image.options) == 4
    a, other = b.panes
    assert a.metric.value == "cosine" and other.layout.display == "none" and b.back.disabled
    assert _card_ids(a) == a.shown["image_id"].tolist() and len(a.buttons) == 4
    card = a.cards.children[0].children[0].value  # id, labels and distance on every thumbnail
    row = a.shown.iloc[0]
    assert (f'<div class="cbir-label"><b>{row.subcategory}</b></div><div class="cbir-category">{row.category}</div>'
            in card and f">{row.image_id}</div>" in card and f"#1 · d = {row.distance:.3f}" in card)
    target = a.shown["image_id"].iloc[1]
    a.buttons[1].click()  # search from a result
    assert b.image.value == target and not b.back.disabled
    want, _ = _scipy_top(store, hist, target, "cosine", 4, runs[0].excluded(target), set(runs[0].catalog_ids))
    assert _card_ids(a) == want
    b.k.value = 7
    assert len(a.shown) == 7 and _card_ids(a) == _scipy_top(store, hist, target, "cosine", 7, {target},
                                                            set(runs[0].catalog_ids))[0]
    b.compare.value = True  # side by side: the second pane, another run and measure
    other.run.value, other.metric.value = lbp, "chebyshev"
    assert other.layout.display == "flex"
    assert _card_ids(other) == _scipy_top(store, lbp, target, "chebyshev", 7, {target}, set(runs[1].catalog_ids))[0]
    assert "run 2: lbp</b> · chebyshev" in other.title.value
    label = cat.at[target, "subcategory"]
    same = (a.found["subcategory"] == label).tolist()
    assert a.found["match"].tolist() == same and f"{sum(same)} of 7 same subcategory" in a.title.value
    b.mistakes.value = True  # only neighbours of another sub-category, ranks kept
    assert a.shown["image_id"].tolist() == a.found.loc[[not s for s in same], "image_id"].tolist()
    assert (a.shown["subcategory"] != label).all() and len(a.buttons) == len(a.shown)
    b.back.click()
    assert b.image.value == first_query and b.back.disabled
    b.search_from(cat.index[-1])  # any catalogue image, here the byte-identical copy
    assert cat.index[-1] not in a.found["image_id"].tolist()


def test_browser_leaves_a_static_rendering_for_saved_notebooks_and_html_exports(run_store, monkeypatch):
    """Displayed, the browser emits a static HTML view of its cards, then the widget: nbconvert's HTML export
    (which cannot draw the widget without its JavaScript) shows the grid."""
    import IPython.display
    import nbformat
    from nbconvert import HTMLExporter

    from cbir.gallery import neighbour_browser

    store, hist, _, cat = run_store
    b = neighbour_browser(store, hist, metrics=["cosine", "chebyshev"], k=5, compare_metric="chebyshev")
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False, **kw: shown.append((obj, raw)))
    b._ipython_display_()
    assert len(shown) == 2
    snapshot, (bundle, raw) = shown[0][0].data, shown[1]
    assert raw and bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == b.model_id
    ids = b.panes[0].shown["image_id"].tolist() + b.panes[1].shown["image_id"].tolist()
    assert snapshot.count('class="cbir-card cbir-result"') == 10 and snapshot.count('class="cbir-card cbir-query"') == 1
    assert "cosine: " in snapshot and "chebyshev: " in snapshot
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("neighbour_browser(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/html": snapshot}),
                    nbformat.v4.new_output("display_data", data=bundle)]
    nb.cells = [cell]
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    for image_id in ids:
        assert f'data-id="{image_id}"' in body
    assert body.count("data:image/jpeg;base64,") >= 11


def test_browser_searches_through_the_runs_index_and_its_caption_names_it(tmp_path, monkeypatch):
    """Notebook 02's browser (searchable catalogue) uses the run's faiss index for a measure it serves: the
    index's neighbours (re-ranked exactly), and the pane's caption names the index and its recall; Manhattan
    stays exact and says why; a stale index is not used."""
    import cbir.index
    from cbir.gallery import NeighbourBrowser, RunVectors
    from cbir.index import build_index, load_index
    from cbir.store import FeatureStore

    X = np.random.default_rng(5).standard_normal((500, 16)).astype(np.float32)  # no clusters: IVF cells cut through
    ids = np.array([f"img{i:04d}" for i in range(500)])
    labels = pd.DataFrame({"image_id": ids, "path": "", "split": np.where(np.arange(500) < 10, "query", "catalog"),
                           "category": [f"c{i % 3}" for i in range(500)],
                           "subcategory": [f"s{i % 7}" for i in range(500)]})
    store = FeatureStore(tmp_path / "s.sqlite")
    store.put_catalog(labels)
    run_id = store.start_run({"model": "toy", "layer": None, "pooling": None})
    store.put_run_labels(run_id, labels)
    store.put_features(run_id, ids, X)
    store.finish_run(run_id)
    # timings are noise on a busy machine: timed equal, the build keeps the smallest setting reaching the target
    monkeypatch.setattr(cbir.index, "_timed", lambda fn, rounds=3: (0.0, fn()))
    info = build_index(store, run_id, metric="cosine", kind="ivf", target_recall=0.05, n_eval_queries=100)
    loaded = load_index(store, run_id, "cosine")
    assert info.search_value == 1 and set(loaded.ids) == set(ids[10:])  # the index holds the searchable catalogue

    def index_top(image_id, k=5):  # the index's candidates without the image itself, re-ranked exactly
        q = X[[list(ids).index(image_id)]].astype(np.float64)
        _, pos = loaded.search(q, k + 1)
        cand = [i for i in loaded.ids[pos[0]] if i != image_id][:k]
        d = cdist(q, X[np.searchsorted(ids, cand)].astype(np.float64), "cosine")[0]
        return [cand[j] for j in np.argsort(d, kind="stable")]

    def exact_top(image_id, k=5):
        q = X[[list(ids).index(image_id)]].astype(np.float64)
        d = cdist(q, X[10:].astype(np.float64), "cosine")[0]
        return [i for i in ids[10:][np.argsort(d, kind="stable")] if i != image_id][:k]

    missed = [i for i in ids if index_top(i) != exact_top(i)]
    assert missed  # nprobe=1 misses some neighbours: the index is not exact search in disguise
    b = NeighbourBrowser(RunVectors(store, run_id, searchable="catalog"), metrics=["cosine", "manhattan"], k=5,
                         image=missed[0], compare_metric="manhattan")
    a, other = b.panes
    assert a.shown["image_id"].tolist() == index_top(missed[0]) != exact_top(missed[0])
    caption = html.unescape(a.title.value)
    assert f'search: {info.label} (index run{run_id}-cosine-ivf.faiss; distances re-ranked exactly)</div>' in caption
    assert "recall@5 " in info.label and "leaves out" not in caption  # the catalogue is exactly what it holds
    assert "search: exact search (manhattan: no approximate faiss index serves it)" in html.unescape(other.title.value)
    assert 'class="cbir-search-how"' in b.snapshot_html()
    # the run's vectors change: the index is stale, the browser searches exactly and says so
    store.put_features(run_id, ids[200:201], X[201:202])
    X[200] = X[201]
    b = NeighbourBrowser(RunVectors(store, run_id, searchable="catalog"), metrics=["cosine"], k=5, image=missed[0])
    assert b.panes[0].shown["image_id"].tolist() == exact_top(missed[0])
    assert (f"search: exact search (cosine: its saved index is stale; rebuild it with `cbir index build --run "
            f"{run_id} --metric cosine`)") in html.unescape(b.panes[0].title.value)
