"""Wrapping the model for the run, in the one order that works:

    device and dtype -> SyncBatchNorm -> FSDP sharding (in place) -> torch.compile of the inner
    module -> DDP (on a side stream when the step is captured in a CUDA graph)

What is saved is always `Wrapped.model`, never a wrapper, so checkpoint keys stay plain (no
`module.` or `_orig_mod.`), and a file written under DDP resumes under FSDP and back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import torch
from torch import nn

from . import checkpoint, fsdp, graphs
from .config import TrainerConfig
from .dist import DistEnv
from .loggers import log


@dataclass
class Wrapped:
    model: nn.Module          # what is saved and exported (sharded in place under FSDP)
    compiled: nn.Module       # model or torch.compile(model): evaluation runs it
    train_module: nn.Module   # compiled or DDP(compiled): the training forward runs it
    ddp: bool
    sharded: bool
    use_graphs: bool          # trainer.cuda_graphs after what this run allows
    mark_compiled_steps: bool  # reduce-overhead graph trees: mark each step, clone their outputs
    param_groups: list | None = None
    notes: list[str] = field(default_factory=list)  # decisions for train.log

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model with plain keys. Under FSDP a collective that gathers it to rank 0 (the
        other ranks get {}): every rank must call it."""
        return fsdp.full_model_state(self.model) if self.sharded else self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Plain (float lrs, parameters by position) and whole: under FSDP gathered to rank 0."""
        state = fsdp.full_optimizer_state(self.model, optimizer) if self.sharded else optimizer.state_dict()
        return graphs.plain_optimizer_state(state) if state else state

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        load = (lambda sd: fsdp.load_model_state(self.model, sd)) if self.sharded else None
        checkpoint.load_model_state(self.model, state, source, load=load)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.sharded:
            fsdp.load_optimizer_state(self.model, optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def weights_finite(self) -> bool:
        """Every rank's parameters (its shards under FSDP) are finite. Host sync: checkpoint time only."""
        finite = torch.stack([fsdp.local(p).detach().isfinite().all() for p in self.model.parameters()]).all()
        if self.sharded:
            finite = finite.to(torch.int32)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)


def compile_mode(tc: TrainerConfig) -> str:
    return "default" if tc.compile is True else (tc.compile or "")


def wrap(model: nn.Module, tc: TrainerConfig, env: DistEnv, device: torch.device, param_dtype: torch.dtype,
         param_groups: list | None = None) -> Wrapped:
    mode = compile_mode(tc)
    use_graphs = False
    if tc.cuda_graphs:
        reason = graphs.why_not_graphable(device, tc.precision)
        if reason:
            log.warning(f"trainer.cuda_graphs=true ignored: {reason}; running eagerly")
        use_graphs = not reason
    model = model.to(device, dtype=param_dtype)
    ddp = env.distributed and tc.strategy == "ddp"
    sharded = env.distributed and tc.strategy == "fsdp"
    notes: list[str] = []
    if (ddp or sharded) and tc.sync_batchnorm:
        if device.type != "cuda":
            log.warning("trainer.sync_batchnorm=true ignored: SyncBatchNorm needs GPUs (NCCL)")
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if sharded:
        if use_graphs:
            log.warning("trainer.cuda_graphs=true ignored under trainer.strategy=fsdp: its all-gathers run "
                        "in module hooks that a whole-step capture does not support; running eagerly")
            use_graphs = False
        # in place: names and keys unchanged; the groups follow the parameters it replaces
        units, param_groups = fsdp.shard(model, tc.fsdp_min_params, param_groups)
        notes.append(f"trainer.strategy=fsdp: {len(units)} sharding unit(s) over {env.world_size} ranks: "
                     f"{', '.join(u or '<root>' for u in units[:8])}" + (" ..." if len(units) > 8 else ""))
    compiled = torch.compile(model, mode=None if mode == "default" else mode) if mode else model
    train_module: nn.Module = compiled
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        # whole-step capture needs DDP built on a side stream (PyTorch CUDA-graph notes)
        side = torch.cuda.stream(torch.cuda.Stream(device)) if use_graphs else contextlib.nullcontext()
        with side:
            train_module = nn.parallel.DistributedDataParallel(compiled, device_ids=ids,
                                                               find_unused_parameters=tc.find_unused_parameters)
        if use_graphs:
            torch.cuda.synchronize(device)
    marks = mode in ("reduce-overhead", "max-autotune") and device.type == "cuda"
    return Wrapped(model, compiled, train_module, ddp, sharded, use_graphs, marks, param_groups, notes)

