"""The tune.* finders (issue #12): the LR range test and the batch-size finder (trainlib/tuning.py).

- on a quadratic whose best step size is known from the data, the suggested lr is within 2x of it;
- after the finders the weights, the optimizer state, the EMA and every RNG are bit-identical to
  before, and a run with auto_lr_find trains exactly like a run given the suggested lr;
- lr_find.csv / lr_find.png / the run directory's config.yaml say what was found;
- the batch-size finder's power and binsearch modes against a model that "runs out of memory"
  above 24 samples, the accumulation that keeps tune.global_batch;
- under torchrun (2 processes) every rank gets the same lr and the same batch size, also when only
  one rank runs out of memory;
- the refusals: FSDP with several processes, optim.lr=0.
"""
from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from tests.conftest import torchrun
from tests.toy import ToyData, make_trainer, toy_model
from tests.tuning_toy import OOMAbove
from trainlib import Config, DataConfig, Trainer, dist, tuning
from trainlib.config import ConfigError
from trainlib.dist import DistEnv


def _same_rng(a: dict, b: dict) -> bool:
    return (a["python"] == b["python"] and torch.equal(a["numpy"]["keys"], b["numpy"]["keys"])
            and a["numpy"]["pos"] == b["numpy"]["pos"] and torch.equal(a["torch"], b["torch"]))


# ------------------------------------------------------------------------------------------------
# LR range test


def test_suggestion_is_within_2x_of_the_best_step_of_a_quadratic(tmp_path):
    """Least squares y ~ x @ w (no bias, from w = 0) trained by plain full-batch gradient descent
    (SGD without momentum, one batch = the whole set, so every step is exact). The loss is
    mean((x w - y)^2), its Hessian H = 2/n x^T x; the design is orthogonal (x^T x = n I), so every
    direction has the same curvature L = 2 (computed from the data below) and the best step size is
    1/L: it reaches the minimum in one step (larger ones overshoot, beyond 2/L they diverge).

    In the sweep the loss falls where the lrs applied so far add up to about 1/L, and the loss of
    step k is measured before step k's update; with a sweep that grows the lr ~1.8x per step (20
    steps over 1e-4..10) these two offsets nearly cancel and the steepest descent of the smoothed
    loss sits at ~1/L (0.97/L here). A finer sweep finds the steepest descent lower, at a fraction of
    1/L (a 100-step sweep over the same range: ~0.2/L), the known reason the rule errs on the safe
    side. A wrong rule fails this: the point of lowest smoothed loss, the first or the last lr, an
    lr not applied to the groups (the loss would not move: no suggestion at all)."""
    n, d = 256, 4
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    x = q * n ** 0.5
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=g,
                                                                                    dtype=torch.float64)
    top = torch.linalg.eigvalsh(2 / n * x.T @ x).max().item()
    best_lr = 1 / top
    assert abs(top - 2) < 1e-6

    model = nn.Linear(d, 1, bias=False)
    nn.init.zeros_(model.weight)
    cfg = Config(data=DataConfig(batch_size=n))
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum = "sgd", 0.01, 0.0
    cfg.tune.auto_lr_find, cfg.tune.lr_find_min, cfg.tune.lr_find_max, cfg.tune.lr_find_steps = True, 1e-4, 10.0, 20
    cfg.trainer.out_dir = str(tmp_path)
    trainer = Trainer(model, lambda out, batch: nn.functional.mse_loss(out, batch[1]),
                      TensorDataset(x.float(), y.float()), config=cfg)
    trainer.state.run_dir = tmp_path
    res = tuning.lr_range_test(trainer)
    assert res.suggestion is not None, res.reason
    assert best_lr / 2 <= res.suggestion <= 2 * best_lr, (res.suggestion, best_lr)
    lowest = res.lrs[min(range(len(res.lrs)), key=lambda i: res.smoothed[i])]
    assert not best_lr / 2 <= lowest <= 2 * best_lr, "the test would not tell the rules apart"
    assert trainer.cfg.optim.lr == res.suggestion == trainer.schedule.lrs[0] == trainer.optimizer.param_groups[0]["lr"]


