"""Colour histograms, LBP, HOG, comparisons, pairwise similarity tables and descriptor extractors."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import cv2
import numpy as np
import pandas as pd
import pytest
from skimage.feature import hog, local_binary_pattern

from cbir.descriptors import (
    COMPARE_METHODS,
    build_descriptor_extractor,
    chi2_distance,
    color_histogram,
    compare_histograms,
    image_histograms,
    lbp_histogram,
    pair_similarities,
    similarity_by_rank,
    similarity_summary,
)

RED = (200, 30, 40)
BLUE = (30, 60, 190)


def two_level(n_dark: int, n_light: int) -> np.ndarray:
    """A 1 x (n_dark + n_light) RGB image: n_dark black pixels then n_light white ones."""
    row = np.array([0] * n_dark + [255] * n_light, np.uint8)
    return np.repeat(row[None, :, None], 3, axis=2)


def garment_on_white(colour, *, h=96, w=80) -> tuple[np.ndarray, np.ndarray]:
    """A flat-coloured ellipse 'garment' on pure white and its true mask."""
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 5, h // 4), 0, 0, 360, 1, -1)
    img = np.full((h, w, 3), 255, np.uint8)
    img[mask > 0] = colour
    return img, mask.astype(bool)


# ----------------------------------------------------------------------------- colour histograms
def test_color_histogram_two_level_by_hand():
    # 8 black + 8 white pixels, 4 bins over 0..255: each channel [0.5, 0, 0, 0.5]
    h = color_histogram(two_level(8, 8), bins=4)
    assert h.shape == (3, 4) and h.dtype == np.float32
    np.testing.assert_allclose(h, [[0.5, 0, 0, 0.5]] * 3)
    h2 = color_histogram(two_level(12, 4), bins=4)
    np.testing.assert_allclose(h2, [[0.75, 0, 0, 0.25]] * 3)


def test_color_correlation_and_chi2_by_hand():
    a = color_histogram(two_level(8, 8), bins=4)   # [.5, 0, 0, .5]
    b = color_histogram(two_level(12, 4), bins=4)  # [.75, 0, 0, .25]
    # Pearson r: deviations [.25,-.25,-.25,.25] and [.5,-.25,-.25,0]: .25 / sqrt(.25 * .375) = sqrt(2/3)
    assert compare_histograms(a, b, method="correlation") == pytest.approx(math.sqrt(2 / 3), abs=1e-7)
    # chi2: 0.5 * (.25^2/1.25 + .25^2/.75) = 0.5 * (0.05 + 1/12) = 1/15 on every channel
    assert compare_histograms(a, b, method="chi2") == pytest.approx(1 / 15, abs=1e-7)
    # intersection: min sums to .5 + .25; Bhattacharyya: sqrt(1 - (sqrt(.375) + sqrt(.125)))
    assert compare_histograms(a, b, method="intersection") == pytest.approx(0.75, abs=1e-7)
    bc = math.sqrt(0.5 * 0.75) + math.sqrt(0.5 * 0.25)
    assert compare_histograms(a, b, method="bhattacharyya") == pytest.approx(math.sqrt(1 - bc), abs=1e-6)


def test_identical_images_correlate_one_and_chi2_zero():
    img = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    h = color_histogram(img, bins=16)
    assert compare_histograms(h, h) == pytest.approx(1.0)
    assert compare_histograms(h, h, method="chi2") == 0.0
    t = lbp_histogram(img, points=8, radius=1)
    assert chi2_distance(t, t) == 0.0


def test_mean_over_channels():
    # R identical, G and B opposite one-hots: r = 1, -1/3, -1/3 with 4 bins -> mean 1/9
    a = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], float)
    b = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]], float)
    assert compare_histograms(a, b) == pytest.approx((1 - 1 / 3 - 1 / 3) / 3)


@pytest.mark.parametrize("method,flag", [
    ("correlation", cv2.HISTCMP_CORREL), ("chisqr", cv2.HISTCMP_CHISQR),
    ("chisqr_alt", cv2.HISTCMP_CHISQR_ALT), ("intersection", cv2.HISTCMP_INTERSECT),
    ("bhattacharyya", cv2.HISTCMP_BHATTACHARYYA)])
def test_compare_matches_opencv_compareHist(method, flag):
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    imgs[1, :12] = 255  # skewed histograms, empty bins
    hists = np.stack([color_histogram(i, bins=16) for i in imgs])
    got = compare_histograms(hists[:, None], hists[None, :], method=method)  # (4, 4) broadcast
    assert got.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            want = np.mean([cv2.compareHist(hists[i, c], hists[j, c], flag) for c in range(3)])
            assert got[i, j] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_hsv_histogram_ranges():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0] = (255, 0, 0)  # pure red: H 0, S 255, V 255
    img[1] = (0, 0, 255)  # pure blue: H 120 (OpenCV 0..179), S 255, V 255
    h = color_histogram(img, bins=6, space="hsv")  # H bins 30 wide, S/V bins 256/6 wide
    np.testing.assert_allclose(h[0], [0.5, 0, 0, 0, 0.5, 0])
    np.testing.assert_allclose(h[1], [0, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(h[2], [0, 0, 0, 0, 0, 1])


def test_bad_inputs_are_named():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="space"):
        color_histogram(img, space="lab")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        color_histogram(img.astype(float))
    with pytest.raises(ValueError, match="no pixel"):
        color_histogram(img, mask=np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="does not match"):
        lbp_histogram(img, mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="method"):
        compare_histograms(np.ones(4), np.ones(4), method="cosine")


# ------------------------------------------------------------------------------------------- LBP
def lbp_dot() -> np.ndarray:
    """3x3 black image with a grey level 1 centre (as RGB)."""
    img = np.zeros((3, 3, 3), np.uint8)
    img[1, 1] = 1
    return img


def test_lbp_histogram_by_hand():
    # P=4, R=1 samples the 4-neighbours exactly; outside reads 0; s = neighbour >= centre.
    # centre (1): all neighbours 0 -> code 0; the 8 other pixels (0): all neighbours >= 0 -> code P = 4
    h = lbp_histogram(lbp_dot(), points=4, radius=1)
    assert h.shape == (6,) and h.dtype == np.float32
    np.testing.assert_allclose(h, [1 / 9, 0, 0, 0, 8 / 9, 0], rtol=1e-6)
    flat = lbp_histogram(np.zeros((3, 3, 3), np.uint8), points=4, radius=1)
    np.testing.assert_allclose(flat, [0, 0, 0, 0, 1, 0])
    # chi2 = 0.5 * ((1/9)^2 / (1/9) + (1/9)^2 / (17/9)) = 0.5 * (1/9 + 1/153) = 1/17
    assert chi2_distance(h, flat) == pytest.approx(1 / 17, rel=1e-6)
    assert chi2_distance(flat, h) == pytest.approx(1 / 17, rel=1e-6)


def test_lbp_mask_counts_only_inside():
    mask = np.zeros((3, 3), bool)
    mask[1, 1] = True
    np.testing.assert_allclose(lbp_histogram(lbp_dot(), points=4, radius=1, mask=mask), [1, 0, 0, 0, 0, 0])


def test_lbp_matches_skimage_and_supports_radius_24():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    for radius in (3, 24):
        h = lbp_histogram(img, points=24, radius=radius)
        codes = local_binary_pattern(grey, 24, radius, method="uniform").astype(int)
        assert h.shape == (26,)
        np.testing.assert_allclose(h, np.bincount(codes.ravel(), minlength=26) / codes.size, rtol=1e-6)


def test_chi2_distance_by_hand():
    assert chi2_distance([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5 * (0.25 / 1.5 + 0.25 / 0.5))
    assert chi2_distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    batch = chi2_distance(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([1.0, 0.0]))
    np.testing.assert_allclose(batch, [1 / 3, 0.0], atol=1e-9)


# ------------------------------------------------------------------------------- the mask effect
def test_roi_mask_separates_garments_on_the_same_white_background():
    """The study's observation: different garments on white correlate highly; inside the ROI they don't."""
    from cbir.roi import find_roi

    red, red_mask = garment_on_white(RED)
    blue, blue_mask = garment_on_white(BLUE)
    whole = compare_histograms(color_histogram(red), color_histogram(blue))
    roi_red, roi_blue = find_roi(red).mask, find_roi(blue).mask
    inside = compare_histograms(color_histogram(red, mask=roi_red), color_histogram(blue, mask=roi_blue))
    assert whole > 0.85
    assert inside < 0.1
    # reference: the same numbers from the true masks with numpy's Pearson correlation
    share = red_mask.mean()
    bins = 32

    def hist(colour, frac):
        h = np.zeros((3, bins))
        for c in range(3):
            h[c, colour[c] * bins // 256] += frac
            h[c, bins - 1] += 1 - frac
        return h

    want_whole = np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(hist(RED, share), hist(BLUE, share))])
    want_inside = np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(hist(RED, 1.0), hist(BLUE, 1.0))])
    assert whole == pytest.approx(want_whole, abs=1e-6)
    assert inside == pytest.approx(want_inside, abs=0.02)  # the ROI mask may hold a few rim pixels


# ------------------------------------------------------------------------- pairwise helpers
@pytest.fixture()
def garment_files(tmp_path):
    red, _ = garment_on_white(RED)
    blue, _ = garment_on_white(BLUE)
    paths = {}
    for name, img in {"red": red, "blue": blue, "red2": red.copy()}.items():
        paths[name] = tmp_path / f"{name}.png"
        cv2.imwrite(str(paths[name]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths["broken"] = tmp_path / "broken.jpg"
    return {k: str(v) for k, v in paths.items()}


def test_pair_similarities_values_cache_and_bad_images(garment_files):
    nb = pd.DataFrame({"model": "m", "query_id": ["red", "red", "red", "blue"],
                       "rank": [1, 2, 3, 1], "neighbour_id": ["red2", "blue", "broken", "red"],
                       "distance": [0.1, 0.2, 0.3, 0.2]})
    loads = []

    from cbir.images import read_image

    def load(i):
        loads.append(i)
        return read_image(garment_files[i])

    out = pair_similarities(nb, load, bins=32, lbp_points=8, lbp_radius=1, workers=2, progress=False)
    assert sorted(loads) == sorted({"red", "red2", "blue", "broken"})  # each image read once
    assert list(out.columns) == [*nb.columns, "color_corr", "lbp_chi2"]
    assert out["color_corr"].iloc[0] == pytest.approx(1.0) and out["lbp_chi2"].iloc[0] == 0.0
    red = read_image(garment_files["red"])
    blue = read_image(garment_files["blue"])
    assert out["color_corr"].iloc[1] == pytest.approx(
        compare_histograms(color_histogram(red), color_histogram(blue)), abs=1e-6)
    assert out["lbp_chi2"].iloc[1] == pytest.approx(
        chi2_distance(lbp_histogram(red, points=8, radius=1), lbp_histogram(blue, points=8, radius=1)), abs=1e-6)
    assert np.isnan(out["color_corr"].iloc[2]) and np.isnan(out["lbp_chi2"].iloc[2])
    assert out["color_corr"].iloc[3] == pytest.approx(out["color_corr"].iloc[1])  # symmetric

    # a dict id -> path gives the same numbers; the ROI mask lowers red-vs-blue colour correlation
    again = pair_similarities(nb, garment_files, lbp_points=8, lbp_radius=1, progress=False)
    pd.testing.assert_frame_equal(again, out)
    roi = pair_similarities(nb, garment_files, lbp_points=8, lbp_radius=1, mask="roi", progress=False)
    assert roi["color_corr"].iloc[1] < 0.1 < 0.85 < out["color_corr"].iloc[1]


def test_image_histograms_from_catalog_frame_and_problems(garment_files):
    df = pd.DataFrame({"image_id": list(garment_files), "path": list(garment_files.values())})
    hs = image_histograms(["blue", "red", "blue", "broken"], df, bins=8, lbp_points=8, lbp_radius=1,
                          progress=False)
    assert list(hs.ids) == ["blue", "red", "broken"]
    assert hs.color.shape == (3, 3, 8) and hs.lbp.shape == (3, 10)
    assert np.isnan(hs.color[2]).all()
    assert hs.problems["image_id"].tolist() == ["broken"]
    assert hs.problems["problem"].iloc[0] in {"corrupt", "truncated", "not_an_image"}
    with pytest.raises(KeyError, match="nope"):
        hs.rows(["nope"])


def test_summary_tables_by_hand():
    pairs = pd.DataFrame({
        "model": ["a"] * 4 + ["b"] * 4,
        "query_id": ["q1", "q1", "q2", "q2"] * 2,
        "rank": [1, 2, 1, 2] * 2,
        "color_corr": [0.9, 0.5, 0.7, 0.1, 0.2, 0.4, 0.6, 0.8],
        "lbp_chi2": [0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.5, 0.5]})
    s = similarity_summary(pairs)
    row = s[(s.model == "a") & (s.measure == "color_corr")].iloc[0]
    assert (row["mean"], row["min"], row["max"], row["n"]) == (0.55, 0.1, 0.9, 4)
    row = s[(s.model == "b") & (s.measure == "lbp_chi2")].iloc[0]
    assert (row["mean"], row["min"], row["max"]) == (0.25, 0.0, 0.5)
    r = similarity_by_rank(pairs, measure="color_corr")
    assert list(r.columns) == [1, 2]
    assert r.loc["a", 1] == 0.8 and r.loc["a", 2] == 0.3 and r.loc["b", 1] == 0.4 and r.loc["b", 2] == 0.6
    with pytest.raises(ValueError, match="metric"):
        similarity_summary(pairs, by="metric")


# -------------------------------------------------------------------------------- extractors
@pytest.mark.parametrize("name,dim,size", [("color_hist", 96, 224), ("lbp", 26, 224), ("hog", 1764, 128)])
def test_descriptor_extractors(name, dim, size):
    ext = build_descriptor_extractor(name)
    assert (ext.name, ext.dim, ext.input_size) == (name, dim, size)
    assert ext.layer is None and ext.pooling is None
    assert ext.weights_label == "handcrafted" and ext.weights_sha1 is None
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    X = ext(batch)
    assert X.shape == (3, dim) and X.dtype == np.float32 and np.isfinite(X).all()
    np.testing.assert_array_equal(X, ext(batch.copy()))  # deterministic
    assert not np.allclose(X[0], X[1])
    ident = ext.identity()
    assert ident["model"] == name and ident["dim"] == dim and ident["input_size"] == size
    assert ident["weights"] == "handcrafted" and ident["layer"] is None


def test_extractor_values_match_functions_and_resize():
    img = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    want = hog(grey, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2), block_norm="L2-Hys")
    np.testing.assert_allclose(build_descriptor_extractor("hog")(img[None])[0], want, rtol=1e-5, atol=1e-6)
    ext = build_descriptor_extractor("color_hist", bins=8, space="hsv", input_size=128)
    np.testing.assert_allclose(ext(img[None])[0], color_histogram(img, bins=8, space="hsv").ravel())
    # other sizes are resized to input_size (HOG's dim depends on it)
    assert build_descriptor_extractor("hog")(np.zeros((1, 200, 150, 3), np.uint8)).shape == (1, 1764)
    l2 = build_descriptor_extractor("lbp", points=8, radius=1, l2_normalize=True)(img[None])
    assert np.linalg.norm(l2) == pytest.approx(1.0, abs=1e-6) and l2.shape == (1, 10)


def test_extractor_roi_option_and_errors():
    red, _ = garment_on_white(RED, h=224, w=224)
    blue, _ = garment_on_white(BLUE, h=224, w=224)
    plain = build_descriptor_extractor("color_hist")(np.stack([red, blue]))
    roi_ext = build_descriptor_extractor("color_hist", roi=True)
    assert roi_ext.identity()["params"]["roi"] is True
    roi = roi_ext(np.stack([red, blue]))
    corr = lambda X: compare_histograms(X[0].reshape(3, -1), X[1].reshape(3, -1))  # noqa: E731
    assert corr(plain) > 0.85 and corr(roi) < 0.1
    with pytest.raises(ValueError, match="unknown descriptor"):
        build_descriptor_extractor("sift")
    with pytest.raises(ValueError, match="no layers"):
        build_descriptor_extractor("lbp", layer="block_1")
    with pytest.raises(ValueError, match="uint8"):
        build_descriptor_extractor("lbp")(np.zeros((1, 8, 8, 3), np.float32))


def test_a_registered_descriptor_is_an_extractor(monkeypatch, request):
    """Adding a descriptor: one registry entry whose builder gives (dim, params, fn); the pipeline's
    build_extractor then builds it like color_hist, lbp and hog."""
    from cbir import extractors

    def mean_rgb(size, *, space="rgb", **_):
        convert = (lambda img: cv2.cvtColor(img, cv2.COLOR_RGB2HSV)) if space == "hsv" else (lambda img: img)
        return 3, {"space": space}, lambda img: convert(img).reshape(-1, 3).mean(axis=0)

    monkeypatch.delitem(extractors.EXTRACTORS, "mean_rgb", raising=False)
    request.addfinalizer(lambda: extractors.EXTRACTORS.pop("mean_rgb", None))
    extractors.register_extractor(extractors.Entry("mean_rgb", "descriptor", 32, builder=mean_rgb))
    assert "mean_rgb" in extractors.descriptor_names() and "mean_rgb" not in extractors.backbone_names()
    ext = extractors.build_extractor("mean_rgb", space="hsv")
    assert (ext.input_size, ext.dim, ext.identity()["params"]) == (32, 3, {"space": "hsv"})
    batch = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    want = [cv2.cvtColor(img, cv2.COLOR_RGB2HSV).reshape(-1, 3).mean(axis=0) for img in batch]
    np.testing.assert_allclose(ext(batch), want, rtol=1e-6)
    with pytest.raises(ValueError, match="handcrafted descriptor: it has no layers or pooling"):
        extractors.build_extractor("mean_rgb", pooling="gap")


def test_backbone_registry_delegates_descriptors():
    backbones = pytest.importorskip("cbir.backbones")
    ext = backbones.build_extractor("lbp", points=8, radius=1)
    assert ext.dim == 10 and ext.identity()["model"] == "lbp"


# -------------------------------------------------------------------------------------- figures
def test_pair_histogram_figure_and_heatmap(garment_files):
    from cbir.plots.colour import plot_pair_histograms, plot_similarity_heatmap

    fig = plot_pair_histograms(garment_files["red"], garment_files["blue"], lbp_points=8, lbp_radius=1)
    assert len(fig.axes) == 6
    red, _ = garment_on_white(RED)
    blue, _ = garment_on_white(BLUE)
    corr = compare_histograms(color_histogram(red), color_histogram(blue))
    assert f"{corr:.3f}" in fig.get_suptitle()
    fig_roi = plot_pair_histograms(red, blue, mask="roi", lbp_points=8, lbp_radius=1)
    assert "(ROI)" in fig_roi.axes[0].get_title()

    pairs = pd.DataFrame({"model": ["a", "a", "b", "b"], "metric": ["cosine", "euclidean"] * 2,
                          "rank": 1, "color_corr": [0.9, 0.7, 0.5, 0.3], "lbp_chi2": [0.1, 0.2, 0.3, 0.4]})
    hm = plot_similarity_heatmap(similarity_summary(pairs, by=["model", "metric"]), measure="color_corr")
    texts = sorted(t.get_text() for t in hm.axes[0].texts)
    assert texts == ["0.300", "0.500", "0.700", "0.900"]
    with pytest.raises(ValueError, match="no rows"):
        plot_similarity_heatmap(similarity_summary(pairs, by=["model", "metric"]), measure="hog")
