"""The papermill runner on tiny throwaway notebooks: order, injection, run.json, skip, force, failure."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cbir import cli, run
from cbir.params import ParamsError

PARAMS_CELL = 'out_dir = "unset"\nstore = "unset"\nk = 5\nseed = 0\nmetrics = ["cosine"]'
# every notebook appends "<stem> k=<k> seed=<seed> metrics=<metrics> cwd=<folder>" to <out_dir>/order.txt
LOG_CELL = (
    "import os, pathlib\n"
    "line = f'{STEM} k={k} seed={seed} metrics={\",\".join(metrics)} cwd={pathlib.Path.cwd().name}'\n"
    "with open(pathlib.Path(out_dir) / 'order.txt', 'a') as fh:\n"
    "    fh.write(line + '\\n')\n"
    "print(line)"
)


def _notebook(path: Path, *, extra: list[str] = (), parameters: str = PARAMS_CELL) -> Path:
    nb = new_notebook(cells=[new_markdown_cell(f"# {path.stem}")])
    params = new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells += [params, new_code_cell(LOG_CELL.replace("{STEM}", path.stem))]
    nb.cells += [new_code_cell(src) for src in extra]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def notebooks(tmp_path: Path) -> Path:
    """00, 01 (fails when seed == 13, in its 4th cell), 07 (app) and 08 (summary)."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    _notebook(folder / "00_first.ipynb",
              extra=["pathlib.Path(store).write_text('features of ' + str(k))",
                     "import pandas as pd\n"
                     "pd.DataFrame({'k': [k]}).to_csv(pathlib.Path(out_dir) / 'tables' / 'k.csv', index=False)"])
    _notebook(folder / "01_second.ipynb",
              extra=["if seed == 13:\n    raise ValueError(f'unlucky seed {seed}')", "print('after')"])
    _notebook(folder / "07_app.ipynb")
    _notebook(folder / "08_summary.ipynb")
    (folder / "notes.ipynb").write_text("{}")  # not numbered: never run
    return folder


