"""Wrapping the model for the run, in the one order that works:

    device and dtype -> SyncBatchNorm -> FSDP sharding (in place) -> torch.compile of the inner
    module -> DDP (on a side stream when the step is captured in a CUDA graph)

What is saved is always `Wrapped.model`, never a wrapper, so checkpoint keys stay plain (no
`module.` or `_orig_mod.`), and a file written under DDP resumes under FSDP and back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import activation_checkpointing, checkpoint, fsdp, graphs
from .config import TrainerConfig, compile_mode
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
    blocks: list[str] = field(default_factory=list)  # the recipe's blocks (FSDP units), by name
    # trainer.save_frozen=false: parameters frozen (requires_grad=False) since the model was wrapped,
    # i.e. as build_model loaded them; checkpoints leave them out (see checkpoint_model)
    frozen: set[str] = field(default_factory=set)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model with plain keys. Under FSDP a collective that gathers it to rank 0 (the
        other ranks get {}): every rank must call it."""
        return fsdp.full_model_state(self.model) if self.sharded else self.model.state_dict()

    def checkpoint_model(self) -> dict:
        """{"model": state, "frozen_left_out": keys} for a checkpoint: with trainer.save_frozen=false
        the state lacks the parameters frozen since the start (under FSDP they are not even
        gathered); a resume takes them from the model as built. One unfrozen at any save (a
        freezing schedule) is saved from then on. Collective under FSDP."""
        if not self.frozen:
            return {"model": self.state_dict(), "frozen_left_out": []}
        params = dict(self.model.named_parameters())
        self.frozen = {n for n in self.frozen if not params[n].requires_grad}
        leave = {k for n in self.frozen for k in _keys_of(self.model, n)}  # tied weights: every key
        every_frozen = not any(not p.requires_grad and n not in self.frozen for n, p in params.items())
        if self.sharded and every_frozen:  # (else gather all, drop below: frozen after training, kept)
            state = fsdp.full_model_state(self.model, skip_frozen=True)
        else:
            state = self.state_dict()
        return {"model": {k: v for k, v in state.items() if k not in leave}, "frozen_left_out": sorted(leave)}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Plain (float lrs, parameters by position) and whole: under FSDP gathered to rank 0."""
        state = fsdp.full_optimizer_state(self.model, optimizer) if self.sharded else optimizer.state_dict()
        return graphs.plain_optimizer_state(state) if state else state

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str, left_out: list[str] = ()) -> None:
        """`left_out`: keys the file declares it left out (trainer.save_frozen=false); they keep the
        model's own values (as built, or as trainer.ckpt_path set them)."""
        load = (lambda sd: fsdp.load_model_state(self.model, sd)) if self.sharded else None
        checkpoint.load_model_state(self.model, state, source, load=load, left_out=left_out)

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


def _keys_of(model: nn.Module, name: str) -> list[str]:
    """The state_dict keys of parameter `name`: more than one when it is shared (tied embeddings)."""
    target = model.get_parameter(name)
    return [k for k, p in model.named_parameters(remove_duplicate=False) if p is target]


def data_parallel(compiled: nn.Module, device: torch.device, find_unused: bool, use_graphs: bool) -> nn.Module:
    """DDP around the compiled module. Its reducer takes the parameters that require a gradient at
    construction: when that set changes, freezing.py builds a new one (its docstring says why)."""
    ids = [device.index] if device.type == "cuda" else None
    # whole-step capture needs DDP built on a side stream (PyTorch CUDA-graph notes)
    with torch.cuda.stream(torch.cuda.Stream(device)) if use_graphs else contextlib.nullcontext():
        ddp = nn.parallel.DistributedDataParallel(compiled, device_ids=ids, find_unused_parameters=find_unused)
    if use_graphs:
        torch.cuda.synchronize(device)
    return ddp


def wrap(model: nn.Module, tc: TrainerConfig, env: DistEnv, device: torch.device, param_dtype: torch.dtype,
         param_groups: list | None = None, blocks: Any = None) -> Wrapped:
    """`blocks`: the recipe's sharding plan (fsdp.resolve_blocks), checked under every strategy."""
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
    planned = fsdp.resolve_blocks(model, blocks) if blocks is not None else None  # after SyncBN swapped modules
    if tc.gradient_checkpointing:  # inside the FSDP units, under compile and DDP (torchtitan's order)
        notes.append(activation_checkpointing.note(activation_checkpointing.apply(planned)))
    frozen = set() if tc.save_frozen else {n for n, p in model.named_parameters() if not p.requires_grad}
    if sharded:
        if use_graphs:
            log.warning("trainer.cuda_graphs=true ignored under trainer.strategy=fsdp: its all-gathers run "
                        "in module hooks that a whole-step capture does not support; running eagerly")
            use_graphs = False
        # in place: names and keys unchanged; the groups follow the parameters it replaces
        policy = fsdp.mixed_precision(tc.precision)
        units, param_groups = fsdp.shard(model, tc.fsdp_min_params, param_groups, planned, policy)
        notes.append(f"trainer.strategy=fsdp: {len(units)} sharding unit(s) over {env.world_size} ranks"
                     f"{' (the recipe blocks)' if planned is not None else ''}: "
                     f"{', '.join(u or '<root>' for u in units[:8])}" + (" ..." if len(units) > 8 else ""))
        if policy is not None:
            notes.append("trainer.precision=bf16-mixed under FSDP: parameters all-gathered in bf16, gradients "
                         "reduce-scattered in fp32 (MixedPrecisionPolicy), autocast as without FSDP")
    if frozen:
        notes.append(f"trainer.save_frozen=false: {len(frozen)} frozen parameter(s) left out of checkpoints "
                     f"(model.safetensors stays complete)")
    compiled = torch.compile(model, mode=None if mode == "default" else mode) if mode else model
    train_module = data_parallel(compiled, device, tc.find_unused_parameters, use_graphs) if ddp else compiled
    marks = mode in ("reduce-overhead", "max-autotune") and device.type == "cuda"
    return Wrapped(model, compiled, train_module, ddp, sharded, use_graphs, marks, param_groups, notes,
                   [n for n, _ in planned or ()], frozen)

