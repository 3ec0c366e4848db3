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
    try:  # fused: one kernel per step, and a device-side skip of non-finite steps (trainer.nonfinite)
        return cls(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # device or dtype without a fused kernel
        return cls(params, **kw)


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
        if cfg.scheduler in ("cosine", "onecycle") and total_steps <= 0:
            raise ConfigError(f"optim.scheduler={cfg.scheduler} needs a known run length (trainer.max_epochs or trainer.max_steps)")
        self.optimizer = optimizer
        self.cfg = cfg
        self.total = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)
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
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps > 0 else 1.0
        if c.scheduler == "cosine":
            p = min(1.0, max(0, step - c.warmup_steps) / max(1, self.total - c.warmup_steps))
            lr = c.min_lr + (base - c.min_lr) * 0.5 * (1 + math.cos(math.pi * p))
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

    def step(self) -> None:
        self.step_count += 1
        if not self.constant or self.step_count <= self.cfg.warmup_steps:
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
        self.step_count = state["step_count"]
        self.plateau_scale = state["plateau_scale"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def _cos(start: float, end: float, p: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, p))))
