"""The tune.* finders on the toy problem, under torchrun (used by tests/test_tuning.py).

    torchrun --nproc_per_node=2 tests/tuning_toy.py OUT_DIR [--oom-above=N] [--oom-rank=R] key=value ...

Rank R's model (every rank's without --oom-rank) raises torch.OutOfMemoryError for a batch of more
than N samples. Each rank writes OUT_DIR/tuned_rank<r>.json: the lr, batch size and accumulation it
trained with, and a checksum of its final weights.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.toy import ToyData, make_trainer, toy_model  # noqa: E402
from trainlib import dist  # noqa: E402


class OOMAbove(nn.Module):
    """`inner`, except that a batch of more than `limit` samples "runs out of memory" (on `ranks`,
    default every rank), as a CUDA allocation would: torch.OutOfMemoryError, raised in the forward."""

    def __init__(self, inner: nn.Module, limit: int, ranks: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.inner, self.limit, self.ranks = inner, limit, ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit and (self.ranks is None or dist.rank() in self.ranks):
            raise torch.OutOfMemoryError(f"CUDA out of memory: a batch of {x.shape[0]} samples (injected)")
        return self.inner(x)


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    limit, ranks, overrides = 10**9, None, []
    for a in argv[1:]:
        if a.startswith("--oom-above="):
            limit = int(a.split("=", 1)[1])
        elif a.startswith("--oom-rank="):
            ranks = (int(a.split("=", 1)[1]),)
        else:
            overrides.append(a)
    trainer = make_trainer(overrides, ToyData(96), OOMAbove(toy_model(), limit, ranks))
    trainer.fit()
    rank = trainer.env.rank
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tuned_rank{rank}.json").write_text(json.dumps({
        "rank": rank, "lr": trainer.cfg.optim.lr, "batch_size": trainer.cfg.data.batch_size,
        "accumulate": trainer.tc.accumulate_grad_batches, "train_batches": trainer.train_batches,
        "step": trainer.global_step,
        "weights": sum(float(v.double().sum()) for v in trainer.model.state_dict().values())}))


if __name__ == "__main__":
    from trainlib.recipe import exit_process, guarded

    exit_process(guarded(lambda: main(sys.argv[1:])))
