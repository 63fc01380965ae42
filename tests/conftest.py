"""Shared test helpers: the tiny model the tests build, a one-thread fixture, op inputs, token layouts."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from sparse_detr.checkpoint import save_checkpoint
from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.models import DeformableDETR, build_model
from sparse_detr.models.token_layout import TokenLayout

# the classes of the small checkpoints the predict/visualize tests draw (label 0 is the unused slot)
TINY_CATEGORIES = {1: {"id": 11, "name": "disc"}, 2: {"id": 12, "name": "square"}, 3: {"id": 13, "name": "star"}}


def tiny_model(overrides: dict | None = None, seed: int = 0) -> DeformableDETR:
    """The ``tiny`` preset's model with dotted config ``overrides`` (``{"model.num_queries": 20}``),
    randomly initialized from ``seed``, in training mode."""
    torch.manual_seed(seed)
    return build_model(apply_overrides(get_preset("tiny"), overrides or {}))


def save_tiny_checkpoint(path: str | Path, keep_ratio: float = 0.3) -> Path:
    """A random tiny checkpoint of :data:`TINY_CATEGORIES` (4 classes, 20 queries) trained for 64-pixel
    inputs, as `sdetr train` stores one."""
    model = tiny_model({"model.num_classes": 4, "model.num_queries": 20, "model.keep_ratio": keep_ratio})
    return save_checkpoint(path, model, categories=TINY_CATEGORIES, train_config={"image_size": 64})


def one_line(result, code: int, *fragments: str) -> str:
    """The error line of a CLI ``result`` that exited with ``code``, checked to hold ``fragments``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)
    return errors[0]


_HOLD_LOCK = """import sys, time
from sparse_detr.utils.lock import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_held_elsewhere(folder: str | Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``folder``'s lock for the ``with`` block (it has the lock when the block
    starts); killed with SIGKILL afterwards, as a crash would end it, so its lock file stays behind."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def library_lines(caplog) -> Callable[[], list[str]]:
    """The lines the ``sparse_detr`` logger has given from INFO on (what ``sdetr`` shows on stderr), so far."""
    caplog.set_level(logging.INFO, logger="sparse_detr")
    return lambda: [record.getMessage() for record in caplog.records if record.name.startswith("sparse_detr")]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine small models run faster on one, and two threads wait
    on each other many times over; the tests that use it check no timing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_op_inputs(
    batch: int,
    level_shapes: list[tuple[int, int]],
    heads: int,
    head_dim: int,
    num_queries: int,
    points: int,
    dtype: torch.dtype = torch.float64,
    spread: float = 1.0,
    seed: int = 0,
):
    """Random ms_deform_attn inputs; ``spread`` > 1 puts points outside [0, 1] (outside the maps)."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    tokens = int(spatial_shapes.prod(1).sum())
    num_levels = len(level_shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, num_queries, heads, num_levels, points, 2, generator=generator, dtype=dtype)
    locations = (locations - 0.5) * spread + 0.5
    weights = torch.rand(batch, num_queries, heads, num_levels, points, generator=generator, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def unpadded_layout(level_shapes: list[tuple[int, int]], batch: int = 1) -> TokenLayout:
    """The layout of ``batch`` images that fill levels of these (H_l, W_l) shapes (no padding)."""
    return TokenLayout.of([torch.zeros(batch, height, width, dtype=torch.bool) for height, width in level_shapes])


@pytest.fixture(name="make_op_inputs")
def make_op_inputs_fixture():
    """The :func:`make_op_inputs` factory."""
    return make_op_inputs


@pytest.fixture(scope="session")
def cpu_backend_available() -> bool:
    from sparse_detr.ops import load_backend

    status = load_backend("cpu")
    if not status.available:
        pytest.fail(f"the C++ CPU kernel must build in CI: {status.reason}")
    return True
