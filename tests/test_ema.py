"""trainer.ema_decay: the average follows its formula, skips steps that were not applied, is what
validation, best.ckpt, model.safetensors and load_model use, replays inside a captured step, and
is the same under DDP and FSDP (the SIGKILL/resume case is in test_resume.py)."""
import json

import pytest
import torch

from tests.conftest import torchrun
from tests.fake_cuda import FakeCUDA, lr_tensors
from tests.test_faults import mse, run_poisoned
from tests.test_fsdp import FSDP, assert_close
from tests.toy import ToyData, make_trainer
from trainlib import Config, DataConfig, OptimConfig, Trainer, TrainerConfig, checkpoint, load_model
from trainlib.loggers import TIMING_KEYS


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_follows_its_formula_and_ignores_steps_not_applied(tmp_path, warmup):
    torch.manual_seed(0)
    start = {k: v.double() for k, v in torch.nn.Linear(4, 1).state_dict().items()}  # run_poisoned's model
    t, rec = run_poisoned(tmp_path, "e", "skip", max_epochs=2, ema_decay=0.9, ema_warmup=warmup)
    ema, n = dict(start), 0
    for step in sorted(rec.after):
        if step in rec.poisoned:  # not applied: neither the weights nor their average moved
            continue
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        ema = {k: d * ema[k] + (1 - d) * v.double() for k, v in rec.after[step][0].items()}
        n += 1
    assert len(rec.poisoned) == 2 and n == 14 and float(t.ema.updates) == 14  # 16 steps, 2 poisoned
    for name, shadow in zip(t.ema.names, t.ema.shadow):
        assert torch.allclose(shadow.double(), ema[name], atol=1e-6, rtol=0), name
    assert not torch.allclose(t.ema.shadow[0], t.model.weight)  # an average, not the last weights


def test_validation_best_checkpoint_export_and_load_model_use_the_averaged_weights(tmp_path):
    common = [f"trainer.out_dir={tmp_path}", "optim.name=adamw", "optim.lr=0.05"]
    t = make_trainer(common + ["trainer.run_name=ema", "trainer.max_epochs=3", "trainer.ema_decay=0.8"], ToyData(64))
    t.fit()
    run = tmp_path / "ema"
    best = checkpoint.load(run / "checkpoints" / "best.ckpt")
    averaged = best["ema"]["weights"]
    assert set(averaged) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not torch.equal(averaged["0.weight"], best["model"]["0.weight"])  # the file holds both
    from safetensors.torch import load_file

    exported = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in averaged.items())
    loaded = load_model(run / "checkpoints" / "best.ckpt", model=make_trainer(common).model)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in averaged.items())
    # the validation loss that chose best.ckpt is the averaged weights' loss: a run without EMA that
    # starts from that file (weights_only takes the average) scores exactly the same
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best_loss = min(r["loss"] for r in rows if r["split"] == "val")
    plain = make_trainer(common + ["trainer.run_name=plain", f"trainer.ckpt_path={run / 'checkpoints' / 'best.ckpt'}"])
    plain.load_checkpoint(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert plain.evaluate("val")["val/loss"] == best_loss


def test_the_average_replays_inside_a_captured_step(tmp_path, monkeypatch):
    common = [f"trainer.out_dir={tmp_path}", "trainer.max_epochs=6", "log.every_n_steps=3", "optim.name=adamw",
              "trainer.ema_decay=0.9", "trainer.ema_warmup=true", "trainer.nonfinite=skip"]
    eager = make_trainer(common + ["trainer.run_name=e"], ToyData(100))
    lr_tensors(eager.optimizer)
    eager.fit()
    t = make_trainer(common + ["trainer.run_name=g"], ToyData(100))
    fake = FakeCUDA(t)
    fake.install(monkeypatch.setattr)
    t.fit()
    assert fake.captures == 2 and fake.replays > t.global_step // 2
    assert float(t.ema.updates) == float(eager.ema.updates) == t.global_step
    for a, b in zip(eager.ema.shadow, t.ema.shadow):
        assert torch.equal(a, b)
    rows = lambda tr: [{k: v for k, v in r.items() if k not in TIMING_KEYS}  # noqa: E731
                       for r in map(json.loads, (tr.run_dir / "metrics.jsonl").read_text().splitlines())]
    assert rows(eager) == rows(t)


def test_the_average_is_the_same_under_ddp_and_fsdp(tmp_path):
    flags = ["optim.name=adamw", "trainer.accumulate_grad_batches=2", "trainer.ema_decay=0.9", "trainer.max_epochs=2"]
    out = {}
    for name, extra in (("ddp", []), ("fsdp", FSDP)):
        r = torchrun(2, ["tests/toy.py", str(tmp_path / name), f"trainer.out_dir={tmp_path / 'runs'}",
                         f"trainer.run_name={name}", *flags, *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = torch.load(tmp_path / name / "weights.pt")
    assert {k for k in out["fsdp"] if k.startswith("ema.")} == {"ema.0.weight", "ema.0.bias", "ema.2.weight",
                                                                  "ema.2.bias"}
    assert_close(out["ddp"], out["fsdp"])
    saved = checkpoint.load(tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt")["ema"]["weights"]
    assert all(torch.equal(v, out["fsdp"][f"ema.{k}"]) for k, v in saved.items())  # gathered whole


def test_ema_decay_bounds():
    from trainlib import ConfigError

    with pytest.raises(ConfigError, match="config key 'trainer.ema_decay': expected a value in \\[0, 1\\), got 1.0"):
        Trainer(torch.nn.Linear(2, 1), mse, config=Config(trainer=TrainerConfig(ema_decay=1.0)))
