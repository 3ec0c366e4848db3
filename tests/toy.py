"""A tiny regression problem and a script to train it under torchrun (used by the engine tests).

    torchrun --nproc_per_node=2 tests/toy.py OUT_DIR key=value ...
writes OUT_DIR/weights.pt (rank 0) and OUT_DIR/seen_rank<r>.json (sample ids per epoch).
"""
from __future__ import annotations

import json
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

    def __init__(self, n: int = 96, dim: int = 6, seed: int = 0) -> None:
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
        return {"x": self.x[i], "y": self.y[i], "valid": self.valid[i], "idx": torch.tensor(i)}


def toy_model(dim: int = 6) -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 1))


def toy_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"])


def masked_mse(out: torch.Tensor, batch: dict) -> dict:
    """Mean over VALID items only: the weight varies per batch, like PDAN's valid frames."""
    err = ((out - batch["y"]) ** 2).squeeze(-1) * batch["valid"]
    n = batch["valid"].sum()
    return {"loss": err.sum() / n, "weight": n}


def make_trainer(overrides: list[str], data: ToyData | None = None, **kw) -> Trainer:
    cfg = Config(data=DataConfig(batch_size=8), recipe="toy")
    cfg.optim.name = "sgd"
    cfg.optim.lr = 0.05
    cfg.optim.momentum = 0.0
    cfg.log.loggers = ["jsonl"]
    cfg.trainer.monitor = "val/loss"
    apply_overrides(cfg, overrides)
    data = data or ToyData()
    return Trainer(toy_model(), masked_mse, data, kw.pop("val_data", ToyData(32, seed=1)), config=cfg,
                   forward_fn=toy_forward, **kw)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    data = ToyData()
    trainer = make_trainer(sys.argv[2:], data)
    seen_by_epoch: dict[int, list[int]] = {}

    from trainlib.callbacks import Callback

    class Record(Callback):
        def on_train_epoch_end(self, t):
            seen_by_epoch[t.epoch] = list(data.seen)
            data.seen.clear()

    trainer.callbacks.append(Record())
    trainer.fit()
    rank = trainer.env.rank
    out.mkdir(parents=True, exist_ok=True)
    (out / f"seen_rank{rank}.json").write_text(json.dumps(seen_by_epoch))
    if rank == 0:
        torch.save(trainer.model.state_dict(), out / "weights.pt")
