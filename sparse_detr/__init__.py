"""sparse-detr: Sparse DETR and Deformable DETR, trained, evaluated, benchmarked and explained.

``from sparse_detr import Predictor, draw_detections, load_model``: the Python predictor, its drawing and the
model of a checkpoint file, run folder or zoo name.
"""

import importlib

__version__ = "0.1.0"

# name -> the module defining it, imported on first use: `import sparse_detr` (which every `sdetr` command and
# submodule import runs) stays free of torch and matplotlib (PEP 562)
_EXPORTS = {
    "Predictor": "sparse_detr.inference",
    "draw_detections": "sparse_detr.viz.detections",
    "load_model": "sparse_detr.zoo",
}
__all__ = ["Predictor", "__version__", "draw_detections", "load_model"]


def __getattr__(name: str):
    """An exported name, from its module (imported now, once)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparse_detr' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    """The module's names and the exported ones, for completion."""
    return sorted({*globals(), *_EXPORTS})
