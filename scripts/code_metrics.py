"""How hard the package is to read, in numbers: the longest functions, the longest parameter lists and the
imports hidden inside functions (those of optional packages apart, which must stay there).

    python scripts/code_metrics.py [--most 10] [package folder]

The redesign notes quote its output before and after a change.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

# packages a base install may lack (pyproject's extras) or that are slow to import on purpose late
OPTIONAL = {"onnx", "onnxruntime", "onnxscript", "openvino", "submitit", "tensorboard", "torch.utils.tensorboard"}


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return ["." * node.level + (node.module or "")]
    return [alias.name for alias in node.names]


def _optional(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in OPTIONAL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="sparse_detr", type=Path)
    parser.add_argument("--most", type=int, default=10)
    args = parser.parse_args()

    lengths, parameters, hidden, optional = [], [], [], []
    for path in sorted(args.package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for function in _functions(tree):
            where = f"{path}:{function.lineno} {function.name}"
            lengths.append((function.end_lineno - function.lineno + 1, where))
            a = function.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            count -= bool(a.args) and a.args[0].arg in ("self", "cls")
            parameters.append((count, where))
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for module in _imported(node):
                        (optional if _optional(module) else hidden).append(f"{path}:{node.lineno} {module}")

    print(f"## Longest functions (lines), top {args.most}")
    for count, where in sorted(lengths, reverse=True)[: args.most]:
        print(f"{count:5d}  {where}")
    print(f"\n## Longest parameter lists, top {args.most}")
    for count, where in sorted(parameters, reverse=True)[: args.most]:
        print(f"{count:5d}  {where}")
    print(f"\n## Imports inside functions: {len(hidden)} (and {len(optional)} of optional packages)")
    for where in hidden:
        print(f"       {where}")


if __name__ == "__main__":
    main()