def _params(tmp_path: Path, name: str, **extra: object) -> Path:
    lines = [f"name: {name}", f"out_dir: {tmp_path / 'out' / name}", f"store: {tmp_path / 'out' / 'shared.sqlite'}",
             'notebooks: ["00", "01"]']
    extra = {"metrics": ["cosine"], **extra}
    lines += [f"{key}: {json.dumps(value)}" for key, value in extra.items()]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _order(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / "out" / name / "order.txt"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_runs_numbered_notebooks_in_order_with_injected_parameters(tmp_path, notebooks, capsys):
    params = _params(tmp_path, "alpha", k=7)
    assert run.run_params(params, overrides={"metrics": "[cosine, euclidean]"}, notebooks_dir=notebooks)

    out = tmp_path / "out" / "alpha"
    # 00 then 01, not 07/08; k from the file, metrics from the override, cwd = the notebooks folder
    assert _order(tmp_path, "alpha") == [
        "00_first k=7 seed=0 metrics=cosine,euclidean cwd=nbs",
        "01_second k=7 seed=0 metrics=cosine,euclidean cwd=nbs",
    ]
    assert sorted(p.name for p in out.glob("*.ipynb")) == ["00_first.ipynb", "01_second.ipynb"]
    assert (out / "tables" / "k.csv").read_text().split() == ["k", "7"]
    assert (out / "figures").is_dir()
    assert (tmp_path / "out" / "shared.sqlite").read_text() == "features of 7"

    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok"
    assert record["name"] == "alpha"
    assert record["parameters"]["k"] == 7
    assert record["parameters"]["metrics"] == ["cosine", "euclidean"]
    assert record["parameters"]["out_dir"] == str(out)
    assert record["overrides"] == {"metrics": "[cosine, euclidean]"}
    assert record["versions"]["numpy"] and record["versions"]["papermill"] and record["versions"]["pandas"]
    assert set(record["versions"]) >= {"numpy", "pandas", "keras", "tensorflow", "sklearn", "faiss", "cv2",
                                       "skimage", "papermill"}
    assert list(record["notebooks"]) == ["00_first", "01_second"]
    for entry in record["notebooks"].values():
        assert entry["status"] == "ok"
        assert entry["seconds"] >= 0
        # only the names the notebook declares are injected
        assert entry["parameters"] == ["k", "metrics", "out_dir", "seed", "store"]

    # the executed notebook holds papermill's injected cell with the absolute out_dir
    executed = nbformat.read(out / "00_first.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and f'out_dir = "{out}"' in injected[0].source
    assert "catalog" not in injected[0].source  # not declared by the notebook
    printed = capsys.readouterr().out
    assert "00_first ok" in printed and "01_second ok" in printed


@pytest.mark.slow
def test_rerun_skips_done_notebooks_force_and_changed_parameters_rerun(tmp_path, notebooks, capsys):
    params = _params(tmp_path, "beta")
    assert run.run_params(params, notebooks_dir=notebooks)
    assert len(_order(tmp_path, "beta")) == 2

    assert run.run_params(params, notebooks_dir=notebooks)  # same parameters: nothing executes
    assert len(_order(tmp_path, "beta")) == 2
    assert "skipped" in capsys.readouterr().out

    assert run.run_params(params, notebooks_dir=notebooks, force=True)
    assert _order(tmp_path, "beta")[2:] == ["00_first k=5 seed=0 metrics=cosine cwd=nbs",
                                            "01_second k=5 seed=0 metrics=cosine cwd=nbs"]

    assert run.run_params(params, overrides={"k": "9"}, notebooks_dir=notebooks)  # new parameters
    assert _order(tmp_path, "beta")[4:] == ["00_first k=9 seed=0 metrics=cosine cwd=nbs",
                                            "01_second k=9 seed=0 metrics=cosine cwd=nbs"]

    # an undeclared parameter changes nothing that a notebook sees: still skipped
    assert run.run_params(params, overrides={"k": "9", "color_bins": "8"}, notebooks_dir=notebooks)
    assert len(_order(tmp_path, "beta")) == 6

    # an edited notebook reruns, and so do the notebooks after it (they read its results)
    for stem, expected in (("01_second", ["01"]), ("00_first", ["00", "01"])):
        nb = nbformat.read(notebooks / f"{stem}.ipynb", as_version=4)
        nb.cells.append(new_code_cell("print('edited')"))
        nbformat.write(nb, notebooks / f"{stem}.ipynb")
        before = len(_order(tmp_path, "beta"))
        assert run.run_params(params, overrides={"k": "9"}, notebooks_dir=notebooks)
        assert [line[:2] for line in _order(tmp_path, "beta")[before:]] == expected


@pytest.mark.slow
def test_failure_names_notebook_and_cell_and_stops_only_this_run(tmp_path, notebooks, capsys, monkeypatch):
    good_first = _params(tmp_path, "good")
    bad = _params(tmp_path, "bad", seed=13)
    good_after = _params(tmp_path, "after")
    monkeypatch.setattr(run, "NOTEBOOKS_DIR", notebooks)

    assert cli.main(["run", str(good_first)]) == 0
    store = tmp_path / "out" / "shared.sqlite"
    good_record = (tmp_path / "out" / "good" / "run.json").read_text()
    capsys.readouterr()

    # the CLI goes on with the next params file after a failure and exits 1
    assert cli.main(["run", str(bad), str(good_after)]) == 1
    printed = capsys.readouterr().out
    assert "01_second.ipynb failed at cell 3, In [4], `if seed == 13:`: ValueError: unlucky seed 13" in printed

    record = json.loads((tmp_path / "out" / "bad" / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["notebooks"]["00_first"]["status"] == "ok"
    failed = record["notebooks"]["01_second"]
    assert failed["status"] == "failed"
    assert failed["error"]["cell"] == 3  # index in the source notebook (markdown title is cell 0)
    assert failed["error"]["ename"] == "ValueError"
    assert failed["error"]["evalue"] == "unlucky seed 13"
    assert _order(tmp_path, "bad") == ["00_first k=5 seed=13 metrics=cosine cwd=nbs",
                                       "01_second k=5 seed=13 metrics=cosine cwd=nbs"]  # never printed 'after'
    executed = nbformat.read(tmp_path / "out" / "bad" / "01_second.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for c in executed.cells if c.cell_type == "code" for o in c.outputs)

    # the next params file ran fully; the earlier run's record is untouched; the store holds the last writer
    assert json.loads((tmp_path / "out" / "after" / "run.json").read_text())["status"] == "ok"
    assert (tmp_path / "out" / "good" / "run.json").read_text() == good_record
    assert store.read_text() == "features of 5"

    # the failed notebook reruns next time (with a fixed seed), the done one is skipped
    assert run.run_params(bad, overrides={"seed": "1"}, notebooks_dir=notebooks)
    assert _order(tmp_path, "bad")[2:] == ["00_first k=5 seed=1 metrics=cosine cwd=nbs",
                                           "01_second k=5 seed=1 metrics=cosine cwd=nbs"]


@pytest.mark.slow
def test_only_runs_the_named_notebooks_including_the_summary(tmp_path, notebooks, capsys):
    params = _params(tmp_path, "gamma")
    assert run.run_params(params, only=["08", "00_first"], notebooks_dir=notebooks)
    assert _order(tmp_path, "gamma") == ["00_first k=5 seed=0 metrics=cosine cwd=nbs",
                                         "08_summary k=5 seed=0 metrics=cosine cwd=nbs"]
    assert not run.run_params(params, only=["05"], notebooks_dir=notebooks)
    assert "no notebook 05_*.ipynb" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'x1' is not a notebook number"):
        run.run_params(params, only=["x1"], notebooks_dir=notebooks)


@pytest.mark.slow
def test_missing_listed_notebook_is_reported_not_fatal(tmp_path, notebooks, capsys):
    params = _params(tmp_path, "delta")
    assert run.run_params(params, overrides={"notebooks": "[00, 02]"}, notebooks_dir=notebooks)
    record = json.loads((tmp_path / "out" / "delta" / "run.json").read_text())
    assert record["notebooks"]["02"] == {"status": "missing"}
    assert record["notebooks"]["00_first"]["status"] == "ok"
    assert "02: no notebook 02_*.ipynb" in capsys.readouterr().out


def test_bad_parameters_fail_before_any_notebook(tmp_path, notebooks, capsys):
    params = _params(tmp_path, "eps")
    with pytest.raises(ParamsError, match=r"-p kk: unknown parameter 'kk' \(did you mean 'k'\?\)"):
        run.run_params(params, overrides={"kk": "3"}, notebooks_dir=notebooks)
    assert not run.run_params(params, overrides={"catalog": str(tmp_path / "no.csv")}, notebooks_dir=notebooks)
    assert f"[eps] error: {params}: catalog not found: {tmp_path / 'no.csv'}" in capsys.readouterr().out
    assert not (tmp_path / "out" / "eps").exists()


def test_find_notebooks_and_selection(tmp_path, notebooks):
    found = run.find_notebooks(notebooks)
    assert list(found) == ["00", "01", "07", "08"]
    assert run.select_notebooks(found, ["00", "01", "02"]) == [
        ("00", notebooks / "00_first.ipynb"), ("01", notebooks / "01_second.ipynb"), ("02", None)]
    assert [p for p, _ in run.select_notebooks(found, ["00"], only=["8", "01"])] == ["01", "08"]
    _notebook(notebooks / "01_clash.ipynb")
    with pytest.raises(ValueError, match="two notebooks share the number 01"):
        run.find_notebooks(notebooks)


def test_python3_kernel_is_installed():
    resource_dir = Path(run.ensure_kernel("python3"))
    spec = json.loads((resource_dir / "kernel.json").read_text())
    assert spec["argv"][1:3] == ["-m", "ipykernel_launcher"]
    with pytest.raises(RuntimeError, match="no Jupyter kernel named 'no-such-kernel'"):
        run.ensure_kernel("no-such-kernel")


@pytest.mark.slow
def test_demo_params_notebook_00(tmp_path, repo_root):
    """The real demo pipeline, notebook 00 only, into a temporary output folder."""
    if not list((repo_root / "notebooks").glob("00_*.ipynb")):
        pytest.skip("notebooks/00_*.ipynb not written yet")
    out = tmp_path / "demo"
    ok = run.run_params(repo_root / "params" / "demo.yaml", only=["00"],
                        overrides={"out_dir": str(out), "store": str(out / "features.sqlite")})
    record = json.loads((out / "run.json").read_text())
    assert ok, record
    (entry,) = record["notebooks"].values()
    assert entry["status"] == "ok"
    assert record["parameters"]["model"] == "efficientnet_lite0"
    assert (out / Path(entry["notebook"]).name).is_file()


def test_kernels_are_quiet_and_progress_bars_go_to_the_terminal(tmp_path, capfd):
    """No kernel warning, C-level output in logs/<notebook>.log, tqdm bars on cbir run's stderr, not in the notebook."""
    folder = tmp_path / "quiet"
    folder.mkdir()
    _notebook(folder / "00_quiet.ipynb", extra=[
        "from tqdm import tqdm\nfor _ in tqdm(range(3), desc='work'):\n    pass",
        "from tqdm.auto import tqdm as auto_tqdm\nn = len(list(auto_tqdm(range(2), desc='auto')))",
        "import os\nos.write(2, b'C-LEVEL NOISE\\n')",
    ])
    params = _params(tmp_path, "quiet")
    capfd.readouterr()
    assert run.run_params(params, notebooks_dir=folder)  # 01 is listed but absent: reported, not fatal
    out, err = capfd.readouterr()
    assert "without encryption" not in err and "WARNING" not in err
    assert "C-LEVEL NOISE" not in err and "C-LEVEL NOISE" not in out
    assert re.search(r"\[00\] work: 100%\|", err) and re.search(r"\[00\] auto: 100%\|", err)
    assert "C-LEVEL NOISE" in (tmp_path / "out" / "quiet" / "logs" / "00_quiet.log").read_text()
    executed = nbformat.read(tmp_path / "out" / "quiet" / "00_quiet.ipynb", as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], outputs
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert re.search(r"^\[quiet\] 00_quiet ok \(\d+\.\d s\)$", out, flags=re.M)


MATCH_CELL = (
    "import pandas as pd\n"
    "rows = [('cosine', 0.95, 0.91, 0.98), ('chebyshev', 0.70, 0.62, 0.78)]\n"
    "pd.DataFrame([{'metric': m, 'k': 5, 'n_queries': 60, 'category_match': v, 'category_match_lo': lo,\n"
    "               'category_match_hi': hi} for m, v, lo, hi in rows]).to_csv(\n"
    "    pathlib.Path(out_dir) / 'tables' / 'category_match.csv', index=False)\n"
    "pd.DataFrame([{'a_metric': 'cosine', 'b_metric': 'chebyshev', 'mean_diff': 0.25, 'p_holm': 0.0,\n"
    "               'score': 'category_match'}]).to_csv(pathlib.Path(out_dir) / 'tables' / 'paired_tests.csv',\n"
    "                                                   index=False)"
)


@pytest.mark.slow
def test_report_and_findings_even_when_a_notebook_fails(tmp_path, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _notebook(folder / "00_first.ipynb", extra=[MATCH_CELL])
    _notebook(folder / "01_second.ipynb", extra=["if seed == 13:\n    raise ValueError(f'unlucky seed {seed}')"])
    params = _params(tmp_path, "rep", seed=13)
    assert not run.run_params(params, notebooks_dir=folder)
    printed = capsys.readouterr().out
    out = tmp_path / "out" / "rep"
    lines = printed.splitlines()
    at = lines.index("[rep] findings:")
    assert lines[at + 2] == ("    Category match (top 5, 60 queries): best: cosine 0.950 [0.910, 0.980]; "
                             "lower: chebyshev (Holm p < 0.001).")
    assert f"[rep] report: {out / 'report.html'}" in lines[at + 3:]
    doc = (out / "report.html").read_text()
    assert doc.index("01_second failed at cell 3: ValueError: unlucky seed 13") < doc.index("id='findings'")
    # the findings sit at the top of the executed notebooks, once, however often the run is repeated
    assert run.run_params(params, overrides={"seed": "1"}, notebooks_dir=folder)
    executed = nbformat.read(out / "00_first.ipynb", as_version=4)
    stamped = [c for c in executed.cells if run.FINDINGS_TAG in c.metadata.get("tags", [])]
    assert len(stamped) == 1 and executed.cells[1] is stamped[0]
    assert "best: cosine 0.950 [0.910, 0.980]" in stamped[0].source
    assert "failed" not in (out / "report.html").read_text().split("id='findings'")[0]


def test_check_params_files_refuses_a_bad_file_before_anything_runs(tmp_path, notebooks):
    good = _params(tmp_path, "good")
    bad = _params(tmp_path, "bad", model="vgg16x")
    with pytest.raises(ParamsError, match=r"bad\.yaml: model 'vgg16x' is not known \(did you mean 'vgg16'\?\)"):
        run.check_params_files([good, bad])
    assert not (tmp_path / "out").exists()
    run.check_params_files([good, good], overrides={"k": "3"})
