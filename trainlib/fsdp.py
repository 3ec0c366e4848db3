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
after): every submodule that holds at least `trainer.fsdp_min_params` parameters not already in
a smaller unit, innermost first, then the root for whatever is left (FSDP1's size-based policy).
"""
from __future__ import annotations

from typing import Any

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


def plan(model: nn.Module, min_params: int) -> list[tuple[str, nn.Module]]:
    """The sharding units, innermost first, the root ('') last. A container without a forward of
    its own (ModuleList, ModuleDict) cannot be a unit: its parameters go to the module using it."""
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


def shard(model: nn.Module, min_params: int, param_groups: list[dict] | None = None) -> tuple[list[str], list | None]:
    """fully_shard the units of `model` in place (see `plan`). Returns their names ('' = root)
    and `param_groups` (built from the model's parameters before) pointing at the sharded
    parameters: sharding swaps every parameter for a DTensor, by name."""
    fully_shard = _fsdp2().fully_shard
    by_name = _named_groups(model, param_groups) if param_groups else None
    units = plan(model, min_params)
    for _, module in units:
        fully_shard(module)
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


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, plain-keyed state on rank 0 (on the CPU); {} on the other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
    """Every rank holds the full state (each read the file): each keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`state` in optimizer.state_dict()'s layout (as saved by any strategy), sharded like the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[int(i)]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the positions of its state_dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise ConfigError("trainer.strategy=fsdp: the optimizer holds a parameter that is not in the model") from None
