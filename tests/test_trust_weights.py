"""Issue 10, items 1-2: no code runs from a weights file, and the app loads only the weights file it checked.

Weights files: a payload (a ``__reduce__`` calling ``os.system`` or ``open`` to create a marker file) is
planted in every pickle of the legacy ``.pth`` stream (magic number, protocol, sys_info, state dict, storage
keys), cut from the real pip checkpoint, and in the ``data.pkl`` of a zip checkpoint; the marker must never
appear. App: a store whose run identity is tampered to point at another weights file is refused, naming the
run, the file and the SHA-1, and an audit hook proves that file is never opened.
"""
from __future__ import annotations

import ast
import builtins
import collections
import io
import json
import os
import pickle
import pickletools
import re
import shlex
import sqlite3
import sys
import zipfile
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from cbir import efficientnet_lite as el

REPO = Path(__file__).resolve().parents[1]
LEGACY_POSITIONS = ("magic", "protocol", "sys_info", "state_dict", "keys")


class _Payload:
    """Unpickling this runs ``os.system('touch MARKER')`` or ``open(MARKER, 'w')``."""

    def __init__(self, kind: str, marker: Path) -> None:
        self.kind, self.marker = kind, marker

    def __reduce__(self):
        if self.kind == "system":
            return os.system, (f"touch {shlex.quote(str(self.marker))}",)
        return builtins.open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def legacy_segments() -> tuple[list[bytes], bytes]:
    """The pip checkpoint cut at its pickle boundaries: the 5 pickles, then the raw storage bytes."""
    data = el.imagenet_checkpoint().read_bytes()
    stream, bounds = io.BytesIO(data), [0]
    for _ in LEGACY_POSITIONS:
        for _ in pickletools.genops(stream):
            pass
        bounds.append(stream.tell())
    return [data[a:b] for a, b in zip(bounds, bounds[1:])], data[bounds[-1]:]


def test_legacy_positions_are_the_real_format(legacy_segments):
    segments, tail = legacy_segments
    plain = {name: pickle.loads(seg) for name, seg in zip(LEGACY_POSITIONS, segments) if name != "state_dict"}
    assert plain["magic"] == el._LEGACY_MAGIC and plain["protocol"] == 1001
    assert plain["sys_info"]["little_endian"] is True
    assert len(plain["keys"]) == 296 and all(isinstance(k, str) for k in plain["keys"])  # one storage per tensor
    assert len(tail) > 18_000_000  # the float32 storages follow the keys


@pytest.mark.parametrize("kind", ["system", "open"])
@pytest.mark.parametrize("position", LEGACY_POSITIONS)
def test_payload_in_any_legacy_pickle_is_refused(tmp_path, legacy_segments, position, kind):
    segments, _ = legacy_segments
    marker = tmp_path / "executed"
    planted = list(segments)
    planted[LEGACY_POSITIONS.index(position)] = pickle.dumps(_Payload(kind, marker), protocol=2)
    evil = tmp_path / f"evil-{position}.pth"
    evil.write_bytes(b"".join(planted))
    with pytest.raises(el.CheckpointError, match=re.escape(f"{evil}: refusing to unpickle")):
        el.load_torch_state_dict(evil)
    assert not marker.exists()


def test_payload_nested_in_plain_data_is_refused(tmp_path, legacy_segments):
    segments, _ = legacy_segments
    marker = tmp_path / "executed"
    keys = pickle.loads(segments[4])
    planted = list(segments)
    planted[2] = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                               "type_sizes": {"int": _Payload("system", marker)}}, protocol=2)
    planted[4] = pickle.dumps(keys + [_Payload("open", marker)], protocol=2)
    evil = tmp_path / "nested.pth"
    evil.write_bytes(b"".join(planted))
    with pytest.raises(el.CheckpointError, match=re.escape(f"{evil}: refusing to unpickle")):
        el.load_torch_state_dict(evil)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["system", "open"])
