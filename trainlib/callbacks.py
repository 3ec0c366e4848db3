"""Callbacks: checkpointing, early stopping, LR monitor, history.

A callback receives a `TrainState` (state.py: where the loop is, the model, `request_stop`,
`save_checkpoint`), never the Trainer. Where each event fires is the loop's pseudo-code in the
docstring of trainer.py. A callback may keep state across a resume through `state_dict` /
`load_state_dict`; those are stored in every checkpoint under the callback's `key`.
"""
from __future__ import annotations

import gc
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_bytes, fsync_dir
from .metrics import improved
from .profiling import StepProfiler
from .state import TrainState


class Callback:
    key: str = ""
    # True: runs before ModelCheckpoint, so a file written at an event holds what this callback
    # decided there (freezing.FreezeSchedule); others run after the built-in callbacks
    runs_before_checkpoint: bool = False

    def on_fit_start(self, state: TrainState) -> None: ...
    def on_train_epoch_start(self, state: TrainState) -> None: ...
    def on_train_log(self, state: TrainState, row: dict) -> None: ...
    def on_train_step_end(self, state: TrainState) -> None: ...

    def runs_every_step(self) -> bool:
        """Whether on_train_step_end does anything (the loop calls it only then)."""
        return type(self).on_train_step_end is not Callback.on_train_step_end
    def on_validation_end(self, state: TrainState, metrics: dict) -> None: ...
    def on_train_epoch_end(self, state: TrainState) -> None: ...
    def on_fit_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class ModelCheckpoint(Callback):
    """last.ckpt at every epoch end (and every n steps), best.ckpt and the top-k by the monitored
    metric; with keep_last_k, the k most recent of those periodic saves as step=<N>.ckpt too (a
    run that diverged can go back a few saves, not only to the best one)."""

    key = "model_checkpoint"

    def __init__(self, monitor: str, mode: str, save_top_k: int = 1, save_last: bool = True,
                 every_n_steps: int = 0, keep_last_k: int = 0) -> None:
        self.monitor, self.mode = monitor, mode
        self.save_top_k, self.save_last, self.every_n_steps = save_top_k, save_last, every_n_steps
        self.keep_last_k = keep_last_k
        self.top_k: list[tuple[float, str]] = []  # (value, file name), best first
        self.best: float | None = None
        self.recent: list[str] = []  # keep_last_k: step checkpoints on disk, oldest first

    def _dir(self, state: TrainState) -> Path:
        return state.run_dir / "checkpoints"

    def runs_every_step(self) -> bool:  # (a subclass's own on_train_step_end always runs)
        return self.every_n_steps > 0 or type(self).on_train_step_end is not ModelCheckpoint.on_train_step_end

    def on_train_step_end(self, state: TrainState) -> None:
        if self.every_n_steps and state.global_step % self.every_n_steps == 0 and not state.epoch_done:
            self._save_periodic(state, write_last=self.save_last)

    def _save_periodic(self, state: TrainState, write_last: bool, epoch_done: bool | None = None) -> None:
        """last.ckpt (when asked) and, with keep_last_k, step=<N>.ckpt: a hard link to the same
        bytes, or the file itself when last.ckpt is off. The oldest step files beyond k are deleted
        only once the new one is on disk; last.ckpt is never one of them."""
        folder, name = self._dir(state), f"step={state.global_step:08d}.ckpt"
        before, evicted = list(self.recent), []
        if self.keep_last_k:
            self.recent = [n for n in self.recent if n != name] + [name]  # saved with the list that names it
            if self.keep_last_k > 0:
                evicted, self.recent = self.recent[: -self.keep_last_k], self.recent[-self.keep_last_k :]
        elif not write_last:
            return
        target = folder / ("last.ckpt" if write_last else name)
        if not state.save_checkpoint(target, epoch_done=epoch_done):
            self.recent = before  # nothing written: keep the files we have
            return
        if self.keep_last_k and state.is_main:
            if write_last:
                _replace_with_link(target, folder / name)
            for old in evicted:
                (folder / old).unlink(missing_ok=True)

    def on_validation_end(self, state: TrainState, metrics: dict) -> None:
        value = metrics.get(self.monitor)
        if value is None or not math.isfinite(value) or self.save_top_k == 0:
            return
        keep = self.save_top_k if self.save_top_k > 0 else 10**9
        ranked = sorted(self.top_k + [(value, "")], key=lambda t: t[0], reverse=self.mode == "max")
        if (value, "") not in ranked[:keep]:
            return
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", self.monitor)
        name = f"epoch={state.epoch:03d}-step={state.global_step}-{tag}={value:.4f}.ckpt"
        folder = self._dir(state)
        # The file holds this callback's state WITH itself in the top k (a resume from it goes on
        # pruning exactly as the uninterrupted run), so the lists change before the save.
        before = (list(self.top_k), self.best)
        new_best = improved(value, self.best, self.mode)
        if new_best:
            self.best = value
        self.top_k = sorted(self.top_k + [(value, name)], key=lambda t: t[0], reverse=self.mode == "max")
        evicted, self.top_k = self.top_k[keep:], self.top_k[:keep]
        # The epoch is not finished yet: a resume from this file continues with the next epoch.
        if not state.save_checkpoint(folder / name, epoch_done=True):
            self.top_k, self.best = before  # declined (non-finite weights): no file, no link, no entry
            return
        if new_best and state.is_main:
            _replace_with_link(folder / name, folder / "best.ckpt")
        if state.is_main:  # only after the new file is safely on disk
            for _, old in evicted:
                (folder / old).unlink(missing_ok=True)

    def on_train_epoch_end(self, state: TrainState) -> None:
        self._save_periodic(state, write_last=self.save_last, epoch_done=True)

    def state_dict(self) -> dict:
        return {"top_k": [list(t) for t in self.top_k], "best": self.best, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.top_k = [(float(v), str(n)) for v, n in state["top_k"]]
        self.best = state["best"]
        self.recent = [str(n) for n in state.get("recent", [])]


def _replace_with_link(src: Path, dst: Path) -> None:
    """dst becomes the same file as src (hard link, atomically replaced; copy where links fail)."""
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_bytes(dst, src.read_bytes())


class EarlyStopping(Callback):
    """Stop after `patience` validations without improvement, or at once on a non-finite metric."""

    key = "early_stopping"

    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float = 0.0, check_finite: bool = True) -> None:
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.check_finite = abs(min_delta), check_finite
        self.best: float | None = None
        self.wait = 0

    def on_validation_end(self, state: TrainState, metrics: dict) -> None:
        value = metrics.get(self.monitor)
        if value is None:
            return
        if not math.isfinite(value):
            if self.check_finite:
                state.request_stop(f"early stopping: {self.monitor} is {value}")
            return
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.patience > 0 and self.wait >= self.patience:
            state.request_stop(f"early stopping: {self.monitor} did not improve for {self.wait} validations "
                                 f"(best {self.best:.6g})")

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], state["wait"]


