"""Progress of long loops and steps, on the ``sparse_detr`` logger's terms.

:func:`track` shows a loop as a rich bar on a terminal (stderr), else as a plain line now and then
(:class:`LineSchedule`), and nothing when the logger hides INFO (``sdetr -q``); :func:`timed_step` frames one
long step with a line before it and one, with its seconds, after. The ETA of both the bars and the lines
(and of training's per-epoch progress) comes from :class:`RecentRate`, which leaves the slow first steps out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn
from rich.progress import Progress as RichProgress

T = TypeVar("T")
Clock = Callable[[], float]
logger = logging.getLogger(__name__)

LINE_FRACTION = 0.1  # off a terminal: a line per further tenth of a loop,
MIN_GAP_S = 5.0  # not closer together than this (a loop of a few seconds gives none),
HEARTBEAT_S = 60.0  # and one a minute at least, however slow the loop


class RecentRate:
    """Seconds per item over the recent half of the updates since :meth:`start` (at most the last ``window``).

    The older half is left out because it holds the warm-up: data-loading workers starting, the allocator
    growing, kernels being tuned make the first steps several times slower, and an average since the start
    then overestimates the time left several-fold early in a loop. Measuring between updates, not per
    item, lets a caller update every few items."""

    def __init__(self, clock: Clock = time.perf_counter, window: int = 1000):
        self.clock = clock
        self.window = window
        self.start()

    def start(self, done: int = 0) -> None:
        """Start measuring at ``done`` items (a resumed loop starts past its first items)."""
        self._samples: deque[tuple[int, float]] = deque([(done, self.clock())], maxlen=self.window + 1)
        self._updates = 0

    def update(self, done: int) -> None:
        """``done`` items are done now."""
        self._samples.append((done, self.clock()))
        self._updates += 1

    def seconds_per_item(self) -> float:
        """The recent seconds per item; NaN before any item is done."""
        back = min(max(self._updates // 2, 1), len(self._samples) - 1)
        if back < 1:
            return math.nan
        (earlier, then), (done, now) = self._samples[-1 - back], self._samples[-1]
        return (now - then) / (done - earlier) if done > earlier else math.nan

    def eta(self, remaining: int) -> float:
        """Seconds until ``remaining`` more items are done, at the recent rate (NaN: not known yet)."""
        return remaining * self.seconds_per_item() if remaining > 0 else 0.0


class LineSchedule:
    """When a loop off a terminal gives its next line: once a further tenth of ``total`` is done
    (:data:`LINE_FRACTION`) if :data:`MIN_GAP_S` have passed since the last line, after :data:`HEARTBEAT_S`
    without one in any case (the only rule for an unknown total), and at the end when a line came before or
    the loop took :data:`MIN_GAP_S`."""

    def __init__(self, total: int | None, clock: Clock = time.perf_counter):
        self.total = total
        self.clock = clock
        self.lines = 0
        self._last_time, self._last_done = clock(), 0

    def due(self, done: int) -> bool:
        """Whether to give a line now that ``done`` items are done (counted as given when True)."""
        since = self.clock() - self._last_time
        if self.total and done >= self.total:
            wanted = self.lines > 0 or since >= MIN_GAP_S
        else:
            wanted = since >= HEARTBEAT_S or (since >= MIN_GAP_S and self._part(done) > self._part(self._last_done))
        if wanted:
            self.lines += 1
            self._last_time, self._last_done = self.clock(), done
        return wanted

    def _part(self, done: int) -> int:
        """How many whole :data:`LINE_FRACTION` parts of the total ``done`` covers (0 without a total)."""
        return int(done / (LINE_FRACTION * self.total)) if self.total else 0


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``?`` when not known)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def format_seconds(seconds: float) -> str:
    """``6.2 s`` under a minute, else ``h:mm:ss``."""
    return f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds)


def format_estimate(seconds: float) -> str:
    """A rough length for an estimate: ``42 s``, ``7.5 min``, ``1.4 h`` (``?`` when not known)."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def shows_progress(stream: TextIO) -> tuple[bool, bool]:
    """Whether progress shows at all (the ``sparse_detr`` logger gives INFO lines: not ``sdetr -q``), and
    whether as a rich bar (``stream`` is a terminal) rather than lines."""
    shown = logger.isEnabledFor(logging.INFO)
    return shown, shown and stream.isatty()


def progress_bar(description: str, stream: TextIO, *columns: ProgressColumn) -> RichProgress:
    """A rich bar on ``stream``: ``description``, the bar, done/total, ``columns``, then the task's ``eta``
    field (:class:`RecentRate`'s estimate, not rich's own average since the start)."""
    return RichProgress(
        TextColumn(description, markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TextColumn("eta {task.fields[eta]}"),
        console=Console(file=stream),
        transient=False,
    )


def track(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    unit: str = "items",
    stream: TextIO | None = None,
    clock: Clock = time.perf_counter,
) -> Iterator[T]:
    """Yield ``items``, showing how many are done of ``total`` (default ``len(items)`` where it has one): a
    rich bar on ``stream`` (default stderr) when it is a terminal, else lines on the logger
    (``evaluating: 40/100 batches (40 %), eta 0:00:18``, as :class:`LineSchedule` says), nothing under
    ``sdetr -q``. An item counts as done when the next one is asked for."""
    if total is None:
        total = _length(items)
    shown, rich = shows_progress(stream or sys.stderr)
    if not shown:
        yield from items
    elif rich:
        yield from _track_bar(items, description, total, stream or sys.stderr, clock)
    else:
        yield from _track_lines(items, description, total, unit, clock)


def _length(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _track_bar(items: Iterable[T], description: str, total: int | None, stream: TextIO, clock: Clock) -> Iterator[T]:
    rate = RecentRate(clock)
    with progress_bar(description, stream) as bar:
        task = bar.add_task(description, total=total, eta="?")
        for done, item in enumerate(items, 1):
            yield item
            rate.update(done)
            eta = format_duration(rate.eta(total - done)) if total else "?"
            bar.update(task, completed=done, eta=eta)


def _track_lines(items: Iterable[T], description: str, total: int | None, unit: str, clock: Clock) -> Iterator[T]:
    rate, schedule, began = RecentRate(clock), LineSchedule(total, clock), clock()
    for done, item in enumerate(items, 1):
        yield item
        rate.update(done)
        if not schedule.due(done):
            continue
        if not total:
            logger.info(f"{description}: {done} {unit}, {format_duration(clock() - began)}")
        elif done >= total:
            logger.info(f"{description}: {done}/{total} {unit}, done in {format_seconds(clock() - began)}")
        else:
            eta = format_duration(rate.eta(total - done))
            logger.info(f"{description}: {done}/{total} {unit} ({100 * done / total:.0f} %), eta {eta}")


@contextlib.contextmanager
def timed_step(start: str, end: str, log: logging.Logger = logger, clock: Clock = time.perf_counter) -> Iterator[None]:
    """Log ``start`` (``building the kernel…``), run the block, then log ``end`` with the block's seconds
    (``built the kernel in 6.2 s``); a block that raises gets no second line."""
    log.info(start)
    began = clock()
    yield
    log.info(f"{end} in {format_seconds(clock() - began)}")
