"""Reading a run's vectors back from the feature store: time and memory of ``FeatureStore.features`` (streamed
into one preallocated array) against the previous algorithm (every blob fetched, then joined), kept here as
the baseline, and of ``FeatureStore.iter_features`` (one chunk at a time). A script that prints ratios measured
in one run; nothing is asserted.

    .venv/bin/python benchmarks/store.py                       # 200,000 x 1280 float32 (1.0 GB of vectors)
    .venv/bin/python benchmarks/store.py --n 50000 --rounds 5  # quicker

Data: ``--n`` x ``--dim`` standard-normal float32 vectors (fixed seed) written in catalogue order, in batches,
into a temporary store (deleted afterwards unless ``--keep``). Per variant it prints:

* read seconds: the median of ``--rounds`` interleaved rounds (the order of the variants alternates from round
  to round) after one warm-up read of each (the file is then in the page cache for all of them), in this
  process (``seconds``: memory freed by the previous reads is reused, which favours the old read's many small
  blobs over one fresh array) and in a fresh process per read (``fresh s``: a first read, as a notebook does);
* Python peak: the peak of ``tracemalloc`` during one read above the level before it (numpy arrays and the
  fetched ``bytes`` both count; a separate, interleaved pass, since tracing slows the allocations down);
* RSS peak growth: ``VmHWM`` minus ``VmRSS`` before the read, in a fresh process per variant and round (what
  the operating system saw, SQLite's own buffers included);

each also as a multiple of the vectors' own size, and ``new / old`` ratios. The old and new reads are checked
to return the same ids and bit-identical vectors.

Time: both reads write the whole output into fresh memory once. numpy asks the kernel for transparent huge
pages on large arrays (``madvise``); where THP ``defrag`` is ``madvise`` and memory is fragmented, those page
faults stall on compaction, which the old read's ``bytearray`` never asked for. Run with
``NUMPY_MADVISE_HUGEPAGE=0`` to see the read without that effect.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pandas as pd

from cbir.store import FeatureStore, StoreError, _crc32

VARIANTS = ("old", "new", "iter")
MiB = 2**20


# ----------------------------------------------------------------------------------------- the baseline
def old_features(store: FeatureStore, run_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``FeatureStore.features(run_id)`` as it was before streaming (commit ddde2ac): ``fetchall`` of every
    blob, the checks, then one ``bytearray`` join in catalogue order: about twice the vectors' memory."""
    con = store._connect()
    _, dim = store._require_run(con, run_id)
    rows = con.execute("SELECT f.image_id, f.vector, i.rowid, f.crc32 FROM features f LEFT JOIN images i"
                       " ON i.image_id = f.image_id WHERE f.run_id = ?", (int(run_id),)).fetchall()
    dim = int(dim or 0)
    got_ids, blobs, pos, crcs = zip(*rows) if rows else ((), (), (), ())
    width = dim * 4
    damaged = [i for i, b, c in zip(got_ids, blobs, crcs) if len(b) != width or (c is not None and c != _crc32(i, b))]
    if damaged:
        raise StoreError(f"{store.path}: run {run_id}: {len(damaged)} stored vector(s) are damaged")
    pos = np.array([-1 if p is None else p for p in pos], dtype=np.int64)
    order = np.lexsort((pos, pos < 0))
    buffer = bytearray().join([blobs[i] for i in order])
    X = np.frombuffer(buffer, dtype="<f4").reshape(len(order), dim).astype(np.float32, copy=False)
    out_ids = np.array([got_ids[i] for i in order], dtype=str)
    if not np.isfinite(X).all():
        raise StoreError(f"{store.path}: run {run_id}: non-finite vectors")
    return out_ids, X


def iter_read(store: FeatureStore, run_id: int, chunk: int) -> tuple[int, float]:
    """Stream the run with ``iter_features`` (what a streaming consumer holds: one chunk); returns (rows, sum)."""
    n, total = 0, 0.0
    for ids, X in store.iter_features(run_id, chunk=chunk):
        n += len(ids)
        total += float(X[:, 0].sum())
    return n, total


def reader(variant: str, store: FeatureStore, run_id: int, chunk: int) -> Callable[[], object]:
    if variant == "old":
        return lambda: old_features(store, run_id)
    if variant == "new":
        return lambda: store.features(run_id)
    return lambda: iter_read(store, run_id, chunk)


# ----------------------------------------------------------------------------------------- measuring
def status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def child(args: argparse.Namespace) -> int:
    """One read of ``--child`` in this fresh process; prints ``{"rss_growth": bytes, "seconds": s}``."""
    store = FeatureStore(args.store, readonly=True)
    run_id = int(store.runs()["run_id"].iloc[0])
    read = reader(args.child, store, run_id, args.chunk)
    before = status_kb("VmRSS")
    t0 = time.perf_counter()
    result = read()
    seconds = time.perf_counter() - t0
    growth = (status_kb("VmHWM") - before) * 1024
    del result
    print(json.dumps({"rss_growth": growth, "seconds": seconds}))
    return 0


