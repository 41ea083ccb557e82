"""A run kept in its Parquet shards (``vectors="shards"``) against the same run ingested into SQLite: what the
ingestion costs and how reading compares. A script that prints ratios measured in one run; nothing is asserted.

    .venv/bin/python benchmarks/shards.py                        # 200,000 x 1280 float32 (1.0 GB of vectors)
    .venv/bin/python benchmarks/shards.py --n 50000 --rounds 3   # quicker

Data: ``--n`` x ``--dim`` standard-normal float32 vectors (fixed seed) in partitions of ``--partition`` rows,
written as the Dask workers write them (:func:`cbir.shards.write_shard`, one file per partition, then the
manifest), and registered in two stores: one run ingested into SQLite the way ``vectors="store"`` does
(each shard read, then one ``put_features`` transaction per shard), one run kept in the shards
(:meth:`FeatureStore.keep_vectors_in_shards`). It prints:

* writing: seconds to write the shards and, on top, seconds to ingest them into SQLite; bytes on disk of each;
* reading, per run: ``features(run)`` (everything, one array), ``iter_features`` (streamed in chunks of 4,096)
  and ``features(ids)`` of ``--lookups`` random ids (what re-ranking index candidates reads): the median of
  ``--rounds`` interleaved rounds after a warm-up, in this process (files in the page cache), and the peak
  RSS growth of one read in a fresh process (``VmHWM`` minus ``VmRSS`` before it), as a multiple of the
  vectors' size. Both runs are checked to return the same ids and bit-identical vectors.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cbir.shards import MANIFEST, read_shard, write_shard
from cbir.store import FeatureStore

MiB = 2**20


def status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def reads(store: FeatureStore, run_id: int, lookups: np.ndarray) -> dict:
    def everything():
        return store.features(run_id)

    def streamed():
        n, total = 0, 0.0
        for ids, X in store.iter_features(run_id, chunk=4096):
            n, total = n + len(ids), total + float(X[:, 0].sum())
        return n, total

    def looked_up():
        return store.features(run_id, lookups)

    return {"features": everything, "iter_features": streamed, "lookups": looked_up}


def child(args: argparse.Namespace) -> int:
    store = FeatureStore(args.store, readonly=True)
    lookups = np.array(json.loads(Path(args.lookup_file).read_text()))
    read = reads(store, int(args.run), lookups)[args.child]
    before = status_kb("VmRSS")
    t0 = time.perf_counter()
    result = read()
    seconds = time.perf_counter() - t0
    print(json.dumps({"rss_growth": (status_kb("VmHWM") - before) * 1024, "seconds": seconds}))
    del result
    return 0


def fresh(kind: str, path: Path, run_id: int, lookup_file: Path) -> tuple[int, float]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--store", str(path), "--run", str(run_id),
                          "--lookup-file", str(lookup_file)], check=True, capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return int(got["rss_growth"]), float(got["seconds"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--partition", type=int, default=4096, help="rows per shard (the Dask partition_size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lookups", type=int, default=1000, help="random ids read by features(ids)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lookup-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    tmp = Path(tempfile.mkdtemp(prefix="cbir-shards-bench-"))
    try:
        n, dim = args.n, args.dim
        data_bytes = n * dim * 4
        print(f"{n:,} x {dim} float32 ({data_bytes / MiB:.0f} MiB of vectors), shards of {args.partition:,} rows, "
              f"{args.rounds} interleaved rounds", flush=True)
        ids = np.array([f"img{i:08d}" for i in range(n)])
        catalog = pd.DataFrame({"image_id": ids, "path": [f"/data/{i}.jpg" for i in ids]})
        rng = np.random.default_rng(args.seed)
        shard_dir = tmp / "shards"
        shard_dir.mkdir()
        names = []
        t0 = time.perf_counter()
        for k, s in enumerate(range(0, n, args.partition)):
            part = ids[s:s + args.partition].tolist()
            X = rng.standard_normal((len(part), dim), dtype=np.float32)
            name = f"part-{k:06d}-{k:012d}.parquet"
            write_shard(shard_dir / name, part, X, list(range(len(part))), [f"{i}-sha" for i in part],
                        [None] * len(part), [None] * len(part), {"identity_sha1": "bench", "dim": str(dim)}, dim)
            names.append(name)
        (shard_dir / MANIFEST).write_text(json.dumps({"format": "1", "identity_sha1": "bench", "shards": names}))
        write_s = time.perf_counter() - t0
        shard_bytes = sum(p.stat().st_size for p in shard_dir.glob("part-*.parquet"))

        sql_path = tmp / "ingested.sqlite"
        sql = FeatureStore(sql_path)
        sql.put_catalog(catalog)
        sql_run = sql.start_run({"model": "synthetic", "dim": dim})
        t0 = time.perf_counter()
        for name in names:
            _, rows, X = read_shard(shard_dir / name)
            sql.put_features(sql_run, rows["image_id"].tolist(), X, sha1=rows["sha1"].tolist())
        sql.finish_run(sql_run)
        ingest_s = time.perf_counter() - t0
        sql._connect().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sql_bytes = sum(p.stat().st_size for p in tmp.glob("ingested.sqlite*"))

        kept_path = tmp / "kept.sqlite"
        kept = FeatureStore(kept_path)
        kept.put_catalog(catalog)
        kept_run = kept.start_run({"model": "synthetic", "dim": dim})
        kept.keep_vectors_in_shards(kept_run, shard_dir)
        kept.finish_run(kept_run, n_features=n, n_failures=0)
        kept_bytes = sum(p.stat().st_size for p in tmp.glob("kept.sqlite*"))
        print(f"\nwriting: shards {write_s:.1f} s ({shard_bytes / n:.0f} B/vector); ingesting them into SQLite "
              f"+{ingest_s:.1f} s ({ingest_s / write_s:.2f}x the shard writing; {n / ingest_s:,.0f} vectors/s), "
              f"+{sql_bytes / MiB:.0f} MiB of store ({sql_bytes / n:.0f} B/vector); the kept run's store: "
              f"{kept_bytes / MiB:.1f} MiB", flush=True)

        lookups = rng.choice(ids, min(args.lookups, n), replace=False)
        lookup_file = tmp / "lookups.json"
        lookup_file.write_text(json.dumps(lookups.tolist()))
        runs = {"sqlite": (sql, sql_run, sql_path), "shards": (kept, kept_run, kept_path)}
        # the same answers
        a_ids, a_X = sql.features(sql_run)
        b_ids, b_X = kept.features(kept_run)
        assert np.array_equal(a_ids, b_ids) and np.array_equal(a_X, b_X), "the two runs disagree"
        assert np.array_equal(sql.features(sql_run, lookups)[1], kept.features(kept_run, lookups)[1])
        del a_X, b_X
        rows = []
        for what in ("features", "iter_features", "lookups"):
            fns = {name: reads(store, run, lookups)[what] for name, (store, run, _) in runs.items()}
            for fn in fns.values():
                fn()  # warm-up
            times = {name: [] for name in fns}
            for r in range(args.rounds):
                for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    t0 = time.perf_counter()
                    out = fns[name]()
                    times[name].append(time.perf_counter() - t0)
                    del out
            for name, (_, run, path) in runs.items():
                growth, fresh_s = fresh(what, path, run, lookup_file)
                rows.append({"read": what, "vectors in": name, "seconds": float(np.median(times[name])),
                             "fresh s": fresh_s, "RSS peak MiB": growth / MiB,
                             "x data": growth / (data_bytes if what != "lookups" else len(lookups) * dim * 4)})
        table = pd.DataFrame(rows)
        print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        for what in ("features", "iter_features", "lookups"):
            t = table.set_index(["read", "vectors in"])["seconds"]
            print(f"  {what}: shards / sqlite = {t[(what, 'shards')] / t[(what, 'sqlite')]:.2f}x")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
