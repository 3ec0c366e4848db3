"""Autocast, GradScaler and parameter dtype from one precision string.

  32-true     fp32 everywhere
  16-mixed    fp16 autocast + GradScaler (the scaler is unscaled before clipping)
  bf16-mixed  bf16 autocast, fp32 weights, no scaler
  bf16-true   weights and activations in bf16 (no autocast)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(self.name)

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16-true" else torch.float32

    @property
    def uses_scaler(self) -> bool:
        return self.name == "16-mixed"

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        """cache=False for CUDA-graph capture (the weight-cast cache must not outlive a capture)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, cache_enabled=cache)

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is a no-op unless precision is 16-mixed (so its state is always saved)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_scaler)

    def cast_batch(self, batch):
        """bf16-true: floating inputs follow the weights' dtype."""
        if self.name != "bf16-true":
            return batch
        from .data import map_tensors
        return map_tensors(batch, lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t)
