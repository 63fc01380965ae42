"""The ONNX forms of ``sparse_detr::ms_deform_attn``, one per ``sdetr export --msda``:

- ``gridsample``: the grid_sample formulation of the op (as in :mod:`sparse_detr.ops.reference`) in standard
  ONNX operators, GridSample first of all (opset 16 or later), so that any ONNX runtime runs the file;
- ``custom``: one node ``sparse_detr::MultiScaleDeformableAttention`` with the op's inputs and output, run by
  onnxruntime with the project's kernel (:mod:`sparse_detr.ops.onnxruntime_library`);
- ``tensorrt``: one node ``MultiscaleDeformableAttnPlugin_TRT`` as TensorRT's plugin of that name takes it
  (value (N, S, M, D), spatial_shapes (L, 2) and level_start_index (L,) in int32, sampling_locations
  (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P); output (N, Lq, M, D); attributes
  ``plugin_version`` "1" and ``plugin_namespace`` ""), so that ``trtexec --onnx`` builds an engine from the
  file as it is. Its domain ``trt.plugins`` keeps the node out of the ONNX operator set (TensorRT's parser
  finds plugins by the node's name whatever its domain).

Level sizes are read from the ``spatial_shapes`` tensor inside the graph, so one file serves every image
size; only the op's static sizes (heads M, channels per head D, levels L, points P) are fixed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import sparse_detr.ops.library  # noqa: F401  (defines the op)

MIN_OPSET = 16  # GridSample
MSDA_FORMATS = ("gridsample", "custom", "tensorrt")
CUSTOM_DOMAIN, CUSTOM_OP = "sparse_detr", "MultiScaleDeformableAttention"
TENSORRT_DOMAIN, TENSORRT_OP = "trt.plugins", "MultiscaleDeformableAttnPlugin_TRT"
TENSORRT_PLUGIN_VERSION = "1"


def _schema(domain: str, name: str, level_type: str, string_attributes: tuple[str, ...] = ()):
    """The operator schema of a one-node form (the exporter builds nodes from schemas; nothing registers it
    with onnx): five inputs in the op's order, float values and ``level_type`` level tensors, one output."""
    from onnx.defs import OpSchema

    parameter = OpSchema.FormalParameter
    inputs = [parameter("value", "T"), parameter("spatial_shapes", "I"), parameter("level_start_index", "I"),
              parameter("sampling_locations", "T"), parameter("attention_weights", "T")]  # fmt: skip
    attributes = [OpSchema.Attribute(attribute, OpSchema.AttrType.STRING, "", required=False)
                  for attribute in string_attributes]  # fmt: skip
    constraints = [("T", ["tensor(float)"], "sampled values"), ("I", [level_type], "level sizes and starts")]
    return OpSchema(name, domain, 1, inputs=inputs, outputs=[parameter("output", "T")],
                    type_constraints=constraints, attributes=attributes)  # fmt: skip


def ms_deform_attn_translation(opset: int, msda: str = "gridsample") -> Callable:
    """A function that builds ``ms_deform_attn`` in ONNX ``opset`` in the form ``msda`` (see the module
    docstring) for ``torch.onnx.export``'s ``custom_translation_table`` (see :data:`TRANSLATED_OP`); inputs
    and output as in :func:`sparse_detr.ops.ms_deform_attn`."""
    if opset < MIN_OPSET:
        raise ValueError(f"the deformable attention op needs ONNX opset {MIN_OPSET} or later, got {opset}")
    if msda not in MSDA_FORMATS:
        raise ValueError(f"unknown deformable attention form {msda!r}; use one of {', '.join(MSDA_FORMATS)}")
    from onnxscript.values import Op, Opset

    op = Opset("", opset)
    if msda == "custom":
        custom = Op(Opset(CUSTOM_DOMAIN, 1), CUSTOM_OP, _schema(CUSTOM_DOMAIN, CUSTOM_OP, "tensor(int64)"))
        return lambda *inputs: custom(*inputs)
    if msda == "tensorrt":
        schema = _schema(TENSORRT_DOMAIN, TENSORRT_OP, "tensor(int32)", ("plugin_version", "plugin_namespace"))
        plugin = Op(Opset(TENSORRT_DOMAIN, 1), TENSORRT_OP, schema)

        def ms_deform_attn_plugin(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
            _, _, heads, channels = value.shape
            int32 = 6  # onnx.TensorProto.INT32: the plugin's level tensors
            output = plugin(
                value, op.Cast(spatial_shapes, to=int32), op.Cast(level_start_index, to=int32), sampling_locations,
                attention_weights, plugin_version=TENSORRT_PLUGIN_VERSION, plugin_namespace="",
            )  # fmt: skip
            # (N, Lq, M, D) -> (N, Lq, M*D)
            return op.Reshape(output, op.Constant(value_ints=[0, 0, heads * channels]))

        return ms_deform_attn_plugin
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
