"""Rebuild a run's feature extractor from its stored identity, checked, to embed new photos the same way.

Shared by everything that embeds a photo for an existing run outside the extraction pipeline
(``cbir search``, :func:`cbir.index.search_image`; the same rules as the visual search app's
``cbir.app.extractor_kwargs`` / ``checked_extractor``, which may import them from here):

* the weights come only from :func:`resolve_weights`: ``imagenet``, seeded random init and handcrafted runs
  need nothing; a run made from a weights file needs that file, found by its name (never its stored folder)
  and accepted only with the SHA-1 stored with the run;
* the stored ``params`` may set only descriptor settings (:func:`descriptor_settings`), of the right type;
* the extractor built must report the run's weights SHA-1 (:func:`checked_extractor`).

A refusal is a :class:`RunRefusedError` (a ``ValueError``) naming the run. Imports only the registries at
module level (the extractors are built lazily).
"""
from __future__ import annotations

import functools
import threading
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunRefusedError", "resolve_weights", "trained_model_file", "descriptor_settings", "extractor_kwargs",
           "checked_extractor",
           "cached_extractor"]


class RunRefusedError(ValueError):
    """A run whose extractor cannot be rebuilt safely; ``reason`` is ``weights`` or ``identity``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def _refuse(run: int | str | None, reason: str, text: str) -> RunRefusedError:
    return RunRefusedError(reason, f"{'this run' if run is None else f'run {run}'}{text}")


def _with_sha1(candidates: list[Path], sha1: str) -> tuple[str | None, str]:
    """``(the first existing candidate file whose SHA-1 is sha1, or None; " (what the others hold)" or "")``."""
    from cbir.efficientnet_lite import file_sha1

    differ = []
    for candidate in candidates:
        if candidate.is_file():
            found = file_sha1(candidate)
            if found == sha1:
                return str(candidate), ""
            differ.append(f"{candidate} has SHA-1 {found}")
    return None, f" ({'; '.join(differ)})" if differ else ""


def resolve_weights(identity: Mapping[str, Any], *, weights: str | os.PathLike | None = None,
                    run: int | str | None = None) -> str:
    """The ``weights`` argument that rebuilds a run's extractor from its stored identity (see the module doc):
    ``imagenet``, ``none``, or the path of a weights file whose SHA-1 is the stored one."""
    label = str(identity.get("weights") or "none")
    if label == "imagenet":
        return "imagenet"
    if label.startswith("none") or label == "handcrafted":
        return "none"
    from cbir.backbones import weights_dirs

    fname = Path(str(identity.get("weights_file") or label)).name
    sha1 = identity.get("weights_sha1")
    if not (isinstance(sha1, str) and re.fullmatch(r"[0-9a-f]{40}", sha1)):
        raise _refuse(run, "weights", f" used the weights file {fname!r} but records no valid SHA-1 for it "
                                      f"({sha1!r}); refusing to load an unchecked file")
    candidates = [Path(weights)] if weights not in (None, "imagenet", "none") else []
    candidates += [folder / fname for folder in weights_dirs()]
    found, seen = _with_sha1([c for c in candidates if c.name == fname], sha1)
    if found:
        return found
    raise _refuse(run, "weights", f" used the weights file {fname!r}, which was not found with SHA-1 {sha1}{seen}; "
                                  f"pass weights=PATH pointing to that file (the app: CBIR_WEIGHTS; cbir search: --weights)")


@functools.cache
def descriptor_settings() -> dict[str, Any]:
    """Settings a run's stored ``params`` may pass on, with their defaults: the keyword parameters of
    :func:`cbir.descriptors.build_descriptor_extractor` that have a value default and that
    :func:`cbir.extractors.build_extractor` does not set itself."""
    from cbir.descriptors import build_descriptor_extractor
    from cbir.extractors import build_extractor

    own = set(inspect.signature(build_extractor).parameters)
    return {name: p.default for name, p in inspect.signature(build_descriptor_extractor).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is not None and name not in own}


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, (bool, str)):
        return type(value) is type(default)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _descriptor_params(identity: Mapping[str, Any], run: int | str | None) -> dict[str, Any]:
    from cbir.extractors import descriptor_names

    params = identity.get("params") or {}
    if not isinstance(params, Mapping):
        raise _refuse(run, "identity", f": stored params must be a mapping, got {type(params).__name__}")
    allowed = descriptor_settings() if identity.get("model") in descriptor_names() else {}
    for key in sorted(params):
        if key not in allowed:
            raise _refuse(run, "identity", f": stored params may not set {key!r} (a {identity.get('model')} "
                                           f"run takes {', '.join(sorted(allowed)) or 'no params'})")
        if not _same_kind(params[key], allowed[key]):
            raise _refuse(run, "identity", f": stored params {key}={params[key]!r} is not of type "
                                           f"{type(allowed[key]).__name__}")
    return dict(params)


def trained_model_file(identity: Mapping[str, Any], *, weights: str | os.PathLike | None = None,
                       run: int | str | None = None) -> str:
    """The ``model.keras`` of a trained model's run: ``weights`` (a path given now) or the stored ``model_file``,
    accepted only with the SHA-1 stored with the run."""
    sha1 = identity.get("weights_sha1")
    if not (isinstance(sha1, str) and re.fullmatch(r"[0-9a-f]{40}", sha1)):
        raise _refuse(run, "weights", f" is a trained model's run without a valid SHA-1 ({sha1!r}); refusing to "
                                      f"load an unchecked model file")
    candidates = [Path(weights)] if weights not in (None, "imagenet", "none") else []
    candidates.append(Path(str(identity.get("model_file") or "")))
    found, seen = _with_sha1([c for c in candidates if c.suffix == ".keras"], sha1)
    if found:
        return found
    raise _refuse(run, "weights", f" used the trained model {identity.get('model_file')!r}, not found with SHA-1 "
                                  f"{sha1}{seen}; pass its model.keras as weights=PATH (cbir search: --weights)")


def extractor_kwargs(identity: Mapping[str, Any], *, weights: str | os.PathLike | None = None,
                     run: int | str | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`cbir.extractors.build_extractor` for a run's stored identity
    (``store.run(run_id)["params"]``); raises :class:`RunRefusedError` for a tampered identity."""
    if identity.get("model_file") is not None or str(identity.get("model", "")).startswith("trained/"):
        return {"name": trained_model_file(identity, weights=weights, run=run), "layer": None, "pooling": None,
                "l2_normalize": bool(identity.get("l2_normalize", False))}
    kwargs: dict[str, Any] = {
        "name": identity["model"],
        "layer": identity.get("layer"),
        "pooling": identity.get("pooling"),
        "weights": resolve_weights(identity, weights=weights, run=run),
        "l2_normalize": bool(identity.get("l2_normalize", False)),
    }
    if identity.get("gem_p") is not None:
        kwargs["gem_p"] = identity["gem_p"]
    kwargs.update(_descriptor_params(identity, run))
    return kwargs


