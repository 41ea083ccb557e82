"""The region-of-interest cropping ablation (notebook 06): does cropping product photos to the product
change what is retrieved, and how much of the colour/texture agreement of retrieved pairs
(:mod:`cbir.color_texture`) is the studio background?

The catalogue and the queries are cropped to their region of interest (:func:`crop_images`,
:func:`cbir.roi.crop_catalog`), features re-extracted on the crops into the same store (a run with
``variant="roi"``, :func:`ensure_roi_features`), the same queries searched in the same catalogue
(:func:`cbir.neighbours.ensure_neighbours`: stored, searched only when missing, so the notebook runs
standalone after notebook 01), and per query the category / sub-category match of the top k and the mean
colour correlation and LBP chi-square of its k pairs compared: *original* = whole-image features,
neighbours and histograms; *cropped* = cropped features and neighbours, histograms inside the ROI mask
(``original_masked``: the original neighbours measured inside the ROI mask, which separates the
background's share of the colour similarity from the change of neighbours). Differences are
``cropped - original`` with a paired bootstrap CI and a sign-flip randomisation p-value over queries
(:func:`cbir.stats.paired_test`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.descriptors import HistogramSet, compare_histograms, image_histograms, pair_similarities
from cbir.evaluate import KEYS, per_query
from cbir.neighbours import ensure_neighbours
from cbir.search import METRICS
from cbir.stats import paired_test

__all__ = [
    "ROI_MEASURES", "ROI_ABLATION_COLUMNS", "COLOUR_COLUMNS", "DEFAULT_ROI_MARGIN", "roi_variant", "crop_images",
    "crop_loader", "ensure_roi_features", "roi_grid_sample", "roi_histograms", "roi_per_query", "paired_summary",
    "changed_queries", "RoiAblation", "roi_ablation", "pick_colour_example",
]

ROI_MEASURES = ("category_match", "subcategory_match", "color_corr", "lbp_chi2")
"""Per-query measures of the ablation: match shares of the top k, mean colour correlation and mean
LBP chi-square of the query's k pairs."""

ROI_ABLATION_COLUMNS = [*KEYS, "measure", "original", "cropped", "difference", "diff_lo", "diff_hi", "p_value",
                        "n_queries", "original_masked"]
"""Columns of :func:`paired_summary` (saved as ``tables/roi_ablation.csv``)."""

COLOUR_COLUMNS = ("base_colour", "baseColour", "colour", "color")
"""Catalogue columns naming a product's base colour, tried in this order by :func:`pick_colour_example`."""

DEFAULT_ROI_MARGIN = 4


# ------------------------------------------------------------------------ crops and features
def roi_variant(margin: int = DEFAULT_ROI_MARGIN) -> str:
    """The store's image variant of ROI crops with ``margin`` pixels: ``"roi"`` for the default margin
    (4), ``"roi_m<margin>"`` otherwise, so crops with another margin never reuse the others' features."""
    return "roi" if int(margin) == DEFAULT_ROI_MARGIN else f"roi_m{int(margin)}"


def crop_images(catalog: Any, out_dir: str | os.PathLike, *, margin: int = DEFAULT_ROI_MARGIN, workers: int = 2,
                progress: bool = True) -> pd.DataFrame:
    """Crop every catalogue image to its ROI (:func:`cbir.roi.crop_catalog`) under
    ``<out_dir>/roi_crops/margin_<margin>/`` (resumes: existing crops are kept). Returns one row per
    readable image: the catalogue columns, ``path`` (the crop), ``source_path`` (the original) and the
    ROI columns (``roi_x0..roi_y1``, ``roi_fallback``, ``roi_code``, ``roi_reason``)."""
    from cbir.roi import crop_catalog

    folder = Path(out_dir) / "roi_crops" / f"margin_{int(margin)}"
    return crop_catalog(catalog, folder, margin=int(margin), workers=workers, progress=progress)


def crop_loader(crops: pd.DataFrame) -> Any:
    """An :func:`cbir.extract.extract_features` loader ``(path, size) -> uint8[size, size, 3]`` that reads
    the crop of each original ``path`` (``crops``: :func:`crop_images` output). The store's catalogue
    keeps the original paths; an image without a crop is a ``missing`` failure."""
    from cbir.images import ImageError, read_image

    missing = [c for c in ("source_path", "path") if c not in crops.columns]
    if missing:
        raise ValueError(f"crops table lacks columns {missing} (use cbir.ablation.crop_images)")
    lookup = dict(zip(crops["source_path"].astype(str), crops["path"].astype(str)))

    def load(path: str, size: int) -> np.ndarray:
        crop = lookup.get(str(path))
        if crop is None:
            raise ImageError(path, "missing", "no region-of-interest crop for this image")
        return read_image(crop, size=size)

    return load