def fresh_read(variant: str, path: str, chunk: int) -> tuple[int, float]:
    """(RSS growth in bytes, seconds) of one read in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--store", path, "--chunk", str(chunk)],
                         check=True, capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return int(got["rss_growth"]), float(got["seconds"])


def traced_peak(read: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = read()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del result
    return peak


def write_run(path: str, n: int, dim: int, batch: int, seed: int) -> int:
    ids = np.array([f"img{i:08d}" for i in range(n)])
    store = FeatureStore(path)
    store.put_catalog(pd.DataFrame({"image_id": ids, "path": [f"/data/{i}.jpg" for i in ids]}))
    run_id = store.start_run({"model": "synthetic", "dim": dim})
    rng = np.random.default_rng(seed)
    for s in range(0, n, batch):
        store.put_features(run_id, ids[s:s + batch], rng.standard_normal((min(batch, n - s), dim), dtype=np.float32))
    store.close()
    return run_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="vectors in the run")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is shown)")
    ap.add_argument("--chunk", type=int, default=4096, help="rows per chunk of iter_features")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="folder for the temporary store (default: the system's temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    folder = tempfile.mkdtemp(prefix="cbir-store-bench-", dir=args.dir)
    path = os.path.join(folder, "features.sqlite")
    try:
        t0 = time.perf_counter()
        run_id = write_run(path, args.n, args.dim, 10_000, args.seed)
        data = args.n * args.dim * 4
        print(f"run: {args.n} x {args.dim} float32 = {data / MiB:.0f} MiB of vectors, store "
              f"{os.path.getsize(path) / MiB:.0f} MiB, written in {time.perf_counter() - t0:.1f} s", flush=True)
        store = FeatureStore(path, readonly=True)
        reads = {v: reader(v, store, run_id, args.chunk) for v in VARIANTS}

        ids_old, X_old = reads["old"]()  # warm-up (page cache) and the check
        ids_new, X_new = reads["new"]()
        same = bool((ids_old == ids_new).all() and np.array_equal(X_old.view(np.uint32), X_new.view(np.uint32)))
        del ids_old, X_old, ids_new, X_new
        reads["iter"]()
        print(f"old and new reads return the same ids and bit-identical vectors: {same}", flush=True)

        secs = {v: [] for v in VARIANTS}
        fresh_secs = {v: [] for v in VARIANTS}
        peaks = {v: [] for v in VARIANTS}
        rss = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for v in order:
                t1 = time.perf_counter()
                result = reads[v]()
                secs[v].append(time.perf_counter() - t1)
                del result
            for v in order:
                peaks[v].append(traced_peak(reads[v]))
            for v in order:
                growth, seconds = fresh_read(v, path, args.chunk)
                rss[v].append(growth)
                fresh_secs[v].append(seconds)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{v} {secs[v][-1]:.2f} s ({fresh_secs[v][-1]:.2f} s fresh)" for v in VARIANTS), flush=True)

        med = {v: (float(np.median(secs[v])), float(np.median(peaks[v])), float(np.median(rss[v])),
                   float(np.median(fresh_secs[v]))) for v in VARIANTS}
        labels = {"old": "features, old (fetchall + join)", "new": "features, streamed",
                  "iter": f"iter_features (chunk {args.chunk})"}
        print(f"\n{'read':<34}{'seconds':>9}{'fresh s':>9}{'python peak MiB':>17}{'x data':>8}"
              f"{'RSS growth MiB':>16}{'x data':>8}")
        for v in VARIANTS:
            s, p, g, f = med[v]
            print(f"{labels[v]:<34}{s:>9.2f}{f:>9.2f}{p / MiB:>17.0f}{p / data:>8.2f}{g / MiB:>16.0f}{g / data:>8.2f}")
        for v in ("new", "iter"):
            print(f"ratio {v} / old: time {med[v][0] / med['old'][0]:.2f} "
                  f"(fresh process {med[v][3] / med['old'][3]:.2f}), python peak {med[v][1] / med['old'][1]:.2f}, "
                  f"RSS growth {med[v][2] / med['old'][2]:.2f}")
        print(f"(medians of {args.rounds} interleaved rounds after a warm-up; data = {data / MiB:.0f} MiB; "
              f"NUMPY_MADVISE_HUGEPAGE={os.environ.get('NUMPY_MADVISE_HUGEPAGE', 'unset')})")
        store.close()
    finally:
        if args.keep:
            print(f"store kept: {path}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
