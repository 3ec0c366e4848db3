"""An exponential moving average of the weights (trainer.ema_decay > 0):

    ema <- decay_t * ema + (1 - decay_t) * weights      after every APPLIED optimizer step
    decay_t = decay, or min(decay, (1 + n) / (10 + n)) with trainer.ema_warmup (n: updates so far)

Why it is built this way:
- the update is device work at the end of the step (step.py), so it is captured with the step in
  a CUDA graph and adds no host sync (its weight is passed as a tensor list: a 0-d tensor weight
  would be read on the host); a step that was not applied (non-finite, or an fp16 overflow the
  GradScaler skipped) leaves it as is;
- it is kept in float32 whatever the parameters' dtype: a 0.999 decay moves a bf16 weight by less
  than its resolution;
- trainable parameters only (those that require a gradient when the Trainer is built; a freezing
  schedule does not change the set, see freezing.py): a frozen pretrained tower would only cost a
  float32 copy; buffers (BatchNorm statistics) stay the live model's, broadcast from rank 0
  before evaluation as without EMA (averaging them per rank would make ranks disagree);
- under FSDP each rank averages its own shards (sharded like the parameters) and a checkpoint
  gathers them whole, like the model: a file resumes under any strategy.
Validation (hence best/top-k selection), model.safetensors, `trainer.ckpt_path` / test_only and
`trainlib.load_model` use the averaged weights; a checkpoint holds both.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .checkpoint import CheckpointError
from .fsdp import local


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool, device: torch.device) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # frozen ones never move
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.warmup = warmup
        self.decay = torch.tensor(float(decay), device=device)
        self.updates = torch.zeros((), device=device)  # applied steps averaged so far
        self.shadow = [local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, skipped: torch.Tensor) -> None:
        """After the optimizer step; `skipped` is the step's device flag (1: not applied)."""
        applied = 1.0 - skipped
        decay = torch.minimum(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        weight = (1 - decay) * applied  # a tensor list below: a single 0-d tensor weight is read on the host
        torch._foreach_lerp_(self.shadow, [local(p).detach().float() for p in self.params], [weight] * len(self.shadow))
        self.updates += applied

    @torch.no_grad()
    def reset(self) -> None:
        """Start averaging from the model's current weights (after loading weights to start from)."""
        torch._foreach_copy_(self.shadow, [local(p).detach().float() for p in self.params])
        self.updates.zero_()

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block (evaluation), the training ones after:
        copied in place, so compiled code and captured graphs keep their addresses."""
        with torch.no_grad():
            live = [local(p).detach() for p in self.params]
            backup = [t.clone() for t in live]
            torch._foreach_copy_(live, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, backup)

    def state_dict(self) -> dict:
        """{"weights": {name: whole float32 tensor on the CPU}, "updates": n}. Under FSDP a
        collective (every rank calls it) that gathers the shards."""
        weights = {}
        for name, p, s in zip(self.names, self.params, self.shadow):
            if hasattr(p, "device_mesh"):  # a DTensor parameter: this rank holds one shard of it
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            weights[name] = s.detach().cpu().clone()
        return {"weights": weights, "updates": float(self.updates)}  # host sync: checkpoint time only

    @torch.no_grad()
    def load_state_dict(self, state: dict, source: str) -> None:
        weights = state["weights"]
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise CheckpointError(f"{source}: its EMA weights lack {', '.join(missing[:8])} (was it saved with "
                                  "another model config?)")
        for name, p, s in zip(self.names, self.params, self.shadow):
            full = weights[name].to(s.device, torch.float32)
            if hasattr(p, "device_mesh"):  # every rank read the whole file: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            s.copy_(full)
        self.updates.fill_(float(state["updates"]))


def with_ema(model_state: dict, saved: dict) -> dict:
    """A checkpoint's model weights with its averaged ones in place of the parameters (when it has them)."""
    ema = saved.get("ema")
    if not ema:
        return model_state
    return {**model_state, **{k: v.to(model_state[k].dtype) if k in model_state else v for k, v in ema["weights"].items()}}