@pytest.mark.parametrize("nested", [False, True])
def test_payload_in_zip_data_pkl_is_refused(tmp_path, kind, nested):
    marker = tmp_path / "executed"
    payload = _Payload(kind, marker)
    obj = collections.OrderedDict(weight=payload) if nested else payload
    evil = tmp_path / "evil-zip.pth"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
    with pytest.raises(el.CheckpointError, match=re.escape(f"{evil}: refusing to unpickle")):
        el.load_torch_state_dict(evil)
    assert not marker.exists()


def test_weights_payload_refused_through_extractor_and_model_loader(tmp_path, legacy_segments):
    from cbir.backbones import WeightsUnavailableError, build_extractor

    segments, _ = legacy_segments
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Payload("system", marker), protocol=2) + b"".join(segments[1:]))
    with pytest.raises(el.CheckpointError, match=re.escape(f"{evil}: refusing to unpickle posix.system")):
        el.load_efficientnet_lite0(evil)
    with pytest.raises(WeightsUnavailableError, match=re.escape(f"{evil}: refusing to unpickle")):
        build_extractor("efficientnet_lite0", pooling="gap", weights=evil)  # `cbir extract --weights evil.pth`
    assert not marker.exists()


def test_huge_storage_size_in_legacy_file_is_refused(tmp_path, legacy_segments):
    segments, tail = legacy_segments
    bad = tmp_path / "huge.pth"
    bad.write_bytes(b"".join(segments) + (2**62).to_bytes(8, "little") + tail[8:1000])
    claim = r"\S+ claims 18446744073709551616 bytes, but only \d+ are left"  # 2**62 float32 elements
    with pytest.raises(el.CheckpointError, match=re.escape(f"{bad}: storage ") + claim):
        el.load_torch_state_dict(bad)


def test_zip_with_a_damaged_member_names_the_file(tmp_path):
    bad = tmp_path / "damaged-zip.pth"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(collections.OrderedDict(), protocol=2))
    bad.write_bytes(bad.read_bytes().replace(b"OrderedDict\n", b"OrderedDicx\n"))  # CRC no longer matches
    with pytest.raises(el.CheckpointError, match=re.escape(f"{bad}: not a readable PyTorch checkpoint (BadZipFile")):
        el.load_torch_state_dict(bad)


_UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "torch.load", "joblib.load", "pd.read_pickle",
                 "pandas.read_pickle", "dill.load", "yaml.unsafe_load", "yaml.full_load", "eval", "exec",
                 "marshal.loads", "shelve.open"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of calls that may run code from data: plain pickle, torch.load, allow_pickle=True,
    Keras load_model without safe_mode=True, yaml.load without a SafeLoader (or a subclass defined here)."""
    safe_loaders = {"SafeLoader", "CSafeLoader"} | {
        node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
        and any(_dotted(b).rpartition(".")[2] in ("SafeLoader", "CSafeLoader") for b in node.bases)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name, kwargs = _dotted(node.func), {k.arg: k.value for k in node.keywords}
        allow, safe = kwargs.get("allow_pickle"), kwargs.get("safe_mode")
        loader = _dotted(kwargs.get("Loader", ast.Name(""))).rpartition(".")[2]
        if name in _UNSAFE_CALLS:
            found.append((node.lineno, name))
        if isinstance(allow, ast.Constant) and allow.value is True:
            found.append((node.lineno, f"{name}(allow_pickle=True)"))
        if name.endswith("load_model") and not (isinstance(safe, ast.Constant) and safe.value is True):
            found.append((node.lineno, f"{name} without safe_mode=True"))
        if name == "yaml.load" and loader not in safe_loaders:
            found.append((node.lineno, f"yaml.load with Loader={loader or '?'}"))
    return found


def test_code_scan_flags_unsafe_loaders():
    bad = ("import pickle, numpy as np, yaml, keras\npickle.load(f)\nnp.load(p, allow_pickle=True)\n"
           "keras.models.load_model(p)\nyaml.load(t, Loader=yaml.Loader)\n")
    good = ("class L(yaml.SafeLoader): pass\nyaml.load(t, Loader=L)\nnp.load(p)\n"
            "keras.saving.load_model(p, safe_mode=True)\nclass U(pickle.Unpickler): pass\nU(f).load()\n")
    assert [line for line, _ in _unsafe_calls(ast.parse(bad))] == [2, 3, 4, 5]
    assert _unsafe_calls(ast.parse(good)) == []


def test_no_code_running_loader_on_user_files_in_cbir():
    """Static guard over cbir/: only restricted unpicklers, SafeLoader YAML and safe_mode Keras loading."""
    found = [f"{path.relative_to(REPO)}:{line} {what}" for path in sorted((REPO / "cbir").rglob("*.py"))
             for line, what in _unsafe_calls(ast.parse(path.read_text(), filename=str(path)))]
    assert found == []


# ------------------------------------------------------------------------------------------------------
# Item 2: the app loads only the weights file it checked
# ------------------------------------------------------------------------------------------------------

_WATCHED: set[str] = set()
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path in _WATCHED:
            _OPENED.append(path)


@pytest.fixture()
def watch_opens():
    """``watch(path)``: record every Python-level open of ``path`` in the returned list."""
    if _audit not in getattr(sys, "_cbir_audit_hooks", ()):
        sys.addaudithook(_audit)
        sys._cbir_audit_hooks = (_audit,)
    _OPENED.clear()

    def watch(path: Path) -> list[str]:
        _WATCHED.add(str(path))
        return _OPENED

    yield watch
    _WATCHED.clear()


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), (200, 30, 60), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hist_store_file(tmp_path_factory) -> tuple[Path, int]:
    """A store with one complete colour-histogram run (8 bins) over 8 demo images."""
    from cbir.backbones import build_extractor
    from cbir.catalog import load_catalog
    from cbir.datasets import make_demo_catalog
    from cbir.extract import extract_features
    from cbir.store import FeatureStore

    root = tmp_path_factory.mktemp("trust")
    catalog = load_catalog(make_demo_catalog(root / "demo", n=8, seed=2, size=64)).usable()
    store = FeatureStore(root / "features.sqlite")
    run_id = extract_features(catalog, model=build_extractor("color_hist", bins=8), store=store,
                              progress=False, workers=0)
    return root / "features.sqlite", run_id


def _tampered_copy(src: Path, dst: Path, run_id: int, **changes) -> Path:
    """A copy of the store whose run ``run_id`` has its stored identity (``runs.params``) changed."""
    from cbir.store import canonical_json

    with closing(sqlite3.connect(src)) as con, closing(sqlite3.connect(dst)) as out:
        con.backup(out)
    with closing(sqlite3.connect(dst)) as con, con:
        identity = json.loads(con.execute("SELECT params FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0])
        identity.update(changes)
        con.execute("UPDATE runs SET params = ?, identity_key = ? WHERE run_id = ?",
                    (canonical_json(identity), canonical_json(identity), run_id))
    return dst


@pytest.fixture()
def evil_pth(tmp_path, legacy_segments) -> tuple[Path, Path]:
    """``(evil.pth, marker)``: a legacy checkpoint whose first pickle runs ``touch marker``."""
    segments, _ = legacy_segments
    marker = tmp_path / "executed"
    evil = tmp_path / "outside" / "evil.pth"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps(_Payload("system", marker), protocol=2) + b"".join(segments[1:]))
    return evil, marker


def test_untampered_store_still_searches(hist_store_file):
    from cbir.app import VisualSearchApp

    path, run_id = hist_store_file
    app = VisualSearchApp(path)
    found = app.search_bytes(_png(), "red.png")
    assert app.run_id == run_id and len(found) == 5
    assert app.extractor().dim == 24  # bins=8 from the stored params, not the default 32


@pytest.mark.parametrize("case", ["cnn_params_weights", "descriptor_params_weights", "params_model",
                                  "params_path_outside", "identity_file_outside"])
def test_tampered_identity_never_opens_another_weights_file(case, hist_store_file, tmp_path, evil_pth,
                                                            watch_opens, monkeypatch):
    from cbir.app import VisualSearchApp
    from cbir.rebuild import RunRefusedError

    src, run_id = hist_store_file
    evil, marker = evil_pth
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path / "weights"))  # evil.pth is not in a trusted folder
    sha1 = el.file_sha1(evil)
    opened = watch_opens(evil)
    cnn = {"model": "efficientnet_lite0", "layer": "top_activation", "pooling": "gap", "weights": "imagenet",
           "weights_sha1": el.file_sha1(el.imagenet_checkpoint()), "input_size": 224, "dim": 1280}
    changes, message = {
        "cnn_params_weights": ({**cnn, "params": {"weights": str(evil)}}, "params may not set 'weights'"),
        "descriptor_params_weights": ({"params": {"bins": 8, "weights": str(evil)}}, "params may not set 'weights'"),
        "params_model": ({"params": {"bins": 8, "model": "efficientnet_lite0"}}, "params may not set 'model'"),
        "params_path_outside": ({**cnn, "params": {"gem_p": 3.0, "l2_normalize": str(evil)}},
                                "params may not set 'gem_p'"),
        "identity_file_outside": ({**cnn, "weights": "evil.pth", "weights_file": str(evil), "weights_sha1": sha1},
                                  f"used the weights file 'evil.pth', which was not found with SHA-1 {sha1}"),
    }[case]
    store = _tampered_copy(src, tmp_path / "tampered.sqlite", run_id, **changes)
    app = VisualSearchApp(store)
    assert app.problem is None and app.run_id == run_id
    with pytest.raises(RunRefusedError, match=re.escape(f"run {run_id}") + ".*" + re.escape(message)):
        app.search_bytes(_png(), "red.png")
    with pytest.raises(RunRefusedError, match=re.escape(f"run {run_id}")):
        app.extractor()
    app.widget()  # the widget shows the refusal instead of dying
    data = _png()
    app.controls["upload"].value = ({"name": "red.png", "type": "image/png", "size": len(data),
                                     "content": memoryview(data),
                                     "last_modified": datetime(2024, 1, 1, tzinfo=timezone.utc)},)
    assert 'class="cbir-error"' in app.controls["message"].value and f"run {run_id}" in app.controls["message"].value
    assert not marker.exists()
    assert opened == []


def _file_run(tmp_path: Path, content: bytes, **identity) -> tuple[Path, dict]:
    weights = tmp_path / "weights" / "mine.weights.h5"
    weights.parent.mkdir(exist_ok=True)
    weights.write_bytes(content)
    return weights, {"model": "mobilenet_v2", "layer": "out_relu", "pooling": "gap", "weights": "mine.weights.h5",
                     "weights_file": "mine.weights.h5", **identity}


def test_weights_file_sha1_mismatch_is_refused_naming_run_file_and_sha1(tmp_path, monkeypatch):
    from cbir.app import extractor_kwargs, resolve_weights
    from cbir.rebuild import RunRefusedError

    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path / "weights"))
    weights, identity = _file_run(tmp_path, b"the real weights")
    good = el.file_sha1(weights)
    assert resolve_weights({**identity, "weights_sha1": good}, run=7) == str(weights)
    assert extractor_kwargs({**identity, "weights_sha1": good}, run=7)["weights"] == str(weights)
    other = tmp_path / "elsewhere" / "mine.weights.h5"  # same name, other content, passed as weights=
    other.parent.mkdir()
    other.write_bytes(b"other weights")
    wanted = "1" * 40
    with pytest.raises(RunRefusedError, match=re.escape(
            f"run 7 used the weights file 'mine.weights.h5', which was not found with SHA-1 {wanted}")) as info:
        resolve_weights({**identity, "weights_sha1": wanted}, weights=other, run=7)
    assert f"{other} has SHA-1 {el.file_sha1(other)}" in str(info.value)
    assert f"{weights} has SHA-1 {good}" in str(info.value)  # no silent fallback to the other same-named file


@pytest.mark.parametrize("stored", [None, "", "not-a-sha1"])
def test_weights_file_run_without_a_stored_sha1_is_refused(tmp_path, monkeypatch, stored):
    from cbir.app import resolve_weights
    from cbir.rebuild import RunRefusedError

    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path / "weights"))
    _, identity = _file_run(tmp_path, b"weights", weights_sha1=stored)
    with pytest.raises(RunRefusedError, match=re.escape("run 3 used the weights file 'mine.weights.h5' but records no "
                                                    "valid SHA-1")):
        resolve_weights(identity, run=3)


def test_descriptor_settings_come_from_the_builder_signature():
    from cbir.app import descriptor_settings, extractor_kwargs

    settings = descriptor_settings()
    assert {"bins", "space", "points", "radius", "method", "orientations", "pixels_per_cell",
            "cells_per_block", "roi", "roi_margin"} == set(settings)
    got = extractor_kwargs({"model": "lbp", "weights": "handcrafted", "params": {"points": 8, "radius": 1.0,
                                                                                 "method": "uniform"}})
    assert got == {"name": "lbp", "layer": None, "pooling": None, "weights": "none", "l2_normalize": False,
                   "points": 8, "radius": 1.0, "method": "uniform"}


@pytest.mark.parametrize("params, message", [
    ({"bins": "../../etc/passwd"}, "stored params bins='../../etc/passwd' is not of type int"),
    ({"roi": 1}, "stored params roi=1 is not of type bool"),
    ([["bins", 8]], "stored params must be a mapping, got list"),
])
def test_descriptor_params_of_the_wrong_type_are_refused(params, message):
    from cbir.app import extractor_kwargs
    from cbir.rebuild import RunRefusedError

    with pytest.raises(RunRefusedError, match=re.escape(f"run 4: {message}")):
        extractor_kwargs({"model": "color_hist", "weights": "handcrafted", "params": params}, run=4)


def test_backbone_run_with_params_is_refused():
    from cbir.app import extractor_kwargs
    from cbir.rebuild import RunRefusedError

    message = "run 5: stored params may not set 'bins' (a mobilenet_v2 run takes no params)"
    with pytest.raises(RunRefusedError, match=re.escape(message)):
        extractor_kwargs({"model": "mobilenet_v2", "weights": "imagenet", "params": {"bins": 8}}, run=5)


def test_rebuilt_imagenet_weights_must_match_the_stored_sha1(hist_store_file, tmp_path, mobilenet_v2_notop_weights):
    """An imagenet run made with other ImageNet weights (a stored SHA-1 that the file found here does not
    have) is refused after the build, naming the run, the file and both SHA-1s."""
    from cbir.app import VisualSearchApp
    from cbir.rebuild import RunRefusedError

    src, run_id = hist_store_file
    wanted = "2" * 40
    store = _tampered_copy(src, tmp_path / "other-imagenet.sqlite", run_id, model="mobilenet_v2", layer="out_relu",
                           pooling="gap", weights="imagenet", weights_file=mobilenet_v2_notop_weights.name,
                           weights_sha1=wanted, input_size=224, dim=1280, params=None)
    app = VisualSearchApp(store)
    with pytest.raises(RunRefusedError, match=re.escape(
            f"run {run_id}: the weights found here ({mobilenet_v2_notop_weights.name}, SHA-1 "
            f"{el.file_sha1(mobilenet_v2_notop_weights)}) are not the ones the run was made with (SHA-1 {wanted})")):
        app.search_bytes(_png(), "red.png")
