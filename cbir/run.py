"""The papermill runner behind ``cbir run``: one params file -> the numbered notebooks, in order ->
``outputs/<name>/`` (executed notebooks, ``tables/``, ``figures/``, ``run.json``).

``run.json`` records the parameters, library versions, the git commit, and per notebook its status
(``ok``, ``failed``, ``interrupted``, ``missing``), timings and, on failure, the failing cell. A
rerun skips a notebook whose status is ``ok`` for the same injected parameters (those its
``parameters`` cell declares) and the same notebook source, unless ``force`` or an earlier notebook
of the same run had to run (later notebooks read its results). A failing notebook stops its own run (later notebooks depend on it) and
leaves other runs, their outputs and the feature store untouched.

After the notebooks (all, or up to the failing one) ``<out_dir>/report.html`` is written
(:mod:`cbir.report`), its findings printed and put at the top of the executed notebooks. Kernels run
quietly: one line per notebook with its time, progress bars of long steps on this terminal, the kernels'
C-level output (TensorFlow start-up lines) in ``<out_dir>/logs/<notebook>.log``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

from cbir.params import DEFAULTS_FILE, REPO_ROOT, load_params, missing_paths, notebook_parameters

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "python3"
RUN_JSON = "run.json"
REPORT_NAME = "report.html"
LOGS_DIR = "logs"
#: arguments for every kernel: no "running over TCP without encryption" warning (once per notebook),
#: C-level output (TensorFlow's oneDNN/absl lines) left on the kernel's own stderr instead of copied into
#: the notebook, and :func:`kernel_setup` run before the first cell
KERNEL_ARGUMENTS = (
    "--IPKernelApp.log_level=ERROR",
    "--IPKernelApp.capture_fd_output=False",
    "--IPKernelApp.exec_lines=__import__('cbir.run').run.kernel_setup()",
)
#: environment of the kernel a notebook runs in: where its C-level stderr goes, and its progress-bar label
KERNEL_LOG_ENV = "CBIR_KERNEL_LOG"
KERNEL_LABEL_ENV = "CBIR_KERNEL_LABEL"
#: import name -> distributions that may provide it (the first installed one is reported)
VERSION_PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "pandas": ("pandas",),
    "keras": ("keras",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "sklearn": ("scikit-learn",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless"),
    "skimage": ("scikit-image",),
    "papermill": ("papermill",),
    "ipykernel": ("ipykernel",),
    "cbir": ("cbir",),
}
_NOTEBOOK_RE = re.compile(r"^(\d{2})_.+\.ipynb$")


def kernel_setup() -> None:
    """Run inside each notebook kernel started by ``cbir run`` (before the first cell).

    - progress bars (``tqdm`` and ``tqdm.auto``) go to the terminal of ``cbir run`` instead of the notebook
      (where they read as an error-coloured block), labelled with the notebook (``$CBIR_KERNEL_LABEL``);
    - the kernel's C-level stderr (TensorFlow's oneDNN and absl start-up lines) goes to the log file
      ``$CBIR_KERNEL_LOG`` (``<out_dir>/logs/<notebook>.log``) instead of the terminal;
    - TensorFlow's Python logger is set to errors only, and warnings raised inside TensorFlow or Keras are
      not shown.
    Never raises: a kernel that cannot be set up runs as before.
    """
    import logging
    import warnings

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(tensorflow|keras|tf_keras|absl)(\.|$)")
    try:
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        log_path = os.environ.get(KERNEL_LOG_ENV)
        if log_path:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 2)
            os.close(fd)
        _route_progress_bars(terminal, os.environ.get(KERNEL_LABEL_ENV, ""))
    except Exception:  # noqa: BLE001 - quieting is a nicety; the notebook must still run
        pass


def _route_progress_bars(terminal: Any, label: str) -> None:
    """Make ``tqdm.tqdm`` and ``tqdm.auto.tqdm`` write to ``terminal`` (functions import them when called)."""
    import tqdm
    import tqdm.auto
    import tqdm.std

    interactive = terminal.isatty()

    class TerminalBar(tqdm.std.tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("file", terminal)
            if not interactive:  # a log file, not a screen: an update every 10 s, not every 0.1 s
                kwargs.setdefault("mininterval", 10.0)
            if label and kwargs.get("desc") is not None:
                kwargs["desc"] = f"[{label}] {kwargs['desc']}"
            elif label:
                kwargs["desc"] = f"[{label}]"
            super().__init__(*args, **kwargs)

    tqdm.tqdm = TerminalBar
    tqdm.auto.tqdm = TerminalBar


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _log(message: str) -> None:
    print(message, flush=True)


def find_notebooks(notebooks_dir: str | Path = NOTEBOOKS_DIR) -> dict[str, Path]:
    """Two-digit prefix -> notebook path for every ``NN_*.ipynb`` in ``notebooks_dir``."""
    found: dict[str, Path] = {}
    for path in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb")):
        match = _NOTEBOOK_RE.match(path.name)
        if match is None:
            continue
        prefix = match.group(1)
        if prefix in found:
            raise ValueError(f"{notebooks_dir}: two notebooks share the number {prefix}: "
                             f"{found[prefix].name}, {path.name}")
        found[prefix] = path
    return found


def _prefix(token: str) -> str:
    token = str(token).strip()
    if len(token) >= 2 and token[:2].isdigit() and (len(token) == 2 or token[2] == "_"):
        return token[:2]
    if token.isdigit() and len(token) == 1:
        return f"0{token}"
    raise ValueError(f"--only: {token!r} is not a notebook number such as 00 or 03_category_evaluation")


def select_notebooks(available: Mapping[str, Path], wanted: Iterable[str],
                     only: Iterable[str] | None = None) -> list[tuple[str, Path | None]]:
    """(prefix, path or None when absent) in execution order.

    Without ``only``: the ``wanted`` list (the ``notebooks`` parameter). With ``only``: those
    numbers, in numeric order, whether or not they are in ``wanted`` (so ``--only 08`` runs the
    summary).
    """
    prefixes = sorted({_prefix(t) for t in only}) if only else list(wanted)
    return [(p, available.get(p)) for p in prefixes]


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape the results (None when not installed); no imports."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in VERSION_PACKAGES.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def git_state(root: str | Path = REPO_ROOT) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the repository at ``root``, or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def ensure_kernel(kernel_name: str = KERNEL_NAME) -> str:
    """The resource dir of Jupyter kernel ``kernel_name``; a clear error when it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        return KernelSpecManager().get_kernel_spec(kernel_name).resource_dir
    except NoSuchKernel as exc:
        raise RuntimeError(
            f"no Jupyter kernel named {kernel_name!r}: install one into this environment with "
            f"`{sys.executable} -m ipykernel install --sys-prefix`") from exc


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def notebook_source_digest(path: Path) -> str:
    """SHA-1 of a notebook's cell types and sources (outputs and metadata ignored)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return _digest([(cell.cell_type, cell.source) for cell in nb.cells])


def declared_parameters(path: Path) -> set[str] | None:
    """Names assigned in the notebook's ``parameters`` cell, or None when it has none."""
    import papermill

    try:
        declared = papermill.inspect_notebook(str(path))
    except Exception:  # noqa: BLE001 - an uninspectable cell: inject everything
        return None
    return set(declared) or None


