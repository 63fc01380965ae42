"""FPS of a model measured in a fresh Python process, so that the peak memory reported is that model's.

On CPU, :func:`~sparse_detr.analysis.fps.measure_fps` can only report the peak resident set of the whole
process; a process per model makes it one model's, which is what the reference's figures in
``official/README.md`` give.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_detr.analysis.fps import FpsResult, measure_fps
from sparse_detr.checkpoint import load_for_inference
from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.errors import SparseDetrError
from sparse_detr.models import build_model
from sparse_detr.models.fast_inference import prepare_for_inference
from sparse_detr.utils.precision import check_amp


@dataclass(frozen=True)
class ModelSpec:
    """A model to measure: a preset with random weights (seed 0), or a checkpoint (``preset`` then picks
    another architecture for its weights, see :func:`~sparse_detr.checkpoint.load_for_inference`), at an optional
    keep ratio; ``overrides`` are dotted config fields (``{"model.num_queries": 100}``) applied first."""

    preset: str | None = None
    backbone: str | None = None
    checkpoint: str | None = None
    keep_ratio: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self):
        """The configuration of a preset model (not of a checkpoint)."""
        return apply_overrides(get_preset(self.preset, self.backbone), self.overrides)

    def build(self, device: str | torch.device = "cpu"):
        """The detector, in eval mode on ``device``."""
        if self.checkpoint is not None:
            model = load_for_inference(self.checkpoint, device, self.overrides, preset=self.preset).model
        else:
            torch.manual_seed(0)
            model = build_model(self.config()).to(device)
        if self.keep_ratio is not None:
            model.set_keep_ratio(self.keep_ratio)
        return model.eval()


@dataclass(frozen=True)
class Timing:
    """How a model is timed: at every batch size of ``batch_sizes`` (ascending, so that the CPU peak
    resident set read after each is that batch size's), ``warmup`` untimed and ``iters`` timed passes (None:
    the device's default), prepared for inference as ``fast``, ``amp`` and ``compile`` say (see
    :func:`~sparse_detr.models.fast_inference.prepare_for_inference`), on ``device`` with ``threads`` CPU
    threads (None: torch's)."""

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int | None = None
    iters: int | None = None
    amp: str | None = None
    compile: bool = False
    device: str = "cpu"
    threads: int | None = None
    fast: bool = True

    @property
    def mode(self) -> str:
        """The inference path in a few words: ``fast float32``, ``fast bf16 compiled``, ``plain float32``."""
        words = ["fast" if self.fast else "plain", self.amp or "float32"]
        return " ".join(words + (["compiled"] if self.compile else []))

    def __post_init__(self) -> None:
        check_amp(self.amp, "--amp")

    def measure(self, model, images: list[torch.Tensor]) -> list[FpsResult]:
        """:func:`~sparse_detr.analysis.fps.measure_fps` of ``model`` at every batch size, in this process
        (``model`` is prepared for inference in place: measure it last)."""
        if self.threads:
            torch.set_num_threads(self.threads)
        runner = prepare_for_inference(model, self.amp, self.compile, self.fast)
        return [
            measure_fps(runner, images, batch_size, self.warmup, self.iters) for batch_size in sorted(self.batch_sizes)
        ]


@dataclass(frozen=True)
class FpsRequest:
    """One process's work: ``model`` timed as ``timing`` says on the images saved in ``images_path``."""

    model: ModelSpec
    images_path: str
    timing: Timing


def run_request(request: FpsRequest) -> list[FpsResult]:
    """Measure ``request`` in this process."""
    if request.timing.threads:
        torch.set_num_threads(request.timing.threads)  # before the model is built
    model = request.model.build(request.timing.device)
    return request.timing.measure(model, torch.load(request.images_path, weights_only=True))


def measure_fps_isolated(
    model: ModelSpec, images: list[torch.Tensor], timing: Timing, timeout_s: float = 3600
) -> list[FpsResult]:
    """``timing.measure`` of ``model`` on ``images`` (a list of (3, H, W)), in a fresh process (so that its
    peak resident set is its own)."""
    env = dict(os.environ)
    if timing.threads:
        env["OMP_NUM_THREADS"] = str(timing.threads)
    with tempfile.TemporaryDirectory(prefix="sdetr_fps_") as folder:
        images_path = Path(folder) / "images.pt"
        torch.save([image.cpu() for image in images], images_path)
        request = FpsRequest(model, str(images_path), timing)
        result = subprocess.run(
            [sys.executable, "-m", "sparse_detr.analysis.latency", json.dumps(asdict(request))],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no error output"]
        raise SparseDetrError(f"FPS measurement of {model} in a fresh process failed: {lines[-1]}")
    return [FpsResult(**fields) for fields in json.loads(result.stdout.strip().splitlines()[-1])]


def _request_from_json(text: str) -> FpsRequest:
    fields = json.loads(text)
    timing = Timing(**{**fields["timing"], "batch_sizes": tuple(fields["timing"]["batch_sizes"])})
    return FpsRequest(ModelSpec(**fields["model"]), fields["images_path"], timing)


if __name__ == "__main__":
    results = run_request(_request_from_json(sys.argv[1]))
    print(json.dumps([dataclasses.asdict(result) for result in results]))
