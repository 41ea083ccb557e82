"""Retrieval evaluation: match rates with confidence intervals, paired tests, per-rank and per-class
tables, confusion, precision-recall, mAP@k, the recall of approximate search and the study's
cross-validation. Pure functions on DataFrames and arrays: nothing here reads or writes the store
(stored neighbour sets come from :mod:`cbir.neighbours`, the statistics from :mod:`cbir.stats`).

Inputs are tidy: a *neighbours* DataFrame (``query_id, rank`` 1-based, ``neighbour_id, distance`` as
written by :func:`cbir.search.search` / ``FeatureStore.neighbours``) with optional tuple columns
``model, layer, pooling, metric`` (see :func:`cbir.neighbours.neighbours_from_store`), and a *labels* DataFrame
``image_id, category, subcategory`` (a catalogue table). Every table has one row per tuple
(model, layer, pooling, metric) and the columns named in each function.

Definitions (per query, over its top-k neighbours):

* *match* (the study's headline): the share of the k neighbours with the query's label
  (category or sub-category); averaged over queries. A query with fewer than k neighbours (a small
  category under ``same_category``) is scored over the neighbours it has.
* *hit*: 1 if any of the top k has the query's label.
* relevance for precision / recall / AP: same label as the query. The number of relevant items
  ``R`` counts the *searchable* images (default: every image in ``labels``) with the query's label,
  the query itself excluded.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cbir.runs import RUN_COLUMNS, TUPLE_COLUMNS, feature_label
from cbir.postprocess import get_postprocess, whitening_components
from cbir.search import METRICS, ApproximateIndex, knn, recall_at_k, search
from cbir.stats import bootstrap_ci, holm, paired_test

__all__ = [
    "KEYS", "MATCH_COLUMNS", "LEVELS", "select", "per_query", "match_table", "best_tuple", "compare",
    "paired_tests", "match_by_rank", "match_by_subcategory", "confusion", "precision_recall", "precision_at_k",
    "average_precision_at_k", "map_at_k", "ranking_depth", "ranking_table", "approximate_recall",
    "whiten_for_fold", "cross_validate", "PAIRED_TEST_COLUMNS",
]

KEYS = ["model", "layer", "pooling", "metric"]
"""Columns naming a tuple; missing ones are added as NA."""
LEVELS = ("category", "subcategory")
MATCH_COLUMNS = ["model", "layer", "pooling", "metric", "k", "n_queries",
                 "category_match", "category_match_lo", "category_match_hi",
                 "subcategory_match", "subcategory_match_lo", "subcategory_match_hi"]
"""The columns of :func:`match_table` (saved as ``tables/category_match.csv``)."""
PAIRED_TEST_COLUMNS = [*(f"{side}_{key}" for side in "ab" for key in KEYS), "n", "mean_a", "mean_b", "mean_diff",
                       "diff_lo", "diff_hi", "p_permutation", "p_wilcoxon", "p_holm"]
"""The columns of :func:`paired_tests` (also when there is no pair: one measure only)."""


# ------------------------------------------------------------------------------------------ helpers
def _label_index(labels: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("image_id", *LEVELS) if c not in labels.columns]
    if missing:
        raise ValueError(f"labels needs columns image_id, category, subcategory; missing {missing}")
    lab = labels[["image_id", *LEVELS]].copy()
    lab["image_id"] = lab["image_id"].astype(str)
    if lab["image_id"].duplicated().any():
        dup = lab.loc[lab["image_id"].duplicated(), "image_id"].iloc[:5].tolist()
        raise ValueError(f"labels has duplicate image ids, e.g. {dup}")
    return lab.set_index("image_id")


def _with_keys(neighbours: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("query_id", "rank", "neighbour_id") if c not in neighbours.columns]
    if missing:
        raise ValueError(f"neighbours needs columns query_id, rank, neighbour_id; missing {missing}")
    nb = neighbours.copy()
    for key in KEYS:
        if key not in nb.columns:
            nb[key] = pd.Series(pd.NA, index=nb.index, dtype=object)
    nb["query_id"] = nb["query_id"].astype(str)
    nb["neighbour_id"] = nb["neighbour_id"].astype(str)
    return nb


def _labelled(neighbours: pd.DataFrame, labels: pd.DataFrame, k: int | None) -> pd.DataFrame:
    """Neighbours (rank <= k) with the query's and the neighbour's labels and match flags."""
    nb = _with_keys(neighbours)
    if k is not None:
        nb = nb.loc[nb["rank"] <= k]
    lab = _label_index(labels)
    for side, col in (("q", "query_id"), ("n", "neighbour_id")):
        got = lab.reindex(nb[col].to_numpy())
        unknown = nb.loc[got["category"].isna().to_numpy(), col].unique()
        if len(unknown):
            raise KeyError(f"labels has no category for {len(unknown)} {col}(s), e.g. {list(unknown[:5])}")
        for level in LEVELS:
            nb[f"{side}_{level}"] = got[level].to_numpy()
    for level in LEVELS:
        nb[f"{level}_ok"] = (nb[f"q_{level}"] == nb[f"n_{level}"]).to_numpy(dtype=bool)
    return nb


def _groups(df: pd.DataFrame) -> Iterable[tuple[dict[str, Any], pd.DataFrame]]:
    """(key dict, rows) per tuple, in order of first appearance; missing key values as None."""
    for key, rows in df.groupby(KEYS, dropna=False, sort=False):
        yield _keyed(dict(zip(KEYS, key))), rows


def select(neighbours: pd.DataFrame, **keys: Any) -> pd.DataFrame:
    """Rows whose tuple columns equal the given values, e.g. ``select(nb, model="vgg19", metric="cosine")``."""
    mask = np.ones(len(neighbours), dtype=bool)
    for key, value in keys.items():
        if key not in neighbours.columns:
            raise KeyError(f"no column {key!r} to select on (columns: {list(neighbours.columns)})")
        col = neighbours[key]
        mask &= (col.isna() if value is None else col == value).to_numpy(dtype=bool)
    return neighbours.loc[mask]


def _one_tuple(df: pd.DataFrame, what: str) -> None:
    n = len(df[KEYS].drop_duplicates())
    if n > 1:
        raise ValueError(f"{what} needs neighbours of one (model, layer, pooling, metric) tuple, got {n}; "
                         f"filter first with cbir.evaluate.select(...)")


# ------------------------------------------------------------------------------------- match rates
def per_query(neighbours: pd.DataFrame, labels: pd.DataFrame, *, k: int | None = None) -> pd.DataFrame:
    """Per tuple and query: ``query_category, query_subcategory, n_neighbours, category_match,
    subcategory_match`` (share of the top k with the query's label) and ``category_hit, subcategory_hit``."""
    nb = _labelled(neighbours, labels, k)
    out = nb.groupby([*KEYS, "query_id"], dropna=False, sort=False).agg(
        query_category=("q_category", "first"), query_subcategory=("q_subcategory", "first"),
        n_neighbours=("rank", "size"), category_match=("category_ok", "mean"),
        subcategory_match=("subcategory_ok", "mean"), category_hit=("category_ok", "max"),
        subcategory_hit=("subcategory_ok", "max")).reset_index()
    return out.astype({"category_hit": float, "subcategory_hit": float, "n_neighbours": "int64"})


def match_table(neighbours: pd.DataFrame, labels: pd.DataFrame, *, k: int | None = None, n_boot: int = 2000,
                seed: int = 0, ci: float = 0.95, hits: bool = False) -> pd.DataFrame:
    """Category and sub-category match of the top k per tuple, with bootstrap CIs over queries.

    Columns :data:`MATCH_COLUMNS` (``k`` = the cut-off used: ``k`` or the largest rank present), plus with
    ``hits=True`` ``category_hit[_lo, _hi], subcategory_hit[_lo, _hi]`` (share of queries with any match).
    """
    pq = per_query(neighbours, labels, k=k)
    nb = _with_keys(neighbours)
    scores = ["category_match", "subcategory_match"] + (["category_hit", "subcategory_hit"] if hits else [])
    rows = []
    for key, rows_q in _groups(pq):
        max_rank = select(nb, **key)["rank"].max() if k is None else k
        row = {**key, "k": int(max_rank), "n_queries": len(rows_q)}
        for score in scores:
            values = rows_q[score].to_numpy()
            row[score] = float(values.mean())
            row[f"{score}_lo"], row[f"{score}_hi"] = bootstrap_ci(values, n_boot=n_boot, seed=seed, ci=ci)
        rows.append(row)
    columns = MATCH_COLUMNS + [f"{s}{x}" for s in scores[2:] for x in ("", "_lo", "_hi")]
    return pd.DataFrame(rows, columns=columns)


def best_tuple(neighbours: pd.DataFrame, labels: pd.DataFrame, *, k: int | None = None,
               by: Sequence[str] = ("subcategory_match", "category_match")) -> dict[str, Any]:
    """The neighbour set (feature run and measure) with the highest mean per-query match (``by`` in order,
    ties to the first set in the table), with its scores: ``{run_id, features, ..., metric, ...by}``
    (the :data:`cbir.runs.TUPLE_COLUMNS` present in ``neighbours``; without ``run_id`` sets are told apart by
    model, layer, pooling and metric)."""
    if "run_id" in neighbours.columns:
        pq = pd.concat([per_query(g, labels, k=k).assign(run_id=rid)
                        for rid, g in neighbours.groupby("run_id", sort=False)], ignore_index=True)
        keys = ["run_id", *KEYS]
    else:
        pq, keys = per_query(neighbours, labels, k=k), KEYS
    means = pq.groupby(keys, dropna=False, sort=False)[list(by)].mean().reset_index()
    means["_order"] = np.arange(len(means))
    top = means.sort_values([*by, "_order"], ascending=[False] * len(by) + [True], kind="stable").iloc[0]
    best = {c: (None if pd.isna(top[c]) else top[c]) for c in keys}
    if "run_id" in best:
        best["run_id"] = int(best["run_id"])
        run = neighbours.loc[neighbours["run_id"] == best["run_id"]]
        if "features" not in run.columns:
            run = run.assign(features=feature_label(neighbours).loc[run.index])
        first = run.iloc[0]
        best |= {c: (None if pd.isna(first[c]) else first[c]) for c in RUN_COLUMNS if c in run.columns}
    cols = [c for c in TUPLE_COLUMNS if c in best]
    return {c: best[c] for c in cols} | {s: float(top[s]) for s in by}


def _scores_of(scores: pd.DataFrame, key: Mapping[str, Any], score: str) -> pd.Series:
    rows = select(scores, **key)
    _one_tuple(rows, f"tuple {dict(key)}")
    if rows.empty:
        raise KeyError(f"no per-query scores for {dict(key)}")
    return rows.set_index("query_id")[score]


def compare(scores: pd.DataFrame, a: Mapping[str, Any], b: Mapping[str, Any], *, score: str = "category_match",
            n_perm: int = 10000, seed: int = 0) -> dict[str, Any]:
    """:func:`paired_test` of tuple ``a`` against tuple ``b`` on their common queries.

    ``scores`` is :func:`per_query` output; ``a``/``b`` select one tuple each, e.g.
    ``compare(pq, dict(model="vgg19", metric="cosine"), dict(model="resnet50", metric="euclidean"))``.
    """
    sa, sb = _scores_of(scores, a, score), _scores_of(scores, b, score)
    common = sa.index.intersection(sb.index)
    if len(common) == 0:
        raise ValueError(f"tuples {dict(a)} and {dict(b)} share no query")
    return {"a": dict(a), "b": dict(b), "score": score,
            **paired_test(sa.loc[common].to_numpy(), sb.loc[common].to_numpy(), n_perm=n_perm, seed=seed)}


def paired_tests(scores: pd.DataFrame, *, score: str = "category_match", baseline: Mapping[str, Any] | None = None,
                 n_perm: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Paired tests between tuples of :func:`per_query` output: every tuple against ``baseline`` (one tuple),
    or every pair when ``baseline`` is None. Columns ``a_<key>, b_<key>`` for the keys, the
    :func:`paired_test` fields and ``p_holm`` (Holm-adjusted ``p_permutation`` over the rows): always
    :data:`PAIRED_TEST_COLUMNS`, no rows when there is no pair (a single tuple)."""
    tuples = [_keyed(t) for t in scores[KEYS].drop_duplicates().to_dict(orient="records")]
    if baseline is not None:
        base = [_keyed(t) for t in select(scores, **baseline)[KEYS].drop_duplicates().to_dict(orient="records")]
        if len(base) != 1:
            raise ValueError(f"baseline {dict(baseline)} matches {len(base)} tuples, need exactly 1")
        pairs = [(t, base[0]) for t in tuples if t != base[0]]
    else:
        pairs = [(tuples[i], tuples[j]) for i in range(len(tuples)) for j in range(i + 1, len(tuples))]
    rows = []
    for ta, tb in pairs:
        res = compare(scores, ta, tb, score=score, n_perm=n_perm, seed=seed)
        rows.append({**{f"a_{c}": ta[c] for c in KEYS}, **{f"b_{c}": tb[c] for c in KEYS},
                     **{c: v for c, v in res.items() if c not in ("a", "b", "score")}})
    out = pd.DataFrame(rows, columns=PAIRED_TEST_COLUMNS[:-1])
    out["p_holm"] = holm(out["p_permutation"].to_numpy(dtype=float))
    return out


def _keyed(t: Mapping[str, Any]) -> dict[str, Any]:
    return {c: (None if pd.isna(v) else v) for c, v in t.items()}


# ---------------------------------------------------------------------------------- breakdown tables
def match_by_rank(neighbours: pd.DataFrame, labels: pd.DataFrame, *, k: int | None = None) -> pd.DataFrame:
    """Per tuple and neighbour rank (the study's Table 9): ``n_cases, category_correct, category_match,
    subcategory_correct, subcategory_match, mean_distance`` (match = correct / cases)."""
    nb = _labelled(neighbours, labels, k)
    if "distance" not in nb.columns:
        nb["distance"] = np.nan
    out = nb.groupby([*KEYS, "rank"], dropna=False, sort=False).agg(
        n_cases=("query_id", "size"), category_correct=("category_ok", "sum"),
        subcategory_correct=("subcategory_ok", "sum"), mean_distance=("distance", "mean")).reset_index()
    out["category_match"] = out["category_correct"] / out["n_cases"]
    out["subcategory_match"] = out["subcategory_correct"] / out["n_cases"]
    cols = [*KEYS, "rank", "n_cases", "category_correct", "category_match", "subcategory_correct",
            "subcategory_match", "mean_distance"]
    return out[cols].sort_values([*KEYS, "rank"], kind="stable", na_position="first").reset_index(drop=True)


def match_by_subcategory(neighbours: pd.DataFrame, labels: pd.DataFrame, *, k: int | None = None) -> pd.DataFrame:
    """Per tuple and the query's (category, subcategory) (the study's Table 8): ``n_queries,
    category_match, subcategory_match, category_hit, subcategory_hit`` (means over those queries)."""
    pq = per_query(neighbours, labels, k=k)
    out = pq.groupby([*KEYS, "query_category", "query_subcategory"], dropna=False, sort=False).agg(
        n_queries=("query_id", "size"), category_match=("category_match", "mean"),
        subcategory_match=("subcategory_match", "mean"), category_hit=("category_hit", "mean"),
        subcategory_hit=("subcategory_hit", "mean")).reset_index()
    out = out.rename(columns={"query_category": "category", "query_subcategory": "subcategory"})
    return out.sort_values([*KEYS, "category", "subcategory"], kind="stable").reset_index(drop=True)


def confusion(neighbours: pd.DataFrame, labels: pd.DataFrame, *, level: str = "subcategory", k: int | None = None,
              normalize: bool = True) -> pd.DataFrame:
    """Query label (rows) x neighbour label (columns) over the top k of ONE tuple; each row sums to 1
    with ``normalize`` (else counts). Labels are sorted; every label seen on either side is a row and a column."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    nb = _labelled(neighbours, labels, k)
    _one_tuple(nb, "confusion")
    names = sorted(set(nb[f"q_{level}"]) | set(nb[f"n_{level}"]))
    table = pd.crosstab(nb[f"q_{level}"], nb[f"n_{level}"]).reindex(index=names, columns=names, fill_value=0)
    table.index.name, table.columns.name = f"query_{level}", f"neighbour_{level}"
    if normalize:
        sums = table.sum(axis=1).replace(0, np.nan)
        table = table.div(sums, axis=0).fillna(0.0)
    return table


# ------------------------------------------------------------------------------- ranking measures
def _relevance(nb: pd.DataFrame, labels: pd.DataFrame, level: str, searchable: Sequence[str] | None,
               depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one tuple's labelled rows: (query ids, rel (nq, depth) bool, R (nq,) relevant searchable items)."""
    qids, q_pos = np.unique(nb["query_id"].to_numpy(dtype=str), return_inverse=True)
    rel = np.zeros((len(qids), depth), dtype=bool)
    rank = nb["rank"].to_numpy(dtype=np.int64)
    inside = rank <= depth
    rel[q_pos[inside], rank[inside] - 1] = nb[f"{level}_ok"].to_numpy(dtype=bool)[inside]
    lab = _label_index(labels)
    pool = lab.index.to_numpy(dtype=str) if searchable is None else np.asarray(searchable).astype(str)
    outside = np.setdiff1d(nb["neighbour_id"].to_numpy(dtype=str), pool)
    if len(outside):
        raise ValueError(f"{len(outside)} neighbour id(s) not in the searchable set, e.g. {outside[:5].tolist()}")
    counts = lab[level].reindex(pool).value_counts()
    q_label = lab[level].reindex(qids)
    R = q_label.map(counts).fillna(0).to_numpy(dtype=np.int64) - np.isin(qids, pool)
    return qids, rel, np.maximum(R, 0)


def _levels(level: str | Sequence[str]) -> list[str]:
    levels = [level] if isinstance(level, str) else list(level)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"level must be in {LEVELS}, got {bad}")
    return levels


def precision_recall(neighbours: pd.DataFrame, labels: pd.DataFrame, *,
                     level: str | Sequence[str] = LEVELS, searchable: Sequence[str] | None = None,
                     k: int | None = None) -> pd.DataFrame:
    """Precision and recall at every cut-off 1..K of the returned lists, averaged over queries.

    Computed from the top-K *returned* neighbours (K = ``k`` or the largest rank present), so the curve
    stops at recall@K; pass neighbours of the full catalogue (search with k = catalogue size) for the
    complete curve. ``recall@j = relevant in top j / R`` with R the relevant searchable items (see module
    doc; queries with R = 0 are left out of recall). Columns: keys, ``level, k, precision, recall,
    n_queries``.
    """
    rows = []
    nb = _labelled(neighbours, labels, k)
    for lv in _levels(level):
        for key, g in _groups(nb):
            depth = int(k if k is not None else g["rank"].max())
            _, rel, R = _relevance(g, labels, lv, searchable, depth)
            cum = np.cumsum(rel, axis=1)
            cut = np.arange(1, depth + 1)
            precision = (cum / cut).mean(axis=0)
            has = R > 0
            recall = (cum[has] / R[has, None]).mean(axis=0) if has.any() else np.full(depth, np.nan)
            rows.append(pd.DataFrame({**{c: [key[c]] * depth for c in KEYS}, "level": lv, "k": cut,
                                      "precision": precision, "recall": recall, "n_queries": len(rel)}))
    return pd.concat(rows, ignore_index=True)


def precision_at_k(neighbours: pd.DataFrame, labels: pd.DataFrame, *, k: int | Sequence[int] = (5, 10),
                   level: str | Sequence[str] = LEVELS, searchable: Sequence[str] | None = None) -> pd.DataFrame:
    """Precision@k and recall@k (see :func:`precision_recall`) at the given cut-offs. A cut-off deeper than
    the returned lists is an error (it would count unreturned ranks as misses)."""
    ks = [k] if np.isscalar(k) else list(k)
    depth = int(pd.to_numeric(neighbours["rank"]).max())
    if max(ks) > depth:
        raise ValueError(f"precision@{max(ks)} asked but the neighbour lists stop at rank {depth}")
    pr = precision_recall(neighbours, labels, level=level, searchable=searchable, k=max(ks))
    return pr.loc[pr["k"].isin(ks)].reset_index(drop=True)


def average_precision_at_k(rel: Any, n_relevant: Any, k: int) -> np.ndarray:
    """AP@k per query from a relevance matrix ``rel`` (nq, >= or < k; rank order) and ``n_relevant`` (nq,).

    ``AP@k = (1 / min(R, k)) * sum_{i <= k} P@i * rel_i`` with ``P@i`` the precision at cut-off i and
    ``R`` the number of relevant searchable items; ranks missing beyond the list count as not relevant.
    NaN where ``R = 0``. With k >= catalogue size this is scikit-learn's ``average_precision_score`` of the
    full ranking (no tied scores).
    """
    rel = np.asarray(rel, dtype=np.float64)
    if rel.ndim != 2:
        raise ValueError(f"rel must be 2-D (nq, ranks), got shape {rel.shape}")
    rel = rel[:, :k]
    R = np.asarray(n_relevant, dtype=np.float64)
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    total = (precision * rel).sum(axis=1)
    den = np.minimum(R, k)
    return np.divide(total, den, out=np.full(len(total), np.nan), where=den > 0)


def map_at_k(neighbours: pd.DataFrame, labels: pd.DataFrame, *, k: int | Sequence[int] = (5, 10),
             level: str | Sequence[str] = LEVELS, searchable: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean AP@k (:func:`average_precision_at_k`) over queries with R > 0, per tuple, level and k.
    Columns: keys, ``level, k, map, n_queries``."""
    ks = [k] if np.isscalar(k) else list(k)
    rows = []
    nb = _labelled(neighbours, labels, None)
    for lv in _levels(level):
        for key, g in _groups(nb):
            _, rel, R = _relevance(g, labels, lv, searchable, max(max(ks), int(g["rank"].max())))
            for kk in ks:
                ap = average_precision_at_k(rel, R, kk)
                rows.append({**key, "level": lv, "k": kk, "map": float(np.nanmean(ap)) if (R > 0).any() else np.nan,
                             "n_queries": int((R > 0).sum())})
    return pd.DataFrame(rows, columns=[*KEYS, "level", "k", "map", "n_queries"])


def ranking_depth(depth: int, *, k: int, n_catalog: int, cutoffs: Sequence[int] = (5, 10)) -> int:
    """How deep to search for the ranking measures: ``depth`` raised to ``k`` and the deepest cut-off,
    capped at the ``n_catalog`` searchable images."""
    return int(min(max(int(depth), int(k), *(int(c) for c in cutoffs)), int(n_catalog)))


def ranking_table(neighbours: pd.DataFrame, labels: pd.DataFrame, *, k: int | Sequence[int] = (5, 10),
                  level: str | Sequence[str] = LEVELS, searchable: Sequence[str] | None = None) -> pd.DataFrame:
    """Precision@k, recall@k (:func:`precision_at_k`) and mAP@k (:func:`map_at_k`) side by side at the
    cut-offs ``k`` the returned lists reach (deeper ones are left out). Columns: keys, ``level, k,
    precision, recall, n_queries, map``."""
    depth = int(pd.to_numeric(neighbours["rank"]).max())
    cutoffs = [int(c) for c in ([k] if np.isscalar(k) else k) if int(c) <= depth]
    if not cutoffs:
        raise ValueError(f"no cut-off of {k} within the neighbour lists (they stop at rank {depth})")
    precision = precision_at_k(neighbours, labels, k=cutoffs, level=level, searchable=searchable)
    average = map_at_k(neighbours, labels, k=cutoffs, level=level, searchable=searchable)
    return precision.merge(average.drop(columns="n_queries"), on=[*KEYS, "level", "k"])


# ---------------------------------------------------------------------------------- approximate search
def approximate_recall(catalog_X: Any, query_X: Any, *, metrics: Sequence[str] = ("cosine", "euclidean"),
                       k: int = 5, kind: str = "hnsw", **index_settings: Any) -> pd.DataFrame:
    """Recall@k of approximate search (:class:`cbir.search.ApproximateIndex` of ``kind`` with
    ``index_settings``) against exact search (:func:`cbir.search.knn`) per measure. Columns ``metric, index``
    (the index's own :attr:`~cbir.search.ApproximateIndex.label`), ``k, n_catalog, recall_at_k``."""
    rows = []
    for metric in metrics:
        exact = knn(catalog_X, query_X, metric, k=k)[1]
        index = ApproximateIndex(catalog_X, metric=metric, kind=kind, **index_settings)
        rows.append({"metric": metric, "index": index.label, "k": int(k), "n_catalog": len(catalog_X),
                     "recall_at_k": recall_at_k(index.search(query_X, k)[1], exact)})
    return pd.DataFrame(rows, columns=["metric", "index", "k", "n_catalog", "recall_at_k"])


# -------------------------------------------------------------------------------- cross-validation
def whiten_for_fold(ids: Sequence[str] | np.ndarray, X: Any, *, fit_ids: Sequence[str], query_ids: Sequence[str],
                    fold: int | None = None, seed: int = 0) -> np.ndarray:
    """``X`` (N, D) PCA-whitened and L2-normalised -> float32 (N, k), the PCA fitted on the rows of ``fit_ids``
    only (the ``pca_whiten`` step of :mod:`cbir.postprocess`, :func:`cbir.postprocess.whitening_components`
    components, as :func:`cbir.extract.whiten_for_catalog`). Raises ``AssertionError`` when a query id is among
    the fit ids."""
    fit_ids = np.asarray(fit_ids).astype(str)
    leaked = np.intersect1d(fit_ids, np.asarray(query_ids).astype(str))
    if len(leaked):
        raise AssertionError(f"fold {fold}: the whitening would be fitted on {len(leaked)} of the fold's queries, "
                             f"e.g. {leaked[:5].tolist()}")
    rows = pd.Index(np.asarray(ids).astype(str)).get_indexer(fit_ids)
    if (rows < 0).any():
        raise KeyError(f"fit ids without features: {fit_ids[rows < 0][:5].tolist()}")
    X = np.asarray(X)
    return get_postprocess("pca_whiten").fit_apply(X[rows], X, n_components=whitening_components(len(rows)), seed=seed)


def cross_validate(ids: Sequence[str] | np.ndarray, X: Any, labels: pd.DataFrame, folds: Sequence[Any], *,
                   metrics: Sequence[str] = METRICS, k: int = 5, p: float = 3.0, same_category: bool = False,
                   exclude_duplicates: bool = True, model: str | None = None, layer: str | None = None,
                   pooling: str | None = None, engine: str = "auto", pca_whiten: bool = False
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's cross-validation: each fold's images query the catalogue WITHOUT the fold.

    With ``pca_whiten`` each fold's vectors are PCA-whitened (+ L2) by :func:`whiten_for_fold`, fitted on the
    images searchable in that fold only (never its queries), like the catalogue-wide whitening of notebooks 02-03.

    ``ids`` (N,) and ``X`` (N, D) are every image of one feature run; ``labels`` has ``image_id, category,
    subcategory`` (and ``dup_group`` for ``exclude_duplicates``); ``folds`` are disjoint arrays of ids (from
    :func:`cbir.catalog.cross_validation_folds`). Returns ``(per_fold, summary)``:

    * ``per_fold``: ``model, layer, pooling, metric, fold`` (1-based), ``n_queries, category_match,
      subcategory_match`` (means over the fold's queries of the top-k match share);
    * ``summary`` (the study's Table 10): per tuple ``n_folds`` and for both scores ``_mean``, ``_std``
      (sample standard deviation over folds, ddof=1) and ``_cv`` (coefficient of variation std / mean).
    """
    ids = np.asarray(ids).astype(str)
    X = np.asarray(X)
    if len(ids) != len(X):
        raise ValueError(f"{len(ids)} ids for {len(X)} feature rows")
    if pd.Index(ids).has_duplicates:
        raise ValueError("ids has duplicate image ids")
    folds = [np.asarray(f).astype(str) for f in folds]
    every = np.concatenate(folds) if folds else np.array([], dtype=str)
    if pd.Index(every).has_duplicates:
        raise ValueError("folds are not disjoint: an image id is in more than one fold")
    unknown = every[~np.isin(every, ids)]
    if len(unknown):
        raise KeyError(f"fold ids without features: {unknown[:5].tolist()}")
    lab = labels.assign(image_id=labels["image_id"].astype(str)).set_index("image_id")
    categories = lab["category"] if same_category else None
    dups = lab["dup_group"] if exclude_duplicates and "dup_group" in lab.columns else None
    position = pd.Index(ids)
    rows = []
    for f, fold in enumerate(folds, start=1):
        in_fold = np.isin(ids, fold)
        cat_ids = ids[~in_fold]
        if np.isin(fold, cat_ids).any():  # the protocol's invariant, checked on every fold
            raise AssertionError(f"fold {f}: a query is in the searchable catalogue")
        fold_X = whiten_for_fold(ids, X, fit_ids=cat_ids, query_ids=fold, fold=f) if pca_whiten else X
        q_X = fold_X[position.get_indexer(fold)]
        for metric in metrics:
            nb = search(cat_ids, fold_X[~in_fold], fold, q_X, metric=metric, k=k, p=p, same_category=same_category,
                        categories=categories, exclude_self=True, exclude_duplicates=exclude_duplicates,
                        dup_groups=dups, engine=engine)
            if np.isin(nb["neighbour_id"].to_numpy(), fold).any():
                raise AssertionError(f"fold {f}, {metric}: a fold image was returned as a neighbour")
            pq = per_query(nb, labels, k=k)
            rows.append({"model": model, "layer": layer, "pooling": pooling, "metric": metric, "fold": f,
                         "n_queries": len(pq), "category_match": float(pq["category_match"].mean()),
                         "subcategory_match": float(pq["subcategory_match"].mean())})
    per_fold = pd.DataFrame(rows, columns=[*KEYS, "fold", "n_queries", "category_match", "subcategory_match"])
    summary = per_fold.groupby(KEYS, dropna=False, sort=False).agg(
        n_folds=("fold", "size"),
        category_match_mean=("category_match", "mean"), category_match_std=("category_match", "std"),
        subcategory_match_mean=("subcategory_match", "mean"),
        subcategory_match_std=("subcategory_match", "std")).reset_index()
    for score in ("category_match", "subcategory_match"):
        summary[f"{score}_cv"] = summary[f"{score}_std"] / summary[f"{score}_mean"]
    order = [*KEYS, "n_folds"] + [f"{s}_{x}" for s in ("category_match", "subcategory_match")
                                  for x in ("mean", "std", "cv")]
    return per_fold, summary[order]


