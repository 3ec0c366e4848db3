"""trainer.strategy=fsdp: parameters, gradients and optimizer state sharded across the ranks with
PyTorch's FSDP2 (`fully_shard`), for models whose training state does not fit one device.

Why FSDP2 and not FSDP1's wrapper class: parameters stay the model's own (as DTensors), so module
names, `named_parameters()` and checkpoint keys are unchanged, and torch.compile sees the model.

Checkpoints are the same files as under DDP: the full, plain-keyed model state and the optimizer
state keyed by parameter position, gathered to rank 0 when saving and sharded again when
loading. A run can therefore resume under another strategy or world size, and
`trainlib.load_model` never needs a process group. Gathering the full state costs host memory
on rank 0 for the duration of a save; the models these recipes train fit that easily.

Sharding units (each one all-gathers its parameters just before its forward and frees them
after): the recipe's blocks when it names them (`Recipe.blocks`, e.g. the transformer layers: one
all-gather per layer is what overlaps communication with compute), else every submodule that
holds at least `trainer.fsdp_min_params` parameters not already in a smaller unit (FSDP1's
size-based policy); innermost first, then the root for whatever is left.

Precision: with trainer.precision=bf16-mixed the units all-gather bf16 copies of the fp32 shards
and reduce-scatter the gradients in fp32 (`MixedPrecisionPolicy`): half the all-gather bytes, no
bf16 rounding in the gradient sum. gloo does bf16 collectives too (torch >= 2.x), so the policy is
the same on CPU and GPU.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .config import ConfigError


def _fsdp2() -> Any:
    """The FSDP2 module: public from torch 2.6, under _composable before."""
    try:
        from torch.distributed import fsdp

        fsdp.fully_shard  # noqa: B018
        return fsdp
    except (ImportError, AttributeError):
        try:
            from torch.distributed._composable import fsdp

            return fsdp
        except ImportError:
            raise ConfigError(f"trainer.strategy=fsdp needs FSDP2 (torch >= 2.4); this is torch {torch.__version__}") from None


def resolve_blocks(model: nn.Module, blocks: Any) -> list[tuple[str, nn.Module]]:
    """The recipe's blocks (`blocks(model)` or a list: submodules or their dotted names) as
    (name, module) pairs in the model's post-order (innermost first, what fully_shard needs), or a
    ConfigError naming what is wrong. Checked under every strategy, so a bad plan fails on one
    process, not first on the multi-GPU job."""
    given = blocks(model) if callable(blocks) else blocks
    if isinstance(given, (str, nn.Module)) or not isinstance(given, Iterable):
        raise ConfigError(f"blocks: expected a list of submodules or their dotted names, got {type(given).__name__}")
    order = {id(m): i for i, (_, m) in enumerate(_post_order(model))}
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[int, tuple[str, nn.Module]] = {}
    for item in given:
        if isinstance(item, str):
            try:
                module = model.get_submodule(item)
            except AttributeError:
                raise ConfigError(f"blocks: the model has no submodule {item!r}") from None
        elif isinstance(item, nn.Module):
            module = item
        else:
            raise ConfigError(f"blocks: expected submodules or dotted names, got {type(item).__name__}")
        if id(module) not in names:
            raise ConfigError(f"blocks: a {type(module).__name__} that is not a submodule of the model "
                              f"(was it built again, or taken from another model?)")
        name = names[id(module)]
        if type(module).forward is nn.Module.forward:
            raise ConfigError(f"blocks: {name or '<root>'} is a {type(module).__name__}, a container without a "
                              f"forward of its own: name its elements instead (e.g. [*model.{name}])")
        if module is not model:  # the root is always the last unit
            found[id(module)] = (name, module)
    return sorted(found.values(), key=lambda nm: order[id(nm[1])])


def plan(model: nn.Module, min_params: int, blocks: list[tuple[str, nn.Module]] | None = None
         ) -> list[tuple[str, nn.Module]]:
    """The sharding units, innermost first, the root ('') last: `blocks` (resolve_blocks) when
    given, else by size. A container without a forward of its own (ModuleList, ModuleDict) cannot
    be a unit: its parameters go to the module using it."""
    if blocks is not None:
        return [*blocks, ("", model)]
    covered: set[int] = set()
    units: list[tuple[str, nn.Module]] = []
    for name, module in _post_order(model):
        if module is model or type(module).forward is nn.Module.forward:
            continue
        own = [p for p in module.parameters() if id(p) not in covered]
        if sum(p.numel() for p in own) >= min_params:
            covered.update(id(p) for p in own)
            units.append((name, module))
    return units + [("", model)]


def mixed_precision(precision: str) -> Any:
    """bf16-mixed: all-gather bf16 parameters, reduce gradients in fp32 (see the module doc); else
    None (32-true: nothing to cast; bf16-true: the parameters are bf16 already; 16-mixed keeps
    fp32 all-gathers: the GradScaler path is left as under DDP, and bf16 is the mode for sharding)."""
    if precision != "bf16-mixed":
        return None
    return _fsdp2().MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: nn.Module, min_params: int, param_groups: list[dict] | None = None,
          blocks: list[tuple[str, nn.Module]] | None = None, mp_policy: Any = None) -> tuple[list[str], list | None]:
    """fully_shard the units of `model` in place (see `plan`). Returns their names ('' = root)
    and `param_groups` (built from the model's parameters before) pointing at the sharded
    parameters: sharding swaps every parameter for a DTensor, by name."""
    fully_shard = _fsdp2().fully_shard
    by_name = _named_groups(model, param_groups) if param_groups else None
    units = plan(model, min_params, blocks)
    for _, module in units:
        fully_shard(module, **({"mp_policy": mp_policy} if mp_policy is not None else {}))
    if by_name:
        params = dict(model.named_parameters())
        param_groups = [{**g, "params": [params[n] for n in g["params"]]} for g in by_name]
    return [name for name, _ in units], param_groups


def _named_groups(model: nn.Module, groups: list) -> list[dict]:
    """Optimizer param groups (dicts, or one plain list of parameters) with parameter names in
    place of the parameters."""
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:
        params = list(g["params"])
        if any(id(p) not in names for p in params):
            raise ConfigError("param_groups: a group holds a parameter that is not in the model")
        out.append({**g, "params": [names[id(p)] for p in params]})
    return out


def _post_order(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        out += _post_order(child, f"{prefix}{name}.")
    out.append((prefix.rstrip("."), module))
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective when it is sharded or partial); the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_model_state(model: nn.Module, skip_frozen: bool = False) -> dict[str, torch.Tensor]:
    """The whole, plain-keyed state on rank 0 (on the CPU); {} on the other ranks. Collective.
    skip_frozen: without the parameters that have requires_grad=False, which are then never
    all-gathered (not only left out after the gather)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=skip_frozen))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state on rank 0 in `optimizer.state_dict()`'s own layout (parameters
    by position), so it loads into any run of the same model; {} on the other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name.get("param_groups"):
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every rank holds the full state (each read the file): each keeps its own shards. A key
    `state` lacks (a frozen parameter a checkpoint left out, checked by the caller) keeps the
    model's own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`state` in optimizer.state_dict()'s layout (as saved by any strategy), sharded like the model.
    A parameter the file has no state for (frozen so far: freezing.py) gets none, as in the run that
    wrote it: the loader first gives every parameter a state (a zero-gradient step), and by default
    refuses such a file and skips the state of parameters that do not require a gradient now."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[int(i)]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        set_optimizer_state_dict(model, optimizer, by_name,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    finally:
        for p in frozen:
            p.requires_grad_(False)
    for name, p in zip(names, params):
        if name not in by_name["state"]:
            optimizer.state.pop(p, None)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the positions of its state_dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise ConfigError("trainer.strategy=fsdp: the optimizer holds a parameter that is not in the model") from None