class LRMonitor(Callback):
    """Adds the learning rate of every parameter group to the training log rows."""

    def on_train_log(self, state: TrainState, row: dict) -> None:
        lrs = state.lrs
        row["lr"] = lrs[0]
        for i, lr in enumerate(lrs[1:], start=1):
            row[f"lr_{i}"] = lr


class History(Callback):
    """history.json: one summary per epoch (train loss, validation metrics, lr, seconds)."""

    key = "history"

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._val: dict = {}
        self._t0 = time.time()

    def on_train_epoch_start(self, state: TrainState) -> None:
        self._val, self._t0 = {}, time.time()

    def on_validation_end(self, state: TrainState, metrics: dict) -> None:
        self._val = dict(metrics)
        self._add(state)  # now, so a top-k checkpoint written after this holds the epoch's row

    def _add(self, state: TrainState) -> None:
        row = {"epoch": state.epoch, "step": state.global_step, **state.train_metrics, **self._val,
               "lr": state.lrs[0], "seconds": round(time.time() - self._t0, 3)}
        self.rows.append({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()})

    def on_train_epoch_end(self, state: TrainState) -> None:
        if not self.rows or self.rows[-1]["epoch"] != state.epoch:  # no validation this epoch
            self._add(state)
        if state.is_main:
            import json

            atomic_write_bytes(state.run_dir / "history.json", json.dumps(self.rows, indent=1).encode())

    def state_dict(self) -> dict:
        import json

        return {"rows": json.dumps(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        import json

        self.rows = json.loads(state["rows"])


class MemoryCleanup(Callback):
    """trainer.memory_cleanup_interval=N: empty the CUDA caching allocator every N optimizer steps.
    Memory goes back to the driver (other processes, fragmentation) at the price of new
    allocations (cudaMalloc) in the following steps: it makes training slower, not faster."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_step_end(self, state: TrainState) -> None:
        if state.global_step % self.every == 0 and torch.cuda.is_available() and torch.cuda.is_initialized():
            gc.collect()  # tensors kept alive only by reference cycles go first
            torch.cuda.empty_cache()


class Profile(Callback):
    """profiler.enabled=true: torch.profiler over a window of optimizer steps (profiling.py: the
    trace in <run_dir>/profiler/, the top-operator table at the end). Every rank profiles itself."""

    def __init__(self, cfg: Any, device: Any = None) -> None:
        self.cfg, self.device = cfg, device  # the `profiler` section; device: None = the model's
        self.profiler: StepProfiler | None = None

    def on_fit_start(self, state: TrainState) -> None:
        device = self.device or next((p.device for p in state.model.parameters()), torch.device("cpu"))
        self.profiler = StepProfiler(self.cfg, state.run_dir, state.rank, device, state.world_size)
        self.profiler.start()

    def on_train_step_end(self, state: TrainState) -> None:
        if self.profiler is not None:
            self.profiler.step(state.global_step)

    def on_fit_end(self, state: TrainState) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None


def default_callbacks(cfg: Any, given: list[Callback], checkpoints: bool) -> list[Callback]:
    """`given` after what every run has: the LR in the log rows, history.json, early stopping (also
    on a non-finite monitored metric), the profiler and memory cleanup when configured, and unless
    a dry run checkpoints (given callbacks with runs_before_checkpoint come just before those).
    A given callback of one of these types replaces the built-in one."""
    tc = cfg.trainer
    out: list[Callback] = [LRMonitor(), History(), EarlyStopping(tc.monitor, tc.mode, tc.early_stop_patience,
                                                                 tc.early_stop_min_delta, check_finite=True)]
    if cfg.profiler.enabled:
        out.append(Profile(cfg.profiler))
    if tc.memory_cleanup_interval:
        out.append(MemoryCleanup(tc.memory_cleanup_interval))
    early = [cb for cb in given if cb.runs_before_checkpoint]
    out += early
    if checkpoints:
        out.append(ModelCheckpoint(tc.monitor, tc.mode, tc.save_top_k, tc.save_last, tc.ckpt_every_n_steps,
                                   tc.keep_last_k))
    have = {type(cb) for cb in given}
    return [cb for cb in out if type(cb) not in have or cb in early] + [cb for cb in given if cb not in early]
