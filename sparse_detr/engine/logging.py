"""What a run reports: JSON-lines metrics (and, when asked, TensorBoard event files), and its progress and
status lines on the ``sparse_detr`` logger (a bar on a terminal instead of the progress lines).

Only rank 0 reports; the other processes get inactive objects.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rich.progress import TextColumn

from sparse_detr.errors import ConfigError
from sparse_detr.utils.io import atomic_write_text
from sparse_detr.utils.progress import Clock, RecentRate, format_duration, progress_bar, shows_progress

logger = logging.getLogger(__name__)


def require_tensorboard() -> None:
    """Raise :class:`~sparse_detr.config.ConfigError` (one line, how to install it) without TensorBoard."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install 'sparse-detr[tensorboard]'"
        ) from None


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl``; with ``tensorboard``, also writes every
    number to TensorBoard event files in ``<output_dir>/tensorboard`` (``train/loss``, ``eval/AP``, …).

    A run that starts at optimizer step ``start_step`` (a resumed one: its checkpoint's) first drops the rows
    a killed run wrote after that step, and TensorBoard hides its events after it, so every step is logged
    once."""

    def __init__(self, output_dir: str | Path, active: bool = True, tensorboard: bool = False, start_step: int = 0):
        self.active = active
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            drop_rows_after(self.path, start_step)
            if tensorboard:
                require_tensorboard()
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=start_step + 1)

    def write(self, record: dict[str, Any], step: int, prefix: str = "train") -> None:
        if not self.active:
            return
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.path.open("a") as file:
            file.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{prefix}/{key.removeprefix(prefix + '_')}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrite the metrics file ``path`` (atomically) without its rows of steps after ``step``, and without a
    line a killed write left incomplete; rows without a step (evaluations, written after the checkpoint of
    their epoch) stay."""
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.splitlines()
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) < len(lines) or not text.endswith("\n"):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _row_step(line: str) -> float:
    """The step of a metrics row: 0 for rows without one, infinite for a line that is no JSON object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    step = row.get("step", 0) if isinstance(row, dict) else None
    return step if isinstance(step, (int, float)) else math.inf


class Progress:
    """Per-epoch progress: a rich bar (loss, it/s, ETA) on a terminal (stderr), otherwise a line on the logger
    every ``log_every`` iterations (for CI and cluster logs); nothing when the logger hides INFO
    (``--quiet``). Speed and ETA are those of the recent iterations (:class:`~sparse_detr.utils.progress.RecentRate`:
    the slow first ones of an epoch are left out); ``clock`` gives the seconds. :meth:`message` is a status
    line on the logger."""

    def __init__(
        self, active: bool = True, log_every: int = 20, stream: TextIO | None = None, clock: Clock = time.perf_counter
    ):
        self.active = active
        self.log_every = log_every
        self.stream = stream or sys.stderr
        shown, rich = shows_progress(self.stream)
        self.shown, self.rich = active and shown, active and rich
        self.rate = RecentRate(clock)
        self._bar = None

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        self.epoch, self.epochs, self.total, self.done = epoch, epochs, total, done
        self.rate.start(done)
        if not self.rich:
            return
        self._bar = progress_bar(f"epoch {epoch + 1}/{epochs}", self.stream, TextColumn("{task.fields[status]}"))
        self._bar.start()
        self._task = self._bar.add_task("train", total=total, completed=done, status="", eta="?")

    def update(self, done: int, loss: float, lr: float) -> None:
        self.done = done
        if not self.shown:
            return
        self.rate.update(done)
        seconds = self.rate.seconds_per_item()
        speed = 1 / seconds if seconds > 0 else math.nan
        eta = format_duration(self.rate.eta(self.total - done))
        status = f"loss {loss:.4f}  lr {lr:.2e}  {speed:.2f} it/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, status=status, eta=eta)
        elif done % self.log_every == 0 or done == self.total:
            logger.info(f"epoch {self.epoch + 1}/{self.epochs} [{done}/{self.total}] {status}  eta {eta}")

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def message(self, text: str) -> None:
        if self.active:
            logger.info(text)
