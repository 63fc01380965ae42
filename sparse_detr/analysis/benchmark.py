"""The model benchmark: parameters, fvcore GFLOPs and FPS over presets × keep ratios, as a table and plots."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sparse_detr.analysis.benchmark_notes import report_notes
from sparse_detr.analysis.benchmark_plots import fps_columns_of, plot_benchmark
from sparse_detr.analysis.flops import PARTS, count_flops, gflops_as_reference
from sparse_detr.analysis.fps import FpsResult, device_name
from sparse_detr.analysis.latency import ModelSpec, Timing, measure_fps_isolated
from sparse_detr.analysis.reference_figures import (
    reference_gflops,
    reference_preset,
    reference_published_params,
)
from sparse_detr.config import check_keep_ratio
from sparse_detr.data import CocoDetection, eval_transform, scaled_sizes
from sparse_detr.data.source import DataSource
from sparse_detr.data.transforms import COCO_EVAL_SIZE
from sparse_detr.engine.run_config import section
from sparse_detr.errors import MissingFileError, UsageError
from sparse_detr.utils.cpu import cpu_isa, cpu_model
from sparse_detr.utils.device import resolve_device
from sparse_detr.utils.io import check_writable
from sparse_detr.utils.progress import format_seconds
from sparse_detr.utils.report import write_table
from sparse_detr.zoo import resolve_checkpoint

logger = logging.getLogger(__name__)

# a lower bound of the memory inference takes per input pixel of a batch (activations, input included):
# peak RSS grows by 160 bytes per pixel for tiny and 320 to 480 for R50 (sparse, dense) on a CPU
MIN_BYTES_PER_PIXEL = 100
BENCHMARK_STEM = "benchmark"
PARTS_STEM = "gflops_by_part"
STAGE_SHARES = ("backbone_pct", "encoder_pct", "rest_pct")  # of gflops, by FlopCount.by_stage


@dataclass(frozen=True)
class BenchmarkResult:
    """``table``: one row per model (columns: see :func:`run_benchmark`); ``gflops_by_part``: one row per model
    with the GFLOPs of its parts as ``gflops_<part>`` (parts of :class:`~sparse_detr.analysis.flops.FlopCount`;
    empty without FLOPs); ``skipped``: ops fvcore did not count -> most occurrences in one forward pass."""

    table: pd.DataFrame
    gflops_by_part: pd.DataFrame
    skipped: dict[str, int]


@dataclass(frozen=True)
class BenchmarkOptions:
    """What to measure and how: GFLOPs (``flops``), speed (``fps``, timed as ``timing`` says). ``isolate``:
    time each model in a fresh process (default: on CPU, where peak memory is the process's resident set;
    on GPU the allocator's peak is per measurement anyway)."""

    flops: bool = True
    fps: bool = True
    timing: Timing = Timing(batch_sizes=(1, 4))
    isolate: bool | None = None


@dataclass(frozen=True)
class BenchmarkInputs:
    """What the models see: one random image of ``size`` (H, W), or the first ``images`` validation images
    of ``data`` at shorter side ``image_size``, resized as evaluation does (then ``size`` is None)."""

    size: tuple[int, int] | None = (850, 1040)
    images: int | None = None
    data: DataSource = field(default_factory=DataSource)
    image_size: int = COCO_EVAL_SIZE

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], size: tuple[int, int] | None, images: int | None):
        """The inputs dotted ``settings`` (``data.*``, ``train.image_size``) describe, with ``size`` or
        ``images`` from the options."""
        image_size = section(settings, "train").get("image_size", COCO_EVAL_SIZE)
        return cls(size, images, DataSource(**section(settings, "data")), image_size)


@dataclass(frozen=True)
class BenchmarkModels:
    """Which models to measure: each of ``presets`` (random weights) or the ``checkpoint`` (a file, run folder
    or zoo name; one preset then names another architecture for its weights), sparse ones at each of
    ``keep_ratios`` when given; ``backbone`` replaces the presets' and ``overrides`` (dotted ``model.*`` /
    ``loss.*`` fields) change every model."""

    presets: tuple[str, ...] = ()
    keep_ratios: tuple[float, ...] | None = None
    backbone: str | None = None
    checkpoint: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkReport:
    """What :func:`benchmark_models` measured and wrote."""

    result: BenchmarkResult
    source: str
    device: str
    paths: list[Path]


