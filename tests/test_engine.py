"""The loop: accumulation equivalence, schedules, checkpoints, early stopping, run directories."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tests.toy import ToyData, make_trainer
from trainlib import ConfigError, DataConfig, OptimConfig, Trainer, TrainerConfig
from trainlib.checkpoint import CheckpointError
from trainlib.config import Config
from trainlib.data import ShardSampler
from trainlib.optim import LRSchedule


def weights(t):
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def assert_same(a, b, atol=1e-6):
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


def test_accumulation_equals_large_batch_including_short_last_window(tmp_path):
    # 100 samples: batch 32 gives windows of 32, 32, 32, 4; batch 8 x 4 micro-steps gives 13 micro-batches:
    # windows 4, 4, 4, 1 -> the short last window must be normalised by its own (smaller) weight.
    data = ToyData(100)
    big = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=3", "data.batch_size=32",
                        "trainer.run_name=big"], data)
    big.fit()
    acc = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=3", "data.batch_size=8",
                        "trainer.accumulate_grad_batches=4", "trainer.run_name=acc"], data)
    assert acc.steps_per_epoch == big.steps_per_epoch == 4
    acc.fit()
    assert_same(weights(big), weights(acc))
    # and the result is not trivially equal to the initial weights
    fresh = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=fresh"], data)
    assert not torch.allclose(weights(fresh)["0.weight"], weights(acc)["0.weight"])


def test_accumulation_with_grad_clip_and_adamw_matches(tmp_path):
    data = ToyData(64)
    common = [f"trainer.out_dir={tmp_path}", "trainer.max_epochs=2", "optim.name=adamw", "optim.lr=0.01",
              "trainer.grad_clip=0.5"]
    big = make_trainer(common + ["data.batch_size=16", "trainer.run_name=a"], data)
    big.fit()
    acc = make_trainer(common + ["data.batch_size=4", "trainer.accumulate_grad_batches=4", "trainer.run_name=b"], data)
    acc.fit()
    assert_same(weights(big), weights(acc), atol=1e-5)


def test_sampler_shards_are_disjoint_and_reshuffle_each_epoch():
    s0, s1 = ShardSampler(40, 0, 2, seed=3), ShardSampler(40, 1, 2, seed=3)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 20 and not set(a) & set(b) and set(a) | set(b) == set(range(40))
    s0.set_epoch(1)
    assert list(s0) != a and len(set(list(s0))) == 20
    # uneven: padded so both ranks take the same number of steps
    u0, u1 = ShardSampler(41, 0, 2), ShardSampler(41, 1, 2)
    assert len(u0) == len(u1) == 21 and set(u0) | set(u1) == set(range(41))
    # evaluation: no padding, every sample exactly once
    e0, e1 = ShardSampler(41, 0, 2, shuffle=False, pad=False), ShardSampler(41, 1, 2, shuffle=False, pad=False)
    assert sorted(list(e0) + list(e1)) == list(range(41))
    # resume offset skips consumed samples instead of replaying them
    s = ShardSampler(40, 0, 2, seed=3)
    full = list(s)
    s.skip(6)
    assert list(s) == full[6:]


def test_grouped_sampler_gives_every_rank_one_group_per_step():
    """group_size = batch 3 x world 2 x accumulation 2: every step's micro-batches on both ranks
    share one key; each epoch is still a permutation (leftovers at its end) and reshuffles."""
    n, bs, world, k = 61, 3, 2, 2
    keys = [i % 4 if i < 50 else 9 for i in range(n)]  # four big groups and one of 11
    size = bs * world * k
    samplers = [ShardSampler(n, r, world, seed=7, groups=keys, group_size=size) for r in range(world)]
    orders = []
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shares = [list(s) for s in samplers]
        assert len(shares[0]) == len(shares[1]) == 31
        assert set(shares[0] + shares[1]) == set(range(n))  # 62 = 61 + one wrapped to even the ranks
        full_steps = sum(keys.count(key) // size for key in set(keys))  # 4: one run of 12 from each big group
        assert full_steps == 4
        for step in range(full_steps):
            window = [i for share in shares for i in share[step * bs * k : (step + 1) * bs * k]]
            assert len({keys[i] for i in window}) == 1, (epoch, step, window)
        orders.append(shares[0])
        # the same order on every construction: any rank can recompute it (resume, other ranks)
        again = ShardSampler(n, 0, world, seed=7, groups=keys, group_size=size)
        again.set_epoch(epoch)
        assert list(again) == shares[0]
        again.skip(5)  # a resume mid-epoch continues the same grouped order
        assert list(again) == shares[0][5:]
    assert orders[0] != orders[1]
    # without grouping the same seed gives mixed windows
    plain = [list(ShardSampler(n, r, world, seed=7)) for r in range(world)]
    assert any(len({keys[i] for share in plain for i in share[lo : lo + bs * k]}) > 1 for lo in range(0, 24, bs * k))
    with pytest.raises(ValueError, match="3 group keys for 61 samples"):
        ShardSampler(n, groups=[0, 1, 2], group_size=4)


def test_schedules():
    def lrs(sched, steps, **kw):
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        s = LRSchedule(opt, OptimConfig(lr=1.0, scheduler=sched, **kw), total_steps=steps, steps_per_epoch=5)
        out = [s.lrs[0]]
        for _ in range(steps):
            s.step()
            out.append(s.lrs[0])
        return out, s

    cos, _ = lrs("cosine", 10, warmup_steps=2, min_lr=0.1)
    assert cos[0] == pytest.approx(0.5) and cos[1] == pytest.approx(1.0)
    assert cos[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert cos[10] == pytest.approx(0.1)
    # linear with a 10% warmup: after the warmup, transformers' get_linear_schedule_with_warmup exactly
    lin, _ = lrs("linear", 20, warmup_ratio=0.1)
    assert lin[0] == pytest.approx(0.5) and lin[1] == pytest.approx(1.0) and lin[20] == 0.0
    assert all(lin[k] == pytest.approx((20 - k) / 18) for k in range(2, 21))
    step, _ = lrs("step", 12, step_size=1, gamma=0.5)  # decay every epoch = 5 steps
    assert step[4] == 1.0 and step[5] == 0.5 and step[10] == 0.25
    one, _ = lrs("onecycle", 10)
    assert one[0] == pytest.approx(1 / 25) and one[3] == pytest.approx(1.0) and one[10] == pytest.approx(1 / 25 / 1e4)
    _, plateau = lrs("plateau", 1, plateau_patience=1, plateau_factor=0.1)
    for v in (1.0, 1.0, 1.0):
        plateau.on_validation(v)
    assert plateau.lrs[0] == pytest.approx(0.1)


def test_scheduler_steps_once_per_optimizer_step(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=2", "data.batch_size=4",
                      "trainer.accumulate_grad_batches=3", "optim.scheduler=cosine"], ToyData(48))
    t.fit()
    assert t.global_step == 2 * 4 and t.schedule.step_count == t.global_step


def test_checkpoint_roundtrip_and_resume_equals_uninterrupted(tmp_path):
    data = ToyData(64)
    full = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=4", "trainer.run_name=full",
                         "optim.name=adamw", "optim.scheduler=cosine"], data)
    full.fit()
    half = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=2", "trainer.run_name=part",
                         "optim.name=adamw", "optim.scheduler=cosine"], data)
    # same schedule length as the full run, so the lr curve is the same
    half.schedule.total = full.schedule.total
    half.fit()
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 16 and state["epoch_done"]
    assert set(state) >= {"model", "optimizer", "schedule", "scaler", "rng", "callbacks", "config", "version"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    rest = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=4", "trainer.run_name=part",
                         "trainer.resume=auto", "optim.name=adamw", "optim.scheduler=cosine"], data)
    rest.fit()
    assert rest.global_step == 32
    for k, v in weights(full).items():
        assert torch.equal(v, rest.model.state_dict()[k]), k  # bit-identical at an epoch boundary
    hist = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3]


def test_run_directory_contract(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=2", "trainer.run_name=r",
                      "trainer.save_top_k=2"], ToyData(32))
    t.fit()
    run = tmp_path / "r"
    for f in ("config.yaml", "metrics.jsonl", "train.log", "history.json", "model.safetensors",
              "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / f).is_file(), f
    topk = sorted(p.name for p in (run / "checkpoints").glob("epoch=*"))
    assert len(topk) <= 2 and all("val_loss=" in n for n in topk)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "val"}
    assert all({"step", "epoch", "split"} <= set(r) for r in rows)
    from safetensors.torch import load_file

    exported = load_file(str(run / "model.safetensors"))
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["model"]
    assert set(exported) == set(best) and all(torch.equal(exported[k], best[k]) for k in best)
    # a second run in the same directory refuses instead of mixing two runs
    with pytest.raises(ConfigError, match="already holds a run.*trainer.resume=auto.*trainer.overwrite=true"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=r"], ToyData(32)).fit()
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_keep_last_k_keeps_the_newest_periodic_saves_across_a_resume(tmp_path):
    """8 steps an epoch, a save every 3 steps and at epoch ends: steps 3, 6, 8 | 9, 12, 15, 16.
    keep_last_k=3 keeps the newest three, also after a resume (the list is in the checkpoint)."""
    common = [f"trainer.out_dir={tmp_path}", "trainer.ckpt_every_n_steps=3", "trainer.keep_last_k=3",
              "trainer.run_name=k", "optim.name=adamw"]
    steps = lambda: sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("step=*"))  # noqa: E731
    make_trainer(common + ["trainer.max_epochs=1"], ToyData(64)).fit()
    assert steps() == ["step=00000003.ckpt", "step=00000006.ckpt", "step=00000008.ckpt"]
    full = make_trainer(common + ["trainer.max_epochs=2", "trainer.resume=auto"], ToyData(64))
    full.fit()
    assert steps() == ["step=00000012.ckpt", "step=00000015.ckpt", "step=00000016.ckpt"]
    folder = tmp_path / "k" / "checkpoints"
    assert (folder / "step=00000016.ckpt").read_bytes() == (folder / "last.ckpt").read_bytes()
    for n in (12, 15):
        assert torch.load(folder / f"step={n:08d}.ckpt", weights_only=True)["global_step"] == n
    # going back to an older save and training on lands on the same weights
    again = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=back", "optim.name=adamw",
                          "trainer.max_epochs=2", f"trainer.resume={folder / 'step=00000012.ckpt'}"], ToyData(64))
    again.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    # without last.ckpt the epoch-end saves are written as step files directly
    make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=n", "trainer.save_last=false",
                  "trainer.keep_last_k=1", "trainer.max_epochs=2"], ToyData(64)).fit()
    assert [p.name for p in (tmp_path / "n" / "checkpoints").glob("step=*")] == ["step=00000016.ckpt"]
    assert not (tmp_path / "n" / "checkpoints" / "last.ckpt").exists()
    with pytest.raises(ConfigError, match="config key 'trainer.keep_last_k': expected a count >= 0, or -1 for all, got -2"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.keep_last_k=-2"], ToyData(64))


def test_early_stopping_and_nonfinite(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=50", "optim.lr=0.0",
                      "trainer.early_stop_patience=2", "trainer.run_name=es"], ToyData(32))
    t.fit()  # lr 0: the val loss never improves after the first validation
    assert t.epoch == 3 and "did not improve for 2 validations" in t.stop_reason

    def nan_loss(out, batch):
        return (out * float("nan")).mean()

    cfg = Config(trainer=TrainerConfig(max_epochs=5, out_dir=str(tmp_path), run_name="nan"), data=DataConfig(batch_size=8))
    cfg.log.loggers = ["jsonl"]
    x = torch.randn(32, 3)
    t = Trainer(nn.Linear(3, 1), nan_loss, TensorDataset(x, x), config=cfg)
    t.fit()
    # the first step's loss is NaN: stopped at the logging step (the epoch's last), naming step 1; the
    # unfinished epoch's end (validation, epoch-end save) is not run, so the epoch counter stays at 0
    assert t.epoch == 0 and t.global_step == 4 and "non-finite loss or gradient at step 1" in t.stop_reason
    assert t.skipped_steps == 4 and all(torch.isfinite(p).all() for p in t.model.parameters())


def test_fast_dev_run_writes_no_checkpoints(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.fast_dev_run=true", "trainer.run_name=f"], ToyData(64))
    t.fit()
    assert t.global_step == 1 and not list((tmp_path / "f" / "checkpoints").iterdir())


def test_limit_batches_and_max_steps(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.limit_train_batches=0.5", "trainer.max_epochs=2",
                      "trainer.run_name=a"], ToyData(64))
    assert t.steps_per_epoch == 4
    t.fit()
    assert t.global_step == 8
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_steps=5", "trainer.max_epochs=9",
                      "trainer.run_name=b"], ToyData(64))
    t.fit()
    assert t.global_step == 5


def test_corrupt_and_foreign_checkpoints(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1", "trainer.run_name=c"], ToyData(32))
    t.fit()
    good = (tmp_path / "c" / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "trunc.ckpt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint {bad}: the file is truncated, corrupt"):
        t.load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="is not a trainlib checkpoint"):
        t.load_checkpoint(foreign)
    other = Trainer(nn.Linear(6, 1), lambda o, b: o.mean(), config=TrainerConfig(out_dir=str(tmp_path)))
    with pytest.raises(CheckpointError, match=r"does not fit this model.*missing \(2\): weight, bias.*unexpected \(4\)"):
        other.load_checkpoint(tmp_path / "c" / "checkpoints" / "last.ckpt")


def test_notebook_usage_learns(tmp_path):
    """Plain nn.Module + loss + datasets, one process, no torchrun."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like: needs the hidden layer
    train, val = TensorDataset(x[:500], y[:500]), TensorDataset(x[500:], y[500:])

    from trainlib import Metric

    class Accuracy(Metric):
        def __init__(self):
            super().__init__()
            self.add_state("correct", "sum")
            self.add_state("total", "sum")

        def update(self, out, batch):
            self.correct = self.correct + (out.argmax(1) == batch[1]).sum().double()
            self.total = self.total + len(batch[1])

        def compute_from(self, s):
            return {"acc": float(s["correct"] / s["total"])}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
    trainer = Trainer(model, lambda out, b: nn.functional.cross_entropy(out, b[1]), train, val,
                      config=TrainerConfig(max_epochs=30, out_dir=str(tmp_path), monitor="val/acc", mode="max"),
                      optim=OptimConfig(lr=0.01), data=DataConfig(batch_size=50), metrics=lambda: [Accuracy()])
    result = trainer.fit()
    assert result["val/acc"] > 0.9  # chance is 0.5


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_precisions_run_and_learn(tmp_path, precision):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=3", f"trainer.precision={precision}",
                      "optim.name=adamw", "optim.lr=0.02"], ToyData(64))
    before = t.evaluate("val")["val/loss"]
    after = t.fit()["val/loss"]
    assert after < 0.5 * before


