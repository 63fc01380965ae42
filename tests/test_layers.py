"""The package's layers: ops -> models -> data, engine -> analysis, viz -> cli, and nothing imports upward.

Every ``import sparse_detr.X`` in a module (at the top or inside a function) is checked against what its
part of the package may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_detr"
BASE = {"errors", "utils"}
# part of the package -> the parts it may import (besides itself)
ALLOWED = {
    "__init__": set(),
    "errors": set(),
    "utils": {"errors"},
    "ops": BASE,
    "config": BASE,
    "models": BASE | {"ops", "config"},
    "data": BASE | {"ops", "config", "models"},
    "checkpoint": BASE | {"config", "models", "data"},
    "zoo": BASE | {"config", "models", "data", "checkpoint"},
    "engine": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo"},
    "export": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo"},
    "inference": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo", "engine", "export"},
    "doctor": BASE | {"ops"},
    "analysis": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo", "engine"},
    "viz": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo", "engine", "export", "inference"},
    "ablation": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo", "engine", "analysis"},
    "cli": {
        part
        for part in (
            "errors",
            "utils",
            "ops",
            "config",
            "models",
            "data",
            "checkpoint",
            "zoo",
            "engine",
            "export",
            "inference",
            "doctor",
            "analysis",
            "viz",
            "ablation",
        )
    },  # fmt: skip
}


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_detr"):
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "sparse_detr" else [
                node.module
            ]  # fmt: skip
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("sparse_detr.")]
        else:
            continue
        parts |= {name.split(".")[1] for name in names if name.count(".") >= 1}
    return parts


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_nothing_imports_upward(path):
    part = _part(path)
    assert part in ALLOWED, f"{part} is not placed in a layer"
    upward = _imported_parts(path) - ALLOWED[part] - {part}
    assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}, above its layer"
