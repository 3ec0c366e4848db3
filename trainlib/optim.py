"""Optimizers and learning-rate schedules.

All schedules are one small stateful object stepped once per OPTIMIZER step (never per
micro-batch, never once per rank), with linear warmup in front. `plateau` additionally reacts
to the monitored validation metric. The lr is a pure function of (step, plateau scale), so a
resumed run lands on exactly the same lr.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .config import ConfigError, OptimConfig
from .metrics import improved


def build_optimizer(params: Iterable[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ConfigError("the model has no trainable parameters (all frozen?)")
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        cls = torch.optim.SGD
        kw = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    else:
        raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}; expected adamw, adam or sgd")
    params = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]  # (generators)
    sharded = any(hasattr(p, "to_local") for g in params for p in (g["params"] if isinstance(g, dict) else [g]))
    if cls is torch.optim.SGD and sharded:  # FSDP2's DTensors have no sharding rule for the fused SGD kernel
        return cls(params, **kw)
    try:  # fused: one kernel per step, and a device-side skip of non-finite steps (trainer.nonfinite)
        return cls(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # device or dtype without a fused kernel
        return cls(params, **kw)


def make_optimizer(given: Any, params: list[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The run's optimizer: `given` built (over this model's parameters), a factory `given(params)`
    (params: the recipe's param groups or the trainable parameters), or None for cfg.optim's."""
    params = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]  # (generators)
    if given is None:
        return build_optimizer(params, cfg)
    opt = given(params) if callable(given) and not isinstance(given, torch.optim.Optimizer) else given
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optimizer=: expected a torch.optim.Optimizer or a function of the parameters that "
                          f"returns one, got {type(opt).__name__}")
    ours = {id(p) for g in params for p in (g["params"] if isinstance(g, dict) else [g])}
    if any(id(p) not in ours for g in opt.param_groups for p in g["params"]):
        raise ConfigError("optimizer=: it holds parameters that are not the model's as wrapped for this run (FSDP "
                          "replaces them); pass a factory instead, e.g. optimizer=lambda params: "
                          "torch.optim.SGD(params, lr=0.1)")
    return opt


def make_schedule(given: Any, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                  steps_per_epoch: int, mode: str = "min") -> "LRSchedule | TorchSchedule":
    """cfg.optim's schedule (None), or a torch scheduler of your own: built, or a factory
    `given(optimizer)` / `given(optimizer, total_steps)` (total_steps: the run's optimizer steps)."""
    if given is None:
        return LRSchedule(optimizer, cfg, total_steps, steps_per_epoch, mode)
    sched = given
    if callable(given) and not hasattr(given, "state_dict"):
        import inspect

        n_args = len(inspect.signature(given).parameters)
        sched = given(optimizer, max(1, total_steps)) if n_args >= 2 else given(optimizer)
    if not hasattr(sched, "step") or not hasattr(sched, "state_dict"):
        raise ConfigError(f"scheduler=: expected a torch.optim.lr_scheduler scheduler or a function of the optimizer "
                          f"that returns one, got {type(sched).__name__}")
    if getattr(sched, "optimizer", optimizer) is not optimizer:
        raise ConfigError("scheduler=: it drives another optimizer than the run's; pass a factory, e.g. "
                          "scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 100)")
    return TorchSchedule(sched)


class TorchSchedule:
    """A torch scheduler of your own, stepped once per optimizer step like the built-in ones
    (ReduceLROnPlateau instead once per validation, with the monitored value). Checkpointed."""

    def __init__(self, sched: Any) -> None:
        self.sched = sched
        self.plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def step(self) -> None:
        if not self.plateau:
            self._keeping_device_lrs(self.sched.step)

    def on_validation(self, value: float) -> None:
        if self.plateau and math.isfinite(value):
            self._keeping_device_lrs(lambda: self.sched.step(value))

    def _keeping_device_lrs(self, step: Any) -> None:
        """A captured step (trainer.cuda_graphs) reads each group's lr from its device tensor: the
        scheduler's new value is written into that tensor instead of replacing it."""
        groups = self.sched.optimizer.param_groups
        held = [g["lr"] for g in groups]
        step()
        for g, old in zip(groups, held):
            if isinstance(old, torch.Tensor) and g["lr"] is not old:
                old.copy_(g["lr"]) if isinstance(g["lr"], torch.Tensor) else old.fill_(g["lr"])
                g["lr"] = old

    def rescale(self, factor: float) -> None:
        """Multiply every group's lr (and the scheduler's base lrs) by `factor` (tune.auto_lr_find)."""
        for g in self.sched.optimizer.param_groups:
            g["lr"] = g["lr"] * factor
            for key in ("initial_lr", "max_lr", "min_lr"):  # OneCycleLR's peak and floor live in the groups
                if key in g:
                    g[key] = g[key] * factor
        for attr in ("base_lrs", "max_lrs"):  # CyclicLR's peaks
            if isinstance(getattr(self.sched, attr, None), list):
                setattr(self.sched, attr, [b * factor for b in getattr(self.sched, attr)])

    @property
    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.sched.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"torch_scheduler": type(self.sched).__name__, "state": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("torch_scheduler") != type(self.sched).__name__:
            raise ConfigError(f"the checkpoint's LR schedule is {state.get('torch_scheduler') or 'optim.scheduler'}"
                              f", this run's is {type(self.sched).__name__}: resume with the same scheduler")
        self.sched.load_state_dict(state["state"])


