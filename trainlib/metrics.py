"""Distributed-aware metrics: state lives in tensors, reduced across ranks once per evaluation.

A metric accumulates per-batch state with `update(outputs, batch)` (no host sync), then
`compute()` reduces its states across ranks (sum, or concatenation for metrics like AP that need
every score) and returns a dict of floats that is identical on every rank. Everything that ranks
decide from these values (best checkpoint, early stopping, plateau lr) is therefore the same on
every rank without further communication.

    class Accuracy(Metric):
        def __init__(self):
            super().__init__()
            self.add_state("correct", "sum"); self.add_state("total", "sum")
        def update(self, outputs, batch):
            self.correct += (outputs.argmax(1) == batch[1]).sum(); self.total += len(batch[1])
        def compute_from(self, s):
            return {"acc": (s["correct"] / s["total"]).item()}
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` (None: nothing yet) by more than `min_delta` in `mode` (min|max):
    the one rule early stopping, best/top-k checkpoints, plateau schedules and hyperopt share."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of per-rank varying length along dim 0 across ranks (rank order)."""
    world = _world()
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]  # host sync: evaluation only
    biggest = max(sizes)
    padded = t.new_zeros((biggest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)])


class Metric:
    """Base class. Subclasses call `add_state`, implement `update` and `compute_from`."""

    def __init__(self) -> None:
        self._states: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._lists: dict[str, list[torch.Tensor]] = {}

    def add_state(self, name: str, reduce: str, shape: tuple[int, ...] = ()) -> None:
        """reduce='sum': a float64 tensor of `shape` summed across ranks (starts at zeros, so a rank
        that saw no batch still reduces the right shape); reduce='cat': a list of tensors,
        concatenated along dim 0 across ranks."""
        if reduce not in ("sum", "cat"):
            raise ValueError(f"reduce must be 'sum' or 'cat', got {reduce!r}")
        self._states[name] = reduce
        self._shapes[name] = tuple(shape)
        if reduce == "cat":
            self._lists[name] = []
            setattr(self, name, self._lists[name])
        else:
            setattr(self, name, torch.zeros(self._shapes[name], dtype=torch.float64))

    def reset(self) -> None:
        for name, reduce in self._states.items():
            if reduce == "cat":
                self._lists[name].clear()
                setattr(self, name, self._lists[name])
            else:
                setattr(self, name, torch.zeros(self._shapes[name], dtype=torch.float64))

    def update(self, outputs: Any, batch: Any) -> None:
        raise NotImplementedError

    def compute_from(self, states: dict[str, torch.Tensor]) -> dict[str, float]:
        """Turn the globally reduced states into named floats."""
        raise NotImplementedError

    def compute(self, device: torch.device | None = None) -> dict[str, float]:
        """Reduce states across ranks (a collective: every rank must call it) and compute."""
        reduced = {}
        for name, reduce in self._states.items():
            value = getattr(self, name)
            if reduce == "sum":
                t = torch.as_tensor(value, dtype=torch.float64)
                if device is not None:
                    t = t.to(device)
                reduced[name] = all_reduce_sum(t).cpu()
            else:
                parts = [p.detach() for p in value]
                if parts:
                    local = torch.cat(parts)
                else:  # a rank with no batches still takes part in the gather
                    local = torch.empty(0)
                if device is not None:
                    local = local.to(device)
                reduced[name] = self._gather(local).cpu()
        return self.compute_from(reduced)

    @staticmethod
    def _gather(local: torch.Tensor) -> torch.Tensor:
        world = _world()
        if world == 1:
            return local
        # Ranks without data do not know the trailing shape; agree on it first.
        meta = [tuple(local.shape[1:]) if local.numel() else None, str(local.dtype) if local.numel() else None]
        metas: list[Any] = [None] * world
        dist.all_gather_object(metas, meta)
        known = next((m for m in metas if m[0] is not None), None)
        if known is None:
            return local
        if local.numel() == 0:
            local = torch.empty((0, *known[0]), dtype=getattr(torch, known[1].split(".")[-1]), device=local.device)
        return all_gather_cat(local)


class MeanMetric(Metric):
    """Weighted mean of a scalar (used for the validation loss)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.add_state("total", "sum")
        self.add_state("weight", "sum")

    def add(self, value: torch.Tensor, weight: torch.Tensor | float) -> None:
        self.total = self.total.to(value.device) + value.detach().double() * weight
        self.weight = self.weight.to(value.device) + torch.as_tensor(weight, device=value.device).double()

    def compute_from(self, s: dict[str, torch.Tensor]) -> dict[str, float]:
        w = float(s["weight"])
        return {self.name: float(s["total"]) / w if w > 0 else float("nan")}