@functools.lru_cache(maxsize=4)
def _build_extractor(frozen: tuple[tuple[str, Any], ...]) -> Any:
    from cbir.extractors import build_extractor

    kwargs = dict(frozen)
    return build_extractor(kwargs.pop("name"), **kwargs)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


_BUILD_LOCK = threading.Lock()


def cached_extractor(kwargs: Mapping[str, Any]) -> Any:
    """``build_extractor(**kwargs)``, built once per process for the same arguments (one build at a time, so
    the app's preloading thread and an early search never build the same model twice)."""
    with _BUILD_LOCK:
        return _build_extractor(tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))


def checked_extractor(identity: Mapping[str, Any], kwargs: Mapping[str, Any], *,
                      run: int | str | None = None) -> Any:
    """:func:`cached_extractor` of ``kwargs``, refused when the weights it loaded do not have the SHA-1
    stored with the run (e.g. other ImageNet weights than the run's)."""
    extractor = cached_extractor(kwargs)
    wanted, got = identity.get("weights_sha1"), getattr(extractor, "weights_sha1", None)
    if wanted and got != wanted:
        found = getattr(extractor, "weights_file", None) or getattr(extractor, "weights_label", "?")
        raise _refuse(run, "weights", f": the weights found here ({found}, SHA-1 {got}) are not the ones the "
                                      f"run was made with (SHA-1 {wanted})")
    return extractor
