"""One optimizer step: forward and backward of every micro-batch, gradient normalisation, the
non-finite check, clipping and the optimizer step; eager, or replayed as one CUDA graph.

Gradients are normalised by the GLOBAL weight of the step (all micro-batches, all ranks), so k
micro-batches give the gradient of one batch k times larger, including an epoch's shorter last
window, and N ranks the gradient of one. A step whose loss (on any rank) or gradient is not
finite is never applied. None of this waits for the device (see `TrainStep.optimizer_step`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from torch import nn

from . import fsdp, graphs
from .config import ConfigError, TrainerConfig
from .data import batch_size_of
from .dist import DistEnv
from .ema import EMA
from .loggers import log
from .parallel import Wrapped
from .precision import Precision

_NO_CONTEXT = contextlib.nullcontext()


def default_forward(model: nn.Module, batch: Any) -> Any:
    """(inputs, target) tuples -> model(inputs); anything else -> model(batch)."""
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


class LossUnpacker:
    """`loss_fn(outputs, batch)` -> (mean loss, weight, logged parts). The weight is what the mean
    is over (valid frames, tokens; default: the batch's sample count); numbers become cached
    device constants, because making a CUDA tensor from a number syncs the host."""

    def __init__(self, loss_fn: Callable[[Any, Any], Any]) -> None:
        self.loss_fn = loss_fn
        self._weights: dict[float, torch.Tensor] = {}

    def __call__(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = self.loss_fn(outputs, batch)
        if isinstance(out, dict):
            if "loss" not in out:
                raise ConfigError("the loss function returned a dict without a 'loss' entry")
            parts = {k: v for k, v in out.items() if k not in ("loss", "weight") and isinstance(v, torch.Tensor)}
            loss, weight = out["loss"], out.get("weight")
        else:
            loss, weight, parts = out, None, {}
        if weight is None:
            weight = batch_size_of(batch)
        if isinstance(weight, torch.Tensor):
            return loss, weight.to(device=loss.device, dtype=torch.float32, non_blocking=True), parts
        w = self._weights.get(weight)
        if w is None:
            w = torch.full((), float(weight), dtype=torch.float32, device=loss.device)
            if len(self._weights) < 64:  # batch sizes repeat; per-batch counts would only fill memory
                self._weights[weight] = w
        return loss, w, parts


class TrainStep:
    """Called with a window of micro-batches; returns the (loss, weight, parts) items to log and
    the device flag "this step was not applied". The LR schedule is stepped by the caller."""

    def __init__(self, wrapped: Wrapped, forward_fn: Callable, unpack: LossUnpacker,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, precision: Precision,
                 env: DistEnv, tc: TrainerConfig, device: torch.device) -> None:
        self.wrapped, self.forward_fn, self.unpack = wrapped, forward_fn, unpack
        self.optimizer, self.env, self.device = optimizer, env, device
        self.scaler = scaler if scaler.is_enabled() else None
        self.grad_clip = tc.grad_clip
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # a fused optimizer takes a device-side found_inf flag: a non-finite step is skipped with no host sync
        self.device_skip = bool(optimizer.defaults.get("fused"))
        self.use_graphs = wrapped.use_graphs and self.device_skip
        if wrapped.use_graphs and not self.device_skip:
            log.warning("trainer.cuda_graphs=true ignored: the optimizer has no fused kernel, so a non-finite step "
                        "can only be skipped from the host; running eagerly")
        # one micro-batch in one process: the loss's own mean already has the right gradient
        self.normalise = env.world_size > 1 or tc.accumulate_grad_batches > 1
        self.autocast = precision.autocast(cache=not self.use_graphs)  # one object, re-entered
        self.graphs: graphs.StepGraphs | None = None  # built at the first step (after a checkpoint load)
        self.ema: EMA | None = None  # trainer.ema_decay: averaged after each applied step (inside the graph)
        self.part_names: list[str] = []

    def __call__(self, batches: list[Any]) -> tuple[list[tuple], torch.Tensor]:
        if self.use_graphs and self.graphs is None:
            graphs.make_capturable(self.optimizer, self.device)
            self.graphs = graphs.StepGraphs(self.packed_step, self.device, self.wrapped.ddp)
        if self.graphs is None:
            return self.device_step(batches)
        packed = self.graphs(batches)
        k, names = len(batches), self.part_names
        parts = {p: packed[(2 + j) * k:(3 + j) * k] for j, p in enumerate(names)}
        return [(packed[:k], packed[k:2 * k], parts)], packed[-1]

    def device_step(self, batches: list[Any]) -> tuple[list[tuple], torch.Tensor]:
        """Forward/backward of every micro-batch (DDP and FSDP sync on the last only), then the
        optimizer step. Device work only, so it can be captured in a CUDA graph."""
        w = self.wrapped
        items, last = [], len(batches) - 1
        for j, batch in enumerate(batches):
            if w.sharded and last:  # FSDP's no_sync: reduce-scatter on the last micro-batch only
                w.model.set_requires_gradient_sync(j == last)
            with w.train_module.no_sync() if w.ddp and j < last else _NO_CONTEXT:
                if w.mark_compiled_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast:
                    outputs = self.forward_fn(w.train_module, batch)
                    loss, weight, parts = self.unpack(outputs, batch)
                objective = loss if loss.dtype == torch.float32 else loss.float()
                if self.normalise:
                    objective = objective * weight
                (self.scaler.scale(objective) if self.scaler else objective).backward()
            loss = loss.detach()
            parts = {name: v.detach() for name, v in parts.items()}
            if w.mark_compiled_steps:  # graph-tree outputs are overwritten by the next replay
                loss, parts = loss.clone(), {name: v.clone() for name, v in parts.items()}
            items.append((loss, weight, parts))
        return items, self.optimizer_step(items)

    def packed_step(self, batches: list[Any]) -> torch.Tensor:
        """device_step with its results in one 1-D tensor (a graph's single output):
        [losses(k), weights(k), each part(k) in sorted name order, skipped flag]."""
        items, skipped = self.device_step(batches)
        self.part_names = names = sorted(items[0][2])
        cols = [torch.stack([it[0].float() for it in items]), torch.stack([it[1] for it in items])]
        cols += [torch.stack([it[2][p].float() for it in items]) for p in names]
        cols.append(skipped.float().view(1))
        return torch.cat(cols)

    def optimizer_step(self, window: list[tuple]) -> torch.Tensor:
        """Normalise by the global weight, check, unscale, clip, step, zero_grad. A step whose loss
        (on any rank) or gradient is not finite is never applied: returns that device flag. No host
        sync, except fp16's GradScaler with an unfused optimizer, and an optimizer without a fused
        kernel whose step must be skipped from the host (marked below)."""
        dev, env = self.device, self.env
        bad = (~torch.isfinite(torch.stack([it[0].float() for it in window]))).any().float()
        total = torch.stack([it[1] for it in window]).sum() if self.normalise else None
        if env.distributed:  # one device-side reduce (world > 1 always normalises); DDP already averaged the grads
            stats = torch.stack([total, bad])
            torch_dist.all_reduce(stats)
            total, bad = stats[0], (stats[1] > 0).float()
        scaler = self.scaler
        if scaler:
            scaler.unscale_(self.optimizer)  # fp16 overflow is the scaler's to skip (not counted as bad)
        grads = [fsdp.local(p.grad) for p in self.params if p.grad is not None]
        found = None
        if total is not None and grads:  # normalise and check in one pass over the gradients
            found = torch.zeros(1, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(
                grads, found, (env.world_size / total.clamp_min(1e-12)).float().reshape(1))
        norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0 else None
        if scaler is None and grads:
            if found is None:  # one process, one micro-batch: nothing has read the gradients yet
                largest = norm if norm is not None else torch.stack(torch._foreach_norm(grads, math.inf)).max()
                found = (~torch.isfinite(largest)).float()
            elif self.wrapped.sharded:  # each rank checked its own shards: the verdict must be global
                torch_dist.all_reduce(found, op=torch_dist.ReduceOp.MAX)
            bad = torch.maximum(bad, found.reshape(()))
        not_applied = bad
        if scaler:
            infs = list(scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values())
            for inf in infs:
                inf.copy_(torch.maximum(inf, bad.to(inf.device)))  # a non-finite loss skips the step too
            not_applied = torch.stack([inf.to(bad.device).reshape(()) for inf in infs]).max()  # + overflow skips
            scaler.step(self.optimizer)
            scaler.update()
        elif self.device_skip:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, bad  # fused step: skipped on device
            self.optimizer.step()
        elif not bool(bad):  # host sync: only an optimizer without a fused kernel needs one to skip
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(not_applied)
        return bad
