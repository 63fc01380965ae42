"""The ONNX form of ``sparse_detr::ms_deform_attn``: the grid_sample formulation of the op (as in
:mod:`sparse_detr.ops.reference`) in standard ONNX operators, GridSample first of all (opset 16 or later),
so that an exported detector runs in any ONNX runtime.

Level sizes are read from the ``spatial_shapes`` tensor inside the graph, so one file serves every image
size; only the op's static sizes (heads M, channels per head D, levels L, points P) are fixed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import sparse_detr.ops.library  # noqa: F401  (defines the op)

MIN_OPSET = 16  # GridSample


def ms_deform_attn_translation(opset: int) -> Callable:
    """A function that builds ``ms_deform_attn`` in ONNX ``opset`` for ``torch.onnx.export``'s
    ``custom_translation_table`` (see :data:`TRANSLATED_OP`); inputs and output as in
    :func:`sparse_detr.ops.ms_deform_attn`."""
    if opset < MIN_OPSET:
        raise ValueError(f"the deformable attention op needs ONNX opset {MIN_OPSET} or later, got {opset}")
    from onnxscript.values import Opset

    op = Opset("", opset)
    interpolation = "linear" if opset >= 20 else "bilinear"  # renamed in opset 20

    def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        _, _, heads, channels = value.shape  # (N, S, M, D): M and D static, N and S dynamic
        num_levels, num_points = attention_weights.shape[3], attention_weights.shape[4]
        batch = op.Shape(value, start=0, end=1)
        num_queries = op.Shape(sampling_locations, start=1, end=2)
        heights = op.Gather(spatial_shapes, op.Constant(value_int=0), axis=1)
        widths = op.Gather(spatial_shapes, op.Constant(value_int=1), axis=1)
        level_ends = op.Add(level_start_index, op.Mul(heights, widths))  # (L,)
        # grid_sample's grid lives in [-1, 1] with align_corners=0: pixel = location * W - 0.5
        grids = op.Sub(op.Mul(sampling_locations, op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
        per_head = op.Constant(value_ints=[-1, channels])
        grid_shape = op.Concat(
            op.Constant(value_ints=[-1]), num_queries, op.Constant(value_ints=[num_points, 2]), axis=0
        )
        sampled = []
        for level in range(num_levels):
            this_level = op.Constant(value_ints=[level])
            level_shape = op.Gather(spatial_shapes, op.Constant(value_int=level), axis=0)  # (2,) H, W
            level_value = op.Slice(
                value,
                op.Gather(level_start_index, this_level),
                op.Gather(level_ends, this_level),
                op.Constant(value_ints=[1]),
            )
            # (N, H*W, M, D) -> (N, M, D, H*W) -> (N*M, D, H, W)
            level_value = op.Transpose(level_value, perm=[0, 2, 3, 1])
            level_value = op.Reshape(level_value, op.Concat(per_head, level_shape, axis=0))
            # (N, Lq, M, P, 2) -> (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
            grid = op.Gather(grids, op.Constant(value_int=level), axis=3)
            grid = op.Reshape(op.Transpose(grid, perm=[0, 2, 1, 3, 4]), grid_shape)
            # (N*M, D, Lq, P)
            sampled.append(op.GridSample(level_value, grid, mode=interpolation, padding_mode="zeros", align_corners=0))
        # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
        weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
        weights = op.Reshape(
            weights,
            op.Concat(
                op.Constant(value_ints=[-1, 1]), num_queries, op.Constant(value_ints=[num_levels * num_points]), axis=0
            ),
        )
        # (N*M, D, Lq, L*P) weighted sum over L*P -> (N*M, D, Lq) -> (N, M*D, Lq) -> (N, Lq, M*D)
        output = op.ReduceSum(op.Mul(op.Concat(*sampled, axis=-1), weights), op.Constant(value_ints=[-1]), keepdims=0)
        output = op.Reshape(output, op.Concat(batch, op.Constant(value_ints=[heads * channels]), num_queries, axis=0))
        return op.Transpose(output, perm=[0, 2, 1])

    return ms_deform_attn


TRANSLATED_OP = torch.ops.sparse_detr.ms_deform_attn.default
