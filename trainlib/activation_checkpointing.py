"""trainer.gradient_checkpointing=true: the recipe's blocks recompute their forward in the backward.

Each block named by the recipe (`Recipe.blocks` / `Trainer(blocks=...)`, resolved by
fsdp.resolve_blocks: the same list that makes the FSDP units) keeps only its inputs from the
forward; the activations inside it are recomputed when the backward reaches it
(`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`). Less activation memory, about
one more forward of compute per step.

How: the block's own `forward` is replaced, on the instance, by one that runs the original under
checkpoint. No wrapper module is inserted, so parameter names, `state_dict` keys, checkpoints and
`model.safetensors` are exactly those of the model without it. parallel.wrap applies it before
FSDP, compile and DDP (torchtitan's order): an FSDP unit's hooks run around the checkpointed
forward, and torch.compile traces the checkpoint as one region per block.

Non-reentrant checkpointing replays the RNG (dropout, stochastic depth draw the same masks in the
recomputation: the gradients equal the plain run's), keeps autocast, accepts keyword arguments and
non-tensor arguments, and needs no input that requires a gradient. Under `torch.no_grad()`
(evaluation) the block runs its plain forward: nothing to recompute.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ConfigError

MISSING_BLOCKS = ("trainer.gradient_checkpointing=true needs the model's blocks: give Recipe.blocks / "
                  "Trainer(blocks=...) (the repeated submodules whose activations are recomputed in the "
                  "backward, e.g. blocks=lambda m: [*m.layers]), or set trainer.gradient_checkpointing=false")


def _checkpointed_forward(inner: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _checkpointed_forward


def apply(blocks: list[tuple[str, nn.Module]] | None) -> list[str]:
    """Checkpoint every block of `blocks` (fsdp.resolve_blocks' (name, module) pairs) that is not
    inside another one (a nested block would be recomputed twice), in place. Returns the names of
    the checkpointed blocks. A block already checkpointed (a second Trainer on the same model)
    stays as it is. ConfigError when there are no blocks."""
    if not blocks:
        raise ConfigError(MISSING_BLOCKS)
    inside = {id(m) for _, b in blocks for m in b.modules() if m is not b}
    done = []
    for name, module in blocks:
        if id(module) in inside:
            continue
        if not is_checkpointed(module):
            module.forward = functools.partial(_checkpointed_forward, module.forward)
        done.append(name)
    return done


def remove(model: nn.Module) -> int:
    """Give every checkpointed block of `model` its plain forward back; returns how many."""
    n = 0
    for module in model.modules():
        if is_checkpointed(module):
            del module.forward
            n += 1
    return n


def note(names: list[str]) -> str:
    shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
    return (f"trainer.gradient_checkpointing=true: {len(names)} block(s) recompute their forward in the backward "
            f"(non-reentrant activation checkpointing): {shown}")
