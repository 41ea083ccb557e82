"""Colour and texture of retrieved pairs (notebook 05): how alike a query and its neighbours look.

Per feature run and measure (:data:`cbir.runs.TUPLE_COLUMNS`: two runs of one model with other weights or
image variants stay apart), the colour correlation (OpenCV ``compareHist`` correlation of the RGB
histograms, mean over channels; 1 = identical) and the LBP chi-square distance (0 = identical texture)
between each query and each of its neighbours, from :func:`cbir.descriptors.pair_similarities` of the
stored neighbours (:func:`cbir.neighbours.stored_neighbours`). The reference study found this
similarity inflated by the white backgrounds of product photos: :mod:`cbir.ablation` measures how much.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from cbir.runs import RUN_COLUMNS, TUPLE_COLUMNS, feature_label

__all__ = ["COLOR_TEXTURE_COLUMNS", "color_texture_table", "color_texture_by_rank", "example_pairs"]

COLOR_TEXTURE_COLUMNS = [*RUN_COLUMNS, "metric", "n_pairs", "color_corr_mean", "color_corr_min", "color_corr_max",
                         "lbp_chi2_mean", "lbp_chi2_min", "lbp_chi2_max"]
"""Columns of :func:`color_texture_table` (saved as ``tables/color_texture.csv``; across runs
``summary_color_texture``)."""


def _keyed_groups(pairs: pd.DataFrame, extra: Sequence[str] = ()) -> Any:
    """``pairs`` grouped per :data:`cbir.runs.TUPLE_COLUMNS` (+ ``extra``); missing run columns are added empty
    (``features`` from :func:`feature_label`), so a table without ``run_id`` groups by model and measure."""
    missing = [c for c in ("color_corr", "lbp_chi2", "metric", *extra) if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table lacks columns {missing} (use cbir.descriptors.pair_similarities)")
    df = pairs.copy()
    if "features" not in df.columns:
        df["features"] = feature_label(df)
    for key in TUPLE_COLUMNS:
        if key not in df.columns:
            df[key] = pd.Series(pd.NA, index=df.index, dtype=object)
    return df.groupby([*TUPLE_COLUMNS, *extra], dropna=False, sort=False)


def _stats(grouped: Any) -> pd.DataFrame:
    out = grouped.agg(n_pairs=("color_corr", "count"),
                      color_corr_mean=("color_corr", "mean"), color_corr_min=("color_corr", "min"),
                      color_corr_max=("color_corr", "max"), lbp_chi2_mean=("lbp_chi2", "mean"),
                      lbp_chi2_min=("lbp_chi2", "min"), lbp_chi2_max=("lbp_chi2", "max")).reset_index()
    out["n_pairs"] = out["n_pairs"].astype("int64")
    return out


def color_texture_table(pairs: pd.DataFrame, *, decimals: int | None = None) -> pd.DataFrame:
    """Colour correlation and LBP chi-square of the (query, neighbour) pairs per feature run and measure
    (the study's Tables 11 and 13; one row per :data:`cbir.runs.TUPLE_COLUMNS`, in order of appearance).

    ``pairs``: :func:`cbir.descriptors.pair_similarities` output of :func:`cbir.neighbours.stored_neighbours`
    (``color_corr``, ``lbp_chi2``, ``metric`` and the run columns; those missing are left empty, so rows without
    ``run_id`` group by model, layer, pooling and weights). Columns :data:`COLOR_TEXTURE_COLUMNS`; ``n_pairs`` counts
    pairs with both images readable (NaN pairs are left out of the statistics).
    """
    out = _stats(_keyed_groups(pairs))[COLOR_TEXTURE_COLUMNS]
    return out.round(decimals) if decimals is not None else out


def color_texture_by_rank(pairs: pd.DataFrame, *, decimals: int | None = None) -> pd.DataFrame:
    """Like :func:`color_texture_table` per run, measure and neighbour ``rank`` (the study's Tables 12 and
    14): run and measure in order of appearance, then rank."""
    out = _stats(_keyed_groups(pairs, ["rank"]))
    group = out.groupby(TUPLE_COLUMNS, dropna=False, sort=False).ngroup()
    out = out.assign(_g=group.to_numpy()).sort_values(["_g", "rank"], kind="stable").reset_index(drop=True)
    out = out[[*TUPLE_COLUMNS, "rank", *COLOR_TEXTURE_COLUMNS[len(TUPLE_COLUMNS):]]]
    return out.round(decimals) if decimals is not None else out


def example_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Four instructive (query, neighbour) pairs: the most and least similar in colour (highest / lowest
    ``color_corr``) and in texture (lowest / highest ``lbp_chi2``); one row each with ``example`` naming it.
    Pairs with NaN values are skipped."""
    ok = pairs.dropna(subset=["color_corr", "lbp_chi2"])
    if ok.empty:
        raise ValueError("no pair with both colour and texture values")
    picks = [("most similar colour", ok["color_corr"].idxmax()), ("least similar colour", ok["color_corr"].idxmin()),
             ("most similar texture", ok["lbp_chi2"].idxmin()), ("least similar texture", ok["lbp_chi2"].idxmax())]
    out = ok.loc[[i for _, i in picks]].reset_index(drop=True)
    out.insert(0, "example", [name for name, _ in picks])
    return out
