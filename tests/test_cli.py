"""The ``cbir`` command on bad input: exit code 1 and one ``error: ...`` line naming the file, never a
traceback, and a reading command never creates a store."""
from __future__ import annotations

import re

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cbir.cli import main
from cbir.store import FeatureStore

IDENTITY = {"model": "tiny", "input_size": 16, "dim": 64}


def _error(capsys) -> str:
    """The one ``error: ...`` line on stderr (progress bars aside); no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


def _store_with_two_runs(path: Path) -> tuple[FeatureStore, np.ndarray]:
    fs = FeatureStore(path)
    ids = [f"img{i}" for i in range(4)]
    fs.put_catalog(pd.DataFrame({"image_id": ids, "path": [f"/x/{i}.png" for i in ids]}))
    X = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for k, pooling in enumerate(("gap", "mac")):
        fs.put_features(fs.start_run({**IDENTITY, "pooling": pooling}), ids, X + 10 * k)
    fs.close()
    return fs, X


def test_export_of_a_missing_store_fails_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "features.sqlite"
    assert main(["export", "--store", str(missing), "--out", str(tmp_path / "x.npz")]) == 1
    assert _error(capsys) == f"error: {missing}: no such feature store"
    assert not (tmp_path / "no").exists() and not (tmp_path / "x.npz").exists()


def test_export_of_an_unknown_run_lists_the_runs(tmp_path, capsys):
    _store_with_two_runs(tmp_path / "s.sqlite")
    assert main(["export", "--store", str(tmp_path / "s.sqlite"), "--run", "99", "--out", str(tmp_path / "x")]) == 1
    assert _error(capsys) == f"error: run 99 not found in {tmp_path / 's.sqlite'}; runs: 1, 2"
    assert main(["export", "--store", str(tmp_path / "s.sqlite"), "--run", "2", "--out", str(tmp_path / "x")]) == 0


def test_export_of_a_store_without_runs_or_of_a_non_database(tmp_path, capsys):
    FeatureStore(tmp_path / "empty.sqlite").close()
    assert main(["export", "--store", str(tmp_path / "empty.sqlite"), "--out", str(tmp_path / "x")]) == 1
    assert _error(capsys) == f"error: {tmp_path / 'empty.sqlite'}: no runs to export"
    (tmp_path / "junk.sqlite").write_bytes(b"not a database, just text " * 200)
    assert main(["export", "--store", str(tmp_path / "junk.sqlite"), "--out", str(tmp_path / "x")]) == 1
    assert _error(capsys).startswith(f"error: {tmp_path / 'junk.sqlite'}: not a usable SQLite feature store")


def test_export_of_a_damaged_vector_fails_naming_the_ids(tmp_path, capsys):
    path = tmp_path / "s.sqlite"
    _, X = _store_with_two_runs(path)
    data = bytearray(path.read_bytes())
    at = data.find(X[2].tobytes())  # run 1's vector of img2
    assert at > 0 and data.find(X[2].tobytes(), at + 1) < 0
    data[at + 40:at + 40 + 128] = bytes(range(128))
    path.write_bytes(bytes(data))
    assert main(["export", "--store", str(path), "--run", "1", "--out", str(tmp_path / "x.npz")]) == 1
    assert _error(capsys) == (f"error: {path}: run 1: 1 stored vector(s) are damaged (checksum or size mismatch): "
                              "['img2']; re-extract them into a new store or restore a backup")
    assert not (tmp_path / "x.npz").exists()


def _manifest(folder: Path, colours: list[tuple[int, int, int]], *, text: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        if text:
            (folder / f"p{i}.png").write_text("not an image")
        else:
            Image.new("RGB", (32, 32), colour).save(folder / f"p{i}.png")
    pd.DataFrame({"image": [f"p{i}.png" for i in range(len(colours))], "category": "tops",
                  "subcategory": "tee"}).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_extract_on_a_catalogue_without_usable_images_fails_before_making_a_store(tmp_path, capsys):
    manifest = _manifest(tmp_path / "shop", [(0, 0, 0)] * 3, text=True)
    store = tmp_path / "s.sqlite"
    assert main(["extract", "--catalog", str(manifest), "--model", "color_hist", "--store", str(store)]) == 1
    assert "no usable image" in _error(capsys)
    assert not store.exists()


def test_extract_a_second_catalogue_into_the_same_store_reports_replaced_vectors(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    args = ["extract", "--model", "color_hist", "--store", str(store), "--workers", "0"]
    a = _manifest(tmp_path / "a", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    b = _manifest(tmp_path / "b", [(255, 0, 0), (9, 9, 9), (0, 0, 255)])  # p1 is another picture
    assert main([*args, "--catalog", str(a)]) == 0
    assert capsys.readouterr().out == f"run 1: 3 feature vectors in {store}\n"
    assert main([*args, "--catalog", str(b)]) == 0
    assert capsys.readouterr().out == f"run 1: 3 feature vectors in {store} (1 replaced: their files changed)\n"
    fresh = tmp_path / "fresh.sqlite"
    assert main([*args[:-4], "--store", str(fresh), "--catalog", str(b)]) == 0
    np.testing.assert_array_equal(FeatureStore(store).features(1)[1], FeatureStore(fresh).features(1)[1])


def test_a_store_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    """A store whose folder would be a file: the message names the store and the folder, no traceback."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    store = tmp_path / "blocker" / "s.sqlite"
    manifest = _manifest(tmp_path / "shop", [(1, 2, 3)])
    assert main(["extract", "--catalog", str(manifest), "--model", "color_hist", "--store", str(store)]) == 1
    assert _error(capsys) == f"error: {store}: cannot create the store's folder {tmp_path / 'blocker'} (File exists)"


