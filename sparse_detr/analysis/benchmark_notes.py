"""The prose notes under the benchmark's tables: what was measured, on what, how (the inference path,
threads, memory), and how the GFLOPs compare with the reference's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import torch

from sparse_detr.analysis.fps import DEFAULT_ITERS
from sparse_detr.utils.cpu import cpu_description

if TYPE_CHECKING:
    from sparse_detr.analysis.benchmark import BenchmarkOptions


def report_notes(frame: pd.DataFrame, options: BenchmarkOptions, source: str, skipped: dict[str, int]) -> list[str]:
    """The conventions and settings a reader of the table needs."""
    notes = [f"Inputs: {source}. Random weights unless a checkpoint is named; eval mode, no gradients."]
    notes.append(
        "Parameters: `params` all, `params_trainable` those that train (frozen BN statistics are buffers; "
        "the R50 stem and layer1, the Swin-T patch embedding and stage 1 are frozen), `params_published` the "
        "trainable ones without the encoder aux heads (training-only), the convention of the published counts."
    )
    if options.flops:
        notes += [
            "GFLOPs: fvcore, one multiply-add = one FLOP, element-wise ops not counted; the deformable sampling "
            "counts 4 FLOPs per sampled value per channel (N·M·D·Lq·L·P·4, fvcore's count of its grid_sample "
            "form), the decoder's scaled_dot_product_attention its two matrix products.",
            "`gflops` leaves out the encoder aux heads, which only feed training losses and do not run at "
            "inference here; `gflops_with_aux` includes them, as the reference runs them at inference too "
            "(compare it with `gflops_reference_with_aux`). `gflops_reference` is the reference's figure "
            "without them.",
            "`gflops_as_reference` adds what the reference computes twice: with box refinement its decoder "
            "runs every layer's box head once to refine and once more for the outputs; this model reuses the "
            "first result (`gflops_decoder_box_heads` in gflops_by_part.md).",
            "gflops_by_part: `backbone_pct`, `encoder_pct` (with the scoring network) and `rest_pct` split "
            "`gflops` as the paper does; what token sparsity can save is the encoder's share.",
            "Ops fvcore skipped (occurrences in one forward pass): "
            + ", ".join(f"{op.split('::')[-1]} {n}" for op, n in sorted(skipped.items())),
        ]
    if options.fps and "fps_iters" in frame:
        iters, warmup = int(frame["fps_iters"].iloc[0]), int(frame["fps_warmup"].iloc[0])
        device = torch.device(options.timing.device).type
        notes.append(
            f"Inference path: {options.timing.mode} ("
            + ("frozen BatchNorm folded into the convolutions, channels_last backbone" if options.timing.fast
               else "the model as built")
            + (f", {options.timing.amp} autocast" if options.timing.amp else "")
            + (", torch.compile with freezing, compiled in the warm-up" if options.timing.compile else "")
            + "; see docs/PERFORMANCE.md)."
        )  # fmt: skip
        if device == "cpu":
            notes.append(f"CPU: {cpu_description()}, {int(frame['threads'].iloc[0])} thread(s).")
        notes.append(
            f"FPS: images per second, median over {iters} timed forward passes after {warmup} warm-up "
            f"pass{'' if warmup == 1 else 'es'} (min and max beside it); "
            + ("timed with CUDA events and synchronization" if device == "cuda" else "timed with perf_counter")
            + (
                f"; fewer passes than the {DEFAULT_ITERS['cuda']} of a GPU run, to keep CPU runs short."
                if device == "cpu" and iters < DEFAULT_ITERS["cuda"]
                else "."
            )
        )
        notes.append(
            "Peak memory: "
            + (
                "peak memory allocated by tensors during the timed passes (MiB)."
                if device == "cuda"
                else "peak resident set (MiB, VmHWM) of the measuring process, torch's own ~0.7 GiB included"
                + (", a fresh process per model." if options.isolate is not False else ", shared by all models.")
            )
        )
    return notes