def test_finders_put_weights_optimizer_ema_and_rng_back(tmp_path):
    t = make_trainer(["optim.name=adamw", "trainer.ema_decay=0.9", "tune.auto_lr_find=true", "tune.lr_find_steps=12",
                      "tune.auto_scale_batch_size=binsearch", "tune.batch_size_max=32", "tune.batch_size_trials=2"],
                     ToyData(96), toy_model(dropout=0.2))
    t.state.run_dir = tmp_path
    t.step(list(t.loaders["train"])[:1])  # one real step: Adam and the EMA hold state the finders must put back
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    opt = copy.deepcopy(t.optimizer.state_dict())
    ema = copy.deepcopy(t.ema.state_dict())
    rng = dist.rng_state()
    base_lr = t.cfg.optim.lr

    found = tuning.before_fit(t)

    assert found["batch_size"].batch_size == 32 and t.cfg.data.batch_size == 32
    res = found["lr"]
    assert res.suggestion is not None and len(set(res.losses)) > 1  # it did train during the sweep
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    now = t.optimizer.state_dict()
    assert now["state"].keys() == opt["state"].keys()
    for i, st in opt["state"].items():
        for k, v in st.items():
            assert torch.equal(now["state"][i][k], v), (i, k)
    factor = t.cfg.optim.lr / base_lr
    for g_now, g_then in zip(now["param_groups"], opt["param_groups"]):
        assert g_now["lr"] == g_then["lr"] * factor and g_now["initial_lr"] == g_then["initial_lr"] * factor
        assert {k: v for k, v in g_now.items() if k not in ("lr", "initial_lr")} == \
            {k: v for k, v in g_then.items() if k not in ("lr", "initial_lr")}
    after = t.ema.state_dict()
    assert after["updates"] == ema["updates"] == 1.0
    assert all(torch.equal(after["weights"][k], v) for k, v in ema["weights"].items())
    assert _same_rng(dist.rng_state(), rng)
    assert all(p.grad is None for p in t.model.parameters())


