"""A detector prepared for fast inference: frozen BatchNorm folded into the convolutions before it, the
convolutional backbone and input projections in channels_last, and optionally ``torch.compile``.

Folding is exact up to float32 rounding: ``conv(x, W) * s + t`` becomes ``conv(x, W * s) + t``. channels_last
lets oneDNN (CPU) and cuDNN pick their fast convolution kernels, in float32 and above all in bfloat16 (AMX):
run the prepared model under :func:`sparse_detr.utils.precision.autocast` for mixed precision, which reaches
the backbone, the input projections and the transformer's linear layers while the deformable attention op
accumulates in float32. A prepared model is for inference only: folding cannot be undone. Preparing also
keeps freed host memory in the process for the next pass (:mod:`sparse_detr.utils.memory`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops.misc import FrozenBatchNorm2d

from sparse_detr.models.backbone import ResNetBackbone
from sparse_detr.models.detector import DeformableDETR
from sparse_detr.models.outputs import DetectorOutputs
from sparse_detr.utils.cpu import bf16_hardware, bf16_note
from sparse_detr.utils.memory import keep_freed_memory
from sparse_detr.utils.precision import AMP_DTYPES, autocast

_BATCH_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution (the next child of the same parent, or the
    child after a ``Sequential`` that ends in one) into that convolution, and replace it by ``Identity``;
    returns how many were folded. The module must be in eval mode, and its forward must apply each such
    pair in that order (as timm's ResNets do)."""
    if module.training:
        raise ValueError("fold_batch_norms needs a module in eval mode (running statistics)")
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            last = conv[-1] if isinstance(conv, nn.Sequential) and len(conv) else conv
            if not (isinstance(last, nn.Conv2d) and isinstance(norm, _BATCH_NORMS)):
                continue
            fused = fuse_conv_bn_eval(last, norm)
            if last is conv:
                setattr(parent, conv_name, fused)
            else:
                conv[-1] = fused
            setattr(parent, norm_name, nn.Identity())
            folded += 1
    return folded


def cast_matmul_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights and biases of every ``Conv2d`` and ``Linear`` in ``dtype`` (the autocast dtype);
    returns how many layers changed. Autocast casts them to that dtype at every call anyway (its cache
    lasts one autocast region, so every forward pass): casting once gives the same numbers without
    reading every weight twice per pass. Other parameters (norms, embeddings) keep their dtype."""
    changed = 0
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.to(dtype)
            changed += 1
    return changed


def _to_channels_last(module: nn.Module, inputs: tuple) -> tuple:
    images, *rest = inputs
    return (images.contiguous(memory_format=torch.channels_last), *rest)


class InferenceModel:
    """A detector prepared by :func:`prepare_for_inference`; call it like the detector (without gradients,
    under its autocast). ``model`` is the prepared detector itself (for its config and keep ratio)."""

    def __init__(self, model: DeformableDETR, runner: nn.Module, amp: str | None):
        self.model, self.runner, self.amp = model, runner, amp
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> DetectorOutputs:
        with autocast(self.device, self.amp):
            return self.runner(images, mask, **kwargs)

    @property
    def dtype(self) -> str:
        """What the passes compute in: the parameters' dtype, or ``bfloat16 autocast`` / ``float16 autocast``."""
        if self.amp is not None:
            return f"{str(AMP_DTYPES[self.amp]).removeprefix('torch.')} autocast"
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


@torch.no_grad()
def prepare_for_inference(
    model: DeformableDETR, amp: str | None = None, compile: bool = False, fast: bool = True
) -> InferenceModel:
    """``model`` made ready for inference, in eval mode, changed in place (see the module docstring).

    Args:
        amp: ``"bf16"`` or ``"fp16"``: run under that autocast; None: the model's dtype.
        compile: ``torch.compile`` the detector, with Inductor's freezing (weights folded into the compiled
            graph as constants); the first call of each input shape compiles.
        fast: fold the frozen BatchNorms, use channels_last and, with ``amp``, store the convolution and
            linear weights in its dtype (:func:`cast_matmul_weights`); False: the model as it is, in eval mode.
    """
    device = next(model.parameters()).device
    autocast(device, amp)  # checks amp before the model changes
    if amp == "bf16" and device.type == "cpu" and bf16_hardware() is None:
        warnings.warn(bf16_note(), RuntimeWarning, stacklevel=2)
    keep_freed_memory()
    model.eval()
    backbone = model.backbone[0]
    if fast:
        if isinstance(backbone, ResNetBackbone):
            fold_batch_norms(backbone.body)
        backbone.to(memory_format=torch.channels_last)
        model.input_proj.to(memory_format=torch.channels_last)
        backbone.register_forward_pre_hook(_to_channels_last)
        if amp is not None:
            cast_matmul_weights(model, AMP_DTYPES[amp])
    runner: nn.Module = model
    if compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        runner = torch.compile(model, dynamic=False)
    return InferenceModel(model, runner, amp)
