"""A tiny regression problem and a script to train it under torchrun (used by the engine tests).

    torchrun --nproc_per_node=2 tests/toy.py OUT_DIR key=value ...
writes OUT_DIR/weights.pt (rank 0) and OUT_DIR/seen_rank<r>.json (sample ids per epoch).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainlib import Config, DataConfig, Trainer  # noqa: E402
from trainlib.config import apply_overrides  # noqa: E402


class ToyData(Dataset):
    """y = x @ w_true + noise; each item also carries its index and a per-sample validity mask."""

    def __init__(self, n: int = 96, dim: int = 6, seed: int = 0, augment: bool = False, delay: float = 0.0,
                 ragged: bool = False) -> None:
        self.augment, self.delay = augment, delay
        # ragged: item i has 2 + i % 3 of the 4 positions (batched by `ragged_collate`, grouped by shape_keys)
        self.lengths = [2 + i % 3 if ragged else 4 for i in range(n)]
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, dim, generator=g)
        w = torch.randn(dim, 1, generator=torch.Generator().manual_seed(1234))  # the same task for every split
        self.y = self.x @ w + 0.05 * torch.randn(n, 4, 1, generator=g)
        self.valid = (torch.rand(n, 4, generator=g) > 0.3).float()
        self.valid[:, 0] = 1.0
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        self.seen.append(i)
        x = self.x[i]
        if self.augment:  # random draws from torch, numpy and python: all must replay exactly on resume
            import random

            import numpy as np

            x = x + 0.05 * torch.randn_like(x) + float(np.random.normal(0, 0.05)) + random.uniform(-0.05, 0.05)
        if self.delay:
            import time

            time.sleep(self.delay)
        n = self.lengths[i]
        return {"x": x[:n], "y": self.y[i, :n], "valid": self.valid[i, :n], "idx": torch.tensor(i)}

    def shape_keys(self) -> list[int]:
        return list(self.lengths)


def ragged_collate(items: list[dict]) -> dict:
    """Pad x, y and valid to the batch's longest item (padding is invalid: valid = 0)."""
    t = max(it["x"].shape[0] for it in items)
    pad = lambda v: torch.cat([v, v.new_zeros(t - v.shape[0], *v.shape[1:])])  # noqa: E731
    return {"x": torch.stack([pad(it["x"]) for it in items]), "y": torch.stack([pad(it["y"]) for it in items]),
            "valid": torch.stack([pad(it["valid"]) for it in items]), "idx": torch.stack([it["idx"] for it in items])}


def toy_model(dim: int = 6, dropout: float = 0.0, buffer_mb: int = 0) -> nn.Module:
    torch.manual_seed(123)
    layers = [nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 1)]
    if dropout:
        layers.insert(2, nn.Dropout(dropout))
    model = nn.Sequential(*layers)
    if buffer_mb:  # a large constant buffer makes checkpoint writes slow enough to be killed mid-write
        model.register_buffer("ballast", torch.arange(buffer_mb * 2**18, dtype=torch.float32))
    return model


class Block(nn.Module):
    """A residual block; remembers the dtype its weight had in the forward (FSDP's all-gathered copy)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.forward_dtype = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_dtype = str(self.lin.weight.dtype)
        return x + torch.tanh(self.lin(x))


class BlockNet(nn.Module):
    """stem -> 3 blocks -> head: the shape of a transformer, for sharding plans. freeze: the stem
    and the first block are frozen, like a pretrained part that build_model loads."""

    def __init__(self, dim: int = 6, width: int = 16, freeze: bool = False) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.stem = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(3)])
        self.head = nn.Linear(width, 1)
        if freeze:
            for p in [*self.stem.parameters(), *self.blocks[0].parameters()]:
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def toy_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"])


def masked_mse(out: torch.Tensor, batch: dict) -> dict:
    """Mean over VALID items only: the weight varies per batch, like PDAN's valid frames."""
    err = ((out - batch["y"]) ** 2).squeeze(-1) * batch["valid"]
    n = batch["valid"].sum()
    return {"loss": err.sum() / n, "weight": n}


