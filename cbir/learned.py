"""Learned features against ImageNet features: the same queries, the same measure, paired tests.

A trained model (:mod:`cbir.train`) is evaluated exactly like any feature run: its run in the store, the session's
queries (never trained on) searching the searchable catalogue. This module lines it up against every other
complete run of the same labelling in the store (ImageNet backbones, descriptors, other trained models):

- :func:`comparable_runs`: the store's complete runs on this labelling, marked ``trained`` or not;
- :func:`retrieval_comparison`: top-k category and sub-category match with bootstrap CIs per run, on all queries
  or a subset (the open-set queries: sub-categories held out of training), and the paired test of one run
  against the best run that is not a trained model (sign-flip permutation and Wilcoxon, :func:`cbir.stats.paired_test`), with a
  verdict that says "tie" when the test cannot separate them.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cbir.evaluate import per_query
from cbir.neighbours import ensure_neighbours
from cbir.runs import run_table
from cbir.stats import bootstrap_ci, paired_test

__all__ = ["comparable_runs", "retrieval_comparison", "open_set_queries", "verdict_line"]


def comparable_runs(store: Any, labels_sha1: str) -> pd.DataFrame:
    """Complete, unwhitened runs of the store made on the labelling ``labels_sha1`` (the same queries):
    ``run_id, model, features, trained`` (bool), in store order."""
    runs = store.runs()
    keep = {int(r.run_id) for r in runs.itertuples(index=False)
            if (r.params.get("labels_sha1") == labels_sha1 and r.status == "complete"
                and (r.variant or "original") == "original")}
    return _labelled_runs(store, keep)


def _labelled_runs(store: Any, run_ids: Iterable[int]) -> pd.DataFrame:
    """``run_id, model, features, trained`` of ``run_ids`` in store order (labels of :func:`cbir.runs.run_table`)."""
    table = run_table(store)
    table = table.loc[table["run_id"].isin([int(r) for r in run_ids])]
    return pd.DataFrame({"run_id": table["run_id"].to_numpy(), "model": table["model"].astype(str).to_numpy(),
                         "features": table["features"].to_numpy(),
                         "trained": table["model"].astype(str).str.startswith("trained/").to_numpy()})


def open_set_queries(labels: pd.DataFrame, query_ids: Sequence[str], holdout: Sequence[str]) -> np.ndarray:
    """The queries whose sub-category is in ``holdout`` (kinds of product a model never trained on)."""
    sub = labels.set_index(labels["image_id"].astype(str))["subcategory"].astype(str)
    ids = np.asarray(query_ids, dtype=str)
    return ids[np.isin(sub.reindex(ids).to_numpy(), list(holdout))]


def retrieval_comparison(store: Any, run_ids: Sequence[int], *, query_ids: Sequence[str],
                         catalog_ids: Sequence[str], labels: pd.DataFrame, focus: int, metric: str = "cosine",
                         k: int = 5, subset: Sequence[str] | None = None, score: str = "subcategory_match",
                         against: str = "untrained", n_perm: int = 10000,
                         seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(table, test)``: each run's top-``k`` match (``metric``) with 95% bootstrap CIs over the queries (all,
    or those in ``subset``), best first by ``score``; and the paired test of run ``focus`` against the best of
    the other runs on ``score`` (``verdict``: ``better`` / ``worse`` when p < 0.05, else ``tie``): the best run that
    is not a trained model (``against="untrained"``: the best ImageNet or handcrafted run, when there is one), or
    the best of all the others (``against="all"``).

    The queries must have a vector in every run (those that do not are left out of every run, so the runs are
    compared on the same queries)."""
    frames = []
    for run_id in run_ids:
        nb = ensure_neighbours(store, int(run_id), query_ids=query_ids, catalog_ids=catalog_ids, metrics=[metric],
                               k=k)
        frames.append(per_query(nb, labels, k=k).assign(run_id=int(run_id)))
    pq = pd.concat(frames, ignore_index=True)
    common = set.intersection(*(set(g["query_id"].astype(str)) for _, g in pq.groupby("run_id")))
    if subset is not None:
        common &= set(np.asarray(subset, dtype=str))
    pq = pq.loc[pq["query_id"].astype(str).isin(common)]
    if pq.empty:
        raise ValueError("no query is shared by every run (and the subset): nothing to compare")
    runs = _labelled_runs(store, run_ids).set_index("run_id")
    rows = []
    for run_id, g in pq.groupby("run_id", sort=False):
        row = {"run_id": int(run_id), "features": runs.loc[run_id, "features"],
               "trained": bool(runs.loc[run_id, "trained"]), "metric": metric, "k": int(k), "n_queries": len(g)}
        for s in ("category_match", "subcategory_match"):
            values = g[s].to_numpy(dtype=float)
            row[s] = float(values.mean())
            row[f"{s}_lo"], row[f"{s}_hi"] = bootstrap_ci(values, seed=seed)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values([score, "run_id"], ascending=[False, True], kind="stable")
    others = table.loc[table["run_id"] != int(focus)]
    if against == "untrained" and (~others["trained"]).any():
        others = others.loc[~others["trained"]]
    test: dict[str, Any] = {"focus": int(focus), "score": score, "metric": metric, "k": int(k)}
    if not others.empty:
        rival = int(others.iloc[0]["run_id"])
        a = pq.loc[pq["run_id"] == int(focus)].set_index("query_id")[score]
        b = pq.loc[pq["run_id"] == rival].set_index("query_id")[score].reindex(a.index)
        result = paired_test(a.to_numpy(), b.to_numpy(), n_perm=n_perm, seed=seed)
        p = result["p_permutation"]
        verdict = "tie" if p >= 0.05 else ("better" if result["mean_diff"] > 0 else "worse")
        test |= {"rival": rival, "rival_features": runs.loc[rival, "features"],
                 "focus_features": runs.loc[int(focus), "features"], **result, "verdict": verdict}
    return table.reset_index(drop=True), test


def verdict_line(test: dict[str, Any], *, what: str = "") -> str:
    """One sentence for a :func:`retrieval_comparison` test: both means, the paired difference with its 95% CI,
    the permutation p and the verdict; or why there is no comparison."""
    if "rival" not in test:
        return (f"{what}no other run of this catalogue and query split in the store: nothing to compare "
                f"(run an ImageNet params file first)")
    p = test["p_permutation"]
    shown = "< 0.001" if p < 0.001 else f"= {p:.3f}"
    return (f"{what}{test['focus_features']} vs {test['rival_features']} (top-{test['k']} "
            f"{test['score'].replace('_', ' ')}, {test['metric']}, {test['n']} queries): {test['mean_a']:.3f} vs "
            f"{test['mean_b']:.3f}, difference {test['mean_diff']:+.3f} [{test['diff_lo']:+.3f}, "
            f"{test['diff_hi']:+.3f}], p {shown}: {test['verdict']}")