def ensure_roi_features(catalog: Any, crops: pd.DataFrame, *, store: Any, model: Any, layer: str | None = None,
                        pooling: str | None = None, weights: Any = "imagenet", margin: int = DEFAULT_ROI_MARGIN,
                        pca_whiten: bool = False, **kwargs: Any) -> int:
    """Features of the cropped images (:func:`crop_images`) in the run of ``model`` with variant
    :func:`roi_variant` (``margin``), extracting only what is missing; returns the run id (with
    ``pca_whiten``, the whitened derived run, fitted on the searchable crops like the whole-image run).
    Other keyword arguments go to :func:`cbir.extract.extract_features`."""
    from cbir.extract import extract_features, whiten_for_catalog

    run_id = extract_features(catalog, model=model, layer=layer, pooling=pooling, weights=weights, store=store,
                              variant=roi_variant(margin), loader=crop_loader(crops), **kwargs)
    return whiten_for_catalog(store, run_id, catalog) if pca_whiten else run_id


def roi_grid_sample(crops: pd.DataFrame, *, n: int = 18, seed: int = 0) -> pd.DataFrame:
    """Up to ``n`` rows of ``crops`` for an ROI overlay grid: whole-image fallbacks first (at most a third),
    then one image per sub-category in turn (seeded order), sorted by sub-category."""
    if crops.empty:
        return crops
    rng = np.random.default_rng(seed)
    df = crops.assign(_key=rng.random(len(crops)))
    df.attrs = {}  # crop_catalog's attrs hold a DataFrame, which pandas cannot compare in concat
    fb = df.loc[df["roi_fallback"].astype(bool)].sort_values("_key").head(max(1, n // 3))
    rest = df.drop(index=fb.index)
    group = rest["subcategory"] if "subcategory" in rest.columns else pd.Series("all", index=rest.index)
    rest = rest.assign(_turn=rest.groupby(group)["_key"].rank(method="first"))
    ok = rest.sort_values(["_turn", "_key"]).head(n - len(fb))
    picked = pd.concat([fb, ok])
    order = ["subcategory", "_key"] if "subcategory" in picked.columns else ["_key"]
    return picked.sort_values(order).drop(columns=["_key", "_turn"], errors="ignore").reset_index(drop=True)


def roi_histograms(ids: Sequence[str] | np.ndarray, images: Any, *, bins: int = 32, lbp_points: int = 24,
                   lbp_radius: float = 3, roi_margin: int = DEFAULT_ROI_MARGIN, workers: int = 2,
                   progress: bool = True) -> tuple[HistogramSet, HistogramSet]:
    """Colour and LBP histograms of ``ids`` on the whole image and inside the ROI mask
    (:func:`cbir.roi.find_roi` with ``roi_margin``): ``(whole, roi)``. ``images``: a catalogue table
    (``image_id``, ``path``) or anything :func:`cbir.descriptors.image_histograms` reads."""
    kw = dict(bins=bins, lbp_points=lbp_points, lbp_radius=lbp_radius, workers=workers, progress=progress)
    whole = image_histograms(ids, images, mask=None, **kw)
    roi = image_histograms(ids, images, mask="roi", roi_margin=roi_margin, **kw)
    return whole, roi


# -------------------------------------------------------------------------------- the ablation
def _pair_means(nb: pd.DataFrame, hist: HistogramSet, k: int | None) -> pd.DataFrame:
    nb = nb if k is None else nb.loc[nb["rank"] <= k]
    pairs = pair_similarities(nb, histograms=hist)
    return pairs.groupby("query_id", sort=False)[["color_corr", "lbp_chi2"]].mean()


def roi_per_query(neighbours_original: pd.DataFrame, neighbours_cropped: pd.DataFrame, labels: pd.DataFrame, *,
                  histograms_whole: HistogramSet, histograms_roi: HistogramSet, k: int | None = None) -> pd.DataFrame:
    """Per tuple, query and measure (:data:`ROI_MEASURES`): ``original`` and ``cropped`` scores, paired.

    ``neighbours_original`` / ``neighbours_cropped``: the whole-image and the cropped runs' neighbours
    (tuple columns ``model, layer, pooling, metric``; the cropped run's are matched on ``metric``).
    ``category_match`` / ``subcategory_match``: share of the top k with the query's label
    (:func:`cbir.evaluate.per_query`); ``color_corr`` / ``lbp_chi2``: mean over the query's k pairs,
    whole-image histograms for ``original`` and ROI-masked ones for ``cropped``;
    ``original_masked``: the original pairs measured inside the ROI mask (NaN for match measures).
    Only queries present in both runs are kept. Columns ``model, layer, pooling, metric, query_id,
    measure, original, cropped, original_masked``.
    """
    rows = []
    orig = neighbours_original.copy()
    crop = neighbours_cropped.copy()
    for df in (orig, crop):
        for key in KEYS:
            if key not in df.columns:
                df[key] = pd.Series(pd.NA, index=df.index, dtype=object)
    for key, nb_o in orig.groupby(KEYS, dropna=False, sort=False):
        keyd = {c: (None if pd.isna(v) else v) for c, v in zip(KEYS, key)}
        nb_c = crop.loc[crop["metric"] == keyd["metric"]]
        if nb_c.empty:
            raise ValueError(f"no cropped neighbours for metric {keyd['metric']!r}")
        pq_o = per_query(nb_o, labels, k=k).set_index("query_id")
        pq_c = per_query(nb_c.drop(columns=["model", "layer", "pooling"]), labels, k=k).set_index("query_id")
        common = pq_o.index.intersection(pq_c.index, sort=False)
        ct_o, ct_c = _pair_means(nb_o, histograms_whole, k), _pair_means(nb_c, histograms_roi, k)
        ct_m = _pair_means(nb_o, histograms_roi, k)
        for measure in ROI_MEASURES:
            if measure in ("color_corr", "lbp_chi2"):
                o, c, m = ct_o[measure], ct_c[measure], ct_m[measure]
            else:
                o, c, m = pq_o[measure], pq_c[measure], pd.Series(np.nan, index=pq_o.index)
            rows.append(pd.DataFrame({**keyd, "query_id": common, "measure": measure,
                                      "original": o.reindex(common).to_numpy(dtype=float),
                                      "cropped": c.reindex(common).to_numpy(dtype=float),
                                      "original_masked": m.reindex(common).to_numpy(dtype=float)}))
    cols = [*KEYS, "query_id", "measure", "original", "cropped", "original_masked"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def paired_summary(per_query_scores: pd.DataFrame, *, n_boot: int = 2000, n_perm: int = 10000,
                   seed: int = 0) -> pd.DataFrame:
    """Mean ``original`` and ``cropped`` score per tuple and measure, their ``difference`` (cropped -
    original), a paired bootstrap 95% CI of the mean difference (``diff_lo, diff_hi``) and the two-sided
    sign-flip randomisation ``p_value`` over queries (:func:`cbir.stats.paired_test`). Queries with a
    NaN score (an unreadable image) are left out of that measure. Columns :data:`ROI_ABLATION_COLUMNS`."""
    need = [*KEYS, "query_id", "measure", "original", "cropped"]
    missing = [c for c in need if c not in per_query_scores.columns]
    if missing:
        raise ValueError(f"per-query table lacks columns {missing}")
    rows = []
    for key, g in per_query_scores.groupby([*KEYS, "measure"], dropna=False, sort=False):
        g = g.dropna(subset=["original", "cropped"])
        row = {**{c: (None if pd.isna(v) else v) for c, v in zip([*KEYS, "measure"], key)}, "n_queries": len(g)}
        if len(g):
            t = paired_test(g["cropped"].to_numpy(), g["original"].to_numpy(), n_perm=n_perm, n_boot=n_boot,
                            seed=seed)
            row |= {"original": t["mean_b"], "cropped": t["mean_a"], "difference": t["mean_diff"],
                    "diff_lo": t["diff_lo"], "diff_hi": t["diff_hi"], "p_value": t["p_permutation"]}
        masked = g["original_masked"] if "original_masked" in g.columns else pd.Series(dtype=float)
        row["original_masked"] = float(masked.mean()) if masked.notna().any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=ROI_ABLATION_COLUMNS)


@dataclass
class RoiAblation:
    """Result of :func:`roi_ablation`; unpacks as ``per_query, summary = roi_ablation(...)``."""

    per_query: pd.DataFrame
    summary: pd.DataFrame
    neighbours_original: pd.DataFrame
    neighbours_cropped: pd.DataFrame
    histograms_whole: HistogramSet
    histograms_roi: HistogramSet
    params: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.per_query, self.summary))


