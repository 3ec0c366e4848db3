"""What callbacks see: where the loop is, the model and optimizer, and the three things a callback
may ask for (stop the run; save a checkpoint; change which parameters train). Callbacks get this
object, never the Trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class TrainState:
    model: nn.Module                         # the plain module (what is saved)
    optimizer: torch.optim.Optimizer
    rank: int = 0
    world_size: int = 1
    run_dir: Path = Path(".")
    train_batches: int = 0                   # micro-batches of an epoch (after limit_train_batches)
    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0                  # micro-batches of the current epoch already consumed
    epoch_done: bool = False
    should_stop: bool = False
    stop_reason: str = ""
    halted: bool = False                     # stopped because training went non-finite
    train_metrics: dict[str, float] = field(default_factory=dict)  # the last epoch's, e.g. train/loss
    save: Callable[..., bool] = lambda path, epoch_done=None: False  # set by the Trainer
    current_lrs: Callable[[], list[float]] = list                    # set by the Trainer
    change_trainable: Callable[[dict, str], list[str]] = lambda changes, event: []  # set by the Trainer
    event: str = ""                          # the callback event being dispatched ("" between events)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def lrs(self) -> list[float]:
        """The learning rate of every parameter group now."""
        return self.current_lrs()

    def request_stop(self, reason: str) -> None:
        """Call it with values that are identical on every rank (reduced metrics), so every rank
        stops together. The first reason wins."""
        if not self.should_stop:
            self.should_stop, self.stop_reason = True, reason

    def save_checkpoint(self, path: Any, epoch_done: bool | None = None) -> bool:
        """Every rank calls it (a collective); rank 0 writes atomically. False (on every rank)
        when it declined to write (non-finite weights)."""
        return self.save(path, epoch_done)

    def set_trainable(self, changes: dict[str, bool]) -> list[str]:
        """Train (True) or freeze (False) the parameters of named modules: dotted names as in
        `model.named_modules()` (or one parameter's name); where names nest the longer one wins,
        e.g. {"backbone": False, "backbone.layer4": True}. Call it on every rank, from
        on_fit_start, on_train_epoch_start, on_validation_end or on_train_epoch_end, with a
        decision taken from values identical on every rank (the epoch, reduced metrics). Returns
        the names of the parameters that changed. Optimizer state, DDP, FSDP, CUDA graphs, EMA:
        see freezing.py."""
        return self.change_trainable(dict(changes), self.event)

    def freeze(self, *names: str) -> list[str]:
        return self.set_trainable(dict.fromkeys(names, False))

    def unfreeze(self, *names: str) -> list[str]:
        return self.set_trainable(dict.fromkeys(names, True))
