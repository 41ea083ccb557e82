"""Speed of cbir.search.knn against the reference libraries, on the same data in the same run.

    .venv/bin/python benchmarks/search.py                      # full size: 100k x 1280 catalogue, 1,000 queries
    .venv/bin/python benchmarks/search.py --n 20000 --queries 200 --engines all   # quick, every engine

Data: clustered, non-negative float32 vectors (like pooled CNN features), fixed seed.
Baselines: faiss IndexFlatIP / IndexFlatL2 (cosine, correlation, euclidean; their normalising /
centring included) and scikit-learn's ``NearestNeighbors(algorithm="brute")`` (manhattan, chebyshev,
minkowski). Prints per measure and engine: seconds (the median of ``--rounds`` interleaved rounds, ours then
the baseline, after one warm-up call of each), ratio ours / baseline (< 1 is faster), agreement of the top-k
sets with the baseline (%), and exactness against a float64 scipy ``cdist`` on ``--verify`` queries (ties
broken by catalogue order). ``benchmarks/scale.py`` has the 1M-vector comparison and the approximate indexes. Minkowski is timed on ``--minkowski-queries`` queries (both
sides): a pow() per element makes it ~40x slower than manhattan for every library.
A script, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from cbir.search import DEFAULT_ENGINE, ENGINES, METRICS, knn


def make_data(n: int, dim: int, n_queries: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue (n, dim), queries (n_queries, dim)) float32: cluster centres + noise, clipped at 0."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 0.5, size=(clusters, dim)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        X = rng.standard_normal((m, dim), dtype=np.float32)
        X *= 0.6
        X += centres[rng.integers(0, clusters, m)]
        np.maximum(X, 0, out=X)
        return X

    return draw(n), draw(n_queries)


def faiss_baseline(C: np.ndarray, Q: np.ndarray, metric: str, k: int) -> tuple[float, np.ndarray]:
    import faiss

    t0 = time.perf_counter()
    if metric == "euclidean":
        index = faiss.IndexFlatL2(C.shape[1])
        index.add(C)
        _, I = index.search(Q, k)
    else:
        if metric == "correlation":
            Cn, Qn = C - C.mean(axis=1, keepdims=True), Q - Q.mean(axis=1, keepdims=True)
        else:
            Cn, Qn = C.copy(), Q.copy()
        faiss.normalize_L2(Cn)
        faiss.normalize_L2(Qn)
        index = faiss.IndexFlatIP(C.shape[1])
        index.add(Cn)
        _, I = index.search(Qn, k)
    return time.perf_counter() - t0, I


def sklearn_baseline(C: np.ndarray, Q: np.ndarray, metric: str, k: int, p: float) -> tuple[float, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    t0 = time.perf_counter()
    kw = {"p": p} if metric == "minkowski" else {}
    _, I = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric, **kw).fit(C).kneighbors(Q)
    return time.perf_counter() - t0, I


def agreement(A: np.ndarray, B: np.ndarray) -> float:
    """Mean share (%) of each query's top-k set found in the other's."""
    return float(100 * (A[:, :, None] == B[:, None, :]).any(axis=2).mean())


def exact_share(C: np.ndarray, Q: np.ndarray, I: np.ndarray, metric: str, k: int, p: float) -> float:
    """% of rows of I equal to float64 cdist + stable sort (ties by index)."""
    from scipy.spatial.distance import cdist

    name = "cityblock" if metric == "manhattan" else metric
    ref = cdist(Q.astype(np.float64), C.astype(np.float64), name, **({"p": p} if metric == "minkowski" else {}))
    want = np.argsort(ref, axis=1, kind="stable")[:, :k]
    return float(100 * (want == I).all(axis=1).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="catalogue size")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--p", type=float, default=3.0, help="minkowski p")
    ap.add_argument("--clusters", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    ap.add_argument("--engines", choices=["default", "all"], default="default",
                    help="time only the default engine per measure, or every engine that serves it")
    ap.add_argument("--verify", type=int, default=200, help="queries checked against float64 cdist (0: skip)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is shown)")
    ap.add_argument("--minkowski-queries", type=int, default=200,
                    help="minkowski (a pow() per element, ~40x slower than L1) is timed on the first N queries, "
                         "both sides (0: all)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    C, Q = make_data(args.n, args.dim, args.queries, args.clusters, args.seed)
    print(f"data: catalogue {C.shape}, queries {Q.shape}, float32, {args.clusters} clusters, seed {args.seed} "
          f"({time.perf_counter() - t0:.1f} s to generate)", flush=True)
    header = (f"{'metric':<12}{'engine':<12}{'ours s':>9}{'baseline':>22}{'base s':>9}{'ratio':>8}"
              f"{'agree %':>9}{'exact %':>9}{'queries':>9}")
    print(header, flush=True)
    rows = []
    for metric in args.metrics:
        Qm = Q[:args.minkowski_queries] if metric == "minkowski" and args.minkowski_queries else Q
        if metric in ("cosine", "correlation", "euclidean"):
            base_name = "faiss IndexFlat" + ("L2" if metric == "euclidean" else "IP")
            baseline = lambda Qx: faiss_baseline(C, Qx, metric, args.k)  # noqa: E731
        else:
            base_name = "sklearn NN brute"
            baseline = lambda Qx: sklearn_baseline(C, Qx, metric, args.k, args.p)  # noqa: E731
        engines = [DEFAULT_ENGINE[metric]] if args.engines == "default" else \
            [e for e, served in ENGINES.items() if metric in served]
        for engine in engines:
            knn(C, Qm[:10], metric, k=args.k, p=args.p, engine=engine)  # warm-up
            baseline(Qm[:10])
            ours_times, base_times = [], []
            for _ in range(args.rounds):
                t1 = time.perf_counter()
                _, I = knn(C, Qm, metric, k=args.k, p=args.p, engine=engine)
                ours_times.append(time.perf_counter() - t1)
                t, base_I = baseline(Qm)
                base_times.append(t)
            ours_t, base_t = float(np.median(ours_times)), float(np.median(base_times))
            exact = exact_share(C, Qm[:args.verify], I[:args.verify], metric, args.k, args.p) if args.verify else np.nan
            row = (metric, engine, ours_t, base_name, base_t, ours_t / base_t, agreement(I, base_I), exact, len(Qm))
            rows.append(row)
            print(f"{row[0]:<12}{row[1]:<12}{row[2]:>9.2f}{row[3]:>22}{row[4]:>9.2f}{row[5]:>8.2f}"
                  f"{row[6]:>9.1f}{row[7]:>9.1f}{row[8]:>9d}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
