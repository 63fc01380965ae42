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
from sparse_detr.errors import SparseDetrError


@dataclass(frozen=True)
class ModelSpec:
    """A model to measure: a preset with random weights (seed 0), or a checkpoint (``preset`` then picks
    another architecture for its weights, see :func:`~sparse_detr.checkpoint.load_model`), at an optional
    keep ratio; ``overrides`` are dotted config fields (``{"model.num_queries": 100}``) applied first."""

    preset: str | None = None
    backbone: str | None = None
    checkpoint: str | None = None
    keep_ratio: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self):
        """The configuration of a preset model (not of a checkpoint)."""
        from sparse_detr.config import apply_overrides, get_preset

        return apply_overrides(get_preset(self.preset, self.backbone), self.overrides)

    def build(self, device: str | torch.device = "cpu"):
        """The detector, in eval mode on ``device``."""
        from sparse_detr.checkpoint import load_model
        from sparse_detr.models import build_model

        if self.checkpoint is not None:
            model = load_model(self.checkpoint, preset=self.preset, map_location=device, overrides=self.overrides)
        else:
            torch.manual_seed(0)
            model = build_model(self.config()).to(device)
        if self.keep_ratio is not None:
            model.set_keep_ratio(self.keep_ratio)
        return model.eval()


@dataclass(frozen=True)
class FpsRequest:
    """One process's work: ``model`` timed at every batch size (ascending, so that the CPU peak resident
    set read after each is that batch size's) on the images saved in ``images_path``."""

    model: ModelSpec
    images_path: str
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int | None = None
    iters: int | None = None
    amp: str | None = None
    compile: bool = False
    device: str = "cpu"
    threads: int | None = None


def run_request(request: FpsRequest) -> list[FpsResult]:
    """Measure ``request`` in this process."""
    if request.threads:
        torch.set_num_threads(request.threads)
    model = request.model.build(request.device)
    images = torch.load(request.images_path, weights_only=True)
    return [
        measure_fps(model, images, batch_size, request.warmup, request.iters, request.amp, request.compile)
        for batch_size in sorted(request.batch_sizes)
    ]


def measure_fps_isolated(
    model: ModelSpec,
    images: list[torch.Tensor],
    batch_sizes: tuple[int, ...] = (1,),
    timeout_s: float = 3600,
    **options,
) -> list[FpsResult]:
    """:func:`~sparse_detr.analysis.fps.measure_fps` of ``model`` on ``images`` (a list of (3, H, W)) at each
    batch size (ascending), in a fresh process. ``options``: the other fields of :class:`FpsRequest`."""
    env = dict(os.environ)
    if options.get("threads"):
        env["OMP_NUM_THREADS"] = str(options["threads"])
    with tempfile.TemporaryDirectory(prefix="sdetr_fps_") as folder:
        images_path = Path(folder) / "images.pt"
        torch.save([image.cpu() for image in images], images_path)
        request = FpsRequest(model, str(images_path), tuple(batch_sizes), **options)
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
    fields["model"] = ModelSpec(**fields["model"])
    fields["batch_sizes"] = tuple(fields["batch_sizes"])
    return FpsRequest(**fields)


if __name__ == "__main__":
    results = run_request(_request_from_json(sys.argv[1]))
    print(json.dumps([dataclasses.asdict(result) for result in results]))
