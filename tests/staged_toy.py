"""A two-stage recipe for the stage tests: stage `first` trains the first layer (lr 0.05),
`second` the last one (lr 0.02), starting from first's final weights.

    python tests/staged_toy.py stage=all trainer.out_dir=... trainer.run_name=...
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.toy import ToyData, masked_mse, toy_forward, toy_model  # noqa: E402
from trainlib.config import DataConfig, opt  # noqa: E402
from trainlib.recipe import Recipe, exit_process, main  # noqa: E402
from trainlib.stages import Stage  # noqa: E402


@dataclass
class ModelConfig:
    dropout: float = opt(0.0, "dropout", ge=0, lt=1)


@dataclass
class Data(DataConfig):
    n: int = opt(64, "training samples", ge=8)


recipe = Recipe(
    name="staged", model_config=ModelConfig, data_config=Data,
    build_model=lambda cfg: toy_model(dropout=cfg.model.dropout),
    build_datasets=lambda cfg: {"train": ToyData(cfg.data.n, augment=True), "val": ToyData(32, seed=1)},
    loss=masked_mse, forward=toy_forward,
    defaults={"data.root": "unused", "trainer.max_epochs": 2, "optim.name": "adamw", "log.every_n_steps": 2,
              "trainer.ckpt_every_n_steps": 1, "log.loggers": ["jsonl"]},
    stages=[Stage("first", trains=["0"], overrides={"optim.lr": 0.05}),
            Stage("second", trains=["2"], overrides={"optim.lr": 0.02, "optim.scheduler": "cosine"})])

if __name__ == "__main__":
    exit_process(main(recipe))