def model_specs(
    presets: Sequence[str],
    keep_ratios: Sequence[float] | None = None,
    backbone: str | None = None,
    checkpoint: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[ModelSpec]:
    """The benchmark matrix: each preset (or the checkpoint, at most one preset then naming its
    architecture) once, sparse ones once per keep ratio when ``keep_ratios`` are given; ``overrides``
    (dotted config fields) change every model."""
    overrides = dict(overrides or {})
    if checkpoint is not None:
        if len(presets) > 1:
            raise UsageError("with a checkpoint give at most one preset (the architecture for its weights)")
        if not Path(checkpoint).is_file():
            raise MissingFileError(f"checkpoint not found: {checkpoint}")
        base = ModelSpec(presets[0] if presets else None, None, str(checkpoint), overrides=overrides)
        bases = [(base, base.build().config.model.is_sparse)]  # the file says whether the model can sparsify
    elif not presets:
        raise UsageError("name at least one preset")
    else:
        specs = [ModelSpec(name, backbone, overrides=overrides) for name in presets]
        bases = [(spec, spec.config().model.is_sparse) for spec in specs]
    for keep_ratio in keep_ratios or []:
        check_keep_ratio(keep_ratio, key="--rho")
    specs = []
    for base, sparse in bases:
        for keep_ratio in keep_ratios if (keep_ratios and sparse) else [None]:
            specs.append(dataclasses.replace(base, keep_ratio=keep_ratio))
    return specs


def parameter_counts(model) -> dict[str, int]:
    """All parameters, the trainable ones, and the trainable ones without the encoder aux heads (the
    published convention: those heads only feed training losses)."""
    aux_heads = model.head_slots.encoder_aux_heads
    aux = sum(
        p.numel()
        for heads in (model.class_embed, model.bbox_embed)
        for head in heads[aux_heads]
        for p in head.parameters()
        if p.requires_grad
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "params_trainable": trainable,
        "params_published": trainable - aux,
    }


def token_counts(model, image: torch.Tensor) -> dict[str, float]:
    """Encoder tokens of ``image`` (3, H, W) and how many the encoder refines (all, without sparsity)."""
    with torch.no_grad():
        outputs = model(image[None].to(next(model.parameters()).device))
    tokens = outputs["layout"].num_tokens
    kept = int(outputs["selection"].counts[0]) if "selection" in outputs else tokens
    return {"tokens": tokens, "kept_tokens": kept}


def _fps_columns(results: list[FpsResult]) -> dict[str, float]:
    columns = {}
    for result in results:
        suffix = f"bs{result.batch_size}"
        columns.update(
            {
                f"fps_{suffix}": result.fps,
                f"fps_{suffix}_min": result.fps_min,
                f"fps_{suffix}_max": result.fps_max,
                f"peak_memory_mib_{suffix}": result.peak_memory_mib,
            }
        )
    columns["peak_memory_mib"] = max(result.peak_memory_mib for result in results)
    first = results[0]
    columns.update(device=first.device, dtype=first.dtype, threads=first.threads)
    columns.update(fps_iters=first.iters, fps_warmup=first.warmup)
    return columns


def _time(spec: ModelSpec, model, images: list[torch.Tensor], options: BenchmarkOptions) -> list[FpsResult]:
    timing = options.timing
    isolate = options.isolate if options.isolate is not None else torch.device(timing.device).type == "cpu"
    return measure_fps_isolated(spec, images, timing) if isolate else timing.measure(model, images)


def run_benchmark(
    specs: Sequence[ModelSpec],
    images: list[torch.Tensor],
    options: BenchmarkOptions,
    input_size: tuple[int, int] | None = None,
) -> BenchmarkResult:
    """Measure every model of ``specs`` on ``images`` (a list of (3, H, W)).

    ``input_size``: (H, W) when ``images`` is one synthetic image of that size; the reference's GFLOPs are
    looked up for it (the reference has no figures for dataset images).
    Columns of the table: ``preset``, ``backbone``, ``rho`` (NaN without sparsity), ``checkpoint`` (when
    given), ``tokens``, ``kept_tokens`` (of the first image), ``params``, ``params_trainable``,
    ``params_published``, ``params_published_reference``; with FLOPs ``gflops``, ``gflops_with_aux``,
    ``gflops_as_reference``, ``gflops_reference``, ``gflops_reference_with_aux``, ``gflops_diff_pct``
    (``gflops`` against ``gflops_reference``); with FPS, per batch size b ``fps_bs{b}``,
    ``fps_bs{b}_min``, ``fps_bs{b}_max``, ``peak_memory_mib_bs{b}``, then ``peak_memory_mib``; always
    ``device``, ``dtype``, ``threads``; with FPS ``fps_iters``, ``fps_warmup`` and ``mode`` (the inference
    path, see :attr:`~sparse_detr.analysis.latency.Timing.mode`); on CPU ``cpu`` (its model) and ``cpu_isa``
    (its AVX2/AVX-512/AVX512-BF16/AMX extensions).
    """
    if options.timing.threads:
        torch.set_num_threads(options.timing.threads)
    rows, parts, skipped = [], [], {}
    for number, spec in enumerate(specs, 1):
        began = time.perf_counter()
        model = spec.build(options.timing.device)
        config = model.config.model
        keep_ratio = model.keep_ratio if model.keep_ratio > 0 else math.nan  # NaN: a dense model
        preset = reference_preset(config, model.keep_ratio)
        label = spec.preset or model.config.name
        sparsity = f", rho {keep_ratio:g})" if model.keep_ratio > 0 else ")"
        name = f"model {number}/{len(specs)}: {label} ({config.backbone}{sparsity}"
        logger.info(f"measuring {name}: {_measured_text(options)}…")
        row = {"preset": label, "backbone": config.backbone, "rho": keep_ratio}
        if spec.checkpoint:
            row["checkpoint"] = spec.checkpoint
        row.update(token_counts(model, images[0]))
        row.update(parameter_counts(model))
        row["params_published_reference"] = reference_published_params(config.backbone, preset)
        if options.flops:
            count = count_flops(model, images)
            reference = reference_gflops(config.backbone, preset, input_size)
            row.update(
                gflops=count.gflops,
                gflops_with_aux=count.gflops_with_aux,
                gflops_as_reference=gflops_as_reference(count, config),
                gflops_reference=reference.without_aux,
                gflops_reference_with_aux=reference.with_aux,
                gflops_diff_pct=100 * (count.gflops / reference.without_aux - 1),
            )
            parts.append(
                {key: row[key] for key in ("preset", "backbone", "rho")}
                | {f"gflops_{part}": value for part, value in count.by_module.items()}
                | {f"{stage}_pct": 100 * value / count.gflops for stage, value in count.by_stage.items()}
            )
            for op, occurrences in count.skipped.items():
                skipped[op] = max(skipped.get(op, 0), occurrences)
        if options.fps:
            row.update(_fps_columns(_time(spec, model, images, options)), mode=options.timing.mode)
        else:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            device = torch.device(options.timing.device)
            row.update(device=device_name(device), dtype=dtype, threads=torch.get_num_threads())
        if torch.device(options.timing.device).type == "cpu":
            row.update(cpu=cpu_model(), cpu_isa=" ".join(cpu_isa()))
        rows.append(row)
        del model
        logger.info(f"measured {name} in {format_seconds(time.perf_counter() - began)}")
    parts_table = pd.DataFrame(parts)
    if parts:  # the parts' order, whichever model came first
        order = ["preset", "backbone", "rho", *(f"gflops_{part}" for part in PARTS), *STAGE_SHARES]
        parts_table = parts_table[[column for column in order if column in parts_table]]
    return BenchmarkResult(pd.DataFrame(rows), parts_table, skipped)


def _measured_text(options: BenchmarkOptions) -> str:
    """What is measured of each model: ``parameters, GFLOPs, FPS at batch 1, 4``."""
    measured = ["parameters", "GFLOPs"] if options.flops else ["parameters"]
    if options.fps:
        measured.append(f"FPS at batch {', '.join(str(size) for size in options.timing.batch_sizes)}")
    return ", ".join(measured)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns worth a screen (the files hold every column)."""
    first = ["preset", "backbone", "rho", "kept_tokens", "params_published", "gflops", "gflops_reference"]
    columns = [*first, "gflops_diff_pct", *fps_columns_of(frame), "peak_memory_mib"]
    return frame[[column for column in columns if column in frame]]


def write_benchmark_report(
    result: BenchmarkResult, directory: str | Path, notes: list[str], title: str = "Benchmark"
) -> list[Path]:
    """``benchmark.csv``/``.md``, ``gflops_by_part.csv``/``.md`` (with FLOPs) and the plots in ``directory``;
    returns their paths."""
    paths = list(write_table(result.table, directory, BENCHMARK_STEM, title=title, notes=notes))
    if not result.gflops_by_part.empty:
        paths += write_table(
            result.gflops_by_part, directory, PARTS_STEM, title=f"{title}: GFLOPs by part",
            notes=["The parts sum to `gflops_with_aux`; `gflops_other`: ops outside them (resizing the padding mask)."],
        )  # fmt: skip
    return paths + plot_benchmark(result.table, directory)


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """The bytes ``device`` can hold and what they are (the GPU's free memory, or the machine's physical
    memory); None where the system does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device_name(device)}"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine has"
    except (ValueError, OSError):
        return None


