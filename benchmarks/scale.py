"""Search at scale: approximate indexes against exact faiss, exact cbir.search.knn against faiss, and the
evaluation's peak memory against the number of queries. A script that prints ratios measured in one run;
nothing is asserted.

    .venv/bin/python benchmarks/scale.py                                  # everything (~20-30 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --parts index --dims 256 --n 200000   # quicker
    .venv/bin/python benchmarks/scale.py --parts exact memory

Parts:

* ``index``: a Gaussian mixture (``--clusters`` centres, unit noise, fixed seed) of ``--n`` vectors per
  dimension in ``--dims``; :func:`cbir.index.build_from_arrays` builds the index of ``--kind`` (IVF-Flat by
  default: what ``auto`` chooses at 1M), tunes ``nprobe`` for recall@5 >= ``--target`` and reports build time,
  peak memory growth during the build (RSS sampled every 20 ms), the index size, then recall@5 and queries/s
  of the kept setting against exact faiss ``IndexFlat`` on ``--queries`` fresh queries (recall against the
  IndexFlat top 5, which is exact up to float32 rounding; checked against float64 on ``--verify`` queries);
* ``hnsw``: HNSW build time and memory at ``--hnsw-n`` vectors (the constant ``auto`` uses);
* ``exact``: :func:`cbir.search.knn` (exact, float64 re-ranked) against faiss ``IndexFlatIP`` / ``L2``
  (normalising / centring included) for cosine, euclidean and correlation at ``--exact-n`` x 256 with
  ``--queries`` queries; exactness of ours checked against float64 ``cdist`` + stable sort on ``--verify``
  queries;
* ``memory``: notebook 03's evaluation path (neighbours at k = 5 and at the precision-recall depth 100 for
  the six measures, match table, paired tests, confusion and its heatmap, precision-recall, mAP) on a
  2,300-image store of 1280-d vectors with 75 sub-categories, in a fresh process per query count; peak RSS
  per count, with and without the heatmap fix (seaborn without a canvas on the figure).

Timing: one warm-up call, then the median of ``--rounds`` rounds, interleaved (ours, baseline, ours, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- helpers
def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 20 ms (``.peak`` bytes)."""

    def __enter__(self) -> "PeakRSS":
        self.base = rss()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss() - self.base)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss() - self.base)