def roi_ablation(store: Any, catalog: Any, *, run_id: int, roi_run_id: int, metrics: Sequence[str] = METRICS,
                 k: int = 5, p: float = 3.0, same_category: bool = False, bins: int = 32, lbp_points: int = 24,
                 lbp_radius: float = 3, roi_margin: int = DEFAULT_ROI_MARGIN, n_boot: int = 2000,
                 n_perm: int = 10000, seed: int = 0, workers: int = 2, progress: bool = True) -> RoiAblation:
    """Retrieval and colour/texture with and without cropping for one feature run and every metric.

    ``catalog``: a split Catalog (``split_queries``); ``run_id``: its whole-image features; ``roi_run_id``:
    the same model on the ROI crops (:func:`ensure_roi_features`). The queries search the searchable
    catalogue in both runs (:func:`cbir.neighbours.ensure_neighbours`, stored); histograms are computed once per image
    (:func:`roi_histograms`); per-query scores (:func:`roi_per_query`) and the paired summary
    (:func:`paired_summary`) follow.
    """
    df = getattr(catalog, "df", catalog)
    if "split" not in df.columns:
        raise ValueError("the catalogue has no 'split' column: call cbir.catalog.split_queries first")
    queries = df.loc[df["split"] == "query", "image_id"].astype(str).to_numpy()
    searchable = df.loc[df["split"] != "query", "image_id"].astype(str).to_numpy()
    kw = dict(query_ids=queries, catalog_ids=searchable, metrics=metrics, k=k, p=p, same_category=same_category)
    nb_o = ensure_neighbours(store, run_id, **kw)
    nb_c = ensure_neighbours(store, roi_run_id, **kw)
    ids = pd.unique(np.concatenate([nb[c].astype(str).to_numpy() for nb in (nb_o, nb_c)
                                    for c in ("query_id", "neighbour_id")]))
    whole, roi = roi_histograms(ids, df, bins=bins, lbp_points=lbp_points, lbp_radius=lbp_radius,
                                roi_margin=roi_margin, workers=workers, progress=progress)
    pq = roi_per_query(nb_o, nb_c, df, histograms_whole=whole, histograms_roi=roi, k=k)
    summary = paired_summary(pq, n_boot=n_boot, n_perm=n_perm, seed=seed)
    params = {"run_id": int(run_id), "roi_run_id": int(roi_run_id), "k": int(k), "p": float(p),
              "same_category": bool(same_category), "bins": int(bins), "lbp_points": int(lbp_points),
              "lbp_radius": float(lbp_radius), "roi_margin": int(roi_margin), "seed": int(seed)}
    return RoiAblation(pq, summary, nb_o, nb_c, whole, roi, params)


