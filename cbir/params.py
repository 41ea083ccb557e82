"""Run parameters: ``params/defaults.yaml`` holds every key with its default, ``params/<run>.yaml``
overrides some of them, ``cbir run -p NAME VALUE`` overrides again.

Keys are the notebook parameter names (docs/CONVENTIONS.md) plus ``name`` (the run name, outputs go to
``outputs/<name>/``) and ``notebooks`` (which numbered notebooks a run executes). Unknown keys and
values of the wrong type are errors naming the key and the file; so are an unknown model, measure or
pooling (the allowed values come from the registries: :data:`cbir.backbones.BACKBONES` and
``DESCRIPTORS``, :data:`cbir.measures.MEASURES`, :data:`cbir.pooling.POOLINGS`, none of which imports
Keras), so ``cbir run`` fails in about a second instead of inside a notebook. Paths in YAML files are relative
to the repository root, paths in overrides relative to the current directory; both come back
absolute.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = REPO_ROOT / "params"
DEFAULTS_FILE = PARAMS_DIR / "defaults.yaml"

#: keys that may be null, with the type of their value when given
NULLABLE = {"name": str, "out_dir": str, "store": str, "layer": str, "pooling": str, "n_queries": int,
            "cluster": str, "train": dict}
#: int keys that also accept a float
FLOAT_OK = {"minkowski_p", "lbp_radius"}
#: keys that are not notebook parameters (not injected by papermill)
RUNNER_KEYS = ("name", "notebooks")
#: accepted spellings of "no pooling" besides YAML's null (``-p pooling none``)
NO_POOLING = ("none", "None", "null")
SUBCATEGORY_FROM = ("articleType", "subCategory")
POSITIVE = ("batch_size", "k", "n_queries", "cv_folds", "cv_fold_size", "color_bins", "lbp_points",
            "gallery_queries", "lbp_radius")
NON_NEGATIVE = ("seed", "roi_margin")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NOTEBOOK_RE = re.compile(r"^\d{2}$")


class ParamsError(ValueError):
    """A params file or override is unusable; the message names the file (or ``-p``) and the key."""


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: object, first: int, second: int) -> None:
        super().__init__(f"duplicate key {key!r} on lines {first} and {second}")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (instead of keeping the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader itself reports it
                continue
        return super().construct_mapping(node, deep=deep)


def _safe_load(text: str) -> Any:
    """``yaml.safe_load`` that raises on duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        data = _safe_load(path.read_text(encoding="utf-8"))
    except _DuplicateKeyError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return data


def load_defaults(path: str | Path = DEFAULTS_FILE) -> dict[str, Any]:
    """The default value of every parameter (``params/defaults.yaml``), in file order."""
    return _read_yaml(Path(path))