def make_trainer(overrides: list[str], data: ToyData | None = None, model: nn.Module | None = None, **kw) -> Trainer:
    cfg = Config(data=DataConfig(batch_size=8), recipe="toy")
    cfg.optim.name = "sgd"
    cfg.optim.lr = 0.05
    cfg.optim.momentum = 0.0
    cfg.log.loggers = ["jsonl"]
    cfg.log.plots = False  # (matplotlib's import in every test process: tests/test_runs_tools.py checks plots)
    cfg.trainer.monitor = "val/loss"
    apply_overrides(cfg, overrides)
    data = data or ToyData()
    return Trainer(model or toy_model(), masked_mse, data, kw.pop("val_data", ToyData(32, seed=1)), config=cfg,
                   **{"forward_fn": toy_forward, **kw})


def split_toy_flags(argv: list[str]) -> tuple[dict[str, float], list[str]]:
    """--toy-NAME=VALUE flags (augment, dropout, delay, buffer_mb, n, val_n, ragged, freeze_last, lr_tensor, fake_graphs,
    blocks, freeze, oom_above, oom_step, oom_rank, count_all_reduce, overflow_step, overflow_rank) vs trainer overrides."""
    flags, rest = {}, []
    for a in argv:
        if a.startswith("--toy-"):
            k, v = a[len("--toy-"):].split("=", 1)
            flags[k.replace("-", "_")] = float(v)
        else:
            rest.append(a)
    return flags, rest