def read_run_json(out_dir: str | Path) -> dict[str, Any]:
    """The run record in ``out_dir`` (empty dict when there is none or it is unreadable)."""
    path = Path(out_dir) / RUN_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_run_json(out_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``run.json`` atomically (temporary file + rename)."""
    path = Path(out_dir) / RUN_JSON
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _failure(exc: BaseException, source_nb: Path) -> dict[str, Any]:
    """Cell index (in the source notebook), execution count, first source line, ename, evalue."""
    from papermill.exceptions import PapermillExecutionError

    if not isinstance(exc, PapermillExecutionError):
        return {"ename": type(exc).__name__, "evalue": str(exc).strip()[:2000]}
    import nbformat

    cell = None
    try:
        cells = nbformat.read(source_nb, as_version=4).cells
        cell = next((i for i, c in enumerate(cells) if c.source == exc.source), None)
    except (OSError, ValueError):
        pass
    first_line = next((line for line in str(exc.source).splitlines() if line.strip()), "")
    return {"cell": cell, "cell_executed": exc.cell_index, "execution_count": exc.exec_count,
            "source": first_line[:200], "ename": exc.ename, "evalue": str(exc.evalue)[:2000]}


def _describe_failure(name: str, error: Mapping[str, Any]) -> str:
    where = []
    if error.get("cell") is not None:
        where.append(f"cell {error['cell']}")
    if error.get("execution_count") is not None:
        where.append(f"In [{error['execution_count']}]")
    if error.get("source"):
        where.append(f"`{error['source']}`")
    at = f" at {', '.join(where)}" if where else ""
    return f"{name} failed{at}: {error.get('ename')}: {error.get('evalue')}"


def execute_notebook(source: Path, output: Path, parameters: Mapping[str, Any], *,
                     kernel_name: str = KERNEL_NAME, label: str = "", log_file: Path | None = None) -> None:
    """Run ``source`` with papermill in its own folder, writing the executed copy to ``output``.

    The kernel is quiet (:data:`KERNEL_ARGUMENTS`, :func:`kernel_setup`): progress bars on this process's
    terminal labelled ``label``, C-level noise in ``log_file`` (when given).
    """
    import papermill

    env = {KERNEL_LABEL_ENV: label, KERNEL_LOG_ENV: str(log_file) if log_file else ""}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment when it starts
    try:
        papermill.execute_notebook(str(source), str(output), parameters=dict(parameters),
                                   cwd=str(source.parent), kernel_name=kernel_name, progress_bar=False,
                                   extra_arguments=list(KERNEL_ARGUMENTS))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _plan(params: Mapping[str, Any], params_file: Path, notebooks_dir: Path,
          only: Iterable[str] | None) -> list[tuple[str, Path | None]] | None:
    """The notebooks to run, or None (after printing why) when this run cannot start."""
    name = params["name"]
    missing = missing_paths(params)
    if missing:  # this run cannot start; the next params file still runs
        _log(f"[{name}] error: {params_file}: {'; '.join(missing)}")
        return None
    plan = select_notebooks(find_notebooks(notebooks_dir), params["notebooks"], only)
    absent = [p for p, path in plan if path is None]
    if only and absent:
        _log(f"[{name}] error: no notebook {', '.join(f'{p}_*.ipynb' for p in absent)} in {notebooks_dir}")
        return None
    return plan


def _start_record(out_dir: Path, params: Mapping[str, Any], params_file: Path,
                  overrides: Mapping[str, Any] | None, root: str | Path) -> dict[str, Any]:
    """Create the output folders and mark the run as running in ``run.json`` (earlier notebook records kept)."""
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    Path(params["store"]).parent.mkdir(parents=True, exist_ok=True)
    record = read_run_json(out_dir)
    record.update({
        "name": params["name"],
        "params_file": str(params_file.resolve()),
        "overrides": {k: str(v) for k, v in (overrides or {}).items()},
        "parameters": dict(params),
        "versions": library_versions(),
        "git": git_state(root),
        "host": platform.node(),
        "started": _now(),
        "finished": None,
        "status": "running",
        "notebooks": dict(record.get("notebooks", {})),
    })
    write_run_json(out_dir, record)
    return record


def _notebook_key(source: Path, all_params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The parameters injected into ``source`` (those its parameters cell declares) and the skip key."""
    declared = declared_parameters(source)
    injected = {k: v for k, v in all_params.items() if declared is None or k in declared}
    return injected, {"params_sha1": _digest(injected), "source_sha1": notebook_source_digest(source)}


def _run_notebook(record: dict[str, Any], out_dir: Path, source: Path, injected: Mapping[str, Any],
                  key: Mapping[str, str], kernel_name: str) -> bool:
    """Execute one notebook, recording it in ``run.json``; False (after printing where) when it failed.

    Ctrl-C marks the notebook and the run ``interrupted`` and propagates.
    """
    name = record["name"]
    output = out_dir / source.name
    entry: dict[str, Any] = {"status": "running", "notebook": source.name, "output": str(output),
                             "started": _now(), **key, "parameters": sorted(injected)}
    record["notebooks"][source.stem] = entry
    write_run_json(out_dir, record)
    _log(f"[{name}] {source.stem} ...")
    t0 = time.perf_counter()
    log_file = out_dir / LOGS_DIR / f"{source.stem}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.unlink(missing_ok=True)
    try:
        execute_notebook(source, output, injected, kernel_name=kernel_name, label=source.stem[:2],
                         log_file=log_file)
    except KeyboardInterrupt:
        entry.update(status="interrupted", seconds=round(time.perf_counter() - t0, 2), finished=_now())
        record.update(status="interrupted", finished=_now())
        write_run_json(out_dir, record)
        raise
    except Exception as exc:  # noqa: BLE001 - any failure stops this run only
        error = _failure(exc, source)
        entry.update(status="failed", seconds=round(time.perf_counter() - t0, 2), finished=_now(), error=error)
        _log(f"[{name}] {_describe_failure(source.name, error)}")
        _log(f"[{name}] the executed notebook with the error is {output}; later notebooks not run")
        return False
    entry.update(status="ok", seconds=round(time.perf_counter() - t0, 2), finished=_now())
    write_run_json(out_dir, record)
    _log(f"[{name}] {source.stem} ok ({entry['seconds']:.1f} s)")
    return True


def run_params(
    params_file: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    only: Iterable[str] | None = None,
    notebooks_dir: str | Path | None = None,
    defaults: str | Path = DEFAULTS_FILE,
    root: str | Path = REPO_ROOT,
    kernel_name: str = KERNEL_NAME,
) -> bool:
    """Execute the notebooks of one params file into ``<out_dir>``; True when all succeeded.

    ``only`` picks notebook numbers (``["00", "08"]``) instead of the ``notebooks`` parameter;
    ``notebooks_dir`` defaults to the repository's ``notebooks/`` (``NOTEBOOKS_DIR``).
    Parameter errors raise (``ParamsError``/``FileNotFoundError``); a missing catalogue or weights file
    is printed and returns False; a failing notebook prints which notebook and cell failed, is recorded
    as ``failed`` in ``run.json`` and makes this return False.
    """
    params_file = Path(params_file)
    params = load_params(params_file, overrides, defaults=defaults, root=root)
    name, out_dir = params["name"], Path(params["out_dir"])
    notebooks_dir = Path(notebooks_dir if notebooks_dir is not None else NOTEBOOKS_DIR)
    plan = _plan(params, params_file, notebooks_dir, only)
    if plan is None:
        return False
    ensure_kernel(kernel_name)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # kernels inherit it: no TensorFlow INFO noise
    record = _start_record(out_dir, params, params_file, overrides, root)
    all_params = notebook_parameters(params)
    _log(f"[{name}] {len(plan)} notebook(s) -> {out_dir}")
    t_run = time.perf_counter()
    ok = True
    upstream_ran = False  # once a notebook runs, the later ones (which read its results) run too
    for prefix, source in plan:
        if source is None:
            _log(f"[{name}] {prefix}: no notebook {prefix}_*.ipynb in {notebooks_dir}; skipped")
            record["notebooks"][prefix] = {"status": "missing"}
            continue
        injected, key = _notebook_key(source, all_params)
        previous = record["notebooks"].get(source.stem, {})
        if (not force and not upstream_ran and previous.get("status") == "ok" and (out_dir / source.name).is_file()
                and all(previous.get(k) == v for k, v in key.items())):
            _log(f"[{name}] {source.stem}: done before with the same parameters; skipped (--force reruns)")
            continue
        upstream_ran = True
        ok = _run_notebook(record, out_dir, source, injected, key, kernel_name)
        if not ok:
            break
    record.update(status="ok" if ok else "failed", finished=_now(), seconds=round(time.perf_counter() - t_run, 2))
    write_run_json(out_dir, record)
    report_and_findings(out_dir, name=name)
    _log(f"[{name}] {'done' if ok else 'FAILED'}: {out_dir / RUN_JSON}")
    return ok


#: analyses left out of the findings printed at the end of ``cbir run`` (they stay in the report)
_QUIET_ANALYSES = ("Catalogue", "Approximate search")
FINDINGS_TAG = "cbir-findings"


def report_and_findings(out_dir: Path, *, name: str) -> Path | None:
    """Write ``<out_dir>/report.html``, print its findings and put them at the top of the executed
    notebooks of ``out_dir``. A report that cannot be written is reported, never fatal (None)."""
    try:
        from cbir.report import findings_lines, write_report

        path, items = write_report(out_dir)
    except Exception as exc:  # noqa: BLE001 - the notebooks' results stand without a report
        _log(f"[{name}] report not written: {type(exc).__name__}: {exc}")
        return None
    shown = [f for f in items if f.analysis not in _QUIET_ANALYSES]
    if shown:
        _log(f"[{name}] findings:")
        for line in findings_lines(shown):
            _log(f"  {line}")
    _log(f"[{name}] report: {path}")
    try:
        stamp_notebooks(out_dir, findings_lines(items))
    except Exception as exc:  # noqa: BLE001
        _log(f"[{name}] findings not added to the executed notebooks: {type(exc).__name__}: {exc}")
    return path


def stamp_notebooks(out_dir: Path, lines: list[str]) -> list[Path]:
    """Put ``lines`` (the run's findings) in a markdown cell tagged :data:`FINDINGS_TAG` at the top of
    every executed notebook in ``out_dir`` (after its title cell), replacing an earlier one."""
    import nbformat

    if not lines:
        return []
    body = "\n".join(f"- {line.strip()}" if line.startswith("  ") else f"\n**{line.rstrip(':')}**\n"
                      for line in lines)
    source = (f"> **Findings of this run** (the full report, with tables and figures: `{REPORT_NAME}` "
              f"next to this notebook)\n{body}")
    done = []
    for path in sorted(Path(out_dir).glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if FINDINGS_TAG not in c.get("metadata", {}).get("tags", [])]
        cell = nbformat.v4.new_markdown_cell(source)
        cell.metadata["tags"] = [FINDINGS_TAG]
        at = 1 if cells and cells[0].cell_type == "markdown" else 0
        nb.cells = cells[:at] + [cell] + cells[at:]
        tmp = path.with_suffix(f".ipynb.tmp{os.getpid()}")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        done.append(path)
    return done


def check_params_files(params_files: Iterable[str | Path], *, overrides: Mapping[str, Any] | None = None,
                       defaults: str | Path = DEFAULTS_FILE, root: str | Path = REPO_ROOT) -> None:
    """Load and validate every params file before any notebook of any of them starts (``cbir run a b``):
    the first bad one raises :class:`~cbir.params.ParamsError` / ``FileNotFoundError`` naming the file and
    the key. Missing catalogue or weights paths are left to :func:`run_params` (that run is skipped, the
    others run)."""
    for params_file in params_files:
        load_params(Path(params_file), overrides, defaults=defaults, root=root)