def test_lr_find_writes_its_curve_updates_the_config_and_trains_like_the_suggested_lr(tmp_path):
    common = [f"trainer.out_dir={tmp_path}", "trainer.max_epochs=2", "optim.name=adamw", "optim.scheduler=cosine"]
    found = make_trainer([*common, "trainer.run_name=found", "tune.auto_lr_find=true", "tune.lr_find_steps=30",
                          "tune.lr_find_min=1e-5", "tune.lr_find_max=10"], model=toy_model(dropout=0.2))
    found.fit()
    lr = found.cfg.optim.lr
    assert lr != 0.05
    run = tmp_path / "found"
    rows = list(csv.DictReader((run / "lr_find.csv").open()))
    assert list(rows[0]) == ["step", "lr", "loss", "smoothed"]
    text = (run / "train.log").read_text()
    line = next(x for x in text.splitlines() if "auto_lr_find: suggested lr" in x)
    assert f"suggested lr {lr:.1e}" in line and f"over {len(rows)} steps" in line and "lr_find.png" in line
    assert len(rows) == 30 or (len(rows) < 30 and "stopped early: " in line), (len(rows), line)
    assert float(rows[0]["lr"]) == 1e-5 and [int(r["step"]) for r in rows] == list(range(len(rows)))
    assert (run / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == lr

    given = make_trainer([*common, "trainer.run_name=given", f"optim.lr={lr!r}"], model=toy_model(dropout=0.2))
    given.fit()
    a, b = found.model_state_dict(), given.model_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "a run with auto_lr_find must train like one given its lr"
    assert not torch.equal(a["0.weight"], toy_model().state_dict()["0.weight"])


def test_no_suggestion_keeps_optim_lr_and_says_why(tmp_path):
    """A sweep that diverges at once (lrs from 1e3 up) stops after two steps: too few points."""
    t = make_trainer(["tune.auto_lr_find=true", "tune.lr_find_min=1e3", "tune.lr_find_max=1e6"], ToyData(48))
    t.state.run_dir = tmp_path
    res = tuning.lr_range_test(t)
    assert res.suggestion is None and "usable point" in res.reason, res
    assert res.stopped.startswith("the smoothed loss passed 4x its best") or "not finite" in res.stopped
    assert t.cfg.optim.lr == 0.05 and t.optimizer.param_groups[0]["lr"] == 0.05
    assert len(list(csv.DictReader((tmp_path / "lr_find.csv").open()))) == len(res.lrs) < 100


# ------------------------------------------------------------------------------------------------
# Batch-size finder


def test_batch_finder_power_and_global_batch_through_fit(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=power", "trainer.max_epochs=1",
                      "tune.auto_scale_batch_size=power", "tune.global_batch=64"], ToyData(96),
                     OOMAbove(toy_model(), 24))
    t.fit()
    assert (t.cfg.data.batch_size, t.tc.accumulate_grad_batches) == (16, 4)
    assert t.train_batches == t.state.train_batches == 6 and t.steps_per_epoch == 2 and t.global_step == 2
    assert t.step.normalise
    saved = yaml.safe_load((tmp_path / "power" / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 16 and saved["trainer"]["accumulate_grad_batches"] == 4
    line = next(x for x in (tmp_path / "power" / "train.log").read_text().splitlines() if "auto_scale_batch_size" in x)
    assert "data.batch_size=16" in line and "largest tried: 32" in line and "accumulate_grad_batches=4" in line


def test_batch_finder_binsearch_refines_between_the_last_fit_and_the_first_failure():
    t = make_trainer(["tune.auto_scale_batch_size=binsearch"], ToyData(96), OOMAbove(toy_model(), 24))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    res = tuning.find_batch_size(t)
    assert res.batch_size == t.cfg.data.batch_size == 24 and res.failed == 25
    assert res.tried == [8, 16, 32, 24, 28, 26, 25]
    assert t.tc.accumulate_grad_batches == 1 and t.train_batches == len(t.loaders["train"]) == 4
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())


def test_batch_finder_caps_and_halves():
    t = make_trainer(["tune.auto_scale_batch_size=true", "tune.batch_size_max=20"], ToyData(96))
    assert tuning.find_batch_size(t).tried == [8, 16, 20] and t.cfg.data.batch_size == 20
    t = make_trainer(["tune.auto_scale_batch_size=true", "data.batch_size=64"], ToyData(96), OOMAbove(toy_model(), 12))
    res = tuning.find_batch_size(t)
    assert res.tried == [64, 32, 16, 8] and res.batch_size == 8 and res.failed == 16


# ------------------------------------------------------------------------------------------------
# Two processes


def test_two_processes_agree_on_lr_and_batch_when_only_rank_1_runs_out_of_memory(tmp_path):
    out = tmp_path / "out"
    r = torchrun(2, ["tests/tuning_toy.py", str(out), "--oom-above=12", "--oom-rank=1",
                     f"trainer.out_dir={tmp_path}/runs", "trainer.run_name=two", "trainer.max_epochs=1",
                     "data.batch_size=4", "tune.auto_scale_batch_size=binsearch", "tune.auto_lr_find=true",
                     "tune.lr_find_steps=20", "tune.lr_find_min=1e-5", "tune.lr_find_max=10"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"tuned_rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["batch_size"] == ranks[1]["batch_size"] == 12  # 4, 8, 16 (rank 1: no), 12, 14, 13
    assert ranks[0]["lr"] == ranks[1]["lr"] != 0.05
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] == 4 and ranks[0]["step"] == 4
    assert ranks[0]["weights"] == ranks[1]["weights"]
    saved = yaml.safe_load((tmp_path / "runs" / "two" / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 12 and saved["optim"]["lr"] == ranks[0]["lr"]


# ------------------------------------------------------------------------------------------------
# Refusals


def test_batch_finder_refuses_fsdp_with_several_processes():
    t = make_trainer(["tune.auto_scale_batch_size=true", "trainer.strategy=fsdp"])
    t.env = DistEnv(rank=0, local_rank=0, world_size=2)  # (the check runs before any collective)
    with pytest.raises(ConfigError, match=r"tune.auto_scale_batch_size cannot run under trainer.strategy=fsdp "
                                          r"with 2 processes: FSDP's forward all-gathers"):
        tuning.before_fit(t)
    assert t.cfg.data.batch_size == 8


def test_lr_find_refuses_optim_lr_zero():
    t = make_trainer(["tune.auto_lr_find=true", "optim.lr=0"])
    with pytest.raises(ConfigError, match=r"tune.auto_lr_find needs optim.lr > 0 \(got optim.lr=0\)"):
        tuning.before_fit(t)