def mixture(n: int, dim: int, clusters: int, seed: int, *, centres: np.ndarray | None = None,
            spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(n x dim float32 Gaussian mixture, centres): centres ~ N(0, 1), noise ~ N(0, spread^2 / dim) per value,
    so clusters overlap as real embeddings' neighbourhoods do. Generated in chunks (bounded extra memory)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    X = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        block = rng.standard_normal((m, dim), dtype=np.float32)
        block *= spread
        block += centres[rng.integers(0, len(centres), m)]
        X[s:s + m] = block
    return X, centres


def interleaved(fns: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median seconds per function over ``rounds`` interleaved rounds, after one warm-up call each."""
    for fn in fns.values():
        fn(warm=True)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(warm=False)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def reference_topk(C: np.ndarray, Q: np.ndarray, metric: str, k: int, chunk: int = 50_000) -> np.ndarray:
    """float64 scipy ``cdist`` + (distance, index) order, chunk by chunk (exact ground truth, ties by index)."""
    from scipy.spatial.distance import cdist

    best = [(np.zeros(0), np.zeros(0, dtype=np.int64)) for _ in range(len(Q))]
    Q64 = Q.astype(np.float64)
    for s in range(0, len(C), chunk):
        D = cdist(Q64, C[s:s + chunk].astype(np.float64), metric)
        kk = min(k, D.shape[1])
        kth = np.partition(D, kk - 1, axis=1)[:, kk - 1]
        for r in range(len(Q)):
            cols = np.flatnonzero(D[r] <= kth[r])  # every tie at the k-th value too
            d = np.concatenate([best[r][0], D[r, cols]])
            i = np.concatenate([best[r][1], cols + s])
            order = np.lexsort((i, d))[:k]
            best[r] = (d[order], i[order])
    return np.stack([i for _, i in best])


def faiss_flat(C: np.ndarray, metric: str, *, copy: bool = True):
    """An exact faiss IndexFlat over C for ``metric`` and the function that prepares queries. ``copy=False``
    (C already in faiss space): ``faiss.knn`` over C itself, the brute-force kernel IndexFlat.search runs,
    without IndexFlat's copy of the vectors (1M x 1280 would not fit 24 GB three times)."""
    import faiss

    from cbir.search import faiss_space

    if not copy:
        code = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT

        class Knn:
            def search(self, Q: np.ndarray, k: int):
                return faiss.knn(np.ascontiguousarray(Q, dtype=np.float32), C, k, code)

        return Knn(), (lambda Q: Q) if metric == "euclidean" else (lambda Q: faiss_space(Q, metric))
    if metric == "euclidean":
        index = faiss.IndexFlatL2(C.shape[1])
        index.add(C)
        return index, lambda Q: Q
    index = faiss.IndexFlatIP(C.shape[1])
    index.add(faiss_space(C, metric))
    return index, lambda Q: faiss_space(Q, metric)


# --------------------------------------------------------------------------------------------- parts
def part_index(args: argparse.Namespace) -> list[dict]:
    from cbir.index import _search, build_from_arrays
    from cbir.measures import get_measure
    from cbir.search import faiss_space, recall_at_k

    rows = []
    for i, dim in enumerate(args.dims):
        n = args.n[min(i, len(args.n) - 1)]
        t0 = time.perf_counter()
        X, centres = mixture(n, dim, args.clusters, args.seed, spread=args.spread)
        Q, _ = mixture(args.queries, dim, args.clusters, args.seed + 1, centres=centres, spread=args.spread)
        if args.metric == "cosine":  # the vectors as l2_normalize runs store them: faiss_space shares them
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            X = faiss_space(X, "cosine")
        print(f"\n[index] {n:,} x {dim} Gaussian mixture ({args.clusters} clusters, {X.nbytes / 2**30:.2f} GiB), "
              f"{len(Q)} queries; generated in {time.perf_counter() - t0:.0f} s", flush=True)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            index, info = build_from_arrays(lambda a, b: X[a:b], len(X), dim, metric=args.metric, kind=args.kind,
                                            target_recall=args.target, k=5, n_eval_queries=args.eval_queries,
                                            seed=args.seed, rounds=args.rounds)
            total_s = time.perf_counter() - t0
        print(f"  {info.factory}: build {info.build_s:.0f} s (+ {total_s - info.build_s:.0f} s measuring recall on "
              f"{info.n_eval_queries} held-out queries), peak memory +{mem.peak / 2**30:.2f} GiB, "
              f"index ~{info.index_bytes / 2**30:.2f} GiB; {info.chosen_because}", flush=True)
        print(info.table().to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
        flat, prep = faiss_flat(X, args.metric, copy=not args.no_copy)
        Qf = faiss_space(Q, args.metric)
        out = {}

        def run_flat(warm: bool) -> None:
            out["flat"] = flat.search(prep(Q[:20] if warm else Q), 5)[1]

        measure = get_measure(args.metric)
        wide = 5 * info.rerank

        def run_index(warm: bool) -> None:
            q = Qf[:20] if warm else Qf
            _, cand = _search(index, q, args.metric, wide)
            if info.rerank == 1:
                out["index"] = cand
                return
            # IVF-PQ: re-rank 5 x rerank candidates by exact distances of their vectors (here gathered from
            # memory; cbir.index.search_vectors reads them from the store), as the index was tuned
            # (16 queries at a time: cache-sized temporaries, as one query at a time in search_vectors)
            Q64 = (Q[:20] if warm else Q).astype(np.float64)
            D = np.empty(cand.shape)
            for s in range(0, len(cand), 16):
                c = np.maximum(cand[s:s + 16], 0)
                D[s:s + 16] = measure.exact(np.repeat(Q64[s:s + 16], wide, 0),
                                            X[c.reshape(-1)].astype(np.float64), 3.0).reshape(c.shape)
            D[cand < 0] = np.inf
            keep = np.lexsort((cand, D), axis=1)[:, :5]
            out["index"] = np.take_along_axis(cand, keep, 1)

        t = interleaved({"flat": run_flat, "index": run_index}, args.rounds)
        recall = recall_at_k(out["index"], out["flat"])
        ref = reference_topk(X, Q[:args.verify], args.metric, 5)
        flat_exact = float((ref == out["flat"][:args.verify]).all(axis=1).mean())
        recall_true = recall_at_k(out["index"][:args.verify], ref)
        row = {"part": "index", "n": n, "dim": dim, "index": info.factory,
               "setting": f"{info.search_param}={info.search_value}" + (f", rerank={info.rerank}" if info.rerank > 1 else ""),
               "build_s": round(info.build_s, 1),
               "peak_build_gib": round(mem.peak / 2**30, 2), "index_gib": round(info.index_bytes / 2**30, 2),
               "recall_at_5": round(recall, 4), "recall_at_5_vs_float64": round(recall_true, 4),
               "flat_exact_share": round(flat_exact, 4), "qps_index": round(len(Q) / t["index"], 1),
               "qps_flat": round(len(Q) / t["flat"], 1), "speedup": round(t["flat"] / t["index"], 1)}
        print(f"  recall@5 {recall:.3f} against IndexFlat on {len(Q)} queries ({recall_true:.3f} against float64 "
              f"cdist on {args.verify}; IndexFlat itself exact on {100 * flat_exact:.1f}% of them); "
              f"{row['qps_index']:.0f} queries/s against {row['qps_flat']:.1f} for IndexFlat: "
              f"{row['speedup']:.1f}x (median of {args.rounds} interleaved rounds)", flush=True)
        rows.append(row)
        del X, index, flat
    return rows


def part_hnsw(args: argparse.Namespace) -> list[dict]:
    import faiss

    from cbir.index import HNSW_BUILD_S_PER_VALUE, HNSW_EF_CONSTRUCTION, HNSW_M

    rows = []
    for dim in args.dims:
        X, _ = mixture(args.hnsw_n, dim, args.clusters, args.seed, spread=args.spread)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            index = faiss.IndexHNSWFlat(dim, HNSW_M)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.add(X)
            secs = time.perf_counter() - t0
        per_value = secs / (args.hnsw_n * dim)
        print(f"\n[hnsw] HNSW{HNSW_M} (efConstruction {HNSW_EF_CONSTRUCTION}) of {args.hnsw_n:,} x {dim}: "
              f"{secs:.1f} s, peak +{mem.peak / 2**30:.2f} GiB; {per_value:.2e} s per vector x dim "
              f"(auto assumes {HNSW_BUILD_S_PER_VALUE:.1e}: 1M x {dim} -> ~{per_value * 1e6 * dim / 60:.0f} min)",
              flush=True)
        rows.append({"part": "hnsw", "n": args.hnsw_n, "dim": dim, "build_s": round(secs, 1),
                     "peak_build_gib": round(mem.peak / 2**30, 2), "s_per_value": per_value})
    return rows


def part_exact(args: argparse.Namespace) -> list[dict]:
    from cbir.search import knn

    X, centres = mixture(args.exact_n, 256, args.clusters, args.seed, spread=args.spread)
    X = np.abs(X)  # non-negative like pooled CNN features
    Q = np.abs(mixture(args.queries, 256, args.clusters, args.seed + 1, centres=centres, spread=args.spread)[0])
    print(f"\n[exact] cbir.search.knn against faiss IndexFlat: {args.exact_n:,} x 256, {len(Q)} queries, k = 5",
          flush=True)
    rows = []
    for metric in ("cosine", "euclidean", "correlation"):
        out = {}

        def ours(warm: bool) -> None:
            out["ours"] = knn(X, Q[:20] if warm else Q, metric, k=5)[1]

        def base(warm: bool) -> None:  # the index built (normalised / centred copy) and searched, as ours does
            flat, prep = faiss_flat(X, metric)
            out["faiss"] = flat.search(prep(Q[:20] if warm else Q), 5)[1]

        t = interleaved({"ours": ours, "faiss": base}, args.rounds)
        ref = reference_topk(X, Q[:args.verify], metric, 5)
        exact = float((ref == out["ours"][:args.verify]).all(axis=1).mean())
        agree = float((out["ours"][:, :, None] == out["faiss"][:, None, :]).any(axis=2).mean())
        row = {"part": "exact", "metric": metric, "n": args.exact_n, "ours_s": round(t["ours"], 2),
               "faiss_s": round(t["faiss"], 2), "ratio": round(t["ours"] / t["faiss"], 2),
               "exact_share": exact, "agree_with_faiss": round(agree, 4)}
        print(f"  {metric:<12} ours {t['ours']:6.2f} s   faiss {t['faiss']:6.2f} s   ratio {row['ratio']:.2f}   "
              f"exact on {100 * exact:.1f}% of {args.verify} queries   top-5 agreement with faiss {100 * agree:.1f}%",
              flush=True)
        rows.append(row)
    return rows


MEMORY_CHILD = r'''
import json, sys, tempfile, os
import numpy as np, pandas as pd
import matplotlib; matplotlib.use("Agg")
nq, fixed = int(sys.argv[1]), sys.argv[2] == "fixed"
import cbir.plots.retrieval as pr
if not fixed:  # the heatmap as before the fix: seaborn measures its tick labels without a canvas
    pr.FigureCanvasAgg = lambda fig: None
from cbir import evaluate
from cbir.neighbours import ensure_neighbours
from cbir.store import FeatureStore
rng = np.random.default_rng(0)
n, d, n_sub = 2300, 1280, 75
sub = rng.integers(0, n_sub, n)
centres = rng.gamma(2, .5, (n_sub, d)).astype(np.float32)
X = np.maximum(centres[sub] + 0.6 * rng.standard_normal((n, d), dtype=np.float32), 0)
ids = np.array([f"i{i}" for i in range(n)])
split = np.array(["catalog"] * n, dtype=object)
split[rng.choice(n, nq, replace=False)] = "query"
labels = pd.DataFrame({"image_id": ids, "path": [f"/x/{i}.jpg" for i in ids], "category": [f"c{s % 6}" for s in sub],
                       "subcategory": [f"s{s}" for s in sub], "split": split})
tmp = tempfile.mkdtemp()
store = FeatureStore(os.path.join(tmp, "f.sqlite"))
store.put_catalog(labels); run = store.start_run({"model": "toy"}); store.put_run_labels(run, labels)
store.put_features(run, ids, X)
del X
q, c = ids[split == "query"], ids[split != "query"]
def peak():  # VmHWM: this process' own peak (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
steps = {"start": peak()}
metrics = ["euclidean", "manhattan", "minkowski", "chebyshev", "correlation", "cosine"]
nb = ensure_neighbours(store, run, query_ids=q, catalog_ids=c, metrics=metrics, k=5).assign(model="toy")
steps["neighbours k=5"] = peak()
evaluate.match_table(nb, labels, k=5, seed=0)
evaluate.paired_tests(evaluate.per_query(nb, labels, k=5), score="category_match", seed=0)
steps["match + paired tests"] = peak()
conf = evaluate.confusion(evaluate.select(nb, metric="cosine"), labels, level="subcategory", k=5)
pr.plot_confusion(conf, title="x", path=os.path.join(tmp, "c.png"))
steps[f"confusion heatmap ({conf.shape[0]} labels)"] = peak()
ranking = ensure_neighbours(store, run, query_ids=q, catalog_ids=c, metrics=metrics, k=100, tag="ranking")
evaluate.precision_recall(ranking, labels, searchable=c)
evaluate.ranking_table(ranking, labels, k=(5, 10), searchable=c)
steps["ranking depth 100 + precision-recall + mAP"] = peak()
print(json.dumps(steps))
'''


def part_memory(args: argparse.Namespace) -> list[dict]:
    print("\n[memory] notebook 03's evaluation path, 2,300 x 1280 vectors, 75 sub-categories: peak RSS (GiB) "
          "after each step, one fresh process per query count", flush=True)
    rows = []
    for variant in ("fixed", "before"):
        for nq in args.memory_queries:
            done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(nq), variant], capture_output=True,
                                  text=True, cwd=REPO, check=True)
            steps = json.loads(done.stdout.strip().splitlines()[-1])
            line = "  ".join(f"{k}: {v / 2**30:.2f}" for k, v in steps.items())
            print(f"  {variant:<6} {nq:4d} queries  {line}", flush=True)
            rows.append({"part": "memory", "variant": variant, "queries": nq,
                         **{k: round(v / 2**30, 3) for k, v in steps.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["exact", "index", "memory"],
                    choices=["index", "hnsw", "exact", "memory"])
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000, 500_000],
                    help="vectors for the index part, one per --dims entry (the last repeats): 1280-d at 1M needs "
                         "~20 GB with the IndexFlat baseline's copy, so 500k by default on a 24 GB machine")
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1280])
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=1.0, help="noise standard deviation per value (centres: 1)")
    ap.add_argument("--kind", default="ivf", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"])
    ap.add_argument("--metric", default="cosine", choices=["cosine", "euclidean", "correlation"])
    ap.add_argument("--target", type=float, default=0.95, help="target recall@5")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--eval-queries", type=int, default=500, help="held-out queries of the index's own tuning")
    ap.add_argument("--verify", type=int, default=200, help="queries checked against float64 cdist")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--exact-n", type=int, default=1_000_000)
    ap.add_argument("--hnsw-n", type=int, default=50_000)
    ap.add_argument("--memory-queries", type=int, nargs="+", default=[60, 200, 600])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-copy", action="store_true",
                    help="index part: exact baseline by faiss.knn over the vectors (IndexFlat's kernel, no copy)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    print(f"cpus: {os.cpu_count()}; parts: {', '.join(args.parts)}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for part in args.parts:
        rows += {"index": part_index, "hnsw": part_hnsw, "exact": part_exact, "memory": part_memory}[part](args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
