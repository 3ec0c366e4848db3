"""Named running statistics of the training loss, and the count of steps that were not applied.

Every step only appends references (its losses, weights, parts and skip flag): no tensor op and
no host sync. On a logging step the pending items are summed in one go, every quantity is
reduced across ranks in ONE all-reduce and read in ONE host sync, by name ("loss", "weight",
"part:<name>", ...), never by position. Everything here is checkpointed, so a resumed run logs
exactly the rows of the uninterrupted one.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as torch_dist

from .config import TrainerConfig
from .data import map_tensors
from .dist import DistEnv
from .loggers import log

SUMS = ("epoch_loss", "epoch_weight", "loss", "weight")  # loss*weight and weight of the epoch and of the window


def flat(values: list[torch.Tensor]) -> torch.Tensor:
    """Scalars (0-dim, or all of shape [1]) as one 1-D tensor: one stack, not a reshape per value
    (a window holds every micro-batch since the last logging step); mixed shapes: one reshape each."""
    try:
        return torch.stack(values).reshape(-1)
    except RuntimeError:  # stack needs equal shapes
        return torch.cat([v.reshape(-1) for v in values])


class RunningStats:
    def __init__(self, device: torch.device, env: DistEnv) -> None:
        self.device, self.env = device, env
        self.acc: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        """A new epoch: sums (finite items only), the window's loss parts, `pending` (loss, weight,
        parts) items not summed yet, and `skips`, each step's device flag "not applied"."""
        zero = lambda: torch.zeros((), device=self.device, dtype=torch.float64)  # noqa: E731
        self.acc = {**{k: zero() for k in SUMS}, "parts": {}, "pending": [], "skips": []}

    def add(self, items: list[tuple], skipped: torch.Tensor) -> None:
        self.acc["pending"].extend(items)
        self.acc["skips"].append(skipped)

    def fold(self) -> None:
        """Sum the pending micro-batches into the running sums (non-finite ones are left out)."""
        acc, pend = self.acc, self.acc["pending"]
        if not pend:
            return
        ws = flat([p[1] for p in pend]).double()
        contrib = flat([p[0] for p in pend]).double() * ws
        ok = torch.isfinite(contrib)
        c, w = torch.where(ok, contrib, 0).sum(), torch.where(ok, ws, 0).sum()
        for name, v in zip(SUMS, (c, w, c, w)):
            acc[name] += v
        for name in pend[0][2]:
            v = flat([p[2][name] for p in pend]).double() * ws
            acc["parts"][name] = acc["parts"].get(name, 0) + torch.where(ok, v, 0).sum()
        pend.clear()

    def window(self, same_on_every_rank: dict[str, torch.Tensor] | None = None,
               **flags: float) -> tuple[dict[str, float], list[float]]:
        """The logging window's sums over every rank by name ("loss", "weight", "part:<name>", and
        each of `flags`, e.g. signal=...: summed, so > 0 means "on some rank"), the device values in
        `same_on_every_rank` as they are (e.g. the global gradient norm), and each step's skip flag
        (already agreed by every rank). One all-reduce, one host sync; the window restarts."""
        self.fold()
        acc, parts, agreed = self.acc, sorted(self.acc["parts"]), same_on_every_rank or {}
        names = ["loss", "weight", *(f"part:{p}" for p in parts), *flags]
        host = torch.tensor([float(v) for v in flags.values()], device=self.device, dtype=torch.float64)
        stats = torch.cat([torch.stack([acc["loss"], acc["weight"], *(acc["parts"][p] for p in parts)]).double(), host])
        if self.env.distributed:
            torch_dist.all_reduce(stats)
        if agreed:
            stats = torch.cat([stats, torch.stack([v.detach().reshape(()).double() for v in agreed.values()])])
            names += list(agreed)
        skips = torch.stack(acc["skips"]).double().reshape(-1) if acc["skips"] else stats[:0]
        values = torch.cat([stats, skips]).tolist()  # host sync (logging step)
        acc["loss"].zero_()
        acc["weight"].zero_()
        acc["parts"].clear()
        acc["skips"].clear()
        return dict(zip(names, values)), values[len(names):]

    def epoch_loss(self) -> float:
        """The epoch's mean training loss over every rank (call after a logging step: nothing pending)."""
        stats = torch.stack([self.acc["epoch_loss"], self.acc["epoch_weight"]])
        if self.env.distributed:
            torch_dist.all_reduce(stats)
        s, w = stats.tolist()  # host sync (epoch end)
        return s / w if w > 0 else float("nan")

    def state_dict(self) -> dict:
        return map_tensors(self.acc, lambda t: t.detach().cpu())

    def load_state_dict(self, state: dict) -> None:
        acc = map_tensors(state, lambda t: t.to(self.device))
        acc["pending"] = [tuple(p) for p in acc["pending"]]  # tuples were saved as lists
        if "sums" in acc:  # written by trainlib 0.1.0: sums by position, one skip count
            sums, skipped = acc.pop("sums"), acc.pop("skipped", None)
            acc.update(zip(SUMS, sums[:4]))
            acc["skips"] = [skipped] if skipped is not None and float(skipped) > 0 else []
        self.acc = acc


