"""Shared fixtures: paths to ../shared (real data and weights), skipped cleanly when absent; unprivileged and
public folders for read-only tests; one demo run shared by the slow pipeline and report tests."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))
REAL_CATALOG = SHARED / "data" / "fashion-products-224"
MODELS = SHARED / "models"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def real_catalog_dir() -> Path:
    """The shared real catalogue (9,583 Myntra photos); skips when ../shared is absent."""
    if not (REAL_CATALOG / "manifest.csv").is_file():
        pytest.skip(f"real catalogue not found at {REAL_CATALOG}")
    return REAL_CATALOG


@pytest.fixture(scope="session")
def mobilenet_v2_weights() -> Path:
    """Real ImageNet weights for Keras MobileNetV2 (full, with top); skips when absent."""
    path = MODELS / "mobilenet_v2_imagenet.weights.h5"
    if not path.is_file():
        pytest.skip(f"MobileNetV2 weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def mobilenet_v2_notop_weights() -> Path:
    path = MODELS / "mobilenet_v2_imagenet_notop.weights.h5"
    if not path.is_file():
        pytest.skip(f"MobileNetV2 no-top weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def imagenet_labels() -> list[str]:
    """1001 ImageNet labels (index 0 = background) shipped beside the MobileNetV2 weights."""
    path = MODELS / "imagenet_labels_1001.txt"
    if not path.is_file():
        pytest.skip(f"ImageNet labels not found at {path}")
    return path.read_text().splitlines()


def _run_unprivileged(fn):
    """``fn()`` in a forked child without root rights (uid/gid 65534 when run as root: root ignores file
    modes), so read-only files and folders really are read-only; returns ``fn``'s JSON-able result or
    ``{"error": "<type>: <message>"}``."""
    import json
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            out = fn()
        except BaseException as exc:  # noqa: BLE001
            out = {"error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(w, "w") as fh:
            json.dump(out, fh)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        text = fh.read()
    os.waitpid(pid, 0)
    return json.loads(text)


@pytest.fixture
def as_unprivileged():
    """Run a function in a forked child without root rights: see :func:`_run_unprivileged`."""
    return _run_unprivileged


@pytest.fixture()
def shared_dir():
    """A folder every user can reach (pytest's tmp_path is private to root), removed afterwards."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="cbir-ro-"))
    folder.chmod(0o755)
    yield folder
    for p in [folder, *folder.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(folder)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """``cbir run params/demo.yaml`` into a temporary folder, once for the whole test session (the report tests and the pipeline test share it): stdout, stderr, out_dir."""
    out = tmp_path_factory.mktemp("demo-report") / "demo"
    capture = tmp_path_factory.mktemp("capture")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cbir.cli", "run", str(REPO / "params" / "demo.yaml"),
                           "-p", "out_dir", str(out), "-p", "store", str(out / "features.sqlite")],
                          capture_output=True, text=True, timeout=1800, cwd=capture)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "out": out,
            "seconds": time.perf_counter() - t0}


def within(seconds: float, func, *args, **kwargs):
    """``func(*args, **kwargs)`` in a daemon thread; fails (instead of hanging the suite) after ``seconds``."""
    import threading

    result: dict = {}

    def work() -> None:
        try:
            result["value"] = func(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(func, '__name__', func)} still running after {seconds} s: it hangs")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture()
def line():
    """Ten catalogue images on a line (x = 0..9), ids c0..c9; categories: c0-c4 'a', c5-c9 'b'."""
    import numpy as np
    import pandas as pd

    ids = np.array([f"c{i}" for i in range(10)])
    X = np.stack([np.arange(10.0), np.zeros(10)], axis=1).astype(np.float32)
    cats = pd.Series(["a"] * 5 + ["b"] * 5, index=ids)
    return ids, X, cats


@pytest.fixture()
def labels():
    """Labels of queries q1, q2 and catalogue images n1..n5 (categories A/B, sub-categories a1, a2, b1, b2)."""
    import pandas as pd

    return pd.DataFrame({
        "image_id": ["q1", "q2", "n1", "n2", "n3", "n4", "n5"],
        "category": ["A", "B", "A", "A", "B", "B", "A"],
        "subcategory": ["a1", "b1", "a1", "a2", "b1", "b2", "a1"],
    })


@pytest.fixture(scope="module")
def client():
    """A Dask LocalCluster of two worker PROCESSES, one thread each (what `--cluster local:2` starts), shared by
    the tests of one module (a module may kill a worker)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c
