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
    "analysis": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo", "engine", "export", "inference"},
    "viz": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo", "engine", "export", "inference"},
    "ablation": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo", "engine", "analysis"},
    "cluster": BASE | {"ops", "config", "models", "data", "checkpoint", "zoo", "engine", "analysis", "ablation"},
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
            "cluster",
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


# what a library module may import inside a function, and why: packages a base install may lack, and imports
# that cost seconds or change global state, paid only by the code that needs them
LATE_IMPORTS = {
    "importlib": "imports the optional packages by name, and the package's public names on first use",
    "onnx": "optional (the onnx extra)",
    "onnxruntime": "optional (the onnx extra)",
    "onnxscript": "optional (the onnx extra)",
    "openvino": "optional (the openvino extra)",
    "sparse_detr.ops.onnx": "imports onnxscript (optional)",
    "torch.onnx": "the exporter's private constants, read where the opset is checked",
    "tensorboard": "optional (the tensorboard extra)",
    "torch.utils.tensorboard": "optional (the tensorboard extra)",
    "torch._inductor": "torch.compile's settings: imports inductor, seconds",
    "torch.utils.cpp_extension": "the kernel build: imports setuptools",
    "matplotlib": "selects the Agg backend before pyplot, when a figure is drawn",
}


def _late_imports(path: Path) -> list[str]:
    """The modules ``path`` imports inside functions."""
    late = []
    for function in ast.walk(ast.parse(path.read_text())):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.module:
                    late.append(node.module)
                elif isinstance(node, ast.Import):
                    late += [alias.name for alias in node.names]
    return late


@pytest.mark.parametrize(
    "path",
    sorted(path for path in PACKAGE.rglob("*.py") if _part(path) != "cli"),
    ids=lambda path: str(path.relative_to(PACKAGE)),
)
def test_library_modules_import_at_the_top(path):
    """Imports stand at the top of a library module, where they show its dependencies; only the
    :data:`LATE_IMPORTS` wait. (The CLI imports each command's library inside the command, so that `sdetr
    --help` starts in a fifth of a second rather than six.)"""
    hidden = [
        module for module in _late_imports(path)
        if not any(module == name or module.startswith(name + ".") for name in LATE_IMPORTS)
    ]  # fmt: skip
    assert not hidden, f"{path.relative_to(PACKAGE)} imports {hidden} inside functions: move them to the top"