def changed_queries(per_query_scores: pd.DataFrame, *, metric: str, measure: str = "subcategory_match",
                    n: int = 6) -> list[str]:
    """The ``n`` query ids of ``metric`` whose ``measure`` changed most with cropping (largest
    ``|cropped - original|``, ties in table order): the queries worth looking at before and after."""
    rows = per_query_scores.loc[(per_query_scores["metric"] == metric) & (per_query_scores["measure"] == measure)]
    if rows.empty:
        raise KeyError(f"no per-query scores for metric {metric!r} and measure {measure!r}")
    change = (rows["cropped"] - rows["original"]).abs().fillna(-1.0)
    order = np.argsort(-change.to_numpy(), kind="stable")[:n]
    return rows["query_id"].astype(str).to_numpy()[order].tolist()


# ---------------------------------------------------------------------------- colour example
def _mean_rgb(hist: np.ndarray) -> np.ndarray:
    """Mean R, G, B (0..255) from per-channel histograms ``(N, 3, bins)`` (bin centres)."""
    bins = hist.shape[-1]
    centres = (np.arange(bins) + 0.5) * 256.0 / bins
    return (hist.astype(np.float64) * centres).sum(axis=-1)


def pick_colour_example(whole: HistogramSet, roi: HistogramSet, labels: pd.DataFrame, *,
                        colour_column: str | None = None, min_colour_distance: float = 80.0,
                        max_per_group: int = 300, seed: int = 0) -> pd.DataFrame:
    """The pair of same-sub-category fashion items of clearly different colour whose colour correlation
    drops most when measured inside the ROI instead of on the whole photo (the study's example of two
    differently coloured garments that look alike through their white backgrounds).

    Candidates: images in both histogram sets and in ``labels`` (``image_id, subcategory``, optional
    ``is_fashion`` and a colour column: ``colour_column`` or the first of :data:`COLOUR_COLUMNS`), every
    pair within a sub-category (at most ``max_per_group`` images per sub-category, seeded sample).
    "Clearly different": the mean product colours inside the ROI lie at least ``min_colour_distance``
    apart (RGB, 0..255 per channel) and, when a colour column exists, the named colours differ. If no
    pair qualifies the colour-name rule, then the distance rule, is dropped (``criterion`` says which
    held). Returns one row: ``image_a, image_b, subcategory, colour_a, colour_b, colour_distance,
    color_corr_whole, color_corr_roi, drop, criterion``; empty when no sub-category has two images.
    """
    lab = labels.assign(image_id=labels["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id")
    if "subcategory" not in lab.columns:
        raise ValueError("labels needs a 'subcategory' column")
    if colour_column is None:
        colour_column = next((c for c in COLOUR_COLUMNS if c in lab.columns), None)
    elif colour_column not in lab.columns:
        raise ValueError(f"labels has no colour column {colour_column!r}")
    ids = np.intersect1d(np.intersect1d(whole.ids, roi.ids), lab.index.to_numpy(dtype=str))
    readable = np.isfinite(whole.color[whole.rows(ids)]).all(axis=(1, 2))
    ids = ids[readable & np.isfinite(roi.color[roi.rows(ids)]).all(axis=(1, 2))]
    if "is_fashion" in lab.columns:
        ids = ids[lab.loc[ids, "is_fashion"].fillna(True).astype(bool).to_numpy()]
    rng = np.random.default_rng(seed)
    groups = pd.Series(ids).groupby(lab.loc[ids, "subcategory"].astype(str).to_numpy())
    a_list, b_list = [], []
    for _, members in groups:
        m = members.to_numpy()
        if len(m) > max_per_group:
            m = np.sort(rng.choice(m, size=max_per_group, replace=False))
        i, j = np.triu_indices(len(m), 1)
        a_list.append(m[i])
        b_list.append(m[j])
    cols = ["image_a", "image_b", "subcategory", "colour_a", "colour_b", "colour_distance", "color_corr_whole",
            "color_corr_roi", "drop", "criterion"]
    if not a_list or sum(len(a) for a in a_list) == 0:
        return pd.DataFrame(columns=cols)
    a, b = np.concatenate(a_list), np.concatenate(b_list)
    wa, wb, ra, rb = whole.rows(a), whole.rows(b), roi.rows(a), roi.rows(b)
    corr_w = np.asarray(compare_histograms(whole.color[wa], whole.color[wb]), dtype=float).reshape(-1)
    corr_r = np.asarray(compare_histograms(roi.color[ra], roi.color[rb]), dtype=float).reshape(-1)
    dist = np.linalg.norm(_mean_rgb(roi.color[ra]) - _mean_rgb(roi.color[rb]), axis=1)
    drop = corr_w - corr_r
    far = dist >= min_colour_distance
    if colour_column is not None:
        ca = lab.loc[a, colour_column].astype("string").str.lower().to_numpy(dtype=object, na_value=None)
        cb = lab.loc[b, colour_column].astype("string").str.lower().to_numpy(dtype=object, na_value=None)
        named = np.array([x is not None and y is not None and x != y for x, y in zip(ca, cb)], dtype=bool)
    else:
        ca = cb = np.full(len(a), None, dtype=object)
        named = np.zeros(len(a), dtype=bool)
    rules = []
    if colour_column is not None:
        rules.append((named & far, f"different {colour_column} and mean ROI colours >= {min_colour_distance:g} apart"))
    rules += [(far, f"mean ROI colours >= {min_colour_distance:g} apart"), (np.ones(len(a), bool), "largest drop")]
    for mask, criterion in rules:
        if mask.any():
            best = np.flatnonzero(mask)[np.argmax(drop[mask])]
            break
    return pd.DataFrame([{"image_a": a[best], "image_b": b[best], "subcategory": lab.loc[a[best], "subcategory"],
                          "colour_a": ca[best], "colour_b": cb[best], "colour_distance": float(dist[best]),
                          "color_corr_whole": float(corr_w[best]), "color_corr_roi": float(corr_r[best]),
                          "drop": float(drop[best]), "criterion": criterion}], columns=cols)