def run_length(epochs: int, steps_per_epoch: int, max_steps: int, training: bool = True) -> int:
    """Optimizer steps the run will take (what cosine and onecycle schedules span): epochs x steps,
    capped by trainer.max_steps (-1: no cap); 1 for an evaluation-only Trainer."""
    if not training:
        return 1
    total = epochs * steps_per_epoch
    if max_steps > 0:
        total = min(total, max_steps) if total > 0 else max_steps
    return total


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class LRSchedule:
    """lr(step) = warmup(step) * shape(step) * plateau_scale, per parameter group."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                 steps_per_epoch: int, mode: str = "min") -> None:
        if (cfg.scheduler in ("cosine", "linear", "onecycle") or cfg.warmup_ratio) and total_steps <= 0:
            raise ConfigError(f"optim.scheduler={cfg.scheduler} needs a known run length (trainer.max_epochs or trainer.max_steps)")
        self.optimizer = optimizer
        self.cfg = cfg
        self.total = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total)  # as transformers' Trainer
        self.mode = mode
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self.step_count = 0
        # no shape to follow once warmed up (the plateau decay re-applies itself): step() skips the work
        self.constant = cfg.scheduler in ("none", "plateau")
        self.plateau_scale = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad = 0
        self._apply()

    def lr_at(self, base: float, step: int) -> float:
        c = self.cfg
        if c.scheduler == "onecycle":  # its own warm phase; warmup_steps does not apply
            up = max(1, int(c.onecycle_pct_start * self.total))
            start, end = base / c.onecycle_div_factor, base / c.onecycle_div_factor / c.onecycle_final_div_factor
            if step < up:
                return _cos(start, base, step / up)
            return _cos(base, end, (step - up) / max(1, self.total - up))
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        p = min(1.0, max(0, step - self.warmup) / max(1, self.total - self.warmup))
        if c.scheduler == "cosine":
            lr = c.min_lr + (base - c.min_lr) * 0.5 * (1 + math.cos(math.pi * p))
        elif c.scheduler == "linear":  # transformers' get_linear_schedule_with_warmup (min_lr 0)
            lr = c.min_lr + (base - c.min_lr) * (1 - p)
        elif c.scheduler == "step":
            lr = base * c.gamma ** (step // (c.step_size * self.steps_per_epoch))
        else:  # none, plateau
            lr = base
        return lr * warm * self.plateau_scale

    def _apply(self) -> None:
        self.current = [self.lr_at(base, self.step_count) for base in self.base_lrs]
        for g, lr in zip(self.optimizer.param_groups, self.current):
            if isinstance(g["lr"], torch.Tensor):  # a captured step reads its lr from the device
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def rescale(self, factor: float) -> None:
        """Multiply every group's peak lr by `factor` (tune.auto_lr_find applies its suggestion)."""
        self.base_lrs = [b * factor for b in self.base_lrs]
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self._apply()

    def step(self) -> None:
        self.step_count += 1
        if not self.constant or self.step_count <= self.warmup:
            self._apply()

    def on_validation(self, value: float) -> None:
        """Plateau: decay after `plateau_patience` validations without improvement."""
        if self.cfg.scheduler != "plateau" or not math.isfinite(value):
            return
        if improved(value, self.plateau_best, self.mode):
            self.plateau_best, self.plateau_bad = value, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad > self.cfg.plateau_patience:
            self.plateau_scale *= self.cfg.plateau_factor
            self.plateau_bad = 0
            self._apply()

    @property
    def lrs(self) -> list[float]:
        return list(self.current)  # host floats, also when the optimizer holds device tensors

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale,
                "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        if "step_count" not in state:
            raise ConfigError(f"the checkpoint's LR schedule is a {state.get('torch_scheduler', 'scheduler')} of "
                              "your own; resume with the same scheduler= argument")
        self.step_count = state["step_count"]
        self.plateau_scale = state["plateau_scale"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def _cos(start: float, end: float, p: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, p))))
