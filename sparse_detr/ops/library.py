"""The ``sparse_detr::ms_deform_attn`` custom op: schema, fake (meta) kernel and autograd formula.

The schema lives here so that it exists on every machine; the compiled extensions in ``csrc/`` only
register device kernels for it (``TORCH_LIBRARY_IMPL(sparse_detr, CPU|CUDA, ...)``). Autograd,
``torch.compile`` and fvcore's tracer therefore all see a single op.
"""

from __future__ import annotations

import torch

NAMESPACE = "sparse_detr"

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(
    "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor"
)
_lib.define(
    "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
    "-> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake(f"{NAMESPACE}::ms_deform_attn")
def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.register_fake(f"{NAMESPACE}::ms_deform_attn_backward")
def _ms_deform_attn_backward_fake(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
):
    return (
        torch.empty_like(value),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.sparse_detr.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_output.contiguous(),
    )
    return grad_value, None, None, grad_locations, grad_weights


torch.library.register_autograd(
    f"{NAMESPACE}::ms_deform_attn", _backward, setup_context=_setup_context
)
