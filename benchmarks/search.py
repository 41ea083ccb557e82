"""Speed of cbir.search.knn against the reference libraries, on the same data in the same run.

    .venv/bin/python benchmarks/search.py                      # quick: 10k x 256 catalogue, 200 queries (~2 min)
    .venv/bin/python benchmarks/search.py --n 100000 --dim 1280 --queries 1000 --engines all   # full size
    .venv/bin/python benchmarks/search.py --metrics manhattan chebyshev minkowski   # the Lp measures only

Data: clustered, non-negative float32 vectors (like pooled CNN features), fixed seed.
Baselines: faiss IndexFlatIP / IndexFlatL2 (cosine, correlation, euclidean; their normalising /
centring included); for manhattan, chebyshev and minkowski both faiss' own exact Lp index
(``faiss.IndexFlat(d, METRIC_L1 / METRIC_Linf / METRIC_Lp)``, ``metric_arg = p``) and scikit-learn's
``NearestNeighbors(algorithm="brute")``. Prints per measure, engine and baseline: seconds (the median of
``--rounds`` interleaved rounds, ours then each baseline, after one warm-up call of each), ratio ours / baseline
(< 1 is faster), agreement of the top-k sets with the baseline on every timed query (``agree %``: the same ids;
``ties %``: the same ids or, where they differ, neighbours at the same float64 distances within ``--tie-rtol``,
i.e. only ties or float32 near-ties ordered differently), and exactness of ours against a float64 scipy
``cdist`` on ``--verify`` queries (ties broken by catalogue order). ``benchmarks/scale.py`` has the
1M-vector comparison and the approximate indexes. Minkowski is timed on ``--minkowski-queries`` queries
(both sides; 0: all): a pow() per element makes it 20-40x slower than manhattan for every library.
A script, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from cbir.measures import get_measure
from cbir.search import DEFAULT_ENGINE, ENGINES, METRICS, knn

LP_METRICS = ("manhattan", "chebyshev", "minkowski")


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


def faiss_lp_baseline(C: np.ndarray, Q: np.ndarray, metric: str, k: int, p: float) -> tuple[float, np.ndarray]:
    """faiss' own exact index of the measure: ``IndexFlat(d, METRIC_L1 | METRIC_Linf | METRIC_Lp)`` (the
    registry's ``faiss`` name; Lp with ``metric_arg = p``, which ranks by sum |x-y|^p)."""
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexFlat(C.shape[1], getattr(faiss, get_measure(metric).faiss))
    if metric == "minkowski":
        index.metric_arg = float(p)
    index.add(C)
    _, I = index.search(Q, k)
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


def agreement_ties(C: np.ndarray, Q: np.ndarray, A: np.ndarray, B: np.ndarray, metric: str, p: float,
                   rtol: float) -> float:
    """% of queries whose two top-k lists hold neighbours at the same float64 distances (sorted, within
    ``rtol``): the same sets, or sets that differ only among (near-)tied neighbours."""
    exact = get_measure(metric).exact
    k = A.shape[1]
    Q64 = np.repeat(Q.astype(np.float64), k, axis=0)
    dA = np.sort(exact(Q64, C[A.ravel()].astype(np.float64), p).reshape(-1, k), axis=1)
    dB = np.sort(exact(Q64, C[B.ravel()].astype(np.float64), p).reshape(-1, k), axis=1)
    return float(100 * np.isclose(dA, dB, rtol=rtol, atol=0.0).all(axis=1).mean())


def exact_share(C: np.ndarray, Q: np.ndarray, I: np.ndarray, metric: str, k: int, p: float) -> float:
    """% of rows of I equal to float64 cdist + stable sort (ties by index)."""
    from scipy.spatial.distance import cdist

    name = "cityblock" if metric == "manhattan" else metric
    ref = cdist(Q.astype(np.float64), C.astype(np.float64), name, **({"p": p} if metric == "minkowski" else {}))
    want = np.argsort(ref, axis=1, kind="stable")[:, :k]
    return float(100 * (want == I).all(axis=1).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="catalogue size")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
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
                    help="minkowski (a pow() per element, 20-40x slower than L1) is timed on the first N queries, "
                         "both sides (0: all)")
    ap.add_argument("--tie-rtol", type=float, default=1e-5,
                    help="relative tolerance under which two float64 distances count as tied (ties %%)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    C, Q = make_data(args.n, args.dim, args.queries, args.clusters, args.seed)
    print(f"data: catalogue {C.shape}, queries {Q.shape}, float32, {args.clusters} clusters, seed {args.seed} "
          f"({time.perf_counter() - t0:.1f} s to generate); medians of {args.rounds} interleaved rounds after a "
          "warm-up", flush=True)
    header = (f"{'metric':<12}{'engine':<11}{'ours s':>8}{'baseline':>22}{'base s':>8}{'ratio':>7}"
              f"{'agree %':>9}{'ties %':>8}{'exact %':>9}{'queries':>8}")
    print(header, flush=True)
    for metric in args.metrics:
        Qm = Q[:args.minkowski_queries] if metric == "minkowski" and args.minkowski_queries else Q
        if metric in LP_METRICS:
            baselines = {"faiss IndexFlat " + get_measure(metric).faiss.removeprefix("METRIC_"):
                         lambda Qx, m=metric: faiss_lp_baseline(C, Qx, m, args.k, args.p),
                         "sklearn NN brute": lambda Qx, m=metric: sklearn_baseline(C, Qx, m, args.k, args.p)}
        else:
            baselines = {"faiss IndexFlat" + ("L2" if metric == "euclidean" else "IP"):
                         lambda Qx, m=metric: faiss_baseline(C, Qx, m, args.k)}
        engines = [DEFAULT_ENGINE[metric]] if args.engines == "default" else \
            [e for e, served in ENGINES.items() if metric in served]
        for engine in engines:
            knn(C, Qm[:10], metric, k=args.k, p=args.p, engine=engine)  # warm-up
            for baseline in baselines.values():
                baseline(Qm[:10])
            ours_times: list[float] = []
            base_times: dict[str, list[float]] = {name: [] for name in baselines}
            base_I: dict[str, np.ndarray] = {}
            for _ in range(args.rounds):
                t1 = time.perf_counter()
                _, I = knn(C, Qm, metric, k=args.k, p=args.p, engine=engine)
                ours_times.append(time.perf_counter() - t1)
                for name, baseline in baselines.items():
                    t, base_I[name] = baseline(Qm)
                    base_times[name].append(t)
            ours_t = float(np.median(ours_times))
            n_verify = min(args.verify, len(Qm))
            exact = exact_share(C, Qm[:n_verify], I[:n_verify], metric, args.k, args.p) if n_verify else np.nan
            for name in baselines:
                base_t = float(np.median(base_times[name]))
                ties = agreement_ties(C, Qm, I, base_I[name], metric, args.p, args.tie_rtol)
                print(f"{metric:<12}{engine:<11}{ours_t:>8.2f}{name:>22}{base_t:>8.2f}{ours_t / base_t:>7.2f}"
                      f"{agreement(I, base_I[name]):>9.1f}{ties:>8.1f}{exact:>9.1f}{len(Qm):>8d}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
