"""The recipe contract: a separate evaluation forward (`predict`) and the complete recipe in docs/engine.md.

The "views" recipe below trains on 2 of 4 views and evaluates on all 4. Its data is built so that the
answer is exact: views 2 and 3 always point at the label (+3), views 0 and 1 point at the label for odd
samples and at a wrong class for even ones (+1). Whatever the learned (positive) scale, the training
forward (views 0-1) scores accuracy 0.5 and the all-view predict 1.0, so val/acc == 1.0 only if the
metrics saw predict's outputs. Run as a script it is the recipe's `main` (the 2-process test).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainlib import DataConfig, Metric, OptimConfig, Recipe, Trainer, TrainerConfig  # noqa: E402
from trainlib.config import ConfigError  # noqa: E402
from trainlib.recipe import exit_process, main  # noqa: E402

V, C = 4, 3  # views, classes


class Views(Dataset):
    def __init__(self, n: int) -> None:
        self.y = torch.arange(n) % C
        self.x = torch.zeros(n, V, C)
        for i, y in enumerate(self.y.tolist()):
            self.x[i, 2:, y] = 3.0
            self.x[i, :2, y if i % 2 else (y + 1) % C] = 1.0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


class ViewPool(nn.Module):
    """Mean over the views it is given, times a learned positive scale: argmax never depends on training."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1) * self.log_scale.exp()


def two_views(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"][:, :2])


calls: list[nn.Module] = []


def all_views(model: nn.Module, batch: dict) -> torch.Tensor:
    assert not model.training and not torch.is_grad_enabled(), "predict runs in eval mode, without grad"
    calls.append(model)
    return model(batch["x"])


def ce(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, batch["y"])


class Accuracy(Metric):
    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", "sum")
        self.add_state("total", "sum")

    def update(self, outputs: torch.Tensor, batch: dict) -> None:
        self.correct = self.correct + (outputs.argmax(-1) == batch["y"]).sum().double()
        self.total = self.total + len(batch["y"])

    def compute_from(self, s: dict) -> dict:
        return {"acc": float(s["correct"] / s["total"])}


@dataclass
class NoModelKeys:
    pass


recipe = Recipe(
    name="views", model_config=NoModelKeys, data_config=DataConfig, build_model=lambda cfg: ViewPool(),
    build_datasets=lambda cfg: {"train": Views(64), "val": Views(32)}, loss=ce,
    metrics=lambda cfg: [Accuracy()], forward=two_views, predict=all_views,
    make_synthetic=lambda root, cfg: None,  # the data is built in memory
    defaults={"optim.name": "sgd", "optim.lr": 0.5, "trainer.max_epochs": 2, "log.loggers": ["jsonl"],
              "trainer.monitor": "val/acc", "trainer.mode": "max"})


def views_trainer(tmp_path: Path, **kw) -> Trainer:
    return Trainer(ViewPool(), ce, Views(64), Views(32), config=TrainerConfig(max_epochs=2, out_dir=str(tmp_path)),
                   optim=OptimConfig(name="sgd", lr=0.5), data=DataConfig(batch_size=8), metrics=lambda: [Accuracy()],
                   forward_fn=two_views, **kw)


def expected_loss(model: ViewPool, views: int) -> float:
    d = Views(32)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(d.x[:, :views]), d.y))


def test_metrics_see_predict_and_the_loss_stays_the_training_forwards(tmp_path):
    assert views_trainer(tmp_path / "plain").fit()["val/acc"] == 0.5  # the training forward's known score
    calls.clear()
    t = views_trainer(tmp_path / "predict", predict_fn=all_views)
    result = t.fit()
    assert result["val/acc"] == 1.0
    assert calls and all(m is t.model for m in calls)  # the plain module, in eval mode, without grad
    assert t.model.training  # back to training mode after evaluation
    assert abs(result["val/loss"] - expected_loss(t.model, 2)) < 1e-6


def test_loss_from_predict_scores_the_loss_on_predicts_outputs(tmp_path):
    t = views_trainer(tmp_path, predict_fn=all_views, loss_from_predict=True)
    result = t.fit()
    assert result["val/acc"] == 1.0
    assert abs(result["val/loss"] - expected_loss(t.model, V)) < 1e-6


def val_rows(out: Path) -> list[dict]:
    (metrics,) = out.glob("*/metrics.jsonl")
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("split") == "val"]


def test_predict_under_two_processes_scores_what_one_process_scores(tmp_path):
    from tests.conftest import torchrun

    # 2 processes x batch 8 train the weights of 1 process x batch 16 (docs/engine.md)
    assert main(recipe, [f"trainer.out_dir={tmp_path / 'one'}", "data.batch_size=16"]) == 0
    r = torchrun(2, [str(Path(__file__).relative_to(ROOT)), f"trainer.out_dir={tmp_path / 'two'}",
                     "data.batch_size=8"])
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = val_rows(tmp_path / "one"), val_rows(tmp_path / "two")
    assert [row["acc"] for row in one] == [row["acc"] for row in two] == [1.0, 1.0]
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(one, two))


# ------------------------------------------------------------------------------------------------
# docs/engine.md "Writing a recipe": its complete recipe runs as it is printed

def doc_recipe() -> str:
    text = (ROOT / "docs" / "engine.md").read_text()
    m = re.search(r"<!-- test: engine-recipe -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/engine.md: no ```python block after <!-- test: engine-recipe -->"
    return m.group(1)


def test_the_recipe_in_docs_engine_md_runs_and_learns(tmp_path):
    code = doc_recipe()
    assert len(code.splitlines()) <= 80
    (tmp_path / "myrecipe.py").write_text(code)
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "myrecipe.py", f"trainer.out_dir={out}", "trainer.max_epochs=15"],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert val_rows(out)[-1]["acc"] > 0.9  # chance is 0.5


if __name__ == "__main__":
    exit_process(main(recipe))


def test_a_recipe_may_build_its_own_optimizer_and_scheduler(tmp_path):
    import dataclasses

    from trainlib.recipe import build_trainer, make_config

    seen = {}

    def build_scheduler(opt, total, cfg):
        seen["total"] = total
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))

    own = dataclasses.replace(recipe, build_optimizer=lambda params, cfg: torch.optim.RMSprop(params, lr=cfg.optim.lr),
                              build_scheduler=build_scheduler)
    cfg, _ = make_config(own, {}, "", [("trainer.out_dir", str(tmp_path)), ("optim.lr", "0.01")])
    t = build_trainer(own, cfg)
    assert isinstance(t.optimizer, torch.optim.RMSprop) and t.optimizer.defaults["lr"] == 0.01
    t.fit()
    assert seen["total"] == 16 and t.schedule.lrs == [pytest.approx(0.01 / 17)]  # 2 epochs x 8 steps


def test_a_recipe_without_a_loss_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"recipe 'views': give loss\(outputs, batch\) or build_loss\(cfg\); got neither"):
        Recipe(name="views", model_config=NoModelKeys, data_config=DataConfig, build_model=lambda cfg: ViewPool(),
               build_datasets=lambda cfg: {})
