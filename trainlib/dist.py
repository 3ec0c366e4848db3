"""Process group from the torchrun environment, per-rank seeding, and small collectives.

One process without torchrun is world size 1 and needs no process group, so the same code runs
in a notebook, under `python -m`, and under `torchrun --nproc_per_node=N`.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def pick_device(spec: str, env: DistEnv) -> torch.device:
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={spec!r} but CUDA is not available here; use trainer.device=cpu or auto")
    if spec in ("auto", "cuda"):
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device(spec)


def group_options(device: torch.device, timeout_s: float) -> dict[str, Any]:
    """init_process_group's backend (gloo on CPU, NCCL on GPU), timeout and device; sets the CUDA
    device. The one place both the run's group and the Optuna study's renewable group come from."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # TRAINLIB_DIST_BACKEND=gloo lets several processes share one GPU (NCCL refuses that): tests
    backend = os.environ.get("TRAINLIB_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = device
    return kwargs


def init(device: torch.device, timeout_s: float) -> DistEnv:
    """Join the torchrun process group; no-op for one process."""
    env = env_from_torchrun()
    if env.world_size > 1 and not dist.is_initialized():
        kwargs = group_options(device, timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart not in (None, "0"):
            # An elastic restart: keep this attempt's keys apart from those the dead attempt left in
            # the store (seen here: the new group otherwise reads stale peer addresses and hangs).
            store, r, w = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                               timeout=kwargs["timeout"]))
            kwargs.update(store=dist.PrefixStore(f"trainlib/attempt_{restart}", store), rank=r, world_size=w)
        dist.init_process_group(**kwargs)
    return env


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (pickled; for small control data only)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int, rank: int) -> None:
    """Each rank draws its own random stream (dropout, augmentation) from seed + rank."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    """RNG states of python, numpy, torch and CUDA, as weights_only-loadable plain data."""
    np_state = np.random.get_state()
    state = {
        "python": _listify(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tupleify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupleify(x: Any) -> Any:
    return tuple(_tupleify(v) for v in x) if isinstance(x, list) else x
