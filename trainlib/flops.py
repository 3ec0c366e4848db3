"""Model FLOPs utilisation (MFU): counted FLOPs per sample against the GPU's dense bf16 peak.

Why count instead of asking the recipe: torch's FlopCounterMode counts the matmuls and
convolutions of one real forward, so every recipe gets MFU for free. A training step costs about
3x the forward (the backward computes gradients for inputs and weights). The reference is the
dense bf16 tensor-core peak, the convention of PaLM/torchtitan-style MFU figures, whatever
precision the run uses (an fp32 run shows how much it leaves on the table).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

# dense bf16 tensor-core peak per GPU, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("V100", 125e12)]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def train_flops_per_sample(model: torch.nn.Module, forward_fn: Callable[[Any, Any], Any], batch: Any,
                           batch_size: int, autocast: contextlib.AbstractContextManager | None = None) -> float:
    """3 x the forward FLOPs of `batch`, per sample. Runs one forward in eval mode under no_grad,
    so no BatchNorm statistic moves and no dropout draw is taken."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, (autocast or contextlib.nullcontext()):
            forward_fn(model, batch)
    finally:
        model.train(was_training)
    return 3.0 * counter.get_total_flops() / max(1, batch_size)