if __name__ == "__main__":
    out = Path(sys.argv[1])
    flags, overrides = split_toy_flags(sys.argv[2:])
    ragged = bool(flags.get("ragged", 0))
    data = ToyData(int(flags.get("n", 96)), augment=bool(flags.get("augment", 0)), delay=flags.get("delay", 0.0),
                   ragged=ragged)
    if "poison" in flags:  # --toy-poison=I: sample I's target is NaN (a non-finite loss on the rank that reads it)
        data.y[int(flags["poison"])] = float("nan")
    if "disk_full_step" in flags:  # --toy-disk_full_step=N: checkpoint writes from step N on fail with ENOSPC
        import errno

        from trainlib import checkpoint

        write = checkpoint.atomic_write_bytes

        def full_disk(path, payload):
            if str(path).endswith(".ckpt") and trainer.global_step >= int(flags["disk_full_step"]):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            write(path, payload)

        checkpoint.atomic_write_bytes = full_disk
    if flags.get("readonly"):  # --toy-readonly=1: the output folder is on a read-only file system
        import errno

        def read_only(self, *a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

        Path.mkdir = read_only
    model = toy_model(dropout=flags.get("dropout", 0.0), buffer_mb=int(flags.get("buffer_mb", 0)))
    kw: dict = {"collate_fn": ragged_collate} if ragged else {}
    if "val_n" in flags:  # --toy-val_n=N: a validation split of N samples (ranks may hold unequal batch counts)
        kw["val_data"] = ToyData(int(flags["val_n"]), seed=1)
    if flags.get("blocks"):  # --toy-blocks=1: BlockNet with its blocks as the plan; --toy-freeze=1: part frozen
        model = BlockNet(freeze=bool(flags.get("freeze", 0)))
        kw["blocks"] = lambda m: [*m.blocks]
    if flags.get("freeze_last"):  # two param groups: the last layer's lr is 0
        kw["param_groups"] = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.0}]
    if "oom_above" in flags:  # --toy-oom_above=N [--toy-oom_step=S --toy-oom_rank=R]: from step S on, rank R
        #                       "runs out of memory" (torch.OutOfMemoryError, as CUDA raises) on micro-batches > N
        def tight_memory(model, batch):
            if (model.training and trainer.env.rank == int(flags.get("oom_rank", 0))
                    and trainer.global_step + 1 >= flags.get("oom_step", 1)
                    and batch["x"].shape[0] > flags["oom_above"]):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return toy_forward(model, batch)

        kw["forward_fn"] = tight_memory
    if flags.get("count_all_reduce"):  # --toy-count_all_reduce=1: the size of every all_reduce, per rank
        import torch.distributed as torch_dist

        sizes: list[int] = []
        real_all_reduce = torch_dist.all_reduce

        def counted(tensor, *a, **k):
            sizes.append([tensor.numel(), bool(k.get("async_op"))])  # (size, launched asynchronously)
            return real_all_reduce(tensor, *a, **k)

        torch_dist.all_reduce = counted
    trainer = make_trainer(overrides, data, model, **kw)
    seen_by_epoch: dict[int, list[int]] = {}

    from trainlib.callbacks import Callback

    class Record(Callback):
        def on_train_epoch_end(self, t):
            seen_by_epoch[t.epoch] = list(data.seen)
            data.seen.clear()

    class Fault(Callback):
        """--toy-fail_step=N [--toy-fail_rank=R]: rank R raises at step N;
        --toy-die_once=1: instead it dies (os._exit) the first time, leaving a marker file."""

        def on_train_step_end(self, t):
            if t.global_step != int(flags.get("fail_step", -1)) or t.rank != int(flags.get("fail_rank", 0)):
                return
            if flags.get("die_once"):
                marker = out / "died_once"
                if not marker.exists():
                    out.mkdir(parents=True, exist_ok=True)
                    marker.write_text("x")
                    os._exit(3)
                return
            if flags.get("fail_user"):  # --toy-fail_user=1: bad input found on that rank only
                from trainlib.config import DataError

                raise DataError(f"sample file broken.npy: expected 4 frames (injected on rank {t.rank})")
            raise RuntimeError(f"injected failure on rank {t.rank} at step {t.global_step}")

    if "overflow_step" in flags:  # --toy-overflow_step=S [--toy-overflow_rank=R, -1: all]: fp16's scaler finds an
        #                            overflow at step S on rank R only (as in a gradient shard only R holds)
        real_unscale = trainer.scaler.unscale_

        def unscale(optimizer):
            real_unscale(optimizer)
            if trainer.global_step + 1 == int(flags["overflow_step"]) and \
                    int(flags.get("overflow_rank", 0)) in (-1, trainer.env.rank):
                for inf in trainer.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                    inf.fill_(1.0)

        trainer.scaler.unscale_ = unscale
    trainer.callbacks += [Record(), Fault()]
    if flags.get("lr_tensor") or flags.get("fake_graphs"):  # see tests/fake_cuda.py
        from tests.fake_cuda import FakeCUDA, lr_tensors

        lr_tensors(trainer.optimizer)
        if flags.get("fake_graphs"):
            fake = FakeCUDA(trainer)
            fake.install()

            class Report(Callback):
                def on_fit_end(self, t):
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"graphs_rank{t.rank}.json").write_text(json.dumps(
                        {"graphs": len(trainer.graphs.graphs), "captures": fake.captures, "replays": fake.replays}))

            trainer.callbacks.append(Report())

    def body():
        trainer.fit()
        rank = trainer.env.rank
        out.mkdir(parents=True, exist_ok=True)
        (out / f"seen_rank{rank}.json").write_text(json.dumps(seen_by_epoch))
        weights = trainer.model_state_dict()  # every rank: a gather under FSDP
        if trainer.ema is not None:  # the averaged weights too (a gather under FSDP)
            weights.update({f"ema.{k}": v for k, v in trainer.ema.state_dict()["weights"].items()})
        from trainlib.fsdp import local

        held = {"params": sum(local(p).numel() for p in trainer.model.parameters()),  # this rank's share
                "exp_avg": sum(local(s["exp_avg"]).numel() for s in trainer.optimizer.state.values() if "exp_avg" in s)}
        if isinstance(trainer.model, BlockNet):  # the weights' dtype inside the forward
            held["forward_dtype"] = [b.forward_dtype for b in trainer.model.blocks]
        (out / f"held_rank{rank}.json").write_text(json.dumps(held))
        if flags.get("count_all_reduce"):
            (out / f"all_reduce_rank{rank}.json").write_text(json.dumps(sizes))
        end = {"step": trainer.global_step, "stop_reason": trainer.stop_reason, "scale": trainer.scaler.get_scale()}
        (out / f"end_rank{rank}.json").write_text(json.dumps(end))
        if rank == 0:
            torch.save(weights, out / "weights.pt")

    from trainlib.recipe import exit_process, guarded

    exit_process(guarded(body))
