"""Stored neighbour sets of feature runs: search a run with each measure and save its neighbours
(:func:`run_search`), reuse the sets already stored with the same settings (:func:`ensure_neighbours`),
and read them back with their run's columns (:func:`neighbours_from_store`, :func:`stored_neighbours`).

The search itself is :func:`cbir.search.search` (arrays in, a tidy DataFrame out); the store is
:class:`cbir.store.FeatureStore`. Evaluation (:mod:`cbir.evaluate`) reads what this module returns.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cbir.measures import MEASURES, get_measure
from cbir.runs import RUN_COLUMNS, order_by_run_and_metric, run_table
from cbir.search import METRICS, NEIGHBOUR_COLUMNS, search

__all__ = ["STORED_NEIGHBOUR_COLUMNS", "run_search", "ensure_neighbours", "neighbours_from_store",
           "stored_neighbours"]

STORED_NEIGHBOUR_COLUMNS = ["run_id", "model", "layer", "pooling", "metric", *NEIGHBOUR_COLUMNS]
"""Columns of :func:`neighbours_from_store`: the run, its (model, layer, pooling), the measure and the
:func:`cbir.search.search` columns."""


def run_search(store: Any, run_id: int, query_ids: Sequence[str] | np.ndarray,
               catalog_ids: Sequence[str] | np.ndarray | None = None, metrics: Sequence[str] = METRICS,
               k: int = 5, *, p: float = 3.0, same_category: bool = False, exclude_self: bool = True,
               exclude_duplicates: bool = True, engine: str = "auto", tag: str = "",
               save: bool = True) -> pd.DataFrame:
    """Search a stored run with each measure and save each neighbour set in the store.

    Reads vectors with ``store.features(run_id, ids)`` (``catalog_ids`` default: every vector of the run),
    categories and duplicate groups from the run's own labels (``store.run_labels``), runs :func:`cbir.search.search` per measure and
    ``store.put_neighbours(run_id, metric, df, tag=tag, params=...)``. Returns all neighbour sets:
    ``run_id, metric`` + the :func:`cbir.search.search` columns.
    """
    query_ids = np.asarray(query_ids).astype(str)
    if catalog_ids is None:
        catalog_ids, Xc = store.features(run_id)
    else:
        catalog_ids, Xc = store.features(run_id, np.asarray(catalog_ids).astype(str))
    _, Xq = store.features(run_id, query_ids)
    labels = store.run_labels(run_id)
    labels = labels.set_index(labels["image_id"].astype(str))
    categories = labels["category"] if same_category else None
    dups = labels["dup_group"] if (exclude_duplicates and "dup_group" in labels.columns) else None
    params = {"k": int(k), "p": float(p), "same_category": bool(same_category), "exclude_self": bool(exclude_self),
              "exclude_duplicates": bool(exclude_duplicates), "n_queries": int(len(query_ids)),
              "n_catalog": int(len(catalog_ids))}
    frames = []
    for metric in metrics:
        df = search(catalog_ids, Xc, query_ids, Xq, metric=metric, k=k, p=p, same_category=same_category,
                    categories=categories, exclude_self=exclude_self, exclude_duplicates=exclude_duplicates,
                    dup_groups=dups, engine=engine)
        if save:
            store.put_neighbours(run_id, metric, df, tag=tag,
                                 params={**params, "p": float(p) if "p" in get_measure(metric).params else None})
        frames.append(df.assign(run_id=int(run_id), metric=metric))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=NEIGHBOUR_COLUMNS)
    return out[["run_id", "metric", *NEIGHBOUR_COLUMNS]] if frames else out


def _set_matches(store: Any, run_id: int, metric: str, tag: str, row: pd.Series, query_ids: np.ndarray,
                 catalog_ids: np.ndarray, k: int, p: float, same_category: bool) -> bool:
    """True when the stored set was searched with these settings, for these queries, in this catalogue."""
    params = row["params"] if isinstance(row["params"], Mapping) else {}
    if (params.get("k") != k or bool(params.get("same_category")) != bool(same_category)
            or params.get("n_catalog") != len(catalog_ids) or params.get("n_queries") != len(query_ids)):
        return False
    if "p" in get_measure(metric).params and params.get("p") is not None and float(params["p"]) != float(p):
        return False
    stored = store.neighbours(int(run_id), metric, tag=tag)
    return bool(np.isin(stored["query_id"].unique(), query_ids).all()
                and np.isin(stored["neighbour_id"].unique(), catalog_ids).all())


def ensure_neighbours(store: Any, run_id: int, *, query_ids: Sequence[str] | np.ndarray,
                      catalog_ids: Sequence[str] | np.ndarray, metrics: Sequence[str] = METRICS, k: int = 5,
                      p: float = 3.0, same_category: bool = False, tag: str = "") -> pd.DataFrame:
    """The run's neighbour sets for ``metrics``, searching only those missing from the store.

    ``query_ids`` search ``catalog_ids`` (e.g. ``cat.queries().ids`` and ``cat.searchable().ids``);
    ids without a vector in the run (extraction failures) are left out. A stored set is reused when
    it has the same ``k``, ``same_category``, ``p`` (minkowski), number of catalogue images and
    queries; otherwise it is searched again (:func:`run_search`) and replaced.
    Returns :func:`neighbours_from_store` rows (:data:`STORED_NEIGHBOUR_COLUMNS`), measures in the order given.
    """
    metrics = list(metrics)
    bad = [m for m in metrics if m not in MEASURES]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; expected some of {tuple(MEASURES)}")
    q = store.ids_with_vectors(int(run_id), query_ids)
    c = store.ids_with_vectors(int(run_id), catalog_ids)
    if len(q) == 0 or len(c) == 0:
        raise ValueError(f"run {run_id} has vectors for {len(q)} of {len(np.asarray(query_ids))} queries and "
                         f"{len(c)} of {len(np.asarray(catalog_ids))} catalogue images: nothing to search")
    sets = store.neighbour_sets()
    sets = sets.loc[(sets["run_id"] == int(run_id)) & (sets["tag"] == tag)].set_index("metric")
    todo = [m for m in metrics if m not in sets.index
            or not _set_matches(store, run_id, m, tag, sets.loc[m], q, c, int(k), p, same_category)]
    if todo:
        run_search(store, int(run_id), q, catalog_ids=c, metrics=todo, k=int(k), p=float(p),
                   same_category=same_category, tag=tag, save=True)
    nb = neighbours_from_store(store, [int(run_id)], metrics, tag=tag)
    order = {m: i for i, m in enumerate(metrics)}
    return nb.sort_values("metric", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def neighbours_from_store(store: Any, run_ids: Sequence[int] | None = None, metrics: Sequence[str] | None = None,
                          *, tag: str = "") -> pd.DataFrame:
    """Every stored neighbour set (optionally of ``run_ids`` / ``metrics``) in one frame with the tuple
    columns :data:`STORED_NEIGHBOUR_COLUMNS`."""
    sets = store.neighbour_sets()
    sets = sets.loc[sets["tag"] == tag]
    if run_ids is not None:
        sets = sets.loc[sets["run_id"].isin([int(r) for r in run_ids])]
    if metrics is not None:
        sets = sets.loc[sets["metric"].isin(list(metrics))]
    frames = []
    for run_id, metric in zip(sets["run_id"], sets["metric"]):
        run = store.run(int(run_id))
        df = store.neighbours(int(run_id), metric, tag=tag)
        frames.append(df.assign(run_id=int(run_id), model=run.get("model"), layer=run.get("layer"),
                                pooling=run.get("pooling"), metric=metric))
    if not frames:
        return pd.DataFrame(columns=STORED_NEIGHBOUR_COLUMNS)
    return pd.concat(frames, ignore_index=True)[STORED_NEIGHBOUR_COLUMNS]


def stored_neighbours(store: Any, *, variant: str | None = "original", k: int | None = None,
                      tag: str = "", run_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Every stored neighbour set (``tag``) of runs of image ``variant`` (None: every variant), ranks up to
    ``k`` (None: all), as :func:`neighbours_from_store` rows with the run's
    :data:`cbir.runs.RUN_COLUMNS` first (``features``: the run's unique label, e.g.
    ``"vgg19 / block5_pool / gap (random init)"``); runs in store order, measures in
    :data:`cbir.search.METRICS` order. ``run_ids``: only these runs."""
    runs = run_table(store)
    image_variant = runs["variant"].astype(str).str.split("+").str[0]  # "original+pcaw" shows original images
    keep = runs if variant is None else runs.loc[image_variant == variant]
    if run_ids is not None:
        keep = keep.loc[keep["run_id"].isin([int(r) for r in run_ids])]
    nb = neighbours_from_store(store, keep["run_id"].tolist(), tag=tag)
    if k is not None:
        nb = nb.loc[nb["rank"] <= int(k)]
    nb = order_by_run_and_metric(nb).reset_index(drop=True)
    info = keep.set_index("run_id")
    extra = [c for c in RUN_COLUMNS if c not in nb.columns]
    nb = nb.assign(**{c: nb["run_id"].map(info[c]).astype(object) for c in extra})
    return nb[[*RUN_COLUMNS, *(c for c in nb.columns if c not in RUN_COLUMNS)]]
