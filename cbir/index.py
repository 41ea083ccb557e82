"""Approximate k-NN indexes (faiss) of a run's vectors, with their recall measured against exact search.

:func:`build_index` streams a run's searchable vectors (split != ``query``) out of the store in chunks,
builds a faiss index of the chosen ``kind`` and measures its recall@k against exact search
(:func:`cbir.search.knn`, also streamed) on held-out queries at several search settings (``nprobe`` for IVF,
``efSearch`` for HNSW). It keeps the fastest setting that reaches ``target_recall`` and saves the index beside
the store: ``<store>.indexes/run<ID>-<metric>-<kind>.faiss`` (faiss' own file format: data, no code), the
image ids in index order (``.ids.npy``, read with ``allow_pickle=False``) and a plain JSON sidecar (``.json``)
with the settings and the whole recall table. :func:`load_index` finds the newest index of a run and measure
again and refuses a stale one (the run's vectors changed since the build); :func:`add_to_index` adds the run's
new images without a rebuild; :func:`search_image` embeds a photo with the run's own extractor and searches
the index (or exactly, where no index or measure applies) in one call.

Kinds (``kind="auto"`` chooses as autofaiss does, from the size and a memory budget):

* ``flat``: exact faiss ``IndexFlat`` (chosen below :data:`FLAT_MAX` vectors);
* ``hnsw``: ``IndexHNSWFlat`` (M = 32, efConstruction 80): a costly build (measured on 2 cores: 7.4e-7 s per
  vector x dimension at 50k, 6.5e-7 at 1M x 256: 167 s and +1.25 GiB, where IVF builds in 24 s and then
  answers faster, 7,741 against 3,979 queries/s at recall@5 0.97) and ~(4 D + 260) bytes per vector; chosen
  while it fits the budget and its estimated build time is at most ``max_build_s`` (120 s);
* ``ivf``: ``IndexIVFFlat`` (about 2 sqrt(N) k-means cells trained on a sample; 4 D bytes per vector);
* ``ivfpq``: ``IndexIVFPQ`` (codes of ``m`` bytes per vector) when the flat vectors do not fit the budget.
  Ranked by its codes alone its recall is capped by the compression (0.84 at 1M x 256 with 128-byte codes),
  so a search fetches ``rerank`` x k candidates and re-ranks them with the exact distances of their stored
  vectors (read from the store by id: only the candidates'); the sweep measures recall at each ``nprobe`` and
  ``rerank`` in :data:`RERANKS` and keeps the fastest pair that reaches the target.

Only the measures faiss indexes serve (``faiss_index`` in :mod:`cbir.measures`: euclidean, correlation,
cosine) are indexed; cosine and correlation are inner products of normalised (centred) rows. Manhattan,
Minkowski and Chebyshev stay exact (:func:`cbir.search.knn`), and every result says which it used.

Pipeline room: imports search, store, measures, rebuild (never evaluation).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.measures import get_measure, measure_names
from cbir.search import faiss_space, knn, recall_at_k, similarity

__all__ = ["INDEX_KINDS", "INDEX_MEASURES", "FLAT_MAX", "IndexInfo", "LoadedIndex", "choose_kind",
           "index_dir", "build_index", "build_from_arrays", "load_index", "add_to_index", "search_vectors",
           "search_image", "search_plan", "SearchResult", "index_how", "exact_how"]

INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")
INDEX_MEASURES: tuple[str, ...] = measure_names(faiss_index=True)
"""Measures a faiss index serves (the registry's ``faiss_index``): the others are searched exactly."""
FLAT_MAX = 10_000
"""Below this many vectors ``auto`` keeps exact faiss Flat (a query costs well under a millisecond)."""
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_BUILD_S_PER_VALUE = 7.5e-7
"""Estimated HNSW build seconds per vector and dimension on 2 cores (measured with efConstruction 80 by
``benchmarks/scale.py --parts hnsw``: 7.4e-7 at 50k x 256, 6.8e-7 and 6.5e-7 at 1M x 256 in two runs); ``auto``
compares N x D x this with ``max_build_s``."""
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EF_SEARCHES = (16, 32, 64, 128, 256, 512)
RERANKS = (1, 2, 4, 8, 16, 32, 64)
"""IVF-PQ: candidates fetched per neighbour asked for, re-ranked with exact distances (swept by the build)."""
CHUNK = 65_536
"""Vectors read from the store (and added to the index) at a time."""


# ------------------------------------------------------------------------------------------ records
@dataclass
class IndexInfo:
    """What an index is, how it was chosen and built, and its measured recall (the JSON sidecar)."""

    run_id: int | None
    metric: str
    kind: str
    factory: str
    n: int
    dim: int
    k: int
    target_recall: float
    search_param: str | None
    search_value: int | None
    recall: float
    met_target: bool
    recall_table: list[dict[str, Any]]
    n_eval_queries: int
    build_s: float
    index_bytes: int
    chosen_because: str
    settings: dict[str, Any] = field(default_factory=dict)
    rerank: int = 1
    """Candidates fetched per neighbour asked for (re-ranked with exact distances): > 1 for IVF-PQ only."""
    n_added: int = 0
    created: str = ""
    run_key: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def label(self) -> str:
        """E.g. ``"faiss IVF2000,Flat (nprobe=16), recall@5 0.982"``."""
        rerank = f", re-ranking {self.rerank}x k" if self.rerank > 1 else ""
        setting = f" ({self.search_param}={self.search_value}{rerank})" if self.search_param else ""
        added = f", +{self.n_added} added since" if self.n_added else ""
        return f"faiss {self.factory}{setting}, recall@{self.k} {self.recall:.3f}{added}"

    def table(self) -> pd.DataFrame:
        """The recall table: ``param, value, rerank, recall_at_k, ms_per_query, chosen``."""
        return pd.DataFrame(self.recall_table)


@dataclass
class LoadedIndex:
    """A loaded faiss index with its image ids (index order) and :class:`IndexInfo`."""

    index: Any
    ids: np.ndarray
    info: IndexInfo

    def search(self, query_X: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances (nq, k) float64 in the measure's units, positions (nq, k) int64)``; -1 / inf where
        fewer were found."""
        return _search(self.index, faiss_space(query_X, self.info.metric), self.info.metric, k)

    def n_candidates(self, k: int) -> int:
        """How many candidates to fetch for ``k`` neighbours: ``k x rerank`` (IVF-PQ), at most the index size;
        the caller re-ranks them with exact distances."""
        return int(min(len(self.ids), int(k) * max(1, int(getattr(self.info, "rerank", 1) or 1))))


def index_dir(store: Any) -> Path:
    """``<store path>.indexes``: where a store's indexes live."""
    return Path(f"{Path(getattr(store, 'path', store))}.indexes")


# ------------------------------------------------------------------------------------- faiss pieces
def _code(metric: str) -> int:
    import faiss

    return faiss.METRIC_L2 if get_measure(metric).family == "l2" else faiss.METRIC_INNER_PRODUCT


def _to_distance(D: np.ndarray, I: np.ndarray, metric: str) -> np.ndarray:
    D = D.astype(np.float64)
    D = np.sqrt(np.maximum(D, 0.0)) if get_measure(metric).family == "l2" else 1.0 - D
    D[I < 0] = np.inf
    return D


def _search(index: Any, Qf: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    D, I = index.search(np.ascontiguousarray(Qf, dtype=np.float32), int(k))
    return _to_distance(D, I, metric), I.astype(np.int64)


def _set_param(index: Any, param: str | None, value: int | None) -> None:
    import faiss

    if param == "nprobe":
        faiss.extract_index_ivf(index).nprobe = int(value)
    elif param == "efSearch":
        index.hnsw.efSearch = int(value)


def _pq_m(d: int, n: int, budget: float) -> int:
    """Bytes per PQ code: the largest divisor of ``d`` (at most d/2, at most 256) whose codes fit the budget."""
    fits = [m for m in range(1, min(256, d // 2) + 1) if d % m == 0 and n * (m + 8) <= 0.8 * budget]
    return max(fits) if fits else min(m for m in range(1, d + 1) if d % m == 0)


def _nlist(n: int) -> int:
    """About 2 sqrt(N) cells, at least 39 training points per cell."""
    return int(np.clip(round(2 * math.sqrt(n)), 1, max(1, n // 39)))


def _memory_budget(memory_gb: float | None) -> float:
    if memory_gb is not None:
        return float(memory_gb) * 2**30
    try:
        import psutil

        return 0.5 * psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil ships with the environment
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_kind(n: int, d: int, *, memory_gb: float | None = None, max_build_s: float = 120.0) -> tuple[str, str]:
    """``(kind, why)`` as autofaiss chooses: flat below :data:`FLAT_MAX`; HNSW while it fits the memory budget
    (default: half the available memory) and its estimated build time is at most ``max_build_s``; IVF-Flat
    while the vectors fit; IVF-PQ beyond."""
    budget = _memory_budget(memory_gb)
    flat_bytes = n * (4 * d + 8)
    hnsw_bytes = n * (4 * d + 8 * HNSW_M * 1.1 + 8)
    hnsw_s = n * d * HNSW_BUILD_S_PER_VALUE
    gib = f"{budget / 2**30:.1f} GiB"
    if n < FLAT_MAX:
        return "flat", f"{n} vectors < {FLAT_MAX}: exact search is fast enough"
    if hnsw_bytes <= budget and hnsw_s <= max_build_s:
        return "hnsw", f"HNSW fits {gib} ({hnsw_bytes / 2**30:.2f} GiB) and builds in about {hnsw_s:.0f} s"
    if flat_bytes <= budget:
        why = "does not fit" if hnsw_bytes > budget else f"would take about {hnsw_s:.0f} s > {max_build_s:.0f} s to build"
        return "ivf", f"HNSW {why}; IVF-Flat fits {gib} ({flat_bytes / 2**30:.2f} GiB)"
    return "ivfpq", f"the vectors ({flat_bytes / 2**30:.2f} GiB) do not fit {gib}: IVF-PQ codes"


def _new_index(kind: str, n: int, d: int, metric: str, budget: float, seed: int) -> tuple[Any, str, dict, Any]:
    """(index, factory string, settings, quantizer kept alive)."""
    import faiss

    code = _code(metric)
    if kind == "flat":
        return (faiss.IndexFlatL2(d) if code == faiss.METRIC_L2 else faiss.IndexFlatIP(d)), "Flat", {}, None
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, code)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index, f"HNSW{HNSW_M},Flat", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}, None
    nlist = _nlist(n)
    quantizer = faiss.IndexFlatL2(d) if code == faiss.METRIC_L2 else faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, code)
        settings, factory = {"nlist": nlist}, f"IVF{nlist},Flat"
    else:
        m = _pq_m(d, n, budget)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, code)
        settings, factory = {"nlist": nlist, "m": m, "nbits": 8}, f"IVF{nlist},PQ{m}"
    index.cp.seed = int(seed)
    return index, factory, settings, quantizer


# --------------------------------------------------------------------------------------- the build
Reader = Callable[[int, int], np.ndarray]
"""``read(start, stop) -> X[start:stop]`` (float32 rows in index order)."""


def _exact_topk(read: Reader, n: int, Q: np.ndarray, metric: str, k: int, chunk: int) -> np.ndarray:
    """Exact top-k positions (ties by position) of ``Q`` over all ``n`` rows, streamed chunk by chunk:
    per chunk :func:`cbir.search.knn`, merged by (exact distance, position)."""
    best_D = np.full((len(Q), 0), np.inf)
    best_I = np.zeros((len(Q), 0), dtype=np.int64)
    for s in range(0, n, chunk):
        X = read(s, min(n, s + chunk))
        D, I = knn(X, Q, metric, k=min(k, len(X)))
        D = np.concatenate([best_D, D], axis=1)
        I = np.concatenate([best_I, I + s], axis=1)
        order = np.lexsort((I, D), axis=1)[:, :k]
        best_D, best_I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    return best_I


def _drop_self(I: np.ndarray, self_pos: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``I`` (k + 1 columns) without the query's own position (or the last column where absent)."""
    out = np.empty((len(I), k), dtype=np.int64)
    for r, (row, me) in enumerate(zip(I, self_pos)):
        kept = row[row != me] if me >= 0 else row
        out[r] = kept[:k]
    return out


def _timed(fn: Callable[[], Any], rounds: int = 3) -> tuple[float, Any]:
    """(median seconds over ``rounds`` after one warm-up call, result)."""
    out = fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def _sweep(kind: str, index: Any, nlist: int | None, k: int) -> tuple[str | None, list[int | None]]:
    if kind == "hnsw":
        return "efSearch", [v for v in EF_SEARCHES if v >= k]
    if kind in ("ivf", "ivfpq"):
        return "nprobe", [v for v in NPROBES if v <= nlist] + ([nlist] if nlist not in NPROBES and nlist < 512 else [])
    return None, [None]


def build_from_arrays(read: Reader, n: int, d: int, *, metric: str, kind: str = "auto",
                      memory_gb: float | None = None, target_recall: float = 0.95, k: int = 5,
                      eval_queries: np.ndarray | None = None, eval_self: np.ndarray | None = None,
                      n_eval_queries: int = 500, seed: int = 0, chunk: int = CHUNK, max_build_s: float = 120.0,
                      rounds: int = 3) -> tuple[Any, IndexInfo]:
    """Build and measure an index over ``n`` rows of dimension ``d`` given by ``read`` (streamed in ``chunk``
    rows: only the training sample, one chunk and the index are in memory at once).

    Recall@k is measured against exact search (:func:`cbir.search.knn`) on ``eval_queries`` (with
    ``eval_self``: each query's own position in the index, or -1; its own hit is left out of both lists) or,
    by default, on ``n_eval_queries`` rows drawn with ``seed`` and searched leave-one-out. Every search setting
    is timed as the median of ``rounds`` runs after a warm-up; the fastest setting whose recall reaches
    ``target_recall`` is kept (a larger setting must be more than 10% faster than a smaller one: timing noise),
    else the one with the best recall, and ``met_target`` is False.
    Returns ``(faiss index, IndexInfo)`` (not saved; :func:`build_index` saves).
    """
    if metric not in INDEX_MEASURES:
        raise ValueError(f"faiss indexes serve {', '.join(INDEX_MEASURES)}, not {metric!r}: "
                         f"{metric} is searched exactly (cbir.search.knn)")
    if kind not in ("auto", *INDEX_KINDS):
        raise ValueError(f"kind must be 'auto' or one of {INDEX_KINDS}, got {kind!r}")
    if n < 1:
        raise ValueError("nothing to index: no vectors")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    k = int(min(k, max(1, n - 1)))
    budget = _memory_budget(memory_gb)
    why = f"asked for {kind}"
    if kind == "auto":
        kind, why = choose_kind(n, d, memory_gb=memory_gb, max_build_s=max_build_s)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    index, factory, settings, quantizer = _new_index(kind, n, d, metric, budget, seed)
    if kind in ("ivf", "ivfpq"):
        nlist = settings["nlist"]
        n_train = int(min(n, max(50 * nlist, 256 * 40 if kind == "ivfpq" else 0, 10_000)))
        pos = np.sort(rng.choice(n, n_train, replace=False))
        train = _gather(read, pos, chunk, metric)
        index.train(train)
        settings["n_train"] = int(n_train)
        del train
    for s in range(0, n, chunk):
        index.add(faiss_space(read(s, min(n, s + chunk)), metric))
    build_s = time.perf_counter() - t0

    # held-out recall
    if eval_queries is None:
        m = int(min(n_eval_queries, n))
        eval_self = np.sort(rng.choice(n, m, replace=False))
        eval_queries = _gather(read, eval_self, chunk, None)
    Q = np.ascontiguousarray(eval_queries, dtype=np.float32)
    self_pos = np.full(len(Q), -1, dtype=np.int64) if eval_self is None else np.asarray(eval_self, dtype=np.int64)
    kq = min(k + 1, n)
    t1 = time.perf_counter()
    exact = _drop_self(_exact_topk(read, n, Q, metric, kq, chunk), self_pos, k)
    exact_ms = 1000 * (time.perf_counter() - t1) / max(1, len(Q))
    Qf = faiss_space(Q, metric)
    param, values = _sweep(kind, index, settings.get("nlist"), kq)
    table = []
    reranks = RERANKS if kind == "ivfpq" else (1,)
    previous = -1.0
    for value in values:
        _set_param(index, param, value)
        if len(reranks) == 1:
            secs, (_, I) = _timed(lambda: _search(index, Qf, metric, kq), rounds)
            found = {1: (I, secs)}
        else:
            found = _reranked(read, n, index, Q, Qf, metric, kq, reranks, chunk, rounds)
        for rerank, (I, secs) in found.items():
            rec = recall_at_k(_drop_self(I, self_pos, k), exact)
            table.append({"param": param, "value": value, "rerank": rerank, "recall_at_k": round(rec, 6),
                          "ms_per_query": 1000 * secs / max(1, len(Q)), "chosen": False})
        here = max(r["recall_at_k"] for r in table[-len(found):])
        if here >= 0.999 or (kind == "ivfpq" and previous >= 0 and here <= previous + 0.001):
            break  # reached; or IVF-PQ on a plateau: more probes find nothing more (its codes' limit)
        previous = here
    ok = [r for r in table if r["recall_at_k"] >= target_recall]
    if ok:  # the fastest; a larger setting must be more than 10% faster to beat a smaller one (timing noise)
        best = ok[0]
        for r in ok[1:]:
            best = r if r["ms_per_query"] < 0.9 * best["ms_per_query"] else best
    else:
        best = max(table, key=lambda r: r["recall_at_k"])
    best["chosen"] = True
    _set_param(index, param, best["value"])
    settings["exact_ms_per_query"] = exact_ms
    info = IndexInfo(run_id=None, metric=metric, kind=kind, factory=factory, n=int(index.ntotal), dim=int(d), k=k,
                     target_recall=float(target_recall), search_param=param, search_value=best["value"],
                     recall=float(best["recall_at_k"]), met_target=bool(ok), recall_table=table,
                     n_eval_queries=int(len(Q)), build_s=round(build_s, 3),
                     index_bytes=_index_bytes(kind, int(index.ntotal), d, settings),
                     chosen_because=why, settings=settings, rerank=int(best["rerank"]),
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    del quantizer  # faiss' Python wrapper keeps it alive with the index (``referenced_objects``)
    return index, info


def _reranked(read: Reader, n: int, index: Any, Q: np.ndarray, Qf: np.ndarray, metric: str, kq: int,
              reranks: Sequence[int], chunk: int, rounds: int) -> dict[int, tuple[np.ndarray, float]]:
    """``{rerank: (top-kq positions, seconds)}``: the index's first ``kq x rerank`` candidates re-ranked by their
    exact distances (as :func:`search_vectors` does with the stored vectors). Seconds: the faiss search of
    ``kq x rerank`` candidates plus the exact distances of those candidates (median of ``rounds``; reading the
    candidates' vectors from the store is not included). The exact distances come from one streamed pass."""
    measure = get_measure(metric)
    wide = int(min(n, kq * max(reranks)))
    _, cand = _search(index, Qf, metric, wide)
    rows = np.repeat(np.arange(len(Q)), wide)
    pos = cand.reshape(-1)
    valid = pos >= 0
    dist = np.full(len(pos), np.inf)
    order = np.argsort(np.where(valid, pos, n), kind="stable")
    sorted_pos = np.where(valid, pos, n)[order]
    for s in range(0, n, chunk):  # exact distances of every (query, candidate), the rows read in order
        lo, hi = np.searchsorted(sorted_pos, [s, min(n, s + chunk)])
        if hi <= lo:
            continue
        at = order[lo:hi]
        X = read(s, min(n, s + chunk))
        dist[at] = measure.exact(Q[rows[at]].astype(np.float64), X[pos[at] - s].astype(np.float64), 3.0)
    dist = dist.reshape(len(Q), wide)
    out = {}
    for rerank in reranks:
        m = int(min(wide, kq * rerank))
        secs, _ = _timed(lambda: _search(index, Qf, metric, m), rounds)
        t0 = time.perf_counter()
        D, I = dist[:, :m], cand[:, :m]
        keep = np.lexsort((I, D), axis=1)[:, :kq]  # exact distance, then index order
        top = np.take_along_axis(I, keep, 1)
        exact_s = (time.perf_counter() - t0) + _exact_seconds(measure, Q, m)
        out[int(rerank)] = (top, secs + exact_s)
        if m >= wide:
            break
    return out


def _exact_seconds(measure: Any, Q: np.ndarray, m: int) -> float:
    """Seconds to compute ``m`` exact float64 distances for each query of ``Q`` (what re-ranking costs)."""
    if m <= 0 or not len(Q):
        return 0.0
    A = np.repeat(Q[:1].astype(np.float64), m, 0)
    B = A + 1.0
    secs, _ = _timed(lambda: measure.exact(A, B, 3.0), 3)
    return secs * len(Q)


def _gather(read: Reader, positions: np.ndarray, chunk: int, metric: str | None) -> np.ndarray:
    """Rows at sorted ``positions`` (in faiss space when ``metric``), reading chunk by chunk."""
    parts = []
    for s in range(0, int(positions[-1]) + 1 if len(positions) else 0, chunk):
        here = positions[(positions >= s) & (positions < s + chunk)]
        if len(here):
            X = read(s, s + chunk)
            parts.append(X[here - s])
    X = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return faiss_space(X, metric) if metric else X


def _index_bytes(kind: str, n: int, d: int, settings: dict[str, Any]) -> int:
    """Estimated size in memory (the saved file's size replaces it once written)."""
    per = {"flat": 4 * d, "hnsw": 4 * d + 8 * HNSW_M + 4, "ivf": 4 * d + 8}.get(kind, settings.get("m", 0) + 8)
    return int(n * per + (settings.get("nlist", 0) * d * 4))


# ------------------------------------------------------------------------------------ store: runs
def _store_ids(store: Any, run_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(searchable ids with a vector, query-split ids with a vector) of a run, in catalogue order."""
    labels = store.run_labels(int(run_id))
    have = store.done_ids(int(run_id))
    ids = labels["image_id"].astype(str).to_numpy()
    split = labels["split"].astype(str).to_numpy() if "split" in labels.columns else np.full(len(ids), "")
    with_vec = np.isin(ids, np.array(sorted(have), dtype=str))
    return ids[with_vec & (split != "query")], ids[with_vec & (split == "query")]


def _run_key(store: Any, run_id: int) -> dict[str, Any]:
    """What must not change for a saved index to stay valid: the run's identity and the content of its vectors."""
    import hashlib

    run = store.run(int(run_id))
    content = store.content_sha1(int(run_id))
    crc = store.vector_crc32(int(run_id))
    digest = hashlib.sha1(json.dumps(sorted((i, s, crc.get(i)) for i, s in content.items())).encode()).hexdigest()
    return {"run_id": int(run_id), "model": run.get("model"), "weights_sha1": run.get("weights_sha1"),
            "dim": run.get("dim"), "created": run.get("created"), "content_sha1": digest}


def _paths(store: Any, run_id: int, metric: str, kind: str) -> tuple[Path, Path, Path]:
    stem = index_dir(store) / f"run{int(run_id)}-{metric}-{kind}"
    return stem.with_suffix(".faiss"), stem.with_suffix(".ids.npy"), stem.with_suffix(".json")


def _save(index: Any, ids: np.ndarray, info: IndexInfo, store: Any) -> IndexInfo:
    import faiss

    path, ids_path, meta = _paths(store, int(info.run_id), info.metric, info.kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    # each file written beside its final name, then renamed: a crash never leaves half a file under that name
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    tmp = ids_path.with_name(ids_path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(ids, dtype=str), allow_pickle=False)
    os.replace(tmp, ids_path)
    info.path = str(path)
    info.index_bytes = int(path.stat().st_size)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=1, default=_json_default))
    os.replace(tmp, meta)
    return info


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON: {type(value)}")


def build_index(store: Any, run_id: int, *, metric: str = "cosine", kind: str = "auto",
                memory_gb: float | None = None, target_recall: float = 0.95, k: int = 5, n_eval_queries: int = 500,
                seed: int = 0, chunk: int = CHUNK, max_build_s: float = 120.0) -> IndexInfo:
    """Build, measure and save a faiss index of run ``run_id``'s searchable vectors (see the module doc).

    Vectors are read from the store ``chunk`` ids at a time. Held-out queries: the run's query-split images
    (not in the index), topped up to ``n_eval_queries`` with catalogue images searched leave-one-out.
    Returns the saved :class:`IndexInfo` (``.label`` names the index and its recall; ``.table()`` the recall
    table).
    """
    ids, query_ids = _store_ids(store, run_id)
    if len(ids) == 0:
        raise ValueError(f"run {run_id} has no searchable vectors in {store.path}: nothing to index")

    def read(a: int, b: int) -> np.ndarray:
        return store.features(int(run_id), ids[a:b])[1]

    d = int(store.run(int(run_id))["dim"])
    rng = np.random.default_rng(seed)
    q_ids = query_ids[np.sort(rng.choice(len(query_ids), min(len(query_ids), n_eval_queries), replace=False))] \
        if len(query_ids) else query_ids
    top_up = max(0, min(n_eval_queries - len(q_ids), len(ids)))
    self_pos = np.sort(rng.choice(len(ids), top_up, replace=False)) if top_up else np.zeros(0, np.int64)
    Q = np.concatenate([store.features(int(run_id), q_ids)[1] if len(q_ids) else np.zeros((0, d), np.float32),
                        store.features(int(run_id), ids[self_pos])[1] if top_up else np.zeros((0, d), np.float32)])
    eval_self = np.concatenate([np.full(len(q_ids), -1, np.int64), self_pos])
    index, info = build_from_arrays(read, len(ids), d, metric=metric, kind=kind, memory_gb=memory_gb,
                                    target_recall=target_recall, k=k, eval_queries=Q, eval_self=eval_self,
                                    seed=seed, chunk=chunk, max_build_s=max_build_s)
    info.run_id = int(run_id)
    info.settings["n_eval_query_split"] = int(len(q_ids))
    info.run_key = _run_key(store, run_id)
    return _save(index, ids, info, store)


# ------------------------------------------------------------------------------- find, load, add
def _infos(store: Any, run_id: int, metric: str) -> list[IndexInfo]:
    folder = index_dir(store)
    out = []
    for meta in sorted(folder.glob(f"run{int(run_id)}-{metric}-*.json")) if folder.is_dir() else []:
        if not re.fullmatch(rf"run{int(run_id)}-{re.escape(metric)}-({'|'.join(INDEX_KINDS)})\.json", meta.name):
            continue
        data = json.loads(meta.read_text())
        fields = {f for f in IndexInfo.__dataclass_fields__}
        out.append(IndexInfo(**{key: value for key, value in data.items() if key in fields}))
    return sorted(out, key=lambda i: i.created)


def load_index(store: Any, run_id: int, metric: str = "cosine", *, kind: str | None = None,
               check: bool = True) -> LoadedIndex | None:
    """The newest saved index of ``run_id`` and ``metric`` (of ``kind`` if given), or None when there is none.

    With ``check`` (default) an index whose run changed since it was built (other vectors: re-extracted
    images, another run under the same id) is refused with a ``ValueError`` saying to rebuild it.
    """
    import faiss

    if metric not in INDEX_MEASURES:
        return None
    infos = [i for i in _infos(store, run_id, metric) if kind is None or i.kind == kind]
    if not infos:
        return None
    info = infos[-1]
    path, ids_path, _ = _paths(store, run_id, metric, info.kind)
    if check:
        key = _run_key(store, run_id)
        stale = [name for name in ("model", "weights_sha1", "dim", "created") if info.run_key.get(name) != key[name]]
        if not stale and info.run_key.get("content_sha1") != key["content_sha1"]:
            stale = ["vectors"]  # images re-extracted, added or removed since the build (or the last add)
        if stale:
            raise ValueError(f"{path}: the index of run {run_id} is stale (the run's {', '.join(stale)} changed "
                             f"since it was built); rebuild it with `cbir index build --run {run_id} --metric {metric}`")
    index = faiss.read_index(str(path))
    ids = np.load(ids_path, allow_pickle=False)
    if index.ntotal != len(ids) or index.d != info.dim:
        raise ValueError(f"{path}: the index holds {index.ntotal} vectors of dimension {index.d} but its sidecar "
                         f"says {len(ids)} ids of dimension {info.dim}; rebuild it")
    _set_param(index, info.search_param, info.search_value)
    info.path = str(path)
    return LoadedIndex(index, ids, info)


def add_to_index(store: Any, run_id: int, metric: str = "cosine", *, ids: Sequence[str] | None = None,
                 chunk: int = CHUNK) -> IndexInfo:
    """Add the run's searchable images that are not in its saved index yet (or only ``ids``) without a
    rebuild: every kind here takes new vectors (IVF assigns them to its trained cells; the recall table was
    measured at the build, and ``n_added`` says how many came after). Returns the updated :class:`IndexInfo`."""
    loaded = load_index(store, run_id, metric, check=False)
    if loaded is None:
        raise ValueError(f"run {run_id} has no {metric} index in {index_dir(store)}; build one first "
                         f"(`cbir index build --run {run_id} --metric {metric}`)")
    searchable, _ = _store_ids(store, run_id)
    wanted = searchable if ids is None else np.asarray(ids).astype(str)
    new = wanted[~np.isin(wanted, loaded.ids)]
    for s in range(0, len(new), chunk):
        loaded.index.add(faiss_space(store.features(int(run_id), new[s:s + chunk])[1], metric))
    info = loaded.info
    info.n_added += int(len(new))
    info.n = int(loaded.index.ntotal)
    info.run_key = {**_run_key(store, run_id)}
    return _save(loaded.index, np.concatenate([loaded.ids, new]), info, store)


# ---------------------------------------------------------------------------------------- queries
def index_how(info: IndexInfo) -> str:
    """How a search through the index of ``info`` is described: its label (kind, setting, measured recall) and
    file, e.g. ``"faiss Flat, recall@5 1.000 (index run1-cosine-flat.faiss; distances re-ranked exactly)"``."""
    return f"{info.label} (index {Path(info.path).name}; distances re-ranked exactly)"


def exact_how(metric: str, why: str | None = None, *, use_index: bool = True) -> str:
    """``"exact search (<metric>: <why>)"``; ``why`` by default: "no approximate faiss index serves it" (manhattan, minkowski,
    chebyshev), "no index built for it", or "asked for exact search" (``use_index=False``)."""
    if why is None:
        why = ("no approximate faiss index serves it" if metric not in INDEX_MEASURES else
               "no index built for it" if use_index else "asked for exact search")
    return f"exact search ({metric}: {why})"


@dataclass
class SearchResult:
    """Neighbours of one query and how they were found: ``how`` names the index and its measured recall, or
    says the search was exact (and why)."""

    neighbours: pd.DataFrame
    how: str
    index: IndexInfo | None


def search_vectors(store: Any, run_id: int, query_X: Any, *, k: int = 10, metric: str = "cosine",
                   p: float = 3.0, use_index: bool = True, loaded: LoadedIndex | None = None) -> SearchResult:
    """Top-k searchable images of a run for one query vector (``query_X`` (1, D)) through its saved index when
    there is one for ``metric``, else exactly. Candidates from an index are re-ranked with exact float64
    distances (their stored vectors). Columns ``rank, image_id, category, subcategory, distance,
    similarity``. ``loaded``: an index already loaded with :func:`load_index` (an app loads it once: loading
    checks the run's fingerprint)."""
    measure = get_measure(metric)
    Q = np.asarray(query_X, dtype=np.float32).reshape(1, -1)
    if loaded is None and use_index:
        loaded = load_index(store, run_id, metric)
    if loaded is not None:
        _, pos = loaded.search(Q, loaded.n_candidates(k))
        found = loaded.ids[pos[0][pos[0] >= 0]]
        X = store.features(int(run_id), found)[1]
        dist = measure.exact(np.repeat(Q.astype(np.float64), len(found), 0), X.astype(np.float64), p)
        how = index_how(loaded.info)
    else:
        ids, _ = _store_ids(store, run_id)
        found_d, found_i = [], []
        for s in range(0, len(ids), CHUNK):
            D, I = knn(store.features(int(run_id), ids[s:s + CHUNK])[1], Q, metric, k=min(k, len(ids[s:s + CHUNK])), p=p)
            found_d.append(D[0])
            found_i.append(I[0] + s)
        D, I = np.concatenate(found_d), np.concatenate(found_i)
        order = np.lexsort((I, D))[:k]
        found, dist = ids[I[order]], D[order]
        how = exact_how(metric, use_index=use_index)
    order = np.lexsort((np.arange(len(found)), dist))[:k]  # exact distance, then index order
    found, dist = found[order], dist[order]
    labels = store.run_labels(int(run_id)).set_index("image_id").reindex(found)
    table = pd.DataFrame({"rank": np.arange(1, len(found) + 1), "image_id": found,
                          "category": labels["category"].to_numpy(dtype=object),
                          "subcategory": labels["subcategory"].to_numpy(dtype=object),
                          "distance": dist, "similarity": similarity(metric, dist)})
    return SearchResult(table, how, loaded.info if loaded is not None else None)


def search_plan(store: Any, run_id: int, metrics: Sequence[str]) -> pd.DataFrame:
    """How each measure would be searched for run ``run_id``: ``metric, index, recall_at_k, k, how`` (the index's
    label, or exact and why). For notebook 02 and the app to say which index and recall they use."""
    rows = []
    for metric in metrics:
        try:
            loaded = load_index(store, run_id, metric)
        except ValueError as exc:  # stale: say so, search exactly
            rows.append({"metric": metric, "index": None, "recall_at_k": np.nan, "k": np.nan,
                         "how": f"exact search ({exc})"})
            continue
        if loaded is None:
            rows.append({"metric": metric, "index": None, "recall_at_k": np.nan, "k": np.nan,
                         "how": exact_how(metric)})
        else:
            rows.append({"metric": metric, "index": Path(loaded.info.path).name, "recall_at_k": loaded.info.recall,
                         "k": loaded.info.k, "how": loaded.info.label})
    return pd.DataFrame(rows, columns=["metric", "index", "recall_at_k", "k", "how"])


def search_image(store: Any, run_id: int, image: str | os.PathLike, *, k: int = 10, metric: str = "cosine",
                 p: float = 3.0, weights: str | os.PathLike | None = None, use_index: bool = True) -> SearchResult:
    """Embed the photo at ``image`` with run ``run_id``'s own extractor (rebuilt and checked by
    :mod:`cbir.rebuild`) and search the run's catalogue (:func:`search_vectors`): one call."""
    from cbir.images import read_image
    from cbir.rebuild import checked_extractor, extractor_kwargs

    identity = store.run(int(run_id))["params"]
    kwargs = extractor_kwargs(identity, weights=weights, run=run_id)
    pixels = read_image(image, size=int(identity.get("input_size") or 224))
    extractor = checked_extractor(identity, kwargs, run=run_id)
    vector = np.asarray(extractor(pixels[None]), dtype=np.float32)
    dim = int(store.run(int(run_id))["dim"])
    if vector.shape != (1, dim):
        raise RuntimeError(f"run {run_id}: the rebuilt extractor gives {vector.shape[1]}-d vectors, the store "
                           f"holds {dim}-d ones")
    return search_vectors(store, run_id, vector, k=k, metric=metric, p=p, use_index=use_index)