def check_fits(size: tuple[int, int], batch_size: int, option: str, device: torch.device) -> None:
    """Refuse, before anything is allocated, inputs of ``size`` (H, W) in batches of ``batch_size`` that need
    more memory than ``device`` has, even at :data:`MIN_BYTES_PER_PIXEL`.

    Raises:
        UsageError: naming ``option``, --batch-sizes, the estimate and the memory there is.
    """
    memory = device_memory(device)
    needed = size[0] * size[1] * batch_size * MIN_BYTES_PER_PIXEL
    if memory is None or needed <= memory[0]:
        return
    available, what = memory
    raise UsageError(
        f"{option} in batches of {batch_size} (--batch-sizes) needs at least {needed / 2**30:,.1f} GiB "
        f"({MIN_BYTES_PER_PIXEL} bytes per input pixel), more than the {available / 2**30:,.1f} GiB {what}: "
        "give a smaller size or batch"
    )


def synthetic_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """One (3, height, width) standard-normal image (the reference's quick mode: FLOPs do not depend on the
    pixels, and a normalized image has about this distribution)."""
    if height < 1 or width < 1:
        raise UsageError(f"the input size must be positive, got {height}x{width}")
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))


def dataset_images(images_dir: str | Path, annotations: str | Path, count: int, image_size: int) -> list[torch.Tensor]:
    """The first ``count`` images of a COCO-format split, each (3, H, W) as evaluation sees it (shorter side
    ``image_size``, longer side at most 1333 · ``image_size`` / 800, normalized)."""
    dataset = CocoDetection(images_dir, annotations, eval_transform(image_size))
    if count > len(dataset):
        raise UsageError(f"--images {count} asks for more than the {len(dataset)} images of {images_dir}")
    return [dataset[index][0] for index in range(count)]


