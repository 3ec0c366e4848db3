"""One optimizer step: forward and backward of every micro-batch, gradient normalisation, the
non-finite check, clipping and the optimizer step; eager, or replayed as one CUDA graph.

Gradients are normalised by the GLOBAL weight of the step (all micro-batches, all ranks), so k
micro-batches give the gradient of one batch k times larger, including an epoch's shorter last
window, and N ranks the gradient of one. A step whose loss (on any rank) or gradient is not
finite is never applied. None of this waits for the device (see `TrainStep.optimizer_step`).
"""
from __future__ import annotations

import contextlib
import gc
import math
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from torch import nn

from . import fsdp, graphs
from .config import ConfigError, TrainerConfig, UserError
from .data import batch_size_of
from .dist import DistEnv
from .ema import EMA
from .loggers import log
from .parallel import Wrapped
from .precision import Precision

_NO_CONTEXT = contextlib.nullcontext()


def split_batch(batch: Any, parts: int) -> list[Any]:
    """A batch cut into `parts` micro-batches along its sample dimension (the last ones smaller
    when it does not divide; fewer when the batch is smaller than `parts`): tensors whose leading
    dimension is the batch's sample count are sliced, and so are lists of per-sample values."""
    n = batch_size_of(batch)
    size = math.ceil(n / parts)
    bounds = [(lo, min(n, lo + size)) for lo in range(0, n, size)]

    def cut(obj: Any, lo: int, hi: int) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj[lo:hi] if obj.dim() and obj.shape[0] == n else obj
        if isinstance(obj, dict):
            return {k: cut(v, lo, hi) for k, v in obj.items()}
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(cut(v, lo, hi) for v in obj))
        if isinstance(obj, (list, tuple)):
            if len(obj) == n and not any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
                return type(obj)(obj[lo:hi])  # per-sample values (ids, names)
            return type(obj)(cut(v, lo, hi) for v in obj)
        return obj

    return [cut(batch, lo, hi) for lo, hi in bounds]