class Throughput:
    """Speed and memory over a logging window: steps/s, samples/s (all ranks), step time, the share
    of wall time spent waiting for data, CUDA memory, and MFU when the GPU's peak is known. Host
    clocks and allocator counters only: nothing here waits for the device."""

    def __init__(self, device: torch.device, env: DistEnv, log_cfg: Any) -> None:
        self.device, self.world = device, env.world_size
        self.memory = bool(getattr(log_cfg, "log_gpu_memory", False)) and device.type == "cuda"
        self.restart(0.0)

    def restart(self, wait_s: float) -> None:
        self.t0, self.steps, self.samples, self.wait0 = time.time(), 0, 0, wait_s

    def add(self, samples: int) -> None:
        self.steps += 1
        self.samples += samples

    def read(self, wait_s: float, flops_per_sample: float | None, peak_flops: float | None) -> dict[str, float]:
        """The window's fields; the next window starts now."""
        elapsed, steps = max(time.time() - self.t0, 1e-9), max(self.steps, 1)
        row = {"steps_per_s": self.steps / elapsed, "samples_per_s": self.samples * self.world / elapsed,
               "step_ms": 1000 * elapsed / steps, "data_wait": (wait_s - self.wait0) / elapsed}
        if self.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30  # allocator stats: no sync
            if self.memory:  # log.log_gpu_memory
                row["mem_allocated_gb"] = torch.cuda.memory_allocated(self.device) / 2**30
                row["mem_reserved_gb"] = torch.cuda.memory_reserved(self.device) / 2**30
        if flops_per_sample and peak_flops:  # model FLOPs utilisation against the GPU's dense bf16 peak
            row["mfu"] = flops_per_sample * row["samples_per_s"] / self.world / peak_flops
        self.restart(wait_s)
        return row


def train_row(step: int, epoch: int, stats: dict[str, float], flags: list[float]) -> dict:
    """A training log row from a window's statistics: the weighted mean loss and parts (none when
    every step of the window was skipped: never a 0.0), and how many steps were not applied."""
    row: dict[str, Any] = {"step": step, "epoch": epoch, "split": "train"}
    if stats["weight"] > 0:
        row["loss"] = stats["loss"] / stats["weight"]
        row.update({p[5:]: v / stats["weight"] for p, v in stats.items() if p.startswith("part:")})
    if any(flags):
        row["skipped_steps"] = sum(f > 0 for f in flags)
    if "grad_norm" in stats:  # trainer.track_grad_norm: the last step's global norm
        row["grad_norm"] = stats["grad_norm"]
    return row


class NonFiniteSteps:
    """Counts the steps that were not applied (a non-finite loss or gradient) and decides what
    happens: trainer.nonfinite=stop ends the run naming the first one; skip says how many and
    goes on, until trainer.max_skipped_steps in a row. Decided from flags every rank agrees on."""

    def __init__(self, tc: TrainerConfig, is_main: bool = True) -> None:
        self.policy, self.limit, self.is_main = tc.nonfinite, tc.max_skipped_steps, is_main
        self.total = 0
        self.consecutive = 0

    def update(self, flags: list[float], last_step: int) -> str:
        """`flags`: the window's steps ending at `last_step`, 1 = not applied. Returns why the run
        must stop ('' to go on)."""
        first = None
        for j, f in enumerate(flags):
            if f > 0:
                self.total += 1
                self.consecutive += 1
                first = first or last_step - len(flags) + 1 + j
            else:
                self.consecutive = 0
        if first is None:
            return ""
        if self.policy == "stop":
            return (f"non-finite loss or gradient at step {first}; that update was not applied "
                    "(trainer.nonfinite=stop; trainer.nonfinite=skip skips such steps and goes on)")
        n = sum(f > 0 for f in flags)
        if self.is_main:  # every rank counts the same steps: say it once
            log.warning(f"skipped {n} step(s) with a non-finite loss or gradient up to step {last_step} "
                        f"(first: step {first}; {self.total} skipped in all, {self.consecutive} in a row)")
        if self.limit and self.consecutive >= self.limit:
            return (f"{self.consecutive} steps in a row had a non-finite loss or gradient "
                    f"(trainer.max_skipped_steps={self.limit}): training diverged or the data holds NaN/inf; "
                    "lower optim.lr or check the data")
        return ""

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.consecutive = state.get("total", 0), state.get("consecutive", 0)
