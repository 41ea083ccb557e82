"""The README's table of interchangeable parts lists exactly what the registries hold."""
from __future__ import annotations

import re

from cbir.extractors import backbone_names, descriptor_names
from cbir.measures import MEASURES
from cbir.pooling import POOLINGS
from cbir.postprocess import POSTPROCESSING


def test_readme_parts_table_matches_the_registries(repo_root):
    text = (repo_root / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and "(`cbir." in cells[0]:
            rows[cells[0].split(" (`")[0]] = tuple(re.findall(r"`([^`]+)`", cells[1]))
    assert rows == {
        "CNN backbones": backbone_names(),
        "handcrafted descriptors": descriptor_names(),
        "poolings": tuple(POOLINGS),
        "distance measures": tuple(MEASURES),
        "post-processing": tuple(POSTPROCESSING),
    }
