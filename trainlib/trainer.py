"""The Trainer: one readable loop that owns distribution, precision, accumulation and checkpoints.

    trainer = Trainer(model, loss_fn, train_data, val_data, config=TrainerConfig(max_epochs=5))
    trainer.fit()

`loss_fn(outputs, batch)` returns a scalar mean loss, or a dict {"loss": mean, "weight": n, ...}
where `weight` is how many items the mean is over (valid frames, tokens; default: the batch's
sample count) and other entries are logged. Gradients are normalised by the GLOBAL weight of the
optimizer step (all micro-batches, all ranks), so k micro-batches give the same gradient as one
batch k times larger, including the shorter last window of an epoch, and 2 ranks the same as 1.
The callback events and the loop order are documented in callbacks.py.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as torch_dist
from torch import nn

from . import __version__, checkpoint, dist, flops, fsdp, graphs, rundir
from .callbacks import Callback, EarlyStopping, History, LRMonitor, ModelCheckpoint
from .config import (Config, ConfigError, DataConfig, LogConfig, OptimConfig, TrainerConfig, dump_yaml, parse_duration,
                     to_dict, validate)
from .data import (DeviceLoader, DevicePrefetcher, ShardSampler, batch_size_of, build_loader, map_tensors,
                   shape_keys, to_device)
from .loggers import ConsoleLogger, Logger, build_loggers, log, setup_text_log
from .metrics import MeanMetric, Metric
from .optim import LRSchedule, build_optimizer, trainable_params
from .precision import Precision
from .preemption import Preempted, SignalFlag


_NO_CONTEXT = contextlib.nullcontext()


def default_forward(model: nn.Module, batch: Any) -> Any:
    """(inputs, target) tuples -> model(inputs); anything else -> model(batch)."""
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _limit(n: int, limit: int | float, key: str) -> int:
    if isinstance(limit, bool) or limit < 0:
        raise ConfigError(f"trainer.{key}: expected a count >= 0 or a fraction in [0, 1], got {limit!r}")
    if isinstance(limit, float):
        if limit > 1.0:
            raise ConfigError(f"trainer.{key}: a float is a fraction in [0, 1]; got {limit} (use an int for a count)")
        return min(n, max(1, int(n * limit)) if limit > 0 and n > 0 else 0)
    return min(n, limit)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Any],
        train_data: Any = None,
        val_data: Any = None,
        test_data: Any = None,
        *,
        config: Config | TrainerConfig | None = None,
        optim: OptimConfig | None = None,
        data: DataConfig | None = None,
        log_config: LogConfig | None = None,
        metrics: Callable[[], list[Metric]] | list[Metric] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        collate_fn: Callable | None = None,
        callbacks: Iterable[Callback] = (),
        param_groups: list[dict] | None = None,
        name: str = "run",
    ) -> None:
        if isinstance(config, Config):
            cfg = config
        else:
            cfg = Config(trainer=config or TrainerConfig(), optim=optim or OptimConfig(),
                         data=data or DataConfig(), log=log_config or LogConfig())
        validate(cfg)  # every key's bounds, before a process group or a run directory exists
        self.cfg, self.tc = cfg, cfg.trainer
        self.name = cfg.recipe or name
        self.loss_fn, self.forward_fn = loss_fn, forward_fn or default_forward
        self._metric_factory = metrics if callable(metrics) else (lambda m=metrics or []: m)
        self.datasets = {"train": train_data, "val": val_data, "test": test_data}
        self.collate_fn = collate_fn

        fdr = self.tc.fast_dev_run
        self.fast_dev_run = (1 if fdr is True else int(fdr)) if fdr not in (False, 0) else 0
        self.max_seconds = parse_duration(self.tc.max_time)

        # --- setup: device, process group, seeds --------------------------------------------------
        pre_env = dist.env_from_torchrun()
        self.device = dist.pick_device(self.tc.device, pre_env)
        self.env = dist.init(self.device, self.tc.ddp_timeout)
        self.is_main = self.env.is_main
        dist.seed_everything(self.tc.seed, self.env.rank)
        if self.tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.precision = Precision(self.tc.precision, self.device.type)
        compile_mode = "default" if self.tc.compile is True else (self.tc.compile or "")
        self.use_graphs = False
        if self.tc.cuda_graphs:
            if compile_mode in ("reduce-overhead", "max-autotune"):
                raise ConfigError(f"trainer.compile={compile_mode} already replays CUDA graphs of the compiled "
                                  "regions; with trainer.cuda_graphs=true use trainer.compile=true or "
                                  "max-autotune-no-cudagraphs (the whole step is captured)")
            reason = graphs.why_not_graphable(self.device, self.tc.precision)
            if reason:
                log.warning(f"trainer.cuda_graphs=true ignored: {reason}; running eagerly")
            self.use_graphs = not reason
        # reduce-overhead's graph trees need to be told where a step starts, and their outputs are
        # overwritten by the next replay: losses are cloned in that mode
        self.mark_compiled_steps = compile_mode in ("reduce-overhead", "max-autotune") and self.device.type == "cuda"

        # --- model: device -> dtype -> sync BN -> (FSDP shards) -> compile -> DDP -----------------
        self.setup_notes: list[str] | None = []  # decisions logged once the run's text log exists (then None)
        self.model = model.to(self.device, dtype=self.precision.param_dtype)
        use_ddp = self.env.distributed and self.tc.strategy == "ddp"
        self.sharded = self.env.distributed and self.tc.strategy == "fsdp"
        if (use_ddp or self.sharded) and self.tc.sync_batchnorm:
            if self.device.type != "cuda":
                log.warning("trainer.sync_batchnorm=true ignored: SyncBatchNorm needs GPUs (NCCL)")
            else:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.sharded:
            if self.use_graphs:
                log.warning("trainer.cuda_graphs=true ignored under trainer.strategy=fsdp: its all-gathers run "
                            "in module hooks that a whole-step capture does not support; running eagerly")
                self.use_graphs = False
            # in place: names and keys unchanged; the groups follow the parameters it replaces
            units, param_groups = fsdp.shard(self.model, self.tc.fsdp_min_params, param_groups)
            self.setup_notes.append(f"trainer.strategy=fsdp: {len(units)} sharding unit(s) over "
                                    f"{self.env.world_size} ranks: {', '.join(u or '<root>' for u in units[:8])}"
                                    + (" ..." if len(units) > 8 else ""))
        # compile the inner module (checkpoint keys stay plain), then wrap it in DDP
        self.compiled = (torch.compile(self.model, mode=None if compile_mode == "default" else compile_mode)
                         if compile_mode else self.model)
        if use_ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # whole-step capture needs DDP built on a side stream (PyTorch CUDA-graph notes)
            side = torch.cuda.stream(torch.cuda.Stream(self.device)) if self.use_graphs else contextlib.nullcontext()
            with side:
                self.train_module = nn.parallel.DistributedDataParallel(
                    self.compiled, device_ids=ids, find_unused_parameters=self.tc.find_unused_parameters)
            if self.use_graphs:
                torch.cuda.synchronize(self.device)
        else:
            self.train_module = self.compiled
        self.ddp = use_ddp

        # --- data -----------------------------------------------------------------------------------
        self.loaders: dict[str, Any] = {}
        if train_data is not None:
            keys = self._shape_groups(train_data)
            self.train_sampler = ShardSampler(
                len(train_data), self.env.rank, self.env.world_size, shuffle=True, seed=self.tc.seed, pad=True,
                drop_last=cfg.data.drop_last, groups=keys,
                group_size=cfg.data.batch_size * self.env.world_size * self.tc.accumulate_grad_batches)
            self.loaders["train"] = self._loader(train_data, cfg.data.batch_size, self.train_sampler,
                                                 cfg.data.drop_last, seeded=True)
            if len(self.loaders["train"]) == 0:
                raise ConfigError(f"the train split has {len(train_data)} samples: not enough for one batch of "
                                  f"data.batch_size={cfg.data.batch_size} on {self.env.world_size} process(es)")
        for split in ("val", "test"):
            ds = self.datasets[split]
            if ds is not None:
                if len(ds) == 0:
                    raise ConfigError(f"the {split} split is empty")
                sampler = ShardSampler(len(ds), self.env.rank, self.env.world_size, shuffle=False, pad=False)
                self.loaders[split] = self._loader(ds, cfg.data.val_batch_size or cfg.data.batch_size, sampler, False)

        # --- optimizer, schedule, scaler -----------------------------------------------------------
        self.optimizer = build_optimizer(param_groups or trainable_params(self.model), cfg.optim)
        # Fused optimizers take a device-side found_inf flag: a non-finite step is skipped with no host sync.
        self.device_skip = bool(self.optimizer.defaults.get("fused"))
        if self.use_graphs and not self.device_skip:
            log.warning("trainer.cuda_graphs=true ignored: the optimizer has no fused kernel, so a non-finite step "
                        "can only be skipped from the host; running eagerly")
            self.use_graphs = False
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # Gradients are normalised by the global weight of each step; with one micro-batch in one
        # process that is the loss's own mean, so the extra pass over the gradients is skipped.
        self.normalise_grads = self.env.world_size > 1 or self.tc.accumulate_grad_batches > 1
        self.train_batches = self._train_batches_per_epoch() if train_data is not None else 0
        self.steps_per_epoch = math.ceil(self.train_batches / self.tc.accumulate_grad_batches)
        epochs = 1 if self.fast_dev_run else self.tc.max_epochs
        total = epochs * self.steps_per_epoch
        if self.tc.max_steps > 0:
            total = min(total, self.tc.max_steps) if total > 0 else self.tc.max_steps
        self.total_steps = total if train_data is not None else 1  # evaluation only: no schedule to run
        self.schedule = LRSchedule(self.optimizer, cfg.optim, self.total_steps, self.steps_per_epoch, self.tc.mode)
        self.scaler = self.precision.scaler()
        # one context object, re-entered every micro-batch
        self._autocast = self.precision.autocast(cache=not self.use_graphs)
        self.graphs: graphs.StepGraphs | None = None  # built at the first step (after a checkpoint load)
        self._weights: dict[float, torch.Tensor] = {}  # device constants for loss weights given as numbers
        self._part_names: list[str] = []
        self.peak_flops = flops.peak_flops(self.device)  # None (no MFU) off known GPUs
        self.flops_per_sample: float | None = None       # counted on the first batch (flops.py)

        # --- loop state (everything a checkpoint must restore) -------------------------------------
        self.epoch = 0
        self.global_step = 0
        self.batch_in_epoch = 0       # micro-batches of the current epoch already consumed
        self.epoch_done = False
        self.should_stop = False
        self.stop_reason = ""
        self.epoch_train_metrics: dict[str, float] = {}
        self.acc: dict | None = None  # running sums of the current epoch (see _train_epoch)
        self.rows_logged = 0          # rows sent to the loggers; a resume truncates metrics.jsonl to it
        self.skipped_steps = 0        # steps not applied (non-finite loss or gradient), and how many in a row
        self.consecutive_skips = 0
        self.halted = False           # stopped because training went non-finite
        self.signals = SignalFlag()
        self.preempt_signal = 0
        self.callbacks: list[Callback] = list(callbacks)
        self.run_dir: Path = Path(self.tc.out_dir)
        self._run_dir_override: Path | None = None  # trainer.resume=<run directory>: continue in it
        self.lock: rundir.RunLock | None = None      # rank 0: the run directory's owner file
        self.loggers: list[Logger] = []

    # ------------------------------------------------------------------------------------------
    def _loader(self, ds: Any, batch_size: int, sampler: ShardSampler, drop_last: bool, seeded: bool = False):
        if self.cfg.data.device_resident:
            same = next((ld for ld in self.loaders.values() if isinstance(ld, DeviceLoader) and ld.dataset is ds), None)
            return DeviceLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=self.collate_fn,
                                device=self.device, drop_last=drop_last, seeded=seeded, share=same)
        return build_loader(ds, batch_size=batch_size, sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=self.cfg.data.num_workers,
                            pin_memory=self.cfg.data.pin_memory and self.device.type == "cuda",
                            drop_last=drop_last, seeded=seeded)

    def _shape_groups(self, ds: Any) -> list | None:
        """data.group_by_shape: the train dataset's shape keys when grouping is on, else None."""
        setting = self.cfg.data.group_by_shape
        keys = shape_keys(ds) if setting else None
        if setting == "auto":
            setting = self.use_graphs and keys is not None
        if not setting:
            return None
        if keys is None:
            raise ConfigError(f"data.group_by_shape=true: the train dataset ({type(ds).__name__}) has no "
                              "shape_keys() method saying which samples collate to the same shape")
        if len(keys) != len(ds):
            raise ConfigError(f"data.group_by_shape: {type(ds).__name__}.shape_keys() gave {len(keys)} keys "
                              f"for {len(ds)} samples (expected one per sample)")
        self.setup_notes.append(f"data.group_by_shape: each optimizer step draws its batches from one of "
                                f"{len(set(keys))} shape groups")
        return keys

    def _train_batches_per_epoch(self) -> int:
        n = len(self.loaders["train"])
        if self.fast_dev_run:
            return min(n, self.fast_dev_run)
        return _limit(n, self.tc.limit_train_batches, "limit_train_batches")

    def _note(self, text: str) -> None:
        """An info line for train.log: logged now, or once the run directory's log exists."""
        if self.setup_notes is None:
            log.info(text)
        else:
            self.setup_notes.append(text)

    def request_stop(self, reason: str) -> None:
        """Called with values that are identical on every rank, so every rank stops together."""
        if not self.should_stop:
            self.should_stop, self.stop_reason = True, reason

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def _log_row(self, row: dict) -> None:
        self.rows_logged += 1
        if self.is_main:
            for lg in self.loggers:
                lg.log(row)

    @property
    def console(self) -> ConsoleLogger | None:
        return next((lg for lg in self.loggers if isinstance(lg, ConsoleLogger)), None)

    # ---------------------------------------------------------------- run directory and loggers
    def _prepare_run_dir(self, resuming: bool) -> None:
        """Create (or continue in) the run directory and take its lock. A folder that already holds
        a run is continued only by a resume; a fresh start there needs trainer.overwrite=true (or is
        an elastic restart of this same job before its first checkpoint). Inputs were checked before:
        a failed start leaves no folder behind."""
        tc = self.tc
        if self._run_dir_override is not None:
            self.run_dir = self._run_dir_override
        else:
            run_name = tc.run_name or dist.broadcast_object(f"{self.name}_{time.strftime('%Y%m%d_%H%M%S')}")
            self.run_dir = Path(tc.out_dir) / run_name
        problem: tuple[str, str] | None = None
        if self.is_main:
            created = not self.run_dir.exists()
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.lock = rundir.RunLock(self.run_dir)
                note = self.lock.acquire()
                if note:
                    self._note(note)
                if not resuming and rundir.holds_run(self.run_dir):
                    if self.lock.same_job_restart():
                        self._note("an earlier attempt of this job wrote this run directory and died before its "
                                   "first checkpoint: starting over")
                        self._clear_run_files()
                    elif tc.overwrite:
                        self._note(f"trainer.overwrite=true: removed the previous run's files in {self.run_dir}")
                        self._clear_run_files()
                    else:
                        why = " but no checkpoint to resume" if tc.resume == "auto" else ""
                        problem = ("config", f"run directory {self.run_dir} already holds a run{why}; continue it with "
                                             "trainer.resume=auto, start over with trainer.overwrite=true, or pick "
                                             "another trainer.run_name")
                if problem is None:
                    (self.run_dir / "checkpoints").mkdir(exist_ok=True)
                    for stale in [*self.run_dir.glob(".*.tmp-*"), *(self.run_dir / "checkpoints").glob(".*.tmp-*")]:
                        stale.unlink(missing_ok=True)  # half-written files of a process that died mid-write
                    checkpoint.atomic_write_bytes(self.run_dir / "config.yaml", dump_yaml(self.cfg).encode())
            except rundir.RunDirError as e:
                problem = ("disk", str(e))
            except OSError as e:
                problem = ("disk", str(rundir.disk_error(e, f"the run directory {self.run_dir}")))
            if problem is not None:
                if self.lock is not None:
                    self.lock.release()
                if created:  # only what this call made
                    shutil.rmtree(self.run_dir, ignore_errors=True)
        problem = dist.broadcast_object(problem)
        if problem is not None:
            raise (ConfigError if problem[0] == "config" else rundir.RunDirError)(problem[1])
        setup_text_log(self.run_dir, self.is_main)
        for note in self.setup_notes or []:  # decisions made while building, before the text log existed
            log.info(note)
        self.setup_notes = None  # from here on, notes are logged at once

    def _clear_run_files(self) -> None:
        for p in ("metrics.jsonl", "history.json", "train.log", "model.safetensors", "tb"):
            q = self.run_dir / p
            shutil.rmtree(q) if q.is_dir() else q.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)

    def _start_loggers(self) -> None:
        """After a resume has cut metrics.jsonl back to the checkpoint's rows."""
        if self.is_main:
            self.loggers = build_loggers(self.cfg.log, self.run_dir.name)
            for lg in self.loggers:
                lg.start(self.run_dir, to_dict(self.cfg))

    def _default_callbacks(self) -> None:
        tc = self.tc
        have = {type(cb) for cb in self.callbacks}
        builtin: list[Callback] = [LRMonitor(), History()]
        builtin.append(EarlyStopping(tc.monitor, tc.mode, tc.early_stop_patience, tc.early_stop_min_delta,
                                     check_finite=True))
        if not self.fast_dev_run:
            builtin.append(ModelCheckpoint(tc.monitor, tc.mode, tc.save_top_k, tc.save_last, tc.ckpt_every_n_steps,
                                           tc.keep_last_k))
        self.callbacks = [cb for cb in builtin if type(cb) not in have] + self.callbacks

    def _resume_path(self) -> Path | None:
        """The checkpoint trainer.resume names: a file; a run directory (its newest checkpoint, and
        the run continues in that folder); 'auto' (the newest checkpoint of trainer.run_name, or of
        the newest run of this recipe); None when 'auto' finds nothing."""
        r = self.tc.resume
        if not r:
            return None
        if r == "auto":
            if self.tc.run_name:
                return rundir.newest_checkpoint(Path(self.tc.out_dir) / self.tc.run_name)
            runs = sorted(Path(self.tc.out_dir).glob(f"{self.name}_*"), key=lambda p: p.name, reverse=True)
            found = next((c for c in map(rundir.newest_checkpoint, runs) if c is not None), None)
            if found is not None:
                self.tc.run_name = found.parent.parent.name
            return found
        path = Path(r)
        if path.is_dir():
            run = path.parent if path.name == "checkpoints" else path
            found = rundir.newest_checkpoint(run)
            if found is None:
                raise checkpoint.CheckpointError(
                    f"trainer.resume={r}: no checkpoint in {run / 'checkpoints'} (expected last.ckpt, "
                    "step=<N>.ckpt or a top-k file)")
            if not self.tc.run_name:
                self._run_dir_override = run
            return found
        if not path.is_file():
            raise checkpoint.CheckpointError(f"trainer.resume: checkpoint not found: {r} (expected a .ckpt file, "
                                             "a run directory, or 'auto')")
        return path

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self, epoch_done: bool) -> dict:
        """Everything a resume needs. RNG states of every rank are gathered (a collective)."""
        rngs = dist.all_gather_object(dist.rng_state())
        # each rank's running sums of the unfinished epoch (they differ per rank until reduced)
        accs = dist.all_gather_object(None if epoch_done or self.acc is None else _to_cpu(self.acc))
        # (pending micro-batches are stored as they are: summing them now would change the rounding)
        return {
            "format": checkpoint.FORMAT,
            "version": __version__,
            "model": self.model_state_dict(),
            "optimizer": self._optimizer_state(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_done": epoch_done,
            "accumulators": accs,
            "rows_logged": self.rows_logged,
            "skips": {"total": self.skipped_steps, "consecutive": self.consecutive_skips},
            "sampler_seed": self.tc.seed,
            "world_size": self.env.world_size,
            "rng": rngs,
            "callbacks": {cb.key: cb.state_dict() for cb in self.callbacks if cb.key},
            "config": to_dict(self.cfg),
        }

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights with plain keys. Under FSDP a collective that gathers them to
        rank 0 (the other ranks get {}): every rank must call it."""
        return fsdp.full_model_state(self.model) if self.sharded else self.model.state_dict()

    def _optimizer_state(self) -> dict:
        """Plain (float lrs, parameters by position) and whole: under FSDP gathered to rank 0."""
        state = fsdp.full_optimizer_state(self.model, self.optimizer) if self.sharded else self.optimizer.state_dict()
        return graphs.plain_optimizer_state(state) if state else state

    def save_checkpoint(self, path: str | os.PathLike, epoch_done: bool | None = None) -> bool:
        """Every rank calls this (RNG gather); rank 0 writes atomically. Never writes NaN/inf
        weights: returns False (on every rank) when it did not write."""
        finite = torch.stack([fsdp.local(p).detach().isfinite().all() for p in self.model.parameters()]).all()
        if self.sharded:  # each rank checked its own shards
            finite = finite.to(torch.int32)
            torch_dist.all_reduce(finite, op=torch_dist.ReduceOp.MIN)
        if not bool(finite):  # host sync: checkpoint time only
            log.error(f"not writing {path}: the model has non-finite weights (keeping the previous checkpoint)")
            return False
        state = self.state_dict(self.epoch_done if epoch_done is None else epoch_done)
        error = ""
        if self.is_main:
            try:
                checkpoint.atomic_save(state, path)
            except OSError as e:  # a full or read-only disk: the previous file (if any) is untouched
                kept = " (the previous file is kept)" if Path(path).is_file() else ""
                error = str(rundir.disk_error(e, f"checkpoint {path}{kept}"))
        error = dist.broadcast_object(error)  # every rank ends with the same line (checkpoint time only)
        if error:
            raise rundir.RunDirError(error)
        return True

    def load_checkpoint(self, path: str | os.PathLike, weights_only: bool = False, state: dict | None = None) -> None:
        """Restore from `path` (or its already loaded `state`): the weights, or with weights_only=False
        everything a resume needs. Touches no file: fit() cuts metrics.jsonl back afterwards."""
        state = checkpoint.load(path) if state is None else state
        checkpoint.load_model_state(self.model, state["model"], str(path),
                                    load=(lambda sd: fsdp.load_model_state(self.model, sd)) if self.sharded else None)
        if weights_only:
            return
        if self.sharded:
            fsdp.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        for cb in self.callbacks:
            if cb.key and cb.key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.key])
        self.global_step = state["global_step"]
        if state["epoch_done"]:
            self.epoch, self.batch_in_epoch = state["epoch"] + 1, 0
        else:
            self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
            accs = state["accumulators"]
            if len(accs) == self.env.world_size and accs[self.env.rank] is not None:
                self.acc = _to_device(accs[self.env.rank], self.device)
        self.rows_logged = state["rows_logged"]
        skips = state.get("skips", {})
        self.skipped_steps, self.consecutive_skips = skips.get("total", 0), skips.get("consecutive", 0)
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            dist.set_rng_state(rngs[self.env.rank])
        else:
            log.warning(f"{path} was written by {len(rngs)} process(es), this run has {self.env.world_size}: "
                        "random streams restart from the seed (results will differ from an uninterrupted run)")
        self._note(f"resumed from {path}: epoch {self.epoch}, step {self.global_step}, "
                   f"batch {self.batch_in_epoch} of the epoch")

    # ------------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, float]:
        if "train" not in self.loaders:
            raise ConfigError("fit() needs training data")
        tc = self.tc
        self._default_callbacks()
        # every input is checked before the run directory is made: a failed start leaves nothing behind
        resume = self._resume_path()
        if resume is not None:
            self.load_checkpoint(resume)
        elif tc.ckpt_path:
            self.load_checkpoint(tc.ckpt_path, weights_only=True)
            self._note(f"initialised weights from {tc.ckpt_path}")
        elif tc.resume == "auto":
            self._note("trainer.resume=auto: no checkpoint to resume, starting a fresh run")
        self._prepare_run_dir(resuming=resume is not None)
        if resume is not None and self.is_main:
            _truncate_lines(self.run_dir / "metrics.jsonl", self.rows_logged)  # rows of a run that died after the checkpoint
        self._start_loggers()
        log.info(f"run directory: {self.run_dir}  ({self.env.world_size} process(es), device {self.device.type}, "
                 f"precision {tc.precision}, {self.steps_per_epoch} steps/epoch)")

        t_start = time.time()
        last_val: dict[str, float] = {}
        max_epochs = 1 if self.fast_dev_run else tc.max_epochs
        self._emit("on_fit_start")
        gc.collect()
        gc.freeze()  # setup's objects leave the young generations: fewer, shorter GC pauses in the loop
        self.signals.install()
        try:
            while self.epoch < max_epochs and not self.should_stop:
                if 0 < tc.max_steps <= self.global_step:
                    break
                self.epoch_done = False
                self._train_epoch(t_start)
                if self.preempt_signal:
                    last = self.run_dir / "checkpoints" / "last.ckpt"
                    self.save_checkpoint(last)  # mid-epoch state: resume continues at the next batch
                    raise Preempted(self.preempt_signal, str(last))
                if self.halted:  # non-finite training: the unfinished epoch is neither validated nor saved as done
                    self._keep_a_checkpoint()
                    break
                self.epoch_done = True
                every = tc.check_val_every_n_epoch
                if "val" in self.loaders and every > 0 and ((self.epoch + 1) % every == 0 or self._last_epoch(max_epochs)):
                    last_val = self.evaluate("val")
                    self._check_monitor(last_val)
                    self.schedule.on_validation(last_val.get(tc.monitor, math.nan))
                    self._emit("on_validation_end", last_val)
                self._emit("on_train_epoch_end")
                if self.console:
                    self.console.epoch_end()
                self.epoch += 1
                self.batch_in_epoch = 0
            if self.should_stop and (self.is_main or not self.halted):  # (errors show on every rank)
                (log.error if self.halted else log.info)(f"stopped: {self.stop_reason}")
            self._emit("on_fit_end")
            if "test" in self.loaders and self.datasets["test"] is not self.datasets["val"]:
                last_val = {**last_val, **self.evaluate("test")}
            if tc.export and not self.fast_dev_run:
                self.export()
        finally:
            self.signals.restore()
            self.close()
        return last_val

    def _keep_a_checkpoint(self) -> None:
        """After a non-finite stop: the run's newest checkpoint (written before the problem) stays as
        it is; a run that has none yet gets last.ckpt of its current weights, which only ever took
        finite steps."""
        if self.fast_dev_run:
            return
        newest = dist.broadcast_object(rundir.newest_checkpoint(self.run_dir) if self.is_main else None)
        if newest is not None:
            log.info(f"the last good checkpoint is {newest}")
            return
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if self.save_checkpoint(last, epoch_done=False):
            log.info(f"wrote {last} from the last finite weights (step {self.global_step})")

    def _last_epoch(self, max_epochs: int) -> bool:
        return self.epoch + 1 >= max_epochs or self.should_stop or 0 < self.tc.max_steps <= self.global_step

    def _check_monitor(self, metrics: dict) -> None:
        if self.tc.monitor not in metrics:
            raise ConfigError(f"trainer.monitor={self.tc.monitor!r} is not a validation metric; "
                              f"available: {', '.join(sorted(metrics))}")

    # ----------------------------------------------------------------------------- one epoch
    def _train_epoch(self, t_start: float) -> None:
        tc, k = self.tc, self.tc.accumulate_grad_batches
        self.train_sampler.set_epoch(self.epoch)            # always: a new shuffle every epoch
        start = self.batch_in_epoch
        self.train_sampler.skip(start * self.cfg.data.batch_size)  # resume: skip consumed samples, no replay
        n = self.train_batches
        self.train_module.train()
        self._emit("on_train_epoch_start")
        console = self.console
        if console:
            console.epoch_start(self.epoch, n)
            console.advance(start)
        if self.use_graphs and self.graphs is None:
            graphs.make_capturable(self.optimizer, self.device)
            self.graphs = graphs.StepGraphs(self._packed_step, self.device, self.ddp)
        step_end = [cb.on_train_step_end for cb in self.callbacks
                    if type(cb).on_train_step_end is not Callback.on_train_step_end]

        dev = self.device
        if start == 0 or self.acc is None:
            self.acc = self._fresh_accumulators()
        acc = self.acc  # running sums + not-yet-summed micro-batches; checkpointed, so a resumed run logs the same rows
        every = self.cfg.log.every_n_steps
        t_log, steps_since_log = time.time(), 0

        i = start
        window: list[Any] = []
        cast = self.precision.cast_batch if self.precision.param_dtype != torch.float32 else None
        one_process = not self.env.distributed
        prefetcher = DevicePrefetcher(self.loaders["train"], dev)
        samples, wait0 = 0, 0.0
        for batch in prefetcher if start < n else ():
            if i >= n:
                break
            window.append(cast(batch) if cast else batch)
            i += 1
            if console:
                console.advance()
            if i % k and i != n:  # the step's window is not full yet (the epoch's last may be shorter)
                continue

            samples += batch_size_of(window[0]) if k == 1 else sum(batch_size_of(b) for b in window)
            if self.peak_flops and self.flops_per_sample is None:
                self.flops_per_sample = flops.train_flops_per_sample(
                    self.model, self.forward_fn, window[0], batch_size_of(window[0]), self.precision.autocast())
            items, skipped = self._run_step(window)  # no host sync
            window = []
            acc["pending"].extend(items)
            acc["skips"].append(skipped)
            self.global_step += 1
            self.batch_in_epoch = i
            steps_since_log += 1

            if self.global_step % every == 0 or i == n:
                # Logging step: the only host syncs of the loop (one reduce, one .tolist()).
                over_time = math.isfinite(self.max_seconds) and time.time() - t_start >= self.max_seconds
                stats, flags = self._window_stats(acc, over_time)
                elapsed = max(time.time() - t_log, 1e-9)
                row = {"step": self.global_step, "epoch": self.epoch, "split": "train"}
                if stats["weight"] > 0:  # a window whose steps were all skipped has no loss to show
                    row["loss"] = stats["loss"] / stats["weight"]
                    row.update({p[5:]: v / stats["weight"] for p, v in stats.items() if p.startswith("part:")})
                if any(flags):
                    row["skipped_steps"] = sum(f > 0 for f in flags)
                row["steps_per_s"] = steps_since_log / elapsed
                row["samples_per_s"] = samples * self.env.world_size / elapsed  # equal shards on every rank
                row["step_ms"] = 1000 * elapsed / max(steps_since_log, 1)
                row["data_wait"] = (prefetcher.wait_s - wait0) / elapsed  # share of wall time waiting for data
                if dev.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30  # allocator stats: no sync
                if self.flops_per_sample:  # model FLOPs utilisation against the GPU's dense bf16 peak
                    row["mfu"] = self.flops_per_sample * row["samples_per_s"] / self.env.world_size / self.peak_flops
                samples, wait0 = 0, prefetcher.wait_s
                self._emit("on_train_log", row)
                self._log_row(row)
                t_log, steps_since_log = time.time(), 0
                self._count_skips(flags)
                if stats["signal"] > 0:  # a rank got SIGTERM/SIGINT: every rank stops here, at the same step
                    self.preempt_signal = self.signals.signum or signal.SIGTERM
                if stats["over_time"] > 0:
                    self.request_stop(f"trainer.max_time={tc.max_time} reached")
            if one_process and self.signals.signum:  # one process: no agreement needed
                self.preempt_signal = self.signals.signum
            if self.preempt_signal:
                break
            for fn in step_end:
                fn(self)
            if self.should_stop or 0 < tc.max_steps <= self.global_step:
                break

        stats = torch.stack([acc["epoch_loss"], acc["epoch_weight"]])  # the last step logged: nothing pending
        if self.env.distributed:
            torch_dist.all_reduce(stats)
        s, w = stats.tolist()  # host sync (epoch end)
        self.epoch_train_metrics = {"train/loss": s / w if w > 0 else math.nan}

    def _fresh_accumulators(self) -> dict:
        """Running sums of the epoch and of the logging window (loss*weight, weight; finite items
        only), the window's loss parts, `pending` (loss, weight, parts) items of steps not summed
        yet (summed in one go on logging steps: no per-step tensor ops) and `skips`, each step's
        device flag "not applied". All checkpointed, so a resumed run logs the same rows."""
        z = lambda: torch.zeros((), device=self.device, dtype=torch.float64)  # noqa: E731
        return {"epoch_loss": z(), "epoch_weight": z(), "loss": z(), "weight": z(), "parts": {}, "pending": [],
                "skips": []}

    def _fold(self) -> None:
        """Sum the pending micro-batches into the running sums (non-finite ones are left out)."""
        acc = self.acc
        pend = acc["pending"]
        if not pend:
            return
        ws = torch.cat([p[1].reshape(-1) for p in pend]).double()
        contrib = torch.cat([p[0].reshape(-1) for p in pend]).double() * ws
        ok = torch.isfinite(contrib)
        c, w = torch.where(ok, contrib, 0).sum(), torch.where(ok, ws, 0).sum()
        for name, v in (("epoch_loss", c), ("epoch_weight", w), ("loss", c), ("weight", w)):
            acc[name] += v
        for name in pend[0][2]:
            v = torch.cat([p[2][name].reshape(-1) for p in pend]).double() * ws
            acc["parts"][name] = acc["parts"].get(name, 0) + torch.where(ok, v, 0).sum()
        pend.clear()

    def _window_stats(self, acc: dict, over_time: bool) -> tuple[dict[str, float], list[float]]:
        """The logging window's statistics by name, summed over ranks ("loss", "weight", "part:<name>",
        "signal", "over_time"), and each step's skip flag (already agreed by every rank), in one
        all-reduce and one host sync. The window's sums start again at zero."""
        self._fold()
        dev = self.device
        names = ["loss", "weight", *(f"part:{p}" for p in sorted(acc["parts"])), "signal", "over_time"]
        host = torch.tensor([float(self.signals.signum), float(over_time)], device=dev, dtype=torch.float64)
        stats = torch.cat([torch.stack([acc["loss"], acc["weight"], *(acc["parts"][p] for p in sorted(acc["parts"]))])
                           .double(), host])
        if self.env.distributed:
            torch_dist.all_reduce(stats)
        skips = torch.stack(acc["skips"]).double().reshape(-1) if acc["skips"] else stats[:0]
        values = torch.cat([stats, skips]).tolist()  # host sync (logging step)
        acc["loss"].zero_()
        acc["weight"].zero_()
        acc["parts"].clear()
        acc["skips"].clear()
        return dict(zip(names, values)), values[len(names):]

    def _count_skips(self, flags: list[float]) -> None:
        """`flags`: this window's steps, 1 = not applied (non-finite loss or gradient). stop: end the
        run naming the first such step; skip: say how many and go on, until trainer.max_skipped_steps
        in a row."""
        first = None
        for j, f in enumerate(flags):
            if f > 0:
                self.skipped_steps += 1
                self.consecutive_skips += 1
                first = first or self.global_step - len(flags) + 1 + j
            else:
                self.consecutive_skips = 0
        if first is None:
            return
        if self.tc.nonfinite == "stop":
            self._halt(f"non-finite loss or gradient at step {first}; that update was not applied "
                       "(trainer.nonfinite=stop; trainer.nonfinite=skip skips such steps and goes on)")
            return
        n = sum(f > 0 for f in flags)
        log.warning(f"skipped {n} step(s) with a non-finite loss or gradient up to step {self.global_step} "
                    f"(first: step {first}; {self.skipped_steps} skipped in all, {self.consecutive_skips} in a row)")
        limit = self.tc.max_skipped_steps
        if limit and self.consecutive_skips >= limit:
            self._halt(f"{self.consecutive_skips} steps in a row had a non-finite loss or gradient "
                       f"(trainer.max_skipped_steps={limit}): training diverged or the data holds NaN/inf; "
                       "lower optim.lr or check the data")

    def _halt(self, reason: str) -> None:
        """Training went non-finite: stop at this step on every rank (the flags are agreed), without
        validating or saving an unfinished epoch as finished; fit() keeps the last good checkpoint."""
        self.halted = True
        self.request_stop(reason)

    # ---------------------------------------------------------------------------- one step
    def _run_step(self, batches: list[Any]) -> tuple[list[tuple], torch.Tensor]:
        """One optimizer step over `batches` (its micro-batches), eager or as a replayed CUDA
        graph. Returns the (loss, weight, parts) items to log and the device flag "this step was
        not applied" (a non-finite loss or gradient). No host sync."""
        if self.graphs is not None:
            packed = self.graphs(batches)
            k, names = len(batches), self._part_names
            items = [(packed[:k], packed[k:2 * k], {p: packed[(2 + j) * k:(3 + j) * k] for j, p in enumerate(names)})]
            skipped = packed[-1]
        else:
            items, skipped = self._device_step(batches)
        self.schedule.step()  # host math; fills the device lr tensor a captured step reads
        return items, skipped

    def _device_step(self, batches: list[Any]) -> tuple[list[tuple], torch.Tensor]:
        """Forward/backward of every micro-batch (DDP syncs on the last only), then the optimizer
        step. Device work only, so it can be captured in a CUDA graph."""
        items = []
        last = len(batches) - 1
        scaler = self.scaler if self.scaler.is_enabled() else None
        for j, batch in enumerate(batches):
            if self.sharded and last:  # FSDP's no_sync: reduce-scatter on the last micro-batch only
                self.model.set_requires_gradient_sync(j == last)
            with self.train_module.no_sync() if self.ddp and j < last else _NO_CONTEXT:
                if self.mark_compiled_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                with self._autocast:
                    outputs = self.forward_fn(self.train_module, batch)
                    loss, weight, parts = self._unpack_loss(self.loss_fn(outputs, batch), batch)
                objective = loss if loss.dtype == torch.float32 else loss.float()
                if self.normalise_grads:  # (one micro-batch, one process: the mean already has the right gradient)
                    objective = objective * weight
                (scaler.scale(objective) if scaler else objective).backward()
            loss = loss.detach()
            if parts:
                parts = {name: v.detach() for name, v in parts.items()}
            if self.mark_compiled_steps:  # graph-tree outputs are overwritten by the next replay
                loss, parts = loss.clone(), {name: v.clone() for name, v in parts.items()}
            items.append((loss, weight, parts))
        return items, self._optimizer_step(items)

    def _packed_step(self, batches: list[Any]) -> torch.Tensor:
        """_device_step with its results in one 1-D tensor (a graph's single output):
        [losses(k), weights(k), each part(k) in sorted name order, skipped flag]."""
        items, skipped = self._device_step(batches)
        self._part_names = names = sorted(items[0][2])
        cols = [torch.stack([it[0].float() for it in items]), torch.stack([it[1] for it in items])]
        cols += [torch.stack([it[2][p].float() for it in items]) for p in names]
        cols.append(skipped.float().view(1))
        return torch.cat(cols)

    def _unpack_loss(self, out: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if isinstance(out, dict):
            if "loss" not in out:
                raise ConfigError("the loss function returned a dict without a 'loss' entry")
            parts = {k: v for k, v in out.items() if k not in ("loss", "weight") and isinstance(v, torch.Tensor)}
            weight = out.get("weight")
            loss = out["loss"]
        else:
            loss, weight, parts = out, None, {}
        if weight is None:
            weight = batch_size_of(batch)
        if isinstance(weight, torch.Tensor):
            weight = weight.to(device=loss.device, dtype=torch.float32, non_blocking=True)
        else:  # a number: a cached device constant (creating a CUDA tensor from a number syncs the host)
            w = self._weights.get(weight)
            if w is None:
                w = torch.full((), float(weight), dtype=torch.float32, device=loss.device)
                if len(self._weights) < 64:  # batch sizes repeat; per-batch counts would only fill memory
                    self._weights[weight] = w
            weight = w
        return loss, weight, parts

    def _optimizer_step(self, window: list[tuple]) -> torch.Tensor:
        """Normalise by the global weight, check, unscale, clip, step, zero_grad. A step whose loss
        (on any rank) or gradient is not finite is never applied: returns that device flag. No host
        sync, except fp16's GradScaler with an unfused optimizer, and an optimizer without a fused
        kernel whose step must be skipped from the host (marked below)."""
        dev = self.device
        bad = (~torch.isfinite(torch.stack([it[0].float() for it in window]))).any().float()
        total = torch.stack([it[1] for it in window]).sum() if self.normalise_grads else None
        if self.env.distributed:  # one device-side reduce; DDP already averaged the gradients over ranks
            stats = torch.stack([total if total is not None else bad, bad])
            torch_dist.all_reduce(stats)
            total, bad = (stats[0] if total is not None else None), (stats[1] > 0).float()
        scaler = self.scaler if self.scaler.is_enabled() else None
        if scaler:
            scaler.unscale_(self.optimizer)  # fp16 overflow is the scaler's to skip (not counted as bad)
        params = self._params
        grads = [fsdp.local(p.grad) for p in params if p.grad is not None]
        found = None
        if total is not None and grads:  # normalise and check in one pass over the gradients
            found = torch.zeros(1, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(
                grads, found, (self.env.world_size / total.clamp_min(1e-12)).float().reshape(1))
        norm = nn.utils.clip_grad_norm_(params, self.tc.grad_clip) if self.tc.grad_clip > 0 else None
        if scaler is None and grads:
            if found is None:  # one process, one micro-batch: nothing has read the gradients yet
                largest = norm if norm is not None else torch.stack(torch._foreach_norm(grads, math.inf)).max()
                found = (~torch.isfinite(largest)).float()
            elif self.sharded:  # each rank checked its own shards: the verdict must be global
                torch_dist.all_reduce(found, op=torch_dist.ReduceOp.MAX)
            bad = torch.maximum(bad, found.reshape(()))
        if scaler:
            for inf in scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values():
                inf.copy_(torch.maximum(inf, bad.to(inf.device)))  # a non-finite loss skips the step too
            scaler.step(self.optimizer)
            scaler.update()
        elif self.device_skip:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, bad  # fused step: skipped on device
            self.optimizer.step()
        elif not bool(bad):  # host sync: only an optimizer without a fused kernel needs one to skip
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return bad

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Loss and metrics over the whole split, reduced across ranks (every rank must call)."""
        loader = self.loaders[split]
        limit = self.fast_dev_run or self.tc.limit_val_batches
        n = _limit(len(loader), limit, "limit_val_batches")
        metrics = list(self._metric_factory())
        for m in metrics:
            m.reset()
        loss_mean = MeanMetric("loss")
        if self.env.distributed:
            # Each rank's last training forward updated its own BatchNorm statistics; evaluate (and
            # checkpoint) rank 0's, so N processes score exactly what one process scores.
            for b in self.model.buffers():
                torch_dist.broadcast(b, 0)
        was_training = self.compiled.training
        self.compiled.eval()
        for i, batch in enumerate(DevicePrefetcher(loader, self.device)):
            if i >= n:
                break
            batch = self.precision.cast_batch(to_device(batch, self.device))
            with self.precision.autocast():
                if self.mark_compiled_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                outputs = self.forward_fn(self.compiled, batch)
                if self.mark_compiled_steps:  # metrics may keep outputs; the next replay would overwrite them
                    outputs = map_tensors(outputs, torch.clone)
                loss, weight, _ = self._unpack_loss(self.loss_fn(outputs, batch), batch)
            loss_mean.add(loss.float(), weight)
            for m in metrics:
                m.update(outputs, batch)
        self.compiled.train(was_training)
        result = {f"{split}/{k}": v for k, v in loss_mean.compute(self.device).items()}
        for m in metrics:
            result.update({f"{split}/{k}": float(v) for k, v in m.compute(self.device).items()})
        self._log_row({"step": self.global_step, "epoch": self.epoch, "split": split,
                       **{k.split("/", 1)[1]: v for k, v in result.items()}})
        return result

    def test(self, ckpt_path: str | None = None, split: str = "test") -> dict[str, float]:
        """Evaluate `split` (default test, else val) with weights from `ckpt_path` (if given)."""
        if split not in self.loaders:
            split = "val"
        if split not in self.loaders:
            raise ConfigError("test needs a test or val split")
        if ckpt_path:  # checked before a run directory is made
            self.load_checkpoint(ckpt_path, weights_only=True)
            self._note(f"loaded weights from {ckpt_path}")
        if not self.loggers:
            self._prepare_run_dir(resuming=True)
            self._start_loggers()
        try:
            return self.evaluate(split)
        finally:
            self.close()

    # ---------------------------------------------------------------------------- export/close
    def export(self) -> Path | None:
        """model.safetensors (+ config) in the run directory: best checkpoint's weights if any, else final.
        Written by rank 0 (it wrote best.ckpt itself); every rank calls it (FSDP gathers the final
        weights)."""
        final = self.model_state_dict()
        if self.is_main:
            best = self.run_dir / "checkpoints" / "best.ckpt"
            state, source = final, "final"
            if best.is_file():
                state, source = checkpoint.load(best)["model"], "best"
            elif not all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point()):
                log.error("not exporting model.safetensors: the final weights are not finite")
                return None
            meta = {"format": "trainlib", "recipe": self.name, "weights": source, "config": dump_yaml(self.cfg)}
            checkpoint.export_safetensors(state, self.run_dir / "model.safetensors", meta)
            log.info(f"exported {source} weights to {self.run_dir / 'model.safetensors'}")
        return self.run_dir / "model.safetensors"

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
        self.loggers = []
        if self.lock is not None:
            self.lock.release()


def _to_cpu(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().cpu())


def _to_device(obj: Any, device: torch.device) -> Any:
    """Checkpointed accumulators back on the device (lists stay lists: tuples are saved as lists)."""
    out = map_tensors(obj, lambda t: t.to(device))
    out["pending"] = [tuple(p) for p in out["pending"]]
    if "sums" in out:  # written by trainlib <= 0.1.0: sums by position, one skip count
        sums = out.pop("sums")
        out.update(epoch_loss=sums[0], epoch_weight=sums[1], loss=sums[2], weight=sums[3])
        skipped = out.pop("skipped", None)
        out["skips"] = [skipped] if skipped is not None and float(skipped) > 0 else []
    return out


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first n lines (rows logged after the checkpoint, by a run that then died, go)."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) != n:
        checkpoint.atomic_write_bytes(path, b"".join(lines[:n]))
