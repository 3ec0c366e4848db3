"""Finders that run before training on a fresh run (tune.*; issue #12), in this order:

    batch-size finder  tune.auto_scale_batch_size=power|binsearch (true: power)
        the largest per-process data.batch_size whose forward, backward and optimizer step run
        tune.batch_size_trials times without running out of memory: doubled from data.batch_size
        while it fits (capped by tune.batch_size_max and the train split's share per process);
        binsearch then bisects between the last size that fitted and the first that did not.
    LR range test      tune.auto_lr_find
        an exponential lr sweep (tune.lr_find_min..lr_find_max) over real optimizer steps on the
        training data; the suggestion is the lr at the steepest descent of the smoothed loss.

Why it is built this way:
- both put the model, optimizer state, GradScaler, EMA and every RNG back bit for bit (Snapshot):
  a run with a finder trains exactly like a run given the chosen values;
- they run eagerly (TrainStep.device_step, never the captured CUDA-graph step);
- every rank takes the same decision. The LR test's steps are real DDP/FSDP steps and its losses
  are averaged over ranks. The batch trials run LOCALLY (the compiled module, not DDP: a rank that
  runs out of memory must not leave the others waiting in a gradient all-reduce); the ranks then
  agree with one all-reduce per candidate. Under FSDP with several ranks the forward itself is a
  collective, so the batch-size finder refuses to run there;
- what they chose goes into the config (data.batch_size, trainer.accumulate_grad_batches,
  optim.lr), the run directory's config.yaml and the LR schedule; a checkpoint holds the schedule
  and the config, so a resume keeps the values and the finders do not run again (trainer.fit).
"""
from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from . import dist
from .checkpoint import atomic_write_bytes
from .config import ConfigError, dump_yaml
from .data import DevicePrefetcher, ShardSampler, build_loader, to_device
from .fsdp import local
from .loggers import log
from .step import free_memory

_ABSENT = object()


