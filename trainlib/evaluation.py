"""Evaluation over one split: the loss and every metric, reduced across ranks, so N processes
score exactly what one process scores."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as torch_dist

from .data import DevicePrefetcher, map_tensors, to_device
from .dist import DistEnv
from .metrics import MeanMetric, Metric
from .parallel import Wrapped
from .precision import Precision


@torch.no_grad()
def evaluate(wrapped: Wrapped, loader: Any, n: int, forward_fn: Callable, unpack: Callable, metrics: list[Metric],
             precision: Precision, device: torch.device, env: DistEnv, split: str) -> dict[str, float]:
    """{"<split>/loss": ..., "<split>/<metric>": ...} over the first `n` batches of `loader` (every
    rank must call)."""
    for m in metrics:
        m.reset()
    loss_mean = MeanMetric("loss")
    if env.distributed:
        # Each rank's last training forward updated its own BatchNorm statistics; evaluate (and
        # checkpoint) rank 0's, so N processes score exactly what one process scores.
        for b in wrapped.model.buffers():
            torch_dist.broadcast(b, 0)
    model, marks = wrapped.compiled, wrapped.mark_compiled_steps
    was_training = model.training
    model.eval()
    for i, batch in enumerate(DevicePrefetcher(loader, device)):
        if i >= n:
            break
        batch = precision.cast_batch(to_device(batch, device))
        with precision.autocast():
            if marks:
                torch.compiler.cudagraph_mark_step_begin()
            outputs = forward_fn(model, batch)
            if marks:  # metrics may keep outputs; the next replay would overwrite them
                outputs = map_tensors(outputs, torch.clone)
            loss, weight, _ = unpack(outputs, batch)
        loss_mean.add(loss.float(), weight)
        for m in metrics:
            m.update(outputs, batch)
    model.train(was_training)
    result = {f"{split}/{k}": v for k, v in loss_mean.compute(device).items()}
    for m in metrics:
        result.update({f"{split}/{k}": float(v) for k, v in m.compute(device).items()})
    return result
