"""Shared fixtures: paths to ../shared (real data and weights), skipped cleanly when absent."""
from __future__ import annotations

import os
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