def free_memory(device: torch.device) -> None:
    """After an out-of-memory error: collect what the failed step left behind and give the CUDA
    cache back, so the retry starts from the memory a step needs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def host_group(env: DistEnv) -> Any:
    """A gloo group for host-side agreements (the default group when it already is gloo). Every
    rank must call it at the same point (it is a collective when it creates a group)."""
    return torch_dist.group.WORLD if torch_dist.get_backend() == "gloo" else torch_dist.new_group(backend="gloo")


def local_stats(items: list[tuple]) -> torch.Tensor:
    """[sum of the micro-batches' weights, 0 if every loss is finite else NaN] of this rank's step
    window: x * 0 is NaN exactly when x is inf or NaN, and a sum holding a NaN is NaN, so summing
    this over ranks flags "some loss was not finite" exactly, in few ops (#17)."""
    if len(items) == 1:  # (a loss or weight of shape [1] is as good as a scalar)
        return torch.stack([items[0][1].reshape(()), (items[0][0].detach().float() * 0).reshape(())])
    weights, losses = torch.stack([it[1] for it in items]), torch.stack([it[0].detach().float() for it in items])
    return torch.stack([weights.sum(), (losses * 0).sum()])  # (x * 0 first: finite losses cannot sum to inf)


def all_reduce_mean(params: list[torch.Tensor], world: int, stats: torch.Tensor) -> torch.Tensor:
    """DDP's gradient average done by hand (oom_recovery runs the backward without DDP's hooks):
    one all-reduce per dtype over the gradients packed into one buffer; the step's `stats` ride
    in the float32 one (summed, not averaged). Returns them reduced."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {torch.float32: []}
    for p in params:
        if p.grad is None and p.requires_grad:  # unused on this rank: zeros, so every rank packs the same layout
            p.grad = torch.zeros_like(p)
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    reduced = stats
    for dtype, grads in by_dtype.items():
        flat = torch.cat([g.reshape(-1) for g in grads] + ([stats] if dtype == torch.float32 else []))
        torch_dist.all_reduce(flat)
        if dtype == torch.float32:
            flat, reduced = flat[:-2], flat[-2:]
        flat.div_(world)
        if grads:
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])
    return reduced


class StatsCarrier:
    """A DDP communication hook: DDP's own averaging all-reduce of each gradient bucket, with the
    step's [global weight, non-finite flag] appended to the first float32 bucket reduced in the
    step, so exact normalisation costs no collective of its own (issue #17: a separate blocking
    all-reduce per step cost 16-30% on 2-process gloo). Eager steps only (a captured step keeps
    its one in-graph all-reduce)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.pending: torch.Tensor | None = None   # set just before the synced backward
        self.reduced: torch.Tensor | None = None   # summed over ranks, once the bucket is reduced

    def hook(self, state, bucket):  # (no annotations: DDP checks them, and this module's are strings)
        buf = bucket.buffer()
        carry, self.pending = (self.pending, None) if self.pending is not None and buf.dtype == torch.float32 \
            else (None, self.pending)
        buf.div_(self.world)  # DDP's default: average (pre-divided, as allreduce_hook does)
        packed = buf if carry is None else torch.cat([buf, carry.float()])  # (summed, not averaged)
        fut = torch_dist.all_reduce(packed, async_op=True).get_future()

        def unpack(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()[0]
            if carry is None:
                return out
            self.reduced = out[-2:]
            return out[:-2]

        return fut.then(unpack)


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
        # a weight below 1 (or a tensor: unknown) lets a step's total weight fall below the world
        # size, and the normalising factor world / total rise above 1 (see TrainStep.optimizer_step)
        self.may_be_below_one = False

    def __call__(self, outputs: Any, batch: Any, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """`n`: the batch's sample count when the caller already has it (default weight)."""
        out = self.loss_fn(outputs, batch)
        if isinstance(out, dict):
            if "loss" not in out:
                raise ConfigError("the loss function returned a dict without a 'loss' entry")
            parts = {k: v for k, v in out.items() if k not in ("loss", "weight") and isinstance(v, torch.Tensor)}
            loss, weight = out["loss"], out.get("weight")
        else:
            loss, weight, parts = out, None, {}
        if weight is None:
            weight = batch_size_of(batch) if n is None else n
        if isinstance(weight, torch.Tensor):
            self.may_be_below_one = True
            return loss, weight.to(device=loss.device, dtype=torch.float32, non_blocking=True), parts
        w = self._weights.get(weight)
        if w is None:
            self.may_be_below_one |= not weight >= 1  # (NaN included)
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
        self.norm_type = tc.track_grad_norm  # 0: off; else the last step's global norm is logged (logged_values)
        self.grad_norm: torch.Tensor | None = None
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # a fused optimizer takes a device-side found_inf flag: a non-finite step is skipped with no host sync
        self.device_skip = bool(optimizer.defaults.get("fused"))
        self.use_graphs = wrapped.use_graphs and self.device_skip
        if wrapped.use_graphs and not self.device_skip:
            log.warning("trainer.cuda_graphs=true ignored: the optimizer has no fused kernel, so a non-finite step "
                        "can only be skipped from the host; running eagerly")
        self.autocast = precision.autocast(cache=not self.use_graphs)  # one object, re-entered
        self.graphs: graphs.StepGraphs | None = None  # built at the first step (after a checkpoint load)
        self.ema: EMA | None = None  # trainer.ema_decay: averaged after each applied step (inside the graph)
        self.part_names: list[str] = []
        # trainer.oom_recovery: each loader batch is cut into `splits` micro-batches (doubled after an
        # out-of-memory error that every rank agreed on; checkpointed, so a resume keeps it)
        self.oom_recovery, self.splits = tc.oom_recovery, 1
        self.set_accumulation(tc.accumulate_grad_batches)
        self.agree_group = host_group(env) if tc.oom_recovery and env.distributed else None
        self.step_number: Callable[[], int] = lambda: -1  # the trainer's global step, for messages
        # DDP (eager): the step's [global weight, non-finite flag] ride in the gradient all-reduce
        self.carrier = StatsCarrier(env.world_size) if wrapped.ddp and not self.use_graphs else None
        self.attach(wrapped.train_module)
        self.reduced: torch.Tensor | None = None  # [total, bad] over every rank, when carried
        # FSDP (eager): the same stats, all-reduced asynchronously during the last backward (FSDP2's
        # reduce-scatter has no cheap place to carry them; overlapped, the step never waits on them alone)
        self.in_flight: tuple[torch.Tensor, Any] | None = None
        # DDP ranks must take the same decision on the normalising pass's second check (their verdicts
        # are not agreed afterwards): any rank's weights below 1, agreed at each logging step (agree)
        self.ranks_below_one = True
        self.one = torch.ones(1, device=device)  # the unscale factor of the plain non-finite check

    def attach(self, ddp_module: nn.Module) -> None:
        """Register the stats carrier on a (new) DDP module (freezing.py builds new ones)."""
        if self.carrier is not None and not self.oom_recovery:
            ddp_module.register_comm_hook(None, self.carrier.hook)

    def set_accumulation(self, accumulate: int) -> None:
        """trainer.accumulate_grad_batches (changed by the batch-size finder, tuning.py). One
        micro-batch in one process needs no normalisation: the loss's own mean has the right gradient."""
        self.base_normalise = self.env.world_size > 1 or accumulate > 1
        self.set_splits(self.splits)

    def set_splits(self, splits: int) -> None:
        self.splits = splits
        self.normalise = self.base_normalise or splits > 1

    def __call__(self, batches: list[Any], sizes: list[int] | None = None) -> tuple[list[tuple], torch.Tensor]:
        """`sizes`: each batch's sample count, when the caller counted them already (the trainer's meter)."""
        if self.oom_recovery:
            return self.recovering_step(batches)
        if self.use_graphs and self.graphs is None:
            graphs.make_capturable(self.optimizer, self.device)
            self.graphs = graphs.StepGraphs(self.packed_step, self.device, self.wrapped.ddp)
        if self.graphs is None:
            return self.device_step(batches, sizes=sizes)
        packed = self.graphs(batches)
        k, names = len(batches), self.part_names
        parts = {p: packed[(2 + j) * k:(3 + j) * k] for j, p in enumerate(names)}
        return [(packed[:k], packed[k:2 * k], parts)], packed[-1]

    def recovering_step(self, batches: list[Any]) -> tuple[list[tuple], torch.Tensor]:
        """trainer.oom_recovery: the step with every loader batch cut into `splits` micro-batches;
        after an out-of-memory error on any rank (agreed on every rank), nothing is applied, memory
        is freed, the micro-batch halves (splits double) and the same step runs again."""
        while True:
            micro = [m for b in batches for m in split_batch(b, self.splits)] if self.splits > 1 else batches
            done = self.device_step(micro, recover=True)
            if done is not None:
                return done
            if max(batch_size_of(m) for m in micro) <= 1:  # (a rank deciding alone: its peers hear it, recipe.guarded)
                raise UserError(f"out of memory in step {self.step_number() + 1} even with a micro-batch of 1 "
                                "sample (trainer.oom_recovery): the model does not fit; use a smaller model, "
                                "trainer.precision=bf16-mixed, trainer.gradient_checkpointing=true or more GPUs")
            self.set_splits(self.splits * 2)
            per = max(batch_size_of(b) for b in batches)
            if self.env.is_main:  # every rank took the same decision: say it once
                log.warning(f"out of memory in step {self.step_number() + 1} on rank(s) {self.oom_ranks}: "
                            "micro-batch "
                        f"halved to {math.ceil(per / self.splits)} sample(s), {len(batches) * self.splits} "
                            "micro-batches per step (same global batch and gradient); retrying the step")

    def device_step(self, batches: list[Any], recover: bool = False,
                    sizes: list[int] | None = None) -> tuple[list[tuple], torch.Tensor] | None:
        """Forward/backward of every micro-batch (DDP and FSDP sync on the last only), then the
        optimizer step. Device work only, so it can be captured in a CUDA graph. With `recover`
        (oom_recovery) no collective runs inside forward/backward: the ranks first agree that none
        ran out of memory (None when one did), then DDP's gradients are all-reduced."""
        w = self.wrapped
        items, last = [], len(batches) - 1
        overlap, self.in_flight = w.sharded and self.graphs is None, None  # (never inside a graph capture)
        if recover and w.ddp:  # no_sync forwards stop DDP's buffer broadcast: ask for it as a synced step would
            w.train_module.require_forward_param_sync = True
        try:
            for j, batch in enumerate(batches):
                if w.sharded and last:  # FSDP's no_sync: reduce-scatter on the last micro-batch only
                    w.model.set_requires_gradient_sync(j == last)
                with w.train_module.no_sync() if w.ddp and (j < last or recover) else _NO_CONTEXT:
                    if w.mark_compiled_steps:
                        torch.compiler.cudagraph_mark_step_begin()
                    with self.autocast:
                        outputs = self.forward_fn(w.train_module, batch)
                        loss, weight, parts = self.unpack(outputs, batch, sizes[j] if sizes else None)
                    objective = loss if loss.dtype == torch.float32 else loss.float()
                    if self.normalise:
                        objective = objective * weight
                    if j == last and not recover and (self.carrier is not None or overlap):
                        stats = local_stats([*items, (loss, weight)])
                        if self.carrier is not None:  # DDP: the synced backward's all-reduce carries them
                            self.carrier.pending = stats
                        else:  # FSDP: reduced while the last backward runs, waited for at the optimizer step
                            self.in_flight = stats, torch_dist.all_reduce(stats, async_op=True)
                    (self.scaler.scale(objective) if self.scaler else objective).backward()
                loss = loss.detach()
                if parts:
                    parts = {name: v.detach() for name, v in parts.items()}
                if w.mark_compiled_steps:  # graph-tree outputs are overwritten by the next replay
                    loss, parts = loss.clone(), {name: v.clone() for name, v in parts.items()}
                items.append((loss, weight, parts))
            out_of_memory = False
        except torch.OutOfMemoryError:
            if not recover:
                raise
            out_of_memory = True
        if recover:
            if self.agree_out_of_memory(out_of_memory):
                items = outputs = loss = objective = parts = None  # noqa: F841  (drop the graph's references)
                self.optimizer.zero_grad(set_to_none=True)
                free_memory(self.device)
                return None
            if w.ddp:
                self.reduced = all_reduce_mean(self.params, self.env.world_size, local_stats(items))
        elif self.carrier is not None:
            self.reduced, self.carrier.reduced = self.carrier.reduced, None
        return items, self.optimizer_step(items)

    def agree_out_of_memory(self, mine: bool) -> bool:
        """Whether any rank ran out of memory in this step (every rank gets the same answer). A
        host-side collective on a gloo group: no device sync, and no rank is left waiting inside a
        forward or backward, because none runs a collective there in this mode."""
        if self.agree_group is None:
            self.oom_ranks = [0] if mine else []
            return mine
        flags = torch.zeros(self.env.world_size)
        flags[self.env.rank] = float(mine)
        torch_dist.all_reduce(flags, group=self.agree_group)  # host-side agreement (CPU tensor, gloo)
        self.oom_ranks = [r for r, f in enumerate(flags.tolist()) if f > 0]
        return bool(self.oom_ranks)

    def host_flags(self) -> dict[str, float]:
        """Summed over the ranks with a logging step's statistics (RunningStats.window)."""
        return {"weights_below_one": float(self.unpack.may_be_below_one)}

    def agree(self, window: tuple[dict[str, float], list[float]]) -> tuple[dict[str, float], list[float]]:
        """A logging step's statistics (returned as they are): every rank learns whether some rank's
        loss weights may be below 1, on the same step."""
        self.ranks_below_one = window[0]["weights_below_one"] > 0
        return window

    def logged_values(self) -> dict[str, torch.Tensor]:
        """Device values a logging step reads with its statistics (one host sync for all)."""
        return {"grad_norm": self.grad_norm} if self.grad_norm is not None else {}

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
        dev, env, scaler, sharded = self.device, self.env, self.scaler, self.wrapped.sharded
        if self.reduced is not None:  # already reduced with the gradients (DDP's carrier, oom_recovery)
            stats, self.reduced = self.reduced, None
        elif self.in_flight is not None:  # FSDP: launched before the last backward
            stats, work = self.in_flight
            self.in_flight = None
            work.wait()  # (gloo: normally done already; NCCL: the stream waits, not the host)
        elif env.distributed:  # one device-side reduce (world > 1 always normalises); DDP already averaged the grads
            stats = local_stats(window)
            torch_dist.all_reduce(stats)
        else:  # one process: the losses join the gradients' non-finite check below (fewer ops: #17)
            stats = None
        if stats is not None:
            total = stats[0]
        else:
            total = None if not self.normalise else window[0][1] if len(window) == 1 else \
                torch.stack([it[1] for it in window]).sum()
        overflow: list[torch.Tensor] = []  # fp16: the scaler's overflow flag per device (its own skip, not bad)
        if scaler:
            scaler.unscale_(self.optimizer)
            overflow = list(scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values())
        grads = [fsdp.local(p.grad) for p in self.params if p.grad is not None] if sharded else \
            [p.grad for p in self.params if p.grad is not None]
        # fp32 losses, after the gradients: the kernel groups by the first tensor's dtype, and CUDA's has no bf16
        losses = [it[0] if it[0].dtype == torch.float32 else it[0].float() for it in window] if stats is None else []
        # the check multiplies in place: by the normalising factor for the gradients, by 1 for the losses
        found = torch.zeros((), device=dev)  # a gradient or (one process) a loss not finite (0-dim, as the scaler's)
        # the gradient pass's own flag where it needs its own verdict: FSDP's shards (agreed over the
        # ranks) and a scaler's gradients (its unscale_ checked them: only what normalising made overflow)
        grad_flag = torch.zeros((), device=dev) if scaler or sharded else found
        check = torch._amp_foreach_non_finite_check_and_unscale_
        if total is not None and grads:  # normalise and check in one pass over the gradients
            check(grads, grad_flag, (env.world_size / total.clamp_min(1e-12)).float().reshape(1))
            # the check reads its input: a factor above 1 (weights >= 1 keep it <= 1) can overflow a finite
            # gradient, so read the output too; DDP ranks decide alike (their verdicts are not agreed after)
            if self.ranks_below_one if env.distributed and not sharded else self.unpack.may_be_below_one:
                check(grads, grad_flag, self.one)
            if losses:
                check(losses, found, self.one)
        elif losses or (grads and scaler is None):  # a factor of 1: exact, and ~20x cheaper on CPU than an inf-norm
            check((grads if scaler is None else []) + losses, found, self.one)
        if sharded:  # each rank checked its own shards: one verdict for all ranks, the scaler's overflow
            #          included (every rank skips it and keeps the same loss scale)
            verdict = torch.stack([grad_flag, *(inf.reshape(()) for inf in overflow)])
            torch_dist.all_reduce(verdict, op=torch_dist.ReduceOp.MAX)
            grad_flag = verdict[0]
            for i, inf in enumerate(overflow):
                inf.copy_(verdict[1 + i].reshape(inf.shape))
        overflowed = torch.stack([inf.to(dev).reshape(()) for inf in overflow]).amax() if overflow else None
        if overflowed is not None:  # a gradient the scaler found overflowing is its skip, not a non-finite step
            grad_flag = grad_flag * (overflowed == 0)
        bad = found
        if stats is not None:
            bad = torch.maximum(bad, torch.isnan(stats[1]).float())
        if grad_flag is not found:
            bad = torch.maximum(bad, grad_flag)
        norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0 else None
        if self.norm_type:  # trainer.track_grad_norm: the clipping's norm when it is the same type (pre-clip)
            self.grad_norm = fsdp.full(norm if norm is not None and self.norm_type == 2 else nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None], self.norm_type))  # (FSDP: a replicated DTensor)
        not_applied = bad
        if scaler:
            for inf in overflow:
                inf.copy_(torch.maximum(inf, bad.to(inf.device)))  # a non-finite loss skips the step too
            not_applied = torch.maximum(overflowed, bad)  # + overflow skips
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
