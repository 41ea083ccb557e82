"""cbir: content-based image retrieval workspace for fashion e-commerce.

The public API is imported lazily so that ``import cbir`` stays fast and does not pull in
TensorFlow until a feature extractor is actually built.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_catalog": "cbir.catalog",
    "Catalog": "cbir.catalog",
    "CatalogError": "cbir.catalog",
    "split_queries": "cbir.catalog",
    "cross_validation_folds": "cbir.catalog",
    "check_catalog_report": "cbir.catalog",
    "make_demo_catalog": "cbir.datasets",
    "resolve_catalog": "cbir.datasets",
    "read_image": "cbir.images",
    "ImageError": "cbir.images",
    "build_extractor": "cbir.backbones",
    "list_backbones": "cbir.backbones",
    "FeatureStore": "cbir.store",
    "extract_features": "cbir.extract",
    "export_features": "cbir.extract",
    "ensure_features": "cbir.extract",
    "knn": "cbir.search",
    "run_search": "cbir.neighbours",
    "similarity": "cbir.search",
    "ApproximateIndex": "cbir.search",
    "METRICS": "cbir.search",
    "find_roi": "cbir.roi",
    "crop_catalog": "cbir.roi",
    "load_params": "cbir.params",
    "run_params": "cbir.run",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cbir' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
