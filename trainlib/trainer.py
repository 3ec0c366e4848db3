"""The Trainer: the training loop, readable top to bottom.

    trainer = Trainer(model, loss_fn, train_data, val_data, config=TrainerConfig(max_epochs=5))
    trainer.fit()

`loss_fn(outputs, batch)` returns a mean loss, or {"loss": mean, "weight": n, ...parts to log}
where `weight` is what the mean is over (default: the batch's sample count); gradients are
normalised by the global weight of each optimizer step (step.py). The parts live in their own
modules: wrapping the model (parallel.py), one optimizer step (step.py), the logged statistics
(stats.py), what callbacks see (state.py), the run directory (rundir.py), checkpoint files
(checkpoint.py). The loop, with every callback event, is written down once, here:

    setup        process group, seeds; model -> device -> SyncBN -> FSDP -> compile -> DDP;
                 loaders; optimizer, LR schedule, GradScaler, TrainStep
    fit()        read the checkpoint to resume or start from (inputs checked first); make and lock
                 the run directory; restore
      on_fit_start(state)
      for epoch in range(max_epochs):
          sampler.set_epoch(epoch)                        # always, on every rank
          on_train_epoch_start(state)                     # freezing.FreezeSchedule: state.set_trainable
          for each window of accumulate_grad_batches micro-batches:
              step(window)     forward/backward (DDP/FSDP sync on the last micro-batch), normalise
                               by the global weight, non-finite check, clip, optimizer step
                               (not applied when non-finite), zero_grad   # no host sync
              schedule.step()
              if logging step:                          # the only host syncs of the loop
                  window statistics reduced in one all-reduce -> row
                  on_train_log(state, row)
                  non-finite steps (stop, or count), SIGTERM/SIGINT, max_time: same on every rank
              on_train_step_end(state)                  # ModelCheckpoint: every n steps
          if halted (non-finite): keep the last good checkpoint; leave the loop
          if validation epoch:
              metrics = evaluate("val")                   # reduced across ranks; images.py's images
              on_validation_end(state, metrics)           # freezing on a plateau, best/top-k, early stopping
          on_train_epoch_end(state)                       # last.ckpt, history.json
          if state.should_stop: break                     # decided from reduced values
      on_fit_end(state)
      evaluate("test") and predict the unlabelled splits (prediction files: evaluation.py);
      export model.safetensors; close loggers; release the lock
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import dist, evaluation, flops, freezing, images, parallel, rundir, run_summary, training_state, tuning
from .callbacks import Callback, default_callbacks
from .config import (Config, ConfigError, DataConfig, LogConfig, OptimConfig, TrainerConfig, dump_yaml, parse_duration,
                     to_dict, validate)
from .ema import EMA
from .data import DevicePrefetcher, batch_size_of, build_loaders, limit_batches
from .loggers import ConsoleLogger, Logger, build_loggers, log
from .metrics import Metric
from .optim import make_optimizer, make_schedule, run_length, trainable_params
from .precision import Precision
from .preemption import Preempted, SignalFlag
from .state import TrainState
from .stats import NonFiniteSteps, RunningStats, Throughput, train_row
from .step import LossUnpacker, TrainStep, default_forward

__all__ = ["Trainer", "default_forward"]


def _from_state(name: str) -> property:
    return property(lambda self: getattr(self.state, name))


class Trainer:
    epoch, global_step, batch_in_epoch = _from_state("epoch"), _from_state("global_step"), _from_state("batch_in_epoch")
    should_stop, stop_reason, halted = _from_state("should_stop"), _from_state("stop_reason"), _from_state("halted")
    run_dir = _from_state("run_dir")

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Any], train_data: Any = None,
                 val_data: Any = None, test_data: Any = None, *, config: Config | TrainerConfig | None = None,
                 optim: OptimConfig | None = None, data: DataConfig | None = None, log_config: LogConfig | None = None,
                 metrics: Callable[[], list[Metric]] | list[Metric] | None = None,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None, collate_fn: Callable | None = None,
                 predict_fn: Callable[[nn.Module, Any], Any] | None = None, loss_from_predict: bool = False,
                 callbacks: Iterable[Callback] = (), param_groups: list[dict] | None = None, name: str = "",
                 blocks: Callable[[nn.Module], list] | list | None = None, optimizer: Any = None,
                 scheduler: Any = None, predict_data: dict[str, Any] | None = None,
                 prediction_writer: Callable[[str], Any] | None = None,
                 image_logger: Callable[[], Any] | None = None) -> None:
        cfg = config if isinstance(config, Config) else Config(
            trainer=config or TrainerConfig(), optim=optim or OptimConfig(), data=data or DataConfig(),
            log=log_config or LogConfig())
        validate(cfg)  # every key's bounds, before a process group or a run directory exists
        self.cfg, self.tc, tc = cfg, cfg.trainer, cfg.trainer
        self.name = name or cfg.recipe or "run"  # run folders are <name>_<time> (a recipe's short name)
        self.forward_fn, self.unpack = forward_fn or default_forward, LossUnpacker(loss_fn)
        self.predict_fn, self.loss_from_predict = predict_fn, loss_from_predict  # evaluation.py: why
        self._metric_factory = metrics if callable(metrics) else (lambda m=metrics or []: m)
        self.datasets = {"train": train_data, "val": val_data, "test": test_data, **(predict_data or {})}
        self.predict_splits, self.prediction_writer = list(predict_data or {}), prediction_writer  # evaluation.py
        self.image_logger = image_logger  # () -> images.ImageCollector | None: validation images (images.py)
        self.fast_dev_run, self.max_seconds = int(tc.fast_dev_run), parse_duration(tc.max_time)  # (true -> 1)

        # --- process group, seeds, the model wrapped for the run (parallel.py) ---------------------
        self.device = dist.pick_device(tc.device, dist.env_from_torchrun())
        self.env = dist.init(self.device, tc.ddp_timeout)
        self.is_main = self.env.is_main
        dist.seed_everything(tc.seed, self.env.rank)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.precision = Precision(tc.precision, self.device.type)
        self.wrapped = parallel.wrap(model, tc, self.env, self.device, self.precision.param_dtype, param_groups,
                                     blocks)  # blocks: the model's repeated blocks (FSDP units); fsdp.resolve_blocks
        self.model, self.compiled = self.wrapped.model, self.wrapped.compiled
        self.setup_notes: list[str] = list(self.wrapped.notes)  # logged once train.log exists (rundir._open)

        # --- optimizer (yours, or from cfg.optim), the step; data and schedule at the end ------------
        self.optimizer = make_optimizer(optimizer, self.wrapped.param_groups or trainable_params(self.model), cfg.optim)
        self.scaler = self.precision.scaler()
        self.step = TrainStep(self.wrapped, self.forward_fn, self.unpack, self.optimizer, self.scaler,
                              self.precision, self.env, tc, self.device)
        self.step.step_number = lambda: self.state.global_step  # (for its messages)
        self.stats, self.meter = RunningStats(self.device, self.env), Throughput(self.device, self.env, cfg.log)
        self.ema = self.step.ema = EMA(self.model, tc.ema_decay, tc.ema_warmup, self.device) if tc.ema_decay > 0 else None
        self.nonfinite = NonFiniteSteps(tc, self.is_main)
        self.peak_flops = flops.peak_flops(self.device)  # None (no MFU) off known GPUs
        self.flops_per_sample: float | None = None       # counted on the first batch (flops.py)

        # --- loop state: what callbacks see (state.py) --------------------------------------------
        self.state = TrainState(self.model, self.optimizer, self.env.rank, self.env.world_size, Path(tc.out_dir),
                                0, save=self.save_checkpoint, current_lrs=lambda: self.schedule.lrs,
                                change_trainable=lambda changes, event: freezing.set_trainable(self, changes, event))
        self.rows_logged = 0          # rows sent to the loggers; a resume truncates metrics.jsonl to it
        self.signals, self.preempt_signal = SignalFlag(), 0
        self.callbacks: list[Callback] = list(callbacks)
        self.loggers: list[Logger] = []
        self.lock: rundir.RunLock | None = None  # rank 0: the run directory's owner file
        self.collate_fn, self.scheduler_arg = collate_fn, scheduler
        self._build_data()

    def _build_data(self) -> None:
        """Loaders, batches per epoch, run length and LR schedule from data.batch_size and the
        accumulation (again when the batch-size finder changed them: tuning.py)."""
        tc = self.tc
        self.step.set_accumulation(tc.accumulate_grad_batches)
        self.loaders, self.train_sampler = build_loaders(
            self.datasets, self.cfg.data, seed=tc.seed, accumulate=tc.accumulate_grad_batches, rank=self.env.rank,
            world=self.env.world_size, device=self.device, collate_fn=self.collate_fn,
            graphs_on=self.wrapped.use_graphs, notes=self.setup_notes, epochs=tc.max_epochs)
        n = len(self.loaders["train"]) if "train" in self.loaders else 0
        self.train_batches = min(n, self.fast_dev_run) if self.fast_dev_run else limit_batches(n, tc.limit_train_batches)
        self.steps_per_epoch = math.ceil(self.train_batches / tc.accumulate_grad_batches)
        self.total_steps = run_length(1 if self.fast_dev_run else tc.max_epochs, self.steps_per_epoch, tc.max_steps,
                                      "train" in self.loaders)
        self.schedule = make_schedule(self.scheduler_arg, self.optimizer, self.cfg.optim, self.total_steps,
                                      self.steps_per_epoch, tc.mode)
        self.state.train_batches = self.train_batches

    graphs = property(lambda self: self.step.graphs)
    loss_fn = property(lambda self: self.unpack.loss_fn, lambda self, fn: setattr(self.unpack, "loss_fn", fn))
    use_graphs = property(lambda self: self.step.use_graphs, lambda self, on: setattr(self.step, "use_graphs", on))
    skipped_steps = property(lambda self: self.nonfinite.total)
    consecutive_skips = property(lambda self: self.nonfinite.consecutive)

    # ------------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, float]:
        if "train" not in self.loaders:
            raise ConfigError("fit() needs training data")
        tc, st = self.tc, self.state
        self.callbacks = default_callbacks(self.cfg, self.callbacks, checkpoints=not self.fast_dev_run)
        if rundir.fit_again(self):  # a second fit() with nothing more to train: one line saying so, nothing else
            return dict(self.fit_result)
        # every input is checked before the run directory is made: a failed start leaves nothing behind
        again = getattr(self, "fitted_in", None)  # a second fit(): its folder, the state as in memory
        candidates, run_dir = ([], again) if again else rundir.find_resume(self.cfg, self.name, self._note)
        resume = again or training_state.restore_newest(self, candidates)
        if resume is None and tc.ckpt_path:
            self.load_checkpoint(tc.ckpt_path, weights_only=True)
            self._note(f"initialised weights from {tc.ckpt_path}")
        elif resume is None and tc.resume == "auto":
            self._note("trainer.resume=auto: no checkpoint to resume, starting a fresh run")
        rundir.open_fit_dir(self, run_dir, resume)  # where: rundir.py
        try:  # from here on the lock and the loggers are released whatever happens (finally: close)
            if resume is not None and self.is_main:
                rundir.truncate_lines(st.run_dir / "metrics.jsonl", self.rows_logged)  # rows after the checkpoint go
            self._start_loggers()
            if resume is None:  # finders (tune.*): a resume keeps what they chose, from its checkpoint
                tuning.before_fit(self)
            log.info(f"run directory: {st.run_dir}  ({self.env.world_size} process(es), device {self.device.type}, "
                     f"precision {tc.precision}, {self.steps_per_epoch} steps/epoch)")

            t_start, last_val = time.time(), {}
            max_epochs = 1 if self.fast_dev_run else tc.max_epochs
            self._emit("on_fit_start")
            gc.collect()
            gc.freeze()  # setup's objects leave the young generations: fewer, shorter GC pauses in the loop
            self.signals.install()
            while st.epoch < max_epochs and not st.should_stop and not 0 < tc.max_steps <= st.global_step:
                st.epoch_done = False
                self._train_epoch(t_start)
                if self.preempt_signal:
                    last = st.run_dir / "checkpoints" / "last.ckpt"
                    self.save_checkpoint(last)  # mid-epoch state: resume continues at the next batch
                    raise Preempted(self.preempt_signal, str(last))
                if st.halted:  # non-finite training: the unfinished epoch is neither validated nor saved as done
                    if not self.fast_dev_run:
                        training_state.keep_a_checkpoint(self)
                    break
                st.epoch_done = True
                every = tc.check_val_every_n_epoch
                if "val" in self.loaders and every > 0 and ((st.epoch + 1) % every == 0 or self._last_epoch(max_epochs)):
                    last_val = self.evaluate("val")
                    evaluation.check_monitor(tc.monitor, last_val)
                    self.schedule.on_validation(last_val.get(tc.monitor, math.nan))
                    self._emit("on_validation_end", last_val)
                self._emit("on_train_epoch_end")
                if self.console:
                    self.console.epoch_end()
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            if st.should_stop and (self.is_main or not st.halted):  # (errors show on every rank)
                (log.error if st.halted else log.info)(f"stopped: {st.stop_reason}")
            self._emit("on_fit_end")
            if "test" in self.loaders and self.datasets["test"] is not self.datasets["val"]:
                last_val = {**last_val, **self.evaluate("test", write=True)}
            evaluation.predict_unlabelled(self)  # predict_data: the prediction writer only
            if tc.export and not self.fast_dev_run:
                self.export()
            self.summary = run_summary.finish(self, last_val, time.time() - t_start)  # summary.json, printed
        finally:
            gc.unfreeze()
            self.signals.restore()
            self.close()
        self.fit_result = last_val  # what a second fit() with nothing more to train returns (rundir.fit_again)
        return last_val

    def _train_epoch(self, t_start: float) -> None:
        tc, st, k = self.tc, self.state, self.tc.accumulate_grad_batches
        self.train_sampler.set_epoch(st.epoch)                 # always: a new shuffle every epoch
        start, n = st.batch_in_epoch, self.train_batches
        self.train_sampler.skip(start * self.cfg.data.batch_size)  # resume: skip consumed samples, no replay
        self.wrapped.train_module.train()
        self._emit("on_train_epoch_start")
        console = self.console
        if console:
            console.epoch_start(st.epoch, n, 1 if self.fast_dev_run else tc.max_epochs)
            console.advance(start)
        step_end = [cb.on_train_step_end for cb in self.callbacks if cb.runs_every_step()]
        if start == 0:
            self.stats.reset()
        every, meter, one_process = self.cfg.log.every_n_steps, self.meter, not self.env.distributed
        cast = self.precision.cast_batch if self.precision.param_dtype != torch.float32 else None
        prefetcher = DevicePrefetcher(self.loaders["train"], self.device)
        meter.restart(prefetcher.wait_s)
        i, window = start, []
        for batch in prefetcher if start < n else ():
            if i >= n:
                break
            window.append(cast(batch) if cast else batch)
            i += 1
            if console:
                console.advance()
            if i % k and i != n:  # the step's window is not full yet (the epoch's last may be shorter)
                continue
            sizes = [batch_size_of(b) for b in window]  # counted once: the meter and the loss's default weight
            meter.add(sum(sizes))
            if self.peak_flops and self.flops_per_sample is None:
                self.flops_per_sample = flops.train_flops_per_sample(
                    self.model, self.forward_fn, window[0], sizes[0], self.precision.autocast())
            self.stats.add(*self.step(window, sizes))  # no host sync
            self.schedule.step()  # host math; fills the device lr tensor a captured step reads
            window = []
            st.global_step += 1
            st.batch_in_epoch = i

            if st.global_step % every == 0 or i == n or st.global_step == tc.max_steps:
                # Logging step: the only host syncs of the loop (one all-reduce, one .tolist()).
                over_time = math.isfinite(self.max_seconds) and time.time() - t_start >= self.max_seconds
                stats, flags = self.step.agree(self.stats.window(
                    self.step.logged_values(), signal=self.signals.signum, over_time=over_time, **self.step.host_flags()))
                row = train_row(st.global_step, st.epoch, stats, flags)
                row.update(meter.read(prefetcher.wait_s, self.flops_per_sample, self.peak_flops))
                self._emit("on_train_log", row)
                self._log_row(row)
                halt = self.nonfinite.update(flags, st.global_step)
                if halt:
                    st.halted = True
                    st.request_stop(halt)
                if stats["signal"] > 0:  # a rank got SIGTERM/SIGINT: every rank stops here, at the same step
                    self.preempt_signal = self.signals.signum or signal.SIGTERM
                if stats["over_time"] > 0:
                    st.request_stop(f"trainer.max_time={tc.max_time} reached")
            if one_process and self.signals.signum:  # one process: no agreement needed
                self.preempt_signal = self.signals.signum
            if self.preempt_signal:
                break
            for fn in step_end:
                fn(st)
            if st.should_stop or 0 < tc.max_steps <= st.global_step:
                break
        st.train_metrics = {"train/loss": self.stats.epoch_loss()}

    def _last_epoch(self, max_epochs: int) -> bool:
        st = self.state
        return st.epoch + 1 >= max_epochs or st.should_stop or 0 < self.tc.max_steps <= st.global_step

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, split: str = "val", write: bool = False) -> dict[str, float]:
        """Loss and metrics (on predict_fn's outputs if given) over the split, reduced across ranks; all
        ranks call. write=True: the prediction writer's files too (the final test, test_only)."""
        loader = self.loaders[split]
        n = limit_batches(len(loader), self.fast_dev_run or self.tc.limit_val_batches)
        writer = self.prediction_writer(split) if write and self.prediction_writer else None
        collector = self.image_logger() if self.image_logger and not write else None
        writer = images.ImagesToLog(collector, self.loggers, self.state.global_step) if collector is not None else writer
        with self.ema.applied() if self.ema else contextlib.nullcontext():  # the averaged weights, when on
            result = evaluation.evaluate(self.wrapped, loader, n, self.forward_fn, self.unpack,
                                         list(self._metric_factory()), self.precision, self.device, self.env, split,
                                         self.predict_fn, self.loss_from_predict, writer, self.state.run_dir)
        self._log_row({"step": self.state.global_step, "epoch": self.state.epoch, "split": split,
                       **{k.split("/", 1)[1]: v for k, v in result.items()}})
        return result

    def test(self, ckpt_path: str | None = None, split: str = "test") -> dict[str, float]:
        """Evaluate `split` (default test, else val) with weights from `ckpt_path` (if given)."""
        split = split if split in self.loaders else "val"
        if split not in self.loaders:
            raise ConfigError("test needs a test or val split")
        if ckpt_path:  # checked before a run directory is made
            self.load_checkpoint(ckpt_path, weights_only=True)
            self._note(f"loaded weights from {ckpt_path}")
        if not self.loggers:
            rundir.open_test_dir(self, ckpt_path)  # <its run>/test_<time>, ...: rundir.py
            self._start_loggers()
        try:
            result = self.evaluate(split, write=True)
            evaluation.predict_unlabelled(self)  # predict_data: the prediction writer only
            return result
        finally:
            self.close()

    # ---------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | os.PathLike, epoch_done: bool | None = None) -> bool:
        """Every rank calls; rank 0 writes atomically. False on every rank when non-finite (training_state.save)."""
        return training_state.save(self, path, self.state.epoch_done if epoch_done is None else epoch_done)

    def load_checkpoint(self, path: str | os.PathLike, weights_only: bool = False) -> None:
        """The weights, or with weights_only=False everything a resume needs. Touches no file."""
        training_state.restore(self, path, weights_only)
        if not weights_only:
            st = self.state
            self._note(f"resumed from {path}: epoch {st.epoch}, step {st.global_step}, "
                       f"batch {st.batch_in_epoch} of the epoch")

    # ------------------------------------------------------------------ run directory, loggers
    def _note(self, text: str) -> None:
        """An info line for train.log: now, or once the run directory's log exists."""
        self.setup_notes.append(text)

    def _start_loggers(self) -> None:
        """After a resume cut metrics.jsonl back; only started loggers are kept (close() closes those)."""
        for lg in build_loggers(self.cfg.log, self.state.run_dir.name) if self.is_main else []:
            lg.start(self.state.run_dir, to_dict(self.cfg))
            self.loggers.append(lg)

    def _emit(self, event: str, *args: Any) -> None:
        self.state.event = event  # where callbacks run: state.set_trainable checks it (freezing.py)
        for cb in self.callbacks:
            getattr(cb, event)(self.state, *args)
        self.state.event = ""

    def _log_row(self, row: dict) -> None:
        self.rows_logged += 1
        if self.is_main:
            for lg in self.loggers:
                lg.log(row)

    console = property(lambda self: next((lg for lg in self.loggers if isinstance(lg, ConsoleLogger)), None))

    def export(self) -> Path:
        """model.safetensors (+ config) in the run directory: best.ckpt's weights if any, else the
        final ones. Every rank calls it (FSDP gathers the final weights); rank 0 writes."""
        final = training_state.final_weights(self)  # the averaged ones with EMA on (a collective under FSDP)
        if self.is_main:
            rundir.export(self.state.run_dir, final, {"format": "trainlib", "recipe": self.name,
                                                      "config": dump_yaml(self.cfg)})
        return self.state.run_dir / "model.safetensors"

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights with plain keys (a collective under FSDP: call on every rank)."""
        return self.wrapped.state_dict()

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
        self.loggers = []
        if self.lock is not None:
            self.lock.release()
