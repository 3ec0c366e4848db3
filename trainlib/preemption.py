"""Graceful stop on SIGTERM / SIGINT (preemption, `kill PID`, Ctrl-C).

The handler only records the signal. The loop looks at it at step boundaries: in one process
at every optimizer step, under DDP on logging steps, where the flag rides along in the all-reduce
the loop does anyway (so every rank stops at the same step, and no extra sync is added). The
trainer then saves checkpoints/last.ckpt and raises `Preempted`; `python -m recipes.<name>` exits
with `Preempted.exit_code` (143 for SIGTERM, 130 for SIGINT), and `trainer.resume=auto` continues.
A second Ctrl-C interrupts at once (KeyboardInterrupt).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType


class Preempted(Exception):
    """Training stopped on a signal after saving last.ckpt."""

    def __init__(self, signum: int, checkpoint: str) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; saved {checkpoint}; continue with trainer.resume=auto")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalFlag:
    """Installs the handlers while training (main thread only) and restores the previous ones."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def install(self) -> "SignalFlag":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()
