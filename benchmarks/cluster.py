"""Benchmark of extraction on a Dask cluster against the in-process pipeline (not a test).

Prints, for the first --n images of the shared real catalogue (../shared/data/fashion-products-224):
  in-process  cbir.extract.extract_features into a fresh store;
  dask        cbir.distributed.extract_distributed on a LocalCluster of --dask-workers worker processes
              (one thread each) into a fresh store: shards written by the workers, ingested by the client;
the medians of --rounds interleaved rounds (order alternating) after a warm-up that builds the model in the
client and in every worker (model build and cluster start-up are reported apart, not in the throughput),
the throughput ratio dask / in-process (target >= 0.9 on one 2-core box: no speed-up is expected there, the
point is scale-out), and whether the features are the same (ids, failures, max |difference| of the vectors).

It also measures the per-image CPU costs behind docs/SCALING.md: the model alone on pre-decoded uint8
batches (--cost-models, batch 32, median of timed batches after a warm-up), decoding (read + decode + resize,
one thread), Parquet shard bytes per image, and the resident memory of each worker after the run.

    .venv/bin/python benchmarks/cluster.py                  # 2,000 images, mobilenet_v2, 2 workers
    .venv/bin/python benchmarks/cluster.py --n 0 --rounds 1  # the whole catalogue
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))
DEFAULT_CATALOG = SHARED / "data" / "fashion-products-224"
DEFAULT_WEIGHTS = SHARED / "models" / "mobilenet_v2_imagenet_notop.weights.h5"


def real_catalog(root: Path, n: int) -> pd.DataFrame:
    """The first ``n`` rows (0: all) of the shared manifest: ``image_id, path, category, subcategory``."""
    manifest = pd.read_csv(root / "manifest.csv", dtype={"product_id": str})
    head = manifest if n <= 0 else manifest.iloc[:n]
    return pd.DataFrame({"image_id": head["product_id"].astype(str), "path": [str(root / p) for p in head["image"]],
                         "category": head["category"].astype(str), "subcategory": head["subcategory"].astype(str)})


def model_cost(model: str, weights: str, *, batch: int = 32, batches: int = 6) -> dict[str, float]:
    """Milliseconds per image of the model alone on random uint8 batches (median of ``batches`` after one
    warm-up batch), and its output dimension."""
    from cbir.extractors import build_extractor

    extractor = build_extractor(model, pooling="gap", weights=weights)
    x = np.random.default_rng(0).integers(0, 256, (batch, extractor.input_size, extractor.input_size, 3), np.uint8)
    extractor(x)
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        extractor(x)
        times.append(time.perf_counter() - t0)
    return {"model_ms_per_image": 1000 * statistics.median(times) / batch, "dim": int(extractor.dim),
            "input_size": int(extractor.input_size)}


def decode_cost(paths: list[str], size: int) -> float:
    """Milliseconds per image to read, hash, decode and resize (one thread), as the pipeline does."""
    import hashlib

    from cbir.images import decode_bytes, read_file_bytes

    t0 = time.perf_counter()
    for p in paths:
        data = read_file_bytes(p)
        hashlib.sha1(data).hexdigest()
        decode_bytes(data, size=size, name=p)
    return 1000 * (time.perf_counter() - t0) / len(paths)


def warm_worker(model: str, weights: str, batch: int) -> None:
    """On a worker: build the extractor (cached per process, as the tasks find it) and run one batch of the
    benchmark's shape, so no compilation lands in the timed rounds."""
    from cbir.extract import _resolve_extractor

    extractor, _ = _resolve_extractor(model, layer=None, pooling="gap", weights=weights, l2_normalize=False)
    extractor(np.zeros((batch, extractor.input_size, extractor.input_size, 3), np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--n", type=int, default=2000, help="first N images (0: the whole catalogue)")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--partition-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cost-models", nargs="*", default=["mobilenet_v2", "efficientnet_lite0"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import psutil
    from distributed import Client, LocalCluster

    from cbir.distributed import extract_distributed
    from cbir.extract import extract_features
    from cbir.store import FeatureStore

    df = real_catalog(args.catalog, args.n)
    for p in df["path"]:  # a warm page cache for every variant
        Path(p).read_bytes()
    result: dict = {"n_images": len(df), "model": args.model, "dask_workers": args.dask_workers,
                    "partition_size": args.partition_size, "batch_size": args.batch_size, "cpus": os.cpu_count()}

    costs = {}
    for name in args.cost_models:
        weights = args.weights if name == args.model else "imagenet"
        costs[name] = model_cost(name, weights)
        costs[name]["decode_ms_per_image"] = decode_cost(df["path"].iloc[:200].tolist(), costs[name]["input_size"])
        print(f"cost {name}: model {costs[name]['model_ms_per_image']:.1f} ms/img (batch 32, CPU), decode "
              f"{costs[name]['decode_ms_per_image']:.2f} ms/img, dim {costs[name]['dim']}", flush=True)
    result["costs"] = costs

    settings = dict(model=args.model, pooling="gap", weights=args.weights, batch_size=args.batch_size)
    work = Path(tempfile.mkdtemp(prefix="cbir-bench-dist-"))
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=args.dask_workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=40)
    client = Client(cluster)
    result["cluster_start_seconds"] = round(time.perf_counter() - t0, 2)
    warm = df.iloc[:64]
    t0 = time.perf_counter()
    extract_features(warm, store=work / "warm-a.sqlite", progress=False, **settings)
    result["client_model_build_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    client.run(warm_worker, args.model, args.weights, args.batch_size)  # every worker builds and runs its model
    extract_distributed(warm, store=work / "warm-b.sqlite", client=client, partition_size=args.batch_size,
                        progress=False, **settings)
    result["worker_warmup_seconds"] = round(time.perf_counter() - t0, 2)

    seconds: dict[str, list[float]] = {"in-process": [], "dask": []}
    stores: dict[str, tuple[FeatureStore, int]] = {}
    for r in range(args.rounds):
        order = ["in-process", "dask"] if r % 2 == 0 else ["dask", "in-process"]
        for kind in order:
            store = FeatureStore(work / f"{kind}-{r}.sqlite")
            t0 = time.perf_counter()
            if kind == "in-process":
                run_id = extract_features(df, store=store, progress=False, **settings)
            else:
                run_id = extract_distributed(df, store=store, client=client, partition_size=args.partition_size,
                                             progress=False, **settings)
            seconds[kind].append(time.perf_counter() - t0)
            stores[kind] = (store, run_id)
            print(f"round {r} {kind}: {len(df) / seconds[kind][-1]:.1f} img/s", flush=True)

    (a, ra), (b, rb) = stores["in-process"], stores["dask"]
    ids_a, X_a = a.features(ra)
    ids_b, X_b = b.features(rb)
    fa = a.failures(ra)[["image_id", "reason"]].sort_values("image_id", ignore_index=True)
    fb = b.failures(rb)[["image_id", "reason"]].sort_values("image_id", ignore_index=True)
    stats = b.run(rb)["stats"]
    shard_bytes = sum(p.stat().st_size for p in Path(stats["shard_dir"]).glob("part-*.parquet"))
    worker_rss = client.run(lambda: psutil.Process().memory_info().rss)
    with sqlite3.connect(a.path) as con:  # fold the WAL into the file before measuring its size
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    result.update(
        same_ids=bool(np.array_equal(ids_a, ids_b)), same_failures=bool(fa.equals(fb)),
        same_run_identity=a.run(ra)["params"] == b.run(rb)["params"],
        max_abs_difference=float(np.abs(X_a - X_b).max()) if np.array_equal(ids_a, ids_b) else None,
        n_vectors=len(ids_a), n_failures=len(fa),
        seconds={k: [round(s, 2) for s in v] for k, v in seconds.items()},
        images_per_second={k: round(len(df) / statistics.median(v), 2) for k, v in seconds.items()},
        shard_bytes_per_image=round(shard_bytes / len(df), 1), n_shards=stats["n_shards"],
        max_model_builds_per_worker=stats["max_model_builds_per_worker"],
        worker_rss_mib=sorted(round(v / 2**20) for v in worker_rss.values()),
        client_rss_mib=round(psutil.Process().memory_info().rss / 2**20),
        store_bytes_per_image=round(sum(Path(str(a.path) + suffix).stat().st_size for suffix in ("", "-wal")
                                        if Path(str(a.path) + suffix).exists()) / len(df), 1))
    result["throughput_ratio"] = round(result["images_per_second"]["dask"]
                                       / result["images_per_second"]["in-process"], 3)
    client.close()
    cluster.close()

    print()
    print(f"{len(df)} images of {args.catalog.name}, {args.model}, {os.cpu_count()} CPUs, "
          f"median of {args.rounds} interleaved round(s)")
    print(f"{'':12s} {'img/s':>8s}  seconds")
    for kind in ("in-process", "dask"):
        print(f"{kind:12s} {result['images_per_second'][kind]:8.2f}  {result['seconds'][kind]}")
    print(f"throughput ratio dask / in-process: {result['throughput_ratio']:.3f} (target >= 0.9)")
    print(f"same ids: {result['same_ids']}, same failures: {result['same_failures']}, same run identity: "
          f"{result['same_run_identity']}, max |difference|: {result['max_abs_difference']:.2e}")
    print(f"cluster start {result['cluster_start_seconds']} s, worker warm-up {result['worker_warmup_seconds']} s; "
          f"worker RSS {result['worker_rss_mib']} MiB; shard {result['shard_bytes_per_image']} B/image, "
          f"SQLite {result['store_bytes_per_image']} B/image")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
