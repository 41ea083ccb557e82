"""cbir.datasets: the synthetic demo catalogue (determinism, balance, decodable, labels) and resolve_catalog."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbir.catalog import background_stats, load_catalog, split_queries
from cbir.datasets import SUBCATEGORIES, make_demo_catalog, resolve_catalog
from cbir.images import read_image

FASHION = {"tops": {"t-shirt", "hoodie", "sweatshirt", "dress"}, "bottoms": {"trousers", "shorts", "skirt"},
           "footwear": {"sneaker", "boot", "sandal"}}
NON_FASHION = {"electronics": {"phone", "tv"}, "vehicles": {"car"}, "home": {"lamp"}}


def _sha1s(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo catalogue (360 images), generated once for the module."""
    return make_demo_catalog(tmp_path_factory.mktemp("demo"))


def test_default_catalogue_counts_and_labels(demo: Path) -> None:
    manifest = pd.read_csv(demo)
    assert list(manifest.columns) == ["image", "category", "subcategory", "is_fashion", "product_id", "colour",
                                      "pattern", "background"]
    assert len(manifest) == 360
    counts = manifest["subcategory"].value_counts()
    assert len(counts) == 14 and set(counts) == {25, 26}  # 360 = 14 * 25 + 10: balanced to within one
    groups = manifest.groupby("category")["subcategory"].agg(set).to_dict()
    assert groups == {**FASHION, **NON_FASHION}
    fashion = manifest.groupby("category")["is_fashion"].agg(set).to_dict()
    assert all(fashion[c] == {True} for c in FASHION) and all(fashion[c] == {False} for c in NON_FASHION)
    assert set(manifest["pattern"]) == {"plain", "stripes", "checks", "dots"}
    assert set(manifest.loc[~manifest["is_fashion"], "pattern"]) == {"plain"}
    grey = (manifest["background"] == "grey").mean()
    assert 0.08 < grey < 0.22  # ~15% light grey backgrounds
    assert manifest["product_id"].is_unique and manifest["colour"].nunique() >= 8


def test_default_catalogue_loads_clean(demo: Path) -> None:
    catalog = load_catalog(demo, progress=False)
    assert len(catalog) == 360 and len(catalog.problems) == 0
    assert catalog.df["dup_group"].isna().all()  # every image is distinct
    assert (catalog.df[["width", "height"]] == 224).all().all() and set(catalog.df["mode"]) == {"RGB"}
    assert catalog.ids.tolist() == pd.read_csv(demo)["product_id"].astype(str).tolist()
    # the background drawn matches the background measured on the image border
    stats = background_stats(catalog, progress=False)
    assert stats["background"].tolist() == catalog.df["background"].tolist()
    # queries come from fashion sub-categories only
    split = split_queries(catalog, n_queries=40)
    assert set(split.queries().df["category"]) == set(FASHION)


def test_silhouettes_fill_part_of_the_frame(demo: Path) -> None:
    manifest = pd.read_csv(demo)
    first = manifest.groupby("subcategory").head(2)
    for row in first.itertuples():
        image = read_image(demo.parent / row.image).astype(int)
        background = np.median(np.concatenate([image[0], image[-1]]), axis=0)
        foreground = (np.abs(image - background).max(axis=2) > 40).mean()
        assert 0.03 < foreground < 0.75, (row.image, row.subcategory, foreground)


def test_subcategories_told_apart_by_shape(demo: Path) -> None:
    """Silhouettes carry the label: 1-NN on scale/position-invariant shape features of the foreground
    mask (Hu moments, extent, aspect, solidity) recognises the sub-category far above chance (1/14)."""
    import cv2
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    manifest = pd.read_csv(demo)
    features = []
    for image_path in manifest["image"]:
        image = read_image(demo.parent / image_path).astype(int)
        background = np.median(np.concatenate([image[0], image[-1]]), axis=0)
        mask = (np.abs(image - background).max(axis=2) > 40).astype(np.uint8)
        hu = cv2.HuMoments(cv2.moments(mask, True)).ravel()
        _, _, w, h = cv2.boundingRect(mask)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
        log_hu = -np.sign(hu) * np.log10(np.abs(hu) + 1e-30)
        features.append([*log_hu, mask.sum() / (w * h), w / h, mask.sum() / hull])
    model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=1))
    accuracy = cross_val_score(model, np.asarray(features), manifest["subcategory"], cv=5).mean()
    assert accuracy > 0.8, accuracy


def test_byte_for_byte_deterministic(tmp_path: Path) -> None:
    a = make_demo_catalog(tmp_path / "a", n=28, seed=5, size=96)
    b = make_demo_catalog(tmp_path / "b", n=28, seed=5, size=96)
    c = make_demo_catalog(tmp_path / "c", n=28, seed=6, size=96)
    sha_a, sha_b, sha_c = _sha1s(a.parent), _sha1s(b.parent), _sha1s(c.parent)
    assert len(sha_a) == 29 and sha_a == sha_b
    assert sha_a["manifest.csv"] != sha_c["manifest.csv"]
    assert sum(sha_a[k] != sha_c.get(k) for k in sha_a) >= 28
    catalog = load_catalog(a, progress=False)
    assert len(catalog.problems) == 0 and (catalog.df[["width", "height"]] == 96).all().all()
    assert catalog.df["subcategory"].value_counts().to_dict() == {s: 2 for s in SUBCATEGORIES}


def test_make_demo_catalog_rejects_bad_n(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be"):
        make_demo_catalog(tmp_path, n=0)


def test_resolve_catalog(tmp_path: Path) -> None:
    assert resolve_catalog("some/where/manifest.csv", tmp_path) == Path("some/where/manifest.csv")
    manifest = resolve_catalog("demo", tmp_path / "out", n=14)
    assert manifest == tmp_path / "out" / "demo_catalog" / "manifest.csv" and manifest.is_file()
    assert len(pd.read_csv(manifest)) == 14
    stamp = manifest.stat().st_mtime_ns
    assert resolve_catalog("demo", tmp_path / "out", n=14) == manifest
    assert manifest.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["demo_catalog"]  # no temporary folder left