def _unknown_key_error(key: object, valid: list[str], where: str) -> ParamsError:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(valid)}"
    return ParamsError(f"{where}: unknown parameter {key!r}{hint}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(key: str, value: Any, default: Any, where: str) -> Any:
    """``value`` checked against the type of ``default`` (bool, int, float, str, list of str)."""
    bad = ParamsError(f"{where}: parameter {key!r} must be "
                      f"{_expected(key, default)}, got {value!r} ({_type_name(value)})")
    if value is None and key in NULLABLE:
        return None
    if default is None:
        if value is None:
            return None
        expected = NULLABLE.get(key)
        if expected is None:
            return value
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad
        if expected is str and not isinstance(value, str):
            raise bad
        if expected is dict and not isinstance(value, dict):
            raise bad
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if isinstance(value, float) and key not in FLOAT_OK:
            raise bad
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, list):
        if isinstance(value, (str, int)) and key == "notebooks":
            value = [value]
        if not isinstance(value, list):
            raise bad
        if key == "notebooks":  # YAML reads 01 as the integer 1: accept and re-pad
            value = [f"{v:02d}" if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    return value


def _expected(key: str, default: Any) -> str:
    if key in NULLABLE:
        return f"null or {_a(NULLABLE[key].__name__)}"
    if default is None:
        return "any value"
    if isinstance(default, list):
        return "a list of strings"
    if isinstance(default, int) and not isinstance(default, bool) and key in FLOAT_OK:
        return "a number"
    return _a(type(default).__name__)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _check_values(params: dict[str, Any], origin: Mapping[str, str], default_where: str) -> None:
    """Value checks beyond the type: choices, ranges, names; ``origin`` maps a key to where it was set."""

    def where(key: str) -> str:
        return origin.get(key, default_where)

    name = params.get("name")
    if not name:
        raise ParamsError(f"{where('name')}: parameter 'name' (the run name) is missing")
    if not _NAME_RE.match(name):
        raise ParamsError(f"{where('name')}: run name {name!r} must be letters, digits, '_', '-', '.' "
                          "(it names a folder)")
    poolings = valid_poolings()
    if params.get("pooling") is not None and params["pooling"] not in poolings:
        raise ParamsError(f"{where('pooling')}: pooling {params['pooling']!r} must be one of "
                          f"{', '.join(poolings)} or null{_did_you_mean(params['pooling'], poolings)}")
    _check_model(params, where)
    metrics = params.get("metrics", [])
    valid_metrics = _valid_metrics()
    unknown = [m for m in metrics if m not in valid_metrics]
    if not metrics or unknown or len(set(metrics)) != len(metrics):
        hint = _did_you_mean(unknown[0], valid_metrics) if unknown else ""
        raise ParamsError(f"{where('metrics')}: metrics must be distinct names from {', '.join(valid_metrics)}; "
                          f"got {metrics!r}{hint}")
    if params.get("subcategory_from") not in SUBCATEGORY_FROM:
        raise ParamsError(f"{where('subcategory_from')}: subcategory_from {params.get('subcategory_from')!r} "
                          f"must be one of {', '.join(SUBCATEGORY_FROM)}")
    for key in POSITIVE:
        value = params.get(key)
        if value is not None and value <= 0:
            raise ParamsError(f"{where(key)}: parameter {key!r} must be > 0, got {value!r}")
    for key in NON_NEGATIVE:
        value = params.get(key)
        if value is not None and value < 0:
            raise ParamsError(f"{where(key)}: parameter {key!r} must be >= 0, got {value!r}")
    if params.get("minkowski_p") is not None and params["minkowski_p"] < 1:
        raise ParamsError(f"{where('minkowski_p')}: minkowski_p must be >= 1 (a metric), "
                          f"got {params['minkowski_p']!r}")
    if params.get("vectors") not in ("store", "shards"):
        raise ParamsError(f"{where('vectors')}: vectors must be 'store' or 'shards', got {params.get('vectors')!r}")
    if params.get("vectors") == "shards" and params.get("cluster") is None:
        raise ParamsError(f"{where('vectors')}: vectors: shards needs a cluster (cluster: local, local:N or "
                          "tcp://HOST:PORT): only Dask workers write shards")
    if params.get("cluster") is not None:
        from cbir.distributed import parse_cluster  # the grammar only; imports no Dask

        try:
            parse_cluster(params["cluster"])
        except ValueError as exc:
            raise ParamsError(f"{where('cluster')}: {exc}") from None
    bad = [n for n in params.get("notebooks", []) if not _NOTEBOOK_RE.match(n)]
    if bad:
        raise ParamsError(f"{where('notebooks')}: notebooks must be two-digit prefixes such as '00', "
                          f"got {bad!r}")


def _valid_metrics() -> tuple[str, ...]:
    """The measure names of :data:`cbir.measures.MEASURES` (imports numpy only)."""
    from cbir.measures import MEASURES

    return tuple(MEASURES)


def valid_poolings() -> tuple[str, ...]:
    """The pooling names of :data:`cbir.pooling.POOLINGS` (imports numpy only)."""
    from cbir.pooling import POOLINGS

    return tuple(POOLINGS)


def valid_models() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(backbones, handcrafted descriptors)``: the names of :data:`cbir.backbones.BACKBONES` and
    ``cbir.backbones.DESCRIPTORS``. Reading the registry builds no model and imports no Keras."""
    from cbir.backbones import BACKBONES, DESCRIPTORS

    return tuple(BACKBONES), tuple(DESCRIPTORS)


def _backbone_layers(model: str) -> tuple[str, ...]:
    """The named feature layers of backbone ``model`` (its registry entry; no Keras)."""
    from cbir.backbones import BACKBONES

    return tuple(BACKBONES[model].layers)


def _did_you_mean(value: object, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_train(params: dict[str, Any], where: Any) -> None:
    """``train`` (when set): training settings :class:`cbir.train.TrainConfig` accepts, for a backbone ``model``."""
    from cbir.train import TrainConfig, TrainingError

    settings = params["train"]
    for key, param in (("backbone", "model"), ("weights", "weights")):
        if key in settings:
            raise ParamsError(f"{where('train')}: train.{key} is set by the parameter {param!r}, not inside train")
    backbones, _ = valid_models()
    if params.get("model") not in backbones:
        raise ParamsError(f"{where('model')}: with train, model must be the CNN backbone to fine-tune "
                          f"({', '.join(backbones)}), got {params.get('model')!r}")
    try:
        TrainConfig.from_mapping({**settings, "backbone": params["model"], "weights": params["weights"]})
    except (TrainingError, TypeError) as exc:
        raise ParamsError(f"{where('train')}: {exc}") from None


def _check_model(params: dict[str, Any], where: Any) -> None:
    """``model`` is a registered backbone or descriptor, or a trained model file (``*.keras``, which takes no
    layer or pooling); descriptors take no layer or pooling; without pooling a backbone's ``layer`` must be one
    of its named feature layers (what ``build_extractor`` accepts)."""
    model = params.get("model")
    if params.get("train") is not None:
        _check_train(params, where)
        return
    from cbir.extractors import is_model_file

    if is_model_file(str(model)):
        for key in ("pooling", "layer"):
            if params.get(key) is not None:
                raise ParamsError(f"{where(key)}: model {model!r} is a trained model (it gives its embedding): "
                                  f"{key} must be null, got {params[key]!r}")
        return
    backbones, descriptors = valid_models()
    if model not in backbones and model not in descriptors:
        hint = _did_you_mean(model, backbones + descriptors)
        raise ParamsError(f"{where('model')}: model {model!r} is not known{hint}; "
                          f"backbones: {', '.join(backbones)}; handcrafted descriptors: {', '.join(descriptors)}")
    if model in descriptors:
        for key in ("pooling", "layer"):
            if params.get(key) is not None:
                raise ParamsError(f"{where(key)}: model {model!r} is a handcrafted descriptor: {key} must be null, "
                                  f"got {params[key]!r}")
        return
    layer = params.get("layer")
    if params.get("pooling") is None and layer is not None:
        layers = _backbone_layers(model)
        if layer not in layers:
            raise ParamsError(f"{where('layer')}: {model} has no feature layer {layer!r}"
                              f"{_did_you_mean(layer, layers)}; with pooling null the layer must be one of "
                              f"{', '.join(layers)} (or set a pooling to pool a convolutional layer)")


def _absolute(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def parse_override(name: str, value: str) -> Any:
    """One ``-p NAME VALUE`` pair: VALUE is a YAML literal (``5``, ``true``, ``null``, ``[a, b]``)."""
    try:
        return _safe_load(value)
    except yaml.YAMLError as exc:
        raise ParamsError(f"-p {name}: value {value!r} is not a YAML literal: {exc}") from exc


def load_params(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    defaults: str | Path = DEFAULTS_FILE,
    root: str | Path = REPO_ROOT,
    check_paths: bool = False,
) -> dict[str, Any]:
    """Defaults, then the params file, then ``overrides``, validated; returns every key.

    ``overrides`` values that are strings are parsed as YAML literals (what ``cbir run -p`` passes).
    ``out_dir`` defaults to ``<root>/outputs/<name>``, ``store`` to ``<out_dir>/features.sqlite``;
    ``name`` defaults to the file's stem. ``catalog`` (unless ``"demo"``), ``out_dir``, ``store`` and
    ``weights`` (unless ``"imagenet"``/``"none"``) are made absolute. ``check_paths`` makes a missing
    catalogue or weights file an error here rather than in the notebook.
    """
    path = Path(path)
    root = Path(root).resolve()
    base = load_defaults(defaults)
    valid = list(base)
    from_file = _read_yaml(path)
    params = dict(base)
    params["name"] = path.stem
    sources: dict[str, Path] = {}
    origin: dict[str, str] = {}
    for key, value in from_file.items():
        if key not in base:
            raise _unknown_key_error(key, valid, str(path))
        params[key] = _check_type(key, value, base[key], str(path))
        sources[key], origin[key] = root, str(path)
    for key, raw in (overrides or {}).items():
        if key not in base:
            raise _unknown_key_error(key, valid, f"-p {key}")
        value = parse_override(key, raw) if isinstance(raw, str) else raw
        params[key] = _check_type(key, value, base[key], f"-p {key}")
        sources[key], origin[key] = Path.cwd(), f"-p {key}"
    if params.get("pooling") in NO_POOLING:  # `-p pooling none` and `pooling: none` mean null, as in `cbir extract`
        params["pooling"] = None
    _check_values(params, origin, str(path))

    if params["out_dir"] is None:
        params["out_dir"] = str(root / "outputs" / params["name"])
    else:
        params["out_dir"] = _absolute(params["out_dir"], sources.get("out_dir", root))
    if params["store"] is None:
        params["store"] = str(Path(params["out_dir"]) / "features.sqlite")
    else:
        params["store"] = _absolute(params["store"], sources.get("store", root))
    if params["catalog"] != "demo":
        params["catalog"] = _absolute(params["catalog"], sources.get("catalog", root))
    if params["weights"] not in ("imagenet", "none"):
        params["weights"] = _absolute(params["weights"], sources.get("weights", root))
    if params.get("train") is not None:  # fine-tune the backbone; the run's features are the trained model's
        from cbir.train import MODEL_FILE, TrainConfig

        config = TrainConfig.from_mapping({**params["train"], "backbone": params["model"],
                                           "weights": params["weights"]})
        params["train"] = config.to_dict()
        params["model"] = str(Path(params["out_dir"]) / "model" / MODEL_FILE)
        params["layer"] = params["pooling"] = None
    elif str(params["model"]).endswith(".keras"):
        params["model"] = _absolute(params["model"], sources.get("model", root))
    if check_paths:
        for problem in missing_paths(params):
            raise FileNotFoundError(f"{path}: {problem}")
    return params


#: what a path parameter may be, for the "not found" messages
PATH_CHOICES = {
    "catalog": "'demo', a manifest CSV, a Kaggle folder (styles.csv + images/) or a folder tree "
               "<category>/<subcategory>/*.jpg",
    "weights": "'imagenet', 'none' or a .weights.h5 / .h5 / .pth file",
}


def missing_paths(params: Mapping[str, Any]) -> list[str]:
    """``"<key> not found: <path> (expected ...)"`` for a catalogue or weights path that does not exist."""
    return [f"{key} not found: {params[key]} (expected {PATH_CHOICES[key]})" for key in ("catalog", "weights")
            if params[key] not in ("demo", "imagenet", "none") and not Path(params[key]).exists()]


def notebook_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters papermill injects into every notebook (all keys but ``name`` and ``notebooks``)."""
    return {key: value for key, value in params.items() if key not in RUNNER_KEYS}