def test_loggers_tensorboard_and_missing_wandb(tmp_path, monkeypatch):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1", "trainer.run_name=tb",
                      "log.loggers=[console,tensorboard]", "log.every_n_steps=2"], ToyData(32))
    t.fit()
    events = list((tmp_path / "tb" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=wb", "log.loggers=wandb"], ToyData(32))
    with pytest.raises(ConfigError, match="'wandb' but wandb is not installed: pip install wandb"):
        t.fit()


def test_max_time_stops_at_a_logging_step(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=100", "trainer.max_time=0.000001",
                      "log.every_n_steps=3"], ToyData(64))
    t.fit()
    assert t.global_step == 3 and "max_time" in t.stop_reason


def test_compile_keeps_checkpoint_keys_plain(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1", "trainer.compile=true",
                      "trainer.run_name=c"], ToyData(32))
    assert t.compiled is not t.model
    t.fit()
    state = torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_training_rows_carry_throughput(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1", "trainer.run_name=tp",
                      "log.every_n_steps=4", "data.batch_size=8"], ToyData(64))
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "tp" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8]
    for r in train:
        assert r["samples_per_s"] == pytest.approx(8 * r["steps_per_s"])
        assert r["step_ms"] == pytest.approx(1000 / r["steps_per_s"])
        assert 0.0 <= r["data_wait"] <= 1.0


def test_the_sampler_computes_the_epoch_order_once_per_epoch():
    from trainlib.data import ShardSampler

    s = ShardSampler(50, rank=1, world=2, shuffle=True, seed=3)
    calls = []
    share = s._share
    s._share = lambda: calls.append(1) or share()
    s.set_epoch(0)
    first = (len(s), list(s), len(s))
    s.set_epoch(1)
    second = list(s)
    assert len(calls) == 2 and first[0] == 25 and first[1] != second
    s.set_epoch(0)
    assert list(s) == first[1] and len(calls) == 3
