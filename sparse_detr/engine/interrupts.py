"""Ctrl-C, SIGTERM and SIGUSR2 (what Slurm sends before a time limit) during training: the run stops between
optimizer steps, so that the checkpoint it then writes holds whole steps only.

While :meth:`StopSignals.installed` is active, the stop signals raise :class:`Stop` (a
``KeyboardInterrupt``) at once, except inside :meth:`StopSignals.deferred`: work there (an optimizer step
and its bookkeeping, the end of an epoch) finishes first, and a second signal stops it at once, half done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

# Ctrl-C; a stop request (Slurm's preemption or requeue, a killed job); Slurm's warning before a time limit
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGUSR2] if hasattr(signal, "SIGUSR2") else []))


class Stop(KeyboardInterrupt):
    """A stop signal during training. ``mid_step``: it cut deferred work off, so the weights, statistics or
    optimizer state may be partly updated."""

    def __init__(self, signum: int = signal.SIGINT, mid_step: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.mid_step = signum, mid_step

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process stopped by this signal: 130 for SIGINT, 143 for SIGTERM, 140 for SIGUSR2."""
        return 128 + self.signum


class StopSignals:
    """Turns the stop signals into :class:`Stop`, held back while deferred work runs."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.deferring = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the stop signals (in the main thread, where Python receives them); the previous handlers
        come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Work that must not be cut in half: a stop signal during it raises :class:`Stop` when it is done."""
        self.deferring = True
        try:
            yield
        except Stop:
            raise
        except KeyboardInterrupt:  # not from the handler (none installed): the work was cut off all the same
            raise Stop(mid_step=True) from None
        finally:
            self.deferring = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Stop(signum)

    def _handle(self, signum: int, frame) -> None:
        if self.deferring and self.pending is None:
            self.pending = signum
            return
        raise Stop(signum, mid_step=self.deferring)
