"""Public entry point of the multi-scale deformable attention op and its backend choice."""

from __future__ import annotations

import os
import warnings

import torch

from sparse_detr.ops.loader import BackendUnavailableError, load_backend
from sparse_detr.ops.reference import ms_deform_attn_pytorch

BACKENDS = ("cuda", "cpu", "pytorch")
BACKEND_ENV_VAR = "SDETR_OP_BACKEND"
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)
_warned_fallback: set[str] = set()


def _default_backend(device_type: str) -> str:
    """The compiled kernel of the tensors' device when it loads, else ``"pytorch"`` (warned once)."""
    if device_type not in ("cpu", "cuda"):
        return "pytorch"
    status = load_backend(device_type)
    if status.available:
        return device_type
    if device_type not in _warned_fallback:
        _warned_fallback.add(device_type)
        warnings.warn(
            f"sparse_detr: the '{device_type}' deformable-attention kernel is unavailable "
            f"({status.reason}); using the slower 'pytorch' reference instead",
            RuntimeWarning,
            stacklevel=4,
        )
    return "pytorch"


@torch.compiler.assume_constant_result
def resolve_backend(requested: str | None, device_type: str) -> str:
    """The backend that runs the op for ``requested`` on tensors of ``device_type``.

    ``requested=None`` takes ``$SDETR_OP_BACKEND`` when set (``pytorch`` everywhere; ``cpu`` or
    ``cuda`` for tensors of that device), else the best available backend. A compiled backend that
    was asked for explicitly and cannot run is an error, never a silent fallback.
    """
    if requested is None:
        from_env = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
        if from_env and from_env not in BACKENDS + ("auto",):
            raise ValueError(
                f"{BACKEND_ENV_VAR}={from_env!r} is not a backend; use one of {', '.join(BACKENDS)} or auto"
            )
        if from_env == "pytorch" or from_env == device_type:
            requested = from_env
        else:
            return _default_backend(device_type)
    if requested not in BACKENDS:
        raise ValueError(f"unknown op backend {requested!r}; use one of {', '.join(BACKENDS)}")
    if requested == "pytorch":
        return requested
    if requested != device_type:
        raise ValueError(f"backend {requested!r} cannot run on {device_type} tensors")
    status = load_backend(requested)
    if not status.available:
        raise BackendUnavailableError(f"op backend {requested!r} is unavailable: {status.reason}")
    return requested


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention (SPEC §3).

    Args:
        value: (N, S, M, D), S the tokens of all levels flattened row-major and concatenated.
        spatial_shapes: (L, 2) int64, (H, W) of every level.
        level_start_index: (L,) int64, where every level starts in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y) of the padded maps; points outside
            [0, 1] sample zeros.
        attention_weights: (N, Lq, M, L, P).
        backend: ``"cuda"``, ``"cpu"``, ``"pytorch"`` or None (see :func:`resolve_backend`).

    Returns:
        (N, Lq, M * D) in value's dtype. float16/bfloat16 values are sampled with float32
        locations, weights and accumulation.
    """
    if torch.compiler.is_exporting():
        # one node in the exported graph, whatever the machine builds: sparse_detr.ops.onnx translates it
        return torch.ops.sparse_detr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    chosen = resolve_backend(backend, value.device.type)
    if chosen == "pytorch":
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.int64)
    level_start_index = level_start_index.to(device=value.device, dtype=torch.int64)
    if value.dtype in _REDUCED_PRECISION and chosen == "cpu":
        # The CPU kernel computes in float32 or float64 only.
        output = torch.ops.sparse_detr.ms_deform_attn(
            value.float(),
            spatial_shapes,
            level_start_index,
            sampling_locations.float(),
            attention_weights.float(),
        )
        return output.to(value.dtype)
    coord_dtype = torch.float32 if value.dtype in _REDUCED_PRECISION else value.dtype
    return torch.ops.sparse_detr.ms_deform_attn(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations.to(coord_dtype),
        attention_weights.to(coord_dtype),
    )