def test_model_and_pooling_choices_come_from_the_registries(capsys):
    from cbir.cli import build_parser
    from cbir.extractors import extractor_names

    parser = build_parser()
    args = parser.parse_args(["extract", "--catalog", "c", "--store", "s", "--model", "mobilenet_v2",
                              "--pooling", "None"])
    assert args.pooling is None  # `none` in any case means no pooling, as the help says
    assert parser.parse_args(["extract", "--catalog", "c", "--store", "s", "--model", "lbp",
                              "--pooling", "gem"]).pooling == "gem"
    with pytest.raises(SystemExit):
        parser.parse_args(["extract", "--catalog", "c", "--store", "s", "--model", "mobilenet_v2",
                           "--pooling", "avg"])
    assert "unknown pooling 'avg'; choose from gap, mac, gem, rmac or none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["extract", "--catalog", "c", "--store", "s", "--model", "mobilenet"])
    err = capsys.readouterr().err
    assert "invalid choice: 'mobilenet'" in err and "efficientnet_lite2" in extractor_names()


def test_version_and_list_come_from_the_package_and_the_registries(capsys, tmp_path):
    from cbir.extractors import extractor_names
    from cbir.measures import MEASURES

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and re.fullmatch(r"cbir \d+\.\d+\.\d+\n", capsys.readouterr().out)
    assert main(["list", "models"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(extractor_names())
    assert main(["list", "measures"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(MEASURES)
    assert main(["list", "params"]) == 0
    assert "params/demo.yaml" in capsys.readouterr().out.splitlines()
    assert main(["list", "runs", "--store", str(tmp_path / "none.sqlite")]) == 1
    assert "no such feature store" in capsys.readouterr().err and not (tmp_path / "none.sqlite").exists()


def test_run_checks_every_params_file_before_any_notebook(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(f"name: good\ncatalog: demo\nout_dir: {tmp_path / 'good_out'}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: mobilenet_v3\n")
    assert main(["run", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "mobilenet_v3" in err
    assert not (tmp_path / "good_out").exists()  # the good file, first in line, did not start either


@pytest.mark.parametrize("command", [[], ["list"], ["catalog"], ["catalog", "check"], ["demo-catalog"],
                                     ["extract"], ["export"], ["run"]])
def test_help_is_written_for_users_with_examples(command, capsys):
    from cbir.cli import EXAMPLES

    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "\nexamples:\n" in text and "The thin" not in text  # the user's help, not the module docstring
    examples = [line.strip().split("  ")[0] for line in text.split("\nexamples:\n", 1)[1].splitlines()
                if line.startswith("  cbir ")]
    assert len(examples) >= 2
    # a subcommand's page shows that subcommand (export also shows how to list the runs to export)
    if command and command != ["export"]:
        assert all(e.startswith(f"cbir {command[0]} ") for e in examples), examples
    name = " ".join(command) or "cbir"
    assert EXAMPLES.get(name, EXAMPLES["catalog check"]).splitlines()[1] in text  # laid out as written