def benchmark_models(
    models: BenchmarkModels, inputs: BenchmarkInputs, options: BenchmarkOptions, folder: str | Path
) -> BenchmarkReport:
    """``sdetr benchmark``: measure ``models`` (presets, or a checkpoint file, run folder or zoo name, at each
    keep ratio) on ``inputs`` and write the report to ``folder`` (checked to be writable first). Input sizes
    and batches that cannot fit in the device's memory are refused before anything is allocated
    (:func:`check_fits`)."""
    device = resolve_device(options.timing.device)
    options = dataclasses.replace(options, timing=dataclasses.replace(options.timing, device=str(device)))
    check_writable(folder)
    path = str(resolve_checkpoint(models.checkpoint)) if models.checkpoint else None
    specs = model_specs(models.presets, models.keep_ratios, models.backbone, path, models.overrides)
    batch_size = max(options.timing.batch_sizes) if options.fps else 1
    if inputs.images is None:
        height, width = inputs.size
        check_fits((height, width), batch_size, f"--input-size {height}x{width}", device)
        images, source = [synthetic_image(height, width)], f"one random {height}×{width} image"
    else:
        widest = (inputs.image_size, scaled_sizes(inputs.image_size).max_size)  # the longer side is capped
        check_fits(widest, batch_size, f"--image-size {inputs.image_size}", device)
        val_images, val_ann = inputs.data.val_split()
        images = dataset_images(val_images, val_ann, inputs.images, inputs.image_size)
        source = (f"the first {inputs.images} images of {val_images}, shorter side {inputs.image_size} "
                  "(mean over them)")  # fmt: skip
    result = run_benchmark(specs, images, options, inputs.size if inputs.images is None else None)
    notes = report_notes(result.table, options, source, result.skipped)
    paths = write_benchmark_report(result, folder, notes, f"Benchmark: {source}")
    return BenchmarkReport(result, source, str(device), paths)