# ------------------------------------------------------------------------------------------ state
class _Kept:
    """A tensor and a copy of its values in host memory (a copy on the device would take memory
    that the batch-size finder measures)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.saved = tensor, local(tensor).detach().to("cpu", copy=True)

    def put(self) -> torch.Tensor:
        local(self.tensor).copy_(self.saved)  # in place: the same tensor object (address) as before
        return self.tensor


def _keep(v: Any) -> Any:
    return _Kept(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v)


def _put(kept: Any) -> Any:
    return kept.put() if isinstance(kept, _Kept) else copy.deepcopy(kept)


class Snapshot:
    """What a finder changes: weights and buffers (this rank's shards), gradients, module modes,
    optimizer state and groups, GradScaler, EMA, every RNG, the train sampler's position.
    `restore()` copies it back in place, bit for bit."""

    def __init__(self, trainer: Any) -> None:
        t = self.t = trainer
        self.tensors = [_Kept(x) for x in (*t.model.parameters(), *t.model.buffers())]
        self.grads = [(p, None if p.grad is None else _Kept(p.grad)) for p in t.model.parameters()]
        mods = {id(m): m for root in (t.model, t.wrapped.train_module) for m in root.modules()}
        self.modes = [(m, m.training) for m in mods.values()]
        opt = t.optimizer
        self.opt_state = {p: {k: _keep(v) for k, v in st.items()} for p, st in opt.state.items()}
        self.groups = [{k: _keep(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.opt_attrs = {a: getattr(opt, a, _ABSENT) for a in ("grad_scale", "found_inf")}
        self.scaler = t.scaler.state_dict() if t.scaler.is_enabled() else None
        ema = t.step.ema
        self.ema = [_Kept(s) for s in (*ema.shadow, ema.updates)] if ema is not None else []
        self.grad_norm = t.step.grad_norm
        self.rng = dist.rng_state()
        s = t.train_sampler
        self.sampler = (s.epoch, s.start) if s is not None else None

    @torch.no_grad()
    def restore(self) -> None:
        t, opt = self.t, self.t.optimizer
        for kept in (*self.tensors, *self.ema):
            kept.put()
        for p, grad in self.grads:
            p.grad = None if grad is None else grad.put()
        for m, training in self.modes:
            m.training = training
        for p in [p for p in opt.state if p not in self.opt_state]:  # state the finder created
            del opt.state[p]
        for p, kept in self.opt_state.items():
            opt.state[p] = {k: _put(v) for k, v in kept.items()}
        for g, kept in zip(opt.param_groups, self.groups):
            g.update({k: _put(v) for k, v in kept.items()})
        for a, v in self.opt_attrs.items():
            if v is not _ABSENT:
                setattr(opt, a, v)
            elif hasattr(opt, a):
                delattr(opt, a)
        if self.scaler is not None:
            t.scaler.load_state_dict(self.scaler)
        t.step.grad_norm = self.grad_norm
        dist.set_rng_state(self.rng)
        if self.sampler is not None:
            t.train_sampler.epoch, t.train_sampler.start = self.sampler


def _free_memory(trainer: Any) -> None:
    trainer.optimizer.zero_grad(set_to_none=True)
    free_memory(trainer.device)


def _rewrite_config(trainer: Any) -> None:
    """The run directory's config.yaml (written when it was opened) says what the finders chose."""
    run_dir = trainer.state.run_dir
    if trainer.is_main and run_dir is not None and Path(run_dir).is_dir():
        atomic_write_bytes(Path(run_dir) / "config.yaml", dump_yaml(trainer.cfg).encode())


# ------------------------------------------------------------------------------------- entry point
def before_fit(trainer: Any) -> dict[str, Any]:
    """Runs the finders the config asks for (trainer.fit, fresh runs only). Inputs are checked
    before either runs. -> {"batch_size": BatchSizeResult | None, "lr": LRFindResult | None}."""
    tune, out = trainer.cfg.tune, {"batch_size": None, "lr": None}
    if tune.auto_scale_batch_size:
        check_batch_finder(trainer)
    if tune.auto_lr_find:
        check_lr_finder(trainer)
    if tune.auto_scale_batch_size:
        out["batch_size"] = find_batch_size(trainer)
    if tune.auto_lr_find:
        out["lr"] = lr_range_test(trainer)
    if out["batch_size"] or out["lr"]:
        _rewrite_config(trainer)
    return out


# -------------------------------------------------------------------------------- batch-size finder
@dataclass
class BatchSizeResult:
    batch_size: int
    accumulate: int
    tried: list[int] = field(default_factory=list)
    failed: int | None = None  # the smallest size that ran out of memory (None: the cap was reached)
    cap: int = 0


def check_batch_finder(trainer: Any) -> None:
    env, tc = trainer.env, trainer.tc
    if tc.strategy == "fsdp" and env.world_size > 1:
        raise ConfigError(
            f"tune.auto_scale_batch_size cannot run under trainer.strategy=fsdp with {env.world_size} processes: "
            "FSDP's forward all-gathers the parameters (a collective), so a rank that runs out of memory in a "
            "trial would leave the others waiting in it. Find the batch size with trainer.strategy=ddp (or one "
            "process, the same model size per GPU) and set data.batch_size, or keep FSDP with "
            "tune.auto_scale_batch_size=false")
    if tc.sync_batchnorm and env.world_size > 1:
        raise ConfigError("tune.auto_scale_batch_size cannot run with trainer.sync_batchnorm=true on "
                          f"{env.world_size} processes: SyncBatchNorm's forward is a collective, so a rank that "
                          "runs out of memory in a trial would leave the others waiting in it; find the size with "
                          "sync_batchnorm=false (or one process) and set data.batch_size")
    if trainer.datasets.get("train") is None:
        raise ConfigError("tune.auto_scale_batch_size needs training data")


def _trial_batch(trainer: Any, size: int, sampler: ShardSampler) -> Any:
    """The first `size` samples of this rank's share, collated as the train loader does."""
    loader = build_loader(trainer.datasets["train"], batch_size=size, sampler=sampler, collate_fn=trainer.collate_fn,
                          num_workers=0, pin_memory=False, drop_last=False, seeded=True)
    batch = to_device(next(iter(loader)), trainer.device)
    return trainer.precision.cast_batch(batch)


def _trial(trainer: Any, batch: Any, times: int) -> None:
    """Forward, backward and optimizer step on this rank only (no DDP: no collective to hang in)."""
    t, opt = trainer, trainer.optimizer
    scaler = t.scaler if t.scaler.is_enabled() else None
    module = t.wrapped.compiled
    module.train()
    for a in ("grad_scale", "found_inf"):  # a fused step reads these (step.py sets them per step)
        if hasattr(opt, a):
            setattr(opt, a, None)
    for _ in range(times):
        with t.precision.autocast():
            outputs = t.forward_fn(module, batch)
            loss = t.unpack(outputs, batch)[0].float()
        (scaler.scale(loss) if scaler else loss).backward()
        del outputs, loss
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _agree(trainer: Any, status: int) -> int:
    """The largest status over ranks (0 fitted, 1 out of memory, 2 another error)."""
    if not trainer.env.distributed:
        return status
    dev = trainer.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([float(status)], device=dev)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return int(flag.item())  # host sync (finder, not the training loop)


def find_batch_size(trainer: Any) -> BatchSizeResult:
    """tune.auto_scale_batch_size: choose data.batch_size (and the accumulation for tune.global_batch),
    rebuild loaders and schedule, and say so in one line."""
    check_batch_finder(trainer)
    t, cfg, tune, env = trainer, trainer.cfg, trainer.cfg.tune, trainer.env
    mode = "power" if tune.auto_scale_batch_size is True else tune.auto_scale_batch_size
    ds = t.datasets["train"]
    sampler = ShardSampler(len(ds), env.rank, env.world_size, shuffle=False, pad=True, drop_last=cfg.data.drop_last)
    share = len(sampler)
    cap = max(1, min(tune.batch_size_max, share))
    tried: list[int] = []
    snap = Snapshot(t)

    def fits(size: int) -> bool:
        tried.append(size)
        status, error = 0, None
        try:
            _trial(t, _trial_batch(t, size, sampler), tune.batch_size_trials)
        except torch.OutOfMemoryError:
            status = 1
        except Exception as e:  # noqa: BLE001  (raised below, after the other ranks heard of it)
            status, error = 2, e
        if status:
            _free_memory(t)
            snap.restore()  # a step cut short may leave optimizer state half made
        status = _agree(t, status)
        if status == 2:
            if error is not None:
                raise error
            raise RuntimeError(f"tune.auto_scale_batch_size: another process failed in the trial of batch {size} "
                               "(its error is in its output)")
        return status == 0

    try:
        size, fit, fail = max(1, min(cfg.data.batch_size, cap)), 0, None
        while True:  # power: double while it fits; halve while even the first size does not
            if fits(size):
                fit = size
                if fail is not None or size >= cap:
                    break
                size = min(size * 2, cap)
            else:
                fail = size
                if fit or size == 1:
                    break
                size //= 2
        if not fit:
            raise ConfigError("tune.auto_scale_batch_size: even a batch of 1 sample runs out of memory; use a "
                              "smaller model, trainer.precision=bf16-mixed, or more GPUs (trainer.strategy=fsdp)")
        while mode == "binsearch" and fail is not None and fail - fit > 1:
            mid = (fit + fail) // 2
            if fits(mid):
                fit = mid
            else:
                fail = mid
    finally:
        snap.restore()
        _free_memory(t)

    accumulate = t.tc.accumulate_grad_batches
    if tune.global_batch > 0:
        accumulate = max(1, round(tune.global_batch / (fit * env.world_size)))
    cfg.data.batch_size, t.tc.accumulate_grad_batches = fit, accumulate
    t._build_data()  # loaders, schedule, the step's normalisation, state.train_batches

    why = (f"the smallest that ran out of memory: {fail}" if fail is not None else
           f"the cap: tune.batch_size_max={tune.batch_size_max}, {share} training samples per process")
    glob = fit * env.world_size * accumulate
    target = "" if tune.global_batch in (0, glob) else f", the nearest to tune.global_batch={tune.global_batch}"
    log.info(f"[trainlib] auto_scale_batch_size ({mode}): data.batch_size={fit} per process (largest tried: "
             f"{max(tried)}, {why}; tried {', '.join(map(str, tried))}); trainer.accumulate_grad_batches="
             f"{accumulate}, global batch {glob} = {fit} x {env.world_size} process(es) x {accumulate}{target}")
    return BatchSizeResult(fit, accumulate, tried, fail, cap)


# ------------------------------------------------------------------------------------ LR range test
@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    reason: str          # why there is no suggestion ('' when there is one)
    stopped: str         # why the sweep stopped early ('' when it ran every step)


def check_lr_finder(trainer: Any) -> None:
    lr = trainer.cfg.optim.lr
    if not lr > 0:
        raise ConfigError(f"tune.auto_lr_find needs optim.lr > 0 (got optim.lr={lr:g}): the sweep keeps every "
                          "parameter group's ratio to optim.lr, and the suggestion rescales the schedule by "
                          "suggested / optim.lr; set optim.lr to any positive value, e.g. optim.lr=1e-3")
    if trainer.datasets.get("train") is None:
        raise ConfigError("tune.auto_lr_find needs training data")


def suggest_lr(lrs: list[float], smoothed: list[float]) -> tuple[float | None, str]:
    """The lr at the steepest descent (most negative gradient w.r.t. log lr) of the smoothed loss.
    Like Lightning's suggestion() it skips the first points (min(10, n // 10): the smoothing has
    seen few losses there) and the last one (where a sweep that stopped early diverged)."""
    n = len(lrs)
    skip_begin = min(10, n // 10)
    keep = [i for i in range(skip_begin, n - 1) if math.isfinite(smoothed[i])]
    if len(keep) < 3:
        return None, (f"only {len(keep)} usable point(s) of the smoothed loss after skipping the first "
                      f"{skip_begin} and the last of {n}; raise tune.lr_find_steps or lower tune.lr_find_min")
    grad = np.gradient(np.array([smoothed[i] for i in keep]), np.log(np.array([lrs[i] for i in keep])))
    best = int(np.argmin(grad))
    if not grad[best] < 0:
        return None, "the smoothed loss never decreased over the sweep; widen tune.lr_find_min..lr_find_max"
    return lrs[keep[best]], ""


def _batches(trainer: Any) -> Any:
    """The train loader's batches (at most trainer.train_batches an epoch), epoch after epoch."""
    t, epoch = trainer, 0
    cast = t.precision.cast_batch
    while True:
        t.train_sampler.set_epoch(epoch)
        got = 0
        for batch in DevicePrefetcher(t.loaders["train"], t.device):
            if got >= t.train_batches:
                break
            got += 1
            yield cast(batch)
        if not got:
            raise ConfigError("tune.auto_lr_find: the train loader gave no batch (trainer.limit_train_batches=0?)")
        epoch += 1


def lr_sweep(trainer: Any) -> LRFindResult:
    """The sweep itself; the model, optimizer, scaler, EMA and RNG are put back after it."""
    t, tune, base = trainer, trainer.cfg.tune, trainer.cfg.optim.lr
    groups = t.optimizer.param_groups
    ratios = [float(g.get("initial_lr", g["lr"])) / base for g in groups]  # groups keep their ratios
    n, lo, hi = tune.lr_find_steps, tune.lr_find_min, tune.lr_find_max
    beta = 1.0 - tune.lr_find_smoothing
    lrs, losses, smoothed, stopped = [], [], [], ""
    avg, best = 0.0, math.inf
    snap = Snapshot(t)
    try:
        t.wrapped.train_module.train()
        batches = _batches(t)
        for i in range(n):
            lr = lo * (hi / lo) ** (i / (n - 1))
            for g, r in zip(groups, ratios):
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(lr * r)
                else:
                    g["lr"] = lr * r
            items, _ = t.step.device_step([next(batches)])  # eager: the CUDA-graph step is never built
            loss, weight = items[0][0].float(), items[0][1]
            pair = torch.stack([loss * weight, weight])
            if t.env.distributed:
                torch_dist.all_reduce(pair)  # the loss averaged over ranks by weight
            total, w = pair.tolist()  # host sync (finder, not the training loop)
            value = total / w if w > 0 else math.nan
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (i + 1))  # bias correction (fastai, Lightning)
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            if not math.isfinite(smooth):
                stopped = f"the loss was not finite at step {i}"
                break
            if i > 0 and smooth > tune.lr_find_diverge * best:
                stopped = f"the smoothed loss passed {tune.lr_find_diverge:g}x its best at step {i}"
                break
            best = min(best, smooth)
        batches.close()
    finally:
        snap.restore()
    suggestion, reason = suggest_lr(lrs, smoothed)
    suggestion, reason = dist.broadcast_object((suggestion, reason))  # (equal already: the losses were reduced)
    return LRFindResult(lrs, losses, smoothed, suggestion, reason, stopped)


def lr_range_test(trainer: Any) -> LRFindResult:
    """tune.auto_lr_find: the sweep, the curve files (rank 0), and the suggestion applied to the
    schedule and to cfg.optim.lr."""
    check_lr_finder(trainer)
    t, tune = trainer, trainer.cfg.tune
    res = lr_sweep(t)
    run_dir = Path(t.state.run_dir) if t.state.run_dir is not None else None
    files = "no run directory"
    if t.is_main and run_dir is not None:
        rows = ["step,lr,loss,smoothed"] + [f"{i},{lr!r},{loss!r},{s!r}" for i, (lr, loss, s)
                                            in enumerate(zip(res.lrs, res.losses, res.smoothed))]
        atomic_write_bytes(run_dir / "lr_find.csv", ("\n".join(rows) + "\n").encode())
        files = f"{run_dir}/lr_find.csv, lr_find.png"
        try:
            _plot(run_dir / "lr_find.png", res, tune.lr_find_diverge)
        except ImportError:
            files = (f"{run_dir}/lr_find.csv (lr_find.png skipped: matplotlib is not installed — "
                     "pip install matplotlib)")
    span = f"lr {res.lrs[0]:g}..{res.lrs[-1]:g}" if res.lrs else "no step"
    early = f"; stopped early: {res.stopped}" if res.stopped else ""
    if res.suggestion is None:
        if t.is_main:
            log.warning(f"[trainlib] auto_lr_find: no suggestion ({res.reason}); keeping optim.lr="
                        f"{t.cfg.optim.lr:g} ({len(res.lrs)} steps, {span}{early}); curve: {files}")
        return res
    factor = res.suggestion / t.cfg.optim.lr
    t.schedule.rescale(factor)
    # exactly the lr the schedule now holds: a run given optim.lr=<this> trains bit for bit the same
    res.suggestion = t.cfg.optim.lr = t.cfg.optim.lr * factor
    log.info(f"[trainlib] auto_lr_find: suggested lr {res.suggestion:.1e} (steepest descent of the smoothed loss "
             f"over {len(res.lrs)} steps, {span}{early}); curve: {files}")
    return res


def _plot(path: Path, res: LRFindResult, diverge: float) -> None:
    """lr_find.png (matplotlib's object API: no pyplot, no global backend change)."""
    from matplotlib.figure import Figure  # optional dependency, imported only here

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(res.lrs, res.losses, color="0.7", lw=1, label="loss")
    ax.plot(res.lrs, res.smoothed, color="C0", lw=2, label="smoothed")
    smooth = [v for v in res.smoothed if math.isfinite(v)]
    values = smooth + [v for v in res.losses if math.isfinite(v)]
    if smooth:  # cut the divergent tail off, or it flattens the part that matters
        low, high = min(values), min(max(values), min(smooth) * diverge)
        pad = 0.05 * (abs(high - low) or abs(high) or 1.0)
        ax.set_ylim(low - pad, max(high, low) + pad)
    if res.suggestion is not None:
        ax.axvline(res.suggestion, color="C3", ls="--", label=f"suggested {res.suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test (steepest descent of the smoothed loss)")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
