"""profiler.enabled=true: torch.profiler over a short window of optimizer steps.

    wait      steps run without the profiler (the first steps: allocator, cuDNN autotuning, compile)
    warmup    steps traced but thrown away (the profiler's own start-up cost lands here)
    active    steps recorded

counted from the start of fit(). CPU activity always, CUDA activity when the device is a GPU.
When the window ends the profiler writes a Chrome-trace JSON (what TensorBoard's profiler plugin
and Perfetto both read) to `<run_dir>/profiler/rank<r>.<time_ns>.pt.trace.json`, the same file
`torch.profiler.tensorboard_trace_handler(dir, worker_name="rank<r>")` writes, and stops: the
steps after the window run with no profiler at all (no record_function, no hooks). At the end of
fit() the top operators (self CUDA time on a GPU, self CPU time otherwise) go to
`<run_dir>/profiler/top_ops_rank<r>.txt`, and rank 0 prints its table to the console and
train.log. Every rank profiles its own process.

A run that ends inside the recorded part of the window still writes its trace and table, and
says how many of the `active` steps it recorded; one that ends before the recorded part (in
`wait` or `warmup`) records nothing and says so in one line.

This module does not import the callbacks (callbacks.Profile drives it): no import circle.
"""
from __future__ import annotations

import atexit
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from .loggers import log

TRACE_SUFFIX = ".pt.trace.json"

_active: "StepProfiler | None" = None  # the one running in this process (a failed fit may leave one behind)


class StepProfiler:
    """One profiling window: start() at the start of fit, step() after every optimizer step,
    stop() at the end (any time: it flushes what was recorded). `cfg` is the `profiler` section."""

    def __init__(self, cfg: Any, run_dir: Path, rank: int, device: torch.device, world_size: int = 1) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.folder = Path(run_dir) / "profiler"
        self.cuda = torch.device(device).type == "cuda"
        self.worker = f"rank{rank}"
        self.window = cfg.wait + cfg.warmup + cfg.active
        self.steps = 0             # optimizer steps since start()
        self.recorded = 0          # of them, steps inside the recorded part of the window
        self.first_recorded: int | None = None  # global step numbers of the recorded steps
        self.last_recorded: int | None = None
        self.trace_path: Path | None = None
        self.table = ""
        self.prof: Any = None
        self.done = False          # the window is over (or stop() ran): nothing runs any more

    # ------------------------------------------------------------------------------------ events
    def start(self) -> None:
        global _active
        if _active is not None and _active is not self:  # an earlier fit that raised: release its profiler
            _active.stop(quiet=True)
        c = self.cfg
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=c.wait, warmup=c.warmup, active=c.active, repeat=1),
            on_trace_ready=self._export, record_shapes=c.record_shapes, profile_memory=c.profile_memory)
        self.prof.__enter__()
        _active = self

    def step(self, global_step: int) -> None:
        """After optimizer step `global_step`. Host work only (no device sync of its own)."""
        if self.done:
            return
        if self.prof.current_action in (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE):
            self.recorded += 1
            self.first_recorded = global_step if self.first_recorded is None else self.first_recorded
            self.last_recorded = global_step
        self.steps += 1
        self.prof.step()  # at the window's end: stops tracing and writes the trace (_export)
        if self.steps >= self.window:
            self._close()  # nothing of the profiler stays in the loop after its window

    def stop(self, quiet: bool = False) -> str:
        """End the profiler (flushing a partly recorded window), write the table; returns the log text."""
        if self.prof is None:
            return ""
        if not self.done:
            self._close()
        text = self._summary()
        if self.recorded and not self.table:
            self.table = self._table()
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / f"top_ops_{self.worker}.txt").write_text(self.table + "\n")
        if not quiet and self.rank == 0:
            log.info(text + (f"\n{self.table}" if self.recorded else ""))
        return text

    # ---------------------------------------------------------------------------------- internals
    def _close(self) -> None:
        global _active
        self.done = True
        try:
            self.prof.__exit__(None, None, None)  # RECORD -> stop: the partial window's trace is written too
        finally:
            if _active is self:
                _active = None

    def _export(self, prof: Any) -> None:
        """on_trace_ready: tensorboard_trace_handler's file, with the path kept to say where it is."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.worker}.{time.time_ns()}{TRACE_SUFFIX}"
        prof.export_chrome_trace(str(path))
        self.trace_path = path

    def _table(self) -> str:
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        title = f"profiler: top {self.cfg.row_limit} operators by {sort} over {self.recorded} step(s), {self.worker}"
        return title + "\n" + self.prof.key_averages().table(sort_by=sort, row_limit=self.cfg.row_limit)

    def _summary(self) -> str:
        c = self.cfg
        if not self.recorded:
            return (f"profiler: nothing recorded: the run ended after {self.steps} step(s), before the recorded part "
                    f"of the window (profiler.wait={c.wait}, profiler.warmup={c.warmup}); no trace written")
        steps = (f"step {self.first_recorded}" if self.first_recorded == self.last_recorded
                 else f"steps {self.first_recorded}-{self.last_recorded}")
        partial = (f" (the run ended before the window completed: {self.recorded} of profiler.active={c.active}; "
                   f"the trace runs on to the end of training)" if self.recorded < c.active else "")
        where = f"{self.trace_path}" if self.trace_path else f"{self.folder} (no trace file was written)"
        return (f"profiler: recorded {self.recorded} step(s), global {steps}{partial}; trace: {where} "
                f"(open in Perfetto, ui.perfetto.dev, or `tensorboard --logdir {self.folder}` with the "
                f"torch-tb-profiler plugin); top operators: {self.folder / f'top_ops_{self.worker}.txt'}"
                + (f"; each of the {self.world_size} ranks wrote its own rank<r> files there" if self.world_size > 1
                   else ""))


@atexit.register
def _flush_at_exit() -> None:
    """A fit that never reached on_fit_end (an exception, preemption inside the window): the
    recorded part still reaches the disk when the process exits."""
    if _active is not None:
        try:
            _active.stop(quiet=True)
        except Exception:  # noqa: BLE001 (exiting anyway: never mask the real error)
            pass
