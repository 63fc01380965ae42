"""Multi-scale deformable attention: the op, its compiled kernels and their loader."""

from sparse_detr.ops.loader import BackendStatus, BackendUnavailableError, load_backend
from sparse_detr.ops.ms_deform_attn import BACKEND_ENV_VAR, BACKENDS, ms_deform_attn, resolve_backend
from sparse_detr.ops.reference import ms_deform_attn_pytorch


def backend_status() -> list[BackendStatus]:
    """Status of every backend (building the compiled ones on first call)."""
    return [load_backend("cuda"), load_backend("cpu"), BackendStatus("pytorch", True)]


__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "BackendStatus",
    "BackendUnavailableError",
    "backend_status",
    "load_backend",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "resolve_backend",
]
