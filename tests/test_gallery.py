"""cbir.gallery (ipywidgets gallery, static twin) and cbir.plots.retrieval figures on tiny real JPEGs."""
from __future__ import annotations

import base64
import io

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from PIL import Image

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
