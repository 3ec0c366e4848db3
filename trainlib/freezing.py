"""Changing which parameters train during a run: `state.set_trainable({"backbone.layer4": True})`
from a callback (state.py), and `FreezeSchedule`, the built-in callback that unfreezes groups of
modules at given epochs or when the monitored metric stops improving.

What a change does, all here (`set_trainable`):

- requires_grad of the named modules' parameters; the gradients of newly frozen ones are dropped
  (set to None). Nothing else about the model changes.
- The optimizer is kept as it is, with every parameter it holds: the optimizers skip a parameter
  whose gradient is None (Adam, AdamW, SGD, fused or not), so a frozen parameter's moments and step
  count stay as they were and the others' state goes on (never reset, never rebuilt); a parameter
  unfrozen again resumes its own state, one never trained starts fresh. Only a parameter the
  optimizer holds can be unfrozen: the Trainer builds it from the parameters trainable when it is
  built (or from the recipe's param_groups), so a module a schedule unfreezes later is left
  trainable in build_model; the schedule freezes it itself at on_fit_start, before the first step.
- DDP: a new DistributedDataParallel around the same compiled module, after the old reducer's
  autograd hooks are removed. Why: a reducer takes the parameters that require a gradient when it
  is built, hooks each one, and after every backward waits for each of them. A parameter frozen
  after that never reports: with find_unused_parameters=false that backward's reduction never
  finishes (the step's other gradients are not averaged) and the next forward raises "Expected to
  have finished reduction in the prior iteration"; with true, DDP walks the autograd graph every
  step to find it. A parameter unfrozen after that has no hook: its gradient is never all-reduced
  and each rank steps with its own, silently. A new reducer hooks exactly the trainable set, and
  rebuilds its buckets from the first backward's gradient order, as at the start of a run; its
  construction checks shapes across ranks and broadcasts rank 0's parameters and buffers
  (identical already), so it is a collective: every rank changes at the same point.
- FSDP2 (fully_shard): nothing to rebuild. The module keeps its sharded parameters; each
  all-gather gives the unsharded parameter the sharded one's requires_grad, and the post-backward
  reduce-scatters only the parameters that got a gradient, so a unit may hold frozen and trainable
  parameters and the set may change between steps (tests/test_freezing.py, 2 gloo ranks).
- CUDA graphs: the captured steps are dropped (graphs.StepGraphs.reset); every batch shape warms
  up and is captured again with the new set. torch.compile re-specialises by itself (its guards
  cover requires_grad).
- EMA (trainer.ema_decay): averages the parameters trainable when the Trainer was built, whatever
  a schedule does later; while one is frozen its average relaxes toward its fixed value. A
  parameter frozen when the Trainer was built cannot be unfrozen with EMA on (ConfigError).

Where: only from on_fit_start, on_train_epoch_start, on_validation_end or on_train_epoch_end
(state.event), never mid-epoch; every rank must take the same decision, from values identical on
every rank (the epoch; validation metrics, which are reduced). In a distributed run every call
gathers the request of every rank first (a small host collective, at epoch boundaries only) and
raises the same ConfigError on every rank when they differ. requires_grad is not in a checkpoint:
a callback that changes it keeps its decision in its state_dict and applies it again at
on_fit_start, before the first step of a resumed run (FreezeSchedule does).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from . import dist, parallel
from .callbacks import Callback
from .metrics import improved
from .config import ConfigError
from .loggers import log
from .state import TrainState

EVENTS = ("on_fit_start", "on_train_epoch_start", "on_validation_end", "on_train_epoch_end")


def _covers(prefix: str, name: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def resolve(model: Any, changes: dict[str, bool]) -> dict[str, bool]:
    """{parameter name: requires_grad} after `changes` ({module or parameter name: train?}; where
    names nest, the longer one wins). ConfigError naming a name that is not in the model."""
    params = dict(model.named_parameters())
    target = {n: p.requires_grad for n, p in params.items()}
    canonical = {id(p): n for n, p in params.items()}  # a shared (tied) parameter under each of its names
    every = [(n, canonical[id(p)]) for n, p in model.named_parameters(remove_duplicate=False)]
    for prefix, train in sorted(changes.items(), key=lambda kv: len(kv[0])):  # general first, specific last
        if not isinstance(prefix, str) or not isinstance(train, bool):
            raise ConfigError(f"set_trainable: expected {{module name: True|False}}, got {prefix!r}: {train!r}")
        hit = list(dict.fromkeys(c for n, c in every if _covers(prefix, n)))
        if not hit:
            tops = ", ".join(n for n, _ in model.named_children())
            what = "has no parameters" if _is_module(model, prefix) else "is not a module of the model"
            raise ConfigError(f"set_trainable: {prefix!r} {what} (its top-level modules: {tops})")
        target.update(dict.fromkeys(hit, train))
    return target


def _is_module(model: Any, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def set_trainable(trainer: Any, changes: dict[str, bool], event: str) -> list[str]:
    """What `TrainState.set_trainable` calls (see the module docstring). `trainer` is the Trainer
    (duck-typed). Returns the names of the parameters whose requires_grad changed."""
    t = trainer
    if event not in EVENTS:
        where = f"from {event}" if event else "mid-epoch or outside fit()"
        raise ConfigError(f"set_trainable called {where}: trainable parameters change only at epoch boundaries "
                          f"({', '.join(EVENTS)}), where every rank is at the same point and a resumed run can apply "
                          "the change again")
    model, params = t.model, dict(t.model.named_parameters())
    if t.env.distributed:  # agree first: a bad name must fail on every rank, not hang the others in the gather
        request = sorted(changes.items())
        asked = dist.all_gather_object(request)
        if any(a != request for a in asked):
            raise ConfigError(f"set_trainable: the ranks asked for different changes at epoch {t.state.epoch} "
                              f"({event}): " + "; ".join(f"rank {r}: {dict(a)}" for r, a in enumerate(asked)) +
                              ". Decide from values identical on every rank (the epoch, reduced validation metrics)")
    target = resolve(model, changes)
    unfreeze = [n for n, train in target.items() if train and not params[n].requires_grad]
    freeze = [n for n, train in target.items() if not train and params[n].requires_grad]
    _check_unfreezable(t, [(n, params[n]) for n in unfreeze])
    if not any(target.values()):
        raise ConfigError("set_trainable: this would freeze every parameter of the model (nothing left to train)")
    if not unfreeze and not freeze:
        return []
    for n in unfreeze:
        params[n].requires_grad_(True)
    for n in freeze:
        params[n].requires_grad_(False)
        params[n].grad = None  # (already None between steps: zero_grad(set_to_none=True))
    w = t.wrapped
    if w.ddp:  # the reducer must hook exactly the trainable parameters (module docstring)
        old = w.train_module
        old._remove_autograd_hooks()
        w.train_module = parallel.data_parallel(w.compiled, t.device, t.tc.find_unused_parameters, w.use_graphs)
        w.train_module.training = old.training
        t.step.attach(w.train_module)  # the step's statistics ride in its gradient all-reduce
    if t.step.graphs is not None:
        t.step.graphs.reset()
    trainable = [p for p in params.values() if p.requires_grad]
    log.info(f"trainable parameters changed at epoch {t.state.epoch} ({event}): "
             + "; ".join(f"{verb} {_summary(names)}" for verb, names in (("unfrozen", unfreeze), ("frozen", freeze))
                         if names)
             + f"; {len(trainable)} of {len(params)} parameter tensors train"
             + (" (DDP reducer rebuilt)" if w.ddp else ""))
    return sorted(unfreeze + freeze)


def _check_unfreezable(t: Any, named: list) -> None:
    held = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in named if id(p) not in held]
    if missing:
        raise ConfigError(f"set_trainable: {_summary(missing)} cannot be unfrozen: the optimizer does not hold "
                          f"{'it' if len(missing) == 1 else 'them'} (frozen when the Trainer was built). Leave what a "
                          "schedule unfreezes trainable in build_model: FreezeSchedule freezes it itself before the "
                          "first step")
    if t.ema is not None:
        averaged = {id(p) for p in t.ema.params}
        missing = [n for n, p in named if id(p) not in averaged]
        if missing:
            raise ConfigError(f"set_trainable: {_summary(missing)} cannot be unfrozen with trainer.ema_decay > 0: "
                              "EMA averages the parameters trainable when the Trainer was built")


def _summary(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")


class FreezeSchedule(Callback):
    """Groups of modules (dotted names; a group is one name or a list of names) frozen at the start
    and unfrozen in order, group i once epoch `unfreeze_at[i]` starts, and/or the next one when the
    monitored metric has not improved for `patience` validations (a plateau pulls the next unfreeze
    earlier; groups after `unfreeze_at` unfreeze on plateaus only; with neither rule they stay
    frozen). Modules in no group are not touched.

        FreezeSchedule(["backbone"], unfreeze_at=[5])                                   # fixed: 5 epochs
        FreezeSchedule(["backbone.layer4", "backbone.layer3", "backbone"], unfreeze_at=[2, 4, 6])  # gradual
        FreezeSchedule(["backbone.layer4", "backbone.layer3"], patience=2)              # on plateau

    Where names nest, the longer wins: with ["backbone.layer4", "backbone"] and one group open,
    layer4 trains and the rest of the backbone does not. The decisions come from the epoch and
    from reduced validation metrics, so they are the same on every rank; its state (groups open,
    best value, validations without improvement) is in every checkpoint, and on_fit_start applies
    it again, so a resumed run trains the same parameters from its first step. It runs before the
    checkpoint callback: a file written at a validation holds the decision taken there."""

    key = "freeze_schedule"
    runs_before_checkpoint = True

    def __init__(self, groups: Sequence[str | Sequence[str]], unfreeze_at: Sequence[int] = (), patience: int = 0,
                 monitor: str = "val/loss", mode: str = "min", min_delta: float = 0.0) -> None:
        self.groups = [[g] if isinstance(g, str) else list(g) for g in groups]
        self.unfreeze_at, self.patience = [int(e) for e in unfreeze_at], patience
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        where = "FreezeSchedule"
        if not self.groups or any(not g or not all(isinstance(n, str) for n in g) for g in self.groups):
            raise ConfigError(f"{where}: groups must be a non-empty list of module names (or lists of them)")
        if len(self.unfreeze_at) > len(self.groups):
            raise ConfigError(f"{where}: unfreeze_at has {len(self.unfreeze_at)} epochs for {len(self.groups)} groups")
        if any(e < 0 for e in self.unfreeze_at) or self.unfreeze_at != sorted(self.unfreeze_at):
            raise ConfigError(f"{where}: unfreeze_at must be epochs >= 0 in increasing order (group i unfreezes "
                              f"after group i-1), got {self.unfreeze_at}")
        if not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"{where}: patience must be an integer >= 0 (0: no plateau rule), got {patience!r}")
        if mode not in ("min", "max"):
            raise ConfigError(f"{where}: mode must be 'min' or 'max', got {mode!r}")
        if not min_delta >= 0:
            raise ConfigError(f"{where}: min_delta must be >= 0, got {min_delta!r}")
        self.opened = 0                  # the first `opened` groups train
        self.best: float | None = None
        self.wait = 0                    # validations without improvement since the best or the last unfreeze

    def due(self, epoch: int) -> int:
        """Groups open at `epoch` by the epoch rule."""
        return sum(e <= epoch for e in self.unfreeze_at)

    def apply(self, state: TrainState) -> list[str]:
        return state.set_trainable({name: i < self.opened for i, group in enumerate(self.groups) for name in group})

    def on_fit_start(self, state: TrainState) -> None:
        self.opened = max(self.opened, self.due(state.epoch))
        self.apply(state)  # a fresh run: freezes the groups; a resumed one: the set it had

    def on_train_epoch_start(self, state: TrainState) -> None:
        self.opened = max(self.opened, self.due(state.epoch))
        self.apply(state)

    def on_validation_end(self, state: TrainState, metrics: dict) -> None:
        if not self.patience or self.opened >= len(self.groups):
            return
        if self.monitor not in metrics:
            raise ConfigError(f"FreezeSchedule: monitor {self.monitor!r} is not among the validation metrics "
                              f"({', '.join(sorted(metrics))})")
        value = metrics[self.monitor]
        if math.isfinite(value) and improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            log.info(f"FreezeSchedule: {self.monitor} did not improve for {self.wait} validation(s): unfreezing "
                     f"{', '.join(self.groups[self.opened])}")
            self.opened, self.wait = self.opened + 1, 0
            self.apply(state)

    def state_dict(self) -> dict:
        return {"opened": self.opened, "best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.opened, self.best, self.wait = int(state["opened"]), state["best"], int(state["wait"])
