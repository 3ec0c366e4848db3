"""Preemption (SIGTERM), a rank that raises, elastic restarts, non-finite losses."""
import json
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tests.test_resume import command, compare, finish, start, wait_for
from trainlib import Callback, DataConfig, LogConfig, OptimConfig, Trainer, TrainerConfig, checkpoint
from trainlib.callbacks import ModelCheckpoint


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_at_a_step_boundary_and_resume_is_exact(tmp_path, nproc):
    ref_out, ref_dir = tmp_path / "ref_out", tmp_path / "runs" / "ref"
    finish(start(command(nproc, ref_out, ref_dir, [])))

    out, run_dir = tmp_path / "out", tmp_path / "runs" / "term"
    last = run_dir / "checkpoints" / "last.ckpt"
    p = start(command(nproc, out, run_dir, []))
    assert wait_for(last.exists, p)
    p.send_signal(signal.SIGTERM)  # to the python process, or to torchrun, which forwards it to every rank
    text = p.communicate(timeout=120)[0].decode()
    assert "stopped by SIGTERM; saved" in text and "continue with trainer.resume=auto" in text, text[-3000:]
    if nproc == 1:
        assert p.returncode == 143  # 128 + SIGTERM, documented in docs/checkpointing.md
    else:
        assert p.returncode != 0
    state = checkpoint.load(last)
    assert not state["epoch_done"] or state["batch_in_epoch"] == 0
    if nproc == 2:  # ranks agree on logging steps only (log.every_n_steps=2), or at an epoch's last step
        assert state["global_step"] % 2 == 0 or state["batch_in_epoch"] == 12
    finish(start(command(nproc, out, run_dir, ["trainer.resume=auto"])))
    compare(ref_out, ref_dir, out, run_dir)


def test_a_rank_that_raises_ends_every_rank_with_its_name(tmp_path):
    p = start(command(2, tmp_path / "out", tmp_path / "runs" / "fail",
                      ["--toy-fail_step=5", "--toy-fail_rank=1", "trainer.ddp_timeout=60"]))
    text = p.communicate(timeout=120)[0].decode()  # the guard: a hang fails the test here
    assert p.returncode != 0
    assert "[rank 1] failed: RuntimeError: injected failure on rank 1 at step 5" in text, text[-3000:]
    assert "[rank 0] stopped" in text or "rank: 1" in text, text[-3000:]


def test_bad_input_on_one_rank_ends_every_rank_with_its_one_line_and_exit_code_2(tmp_path):
    p = start(command(2, tmp_path / "out", tmp_path / "runs" / "bad",
                      ["--toy-fail_step=5", "--toy-fail_rank=1", "--toy-fail_user=1", "trainer.ddp_timeout=60"]))
    text = p.communicate(timeout=120)[0].decode()  # the guard: a hang fails the test here
    assert p.returncode != 0
    line = "error: sample file broken.npy: expected 4 frames (injected on rank 1)"
    assert f"[rank 1] {line}" in text, text[-3000:]
    assert f"[rank 0] {line} (rank 1)" in text, text[-3000:]  # told through the rendezvous store
    assert "[rank 0] stopped: a collective failed" not in text
    # torchrun's summary: both exit codes 2, and the message as the root cause instead of a hint
    assert text.count("exitcode  : 2") == 2, text[-3000:]
    assert f"traceback : {line}" in text and "To enable traceback see" not in text, text[-3000:]


def test_elastic_restart_resumes_from_last_checkpoint(tmp_path):
    ref_out, ref_dir = tmp_path / "ref_out", tmp_path / "runs" / "ref"
    finish(start(command(2, ref_out, ref_dir, [])))
    out, run_dir = tmp_path / "out", tmp_path / "runs" / "elastic"
    cmd = command(2, out, run_dir, ["trainer.resume=auto", "--toy-fail_step=7", "--toy-fail_rank=1",
                                    "--toy-die_once=1"])
    # rank 1 dies once; a restarted round may itself need another try to form (gloo on a busy machine)
    cmd.insert(cmd.index("--standalone"), "--max_restarts=3")
    finish(start(cmd))
    assert (out / "died_once").exists(), "rank 1 was supposed to die once"
    compare(ref_out, ref_dir, out, run_dir)


class Poisoned(Dataset):
    """A regression set whose sample 5 makes the loss NaN (`cause="data"`) or, with a finite loss,
    the gradient NaN (`cause="grad"`: the loss adds sqrt(0 * w), whose gradient is 0 * inf)."""

    def __init__(self, cause="data"):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)
        self.cause = cause

    def __len__(self):
        return 64

    def __getitem__(self, i):
        bad = self.cause == "data" and i == 5
        return self.x[i], self.y[i] * (float("nan") if bad else 1.0), torch.tensor(float(i == 5))


def mse(out, batch):
    return ((out - batch[1]) ** 2).mean()


class StepRecorder(Callback):
    """Weights and optimizer state after every step, and the steps whose batch held sample 5."""

    def __init__(self):
        self.after, self.poisoned = {}, []

    def on_train_step_end(self, t):
        self.after[t.global_step] = ({k: v.clone() for k, v in t.model.state_dict().items()},
                                     [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                                      for st in t.optimizer.state.values()])


def run_poisoned(tmp_path, name, mode, cause="data", optimizer="adamw", **trainer_kw):
    rec = StepRecorder()

    def loss_fn(out, batch):
        loss = mse(out, batch)
        if batch[2].sum() > 0:
            rec.poisoned.append(t.global_step + 1)  # the step this micro-batch belongs to
            if cause == "grad":
                loss = loss + torch.sqrt(0 * t.model.weight.sum())
            if cause == "loss":  # the loss is NaN, every gradient finite: the check must read the loss too
                loss = loss + float("nan")
        return loss

    torch.manual_seed(0)
    t = Trainer(nn.Linear(4, 1), loss_fn, Poisoned(cause), config=TrainerConfig(
        max_epochs=trainer_kw.pop("max_epochs", 8), out_dir=str(tmp_path), run_name=name, nonfinite=mode, **trainer_kw),
        optim=OptimConfig(name=optimizer, lr=0.05), data=DataConfig(batch_size=8), callbacks=[rec])
    t.fit()
    return t, rec


def same_state(a, b):
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a[1], b[1]) for k in x)


@pytest.mark.parametrize("cause,optimizer", [("data", "adamw"), ("grad", "adamw"), ("loss", "adamw"), ("data", "sgd"),
                                             ("grad", "sgd"), ("loss", "sgd")])
def test_a_nonfinite_step_is_never_applied_and_skip_goes_on(tmp_path, cause, optimizer):
    t, rec = run_poisoned(tmp_path, "skip", "skip", cause, optimizer)
    assert t.epoch == 8 and not t.should_stop and len(rec.poisoned) == 8  # one poisoned batch per epoch
    for step in rec.poisoned:  # weights AND optimizer state exactly as after the step before
        assert same_state(rec.after[step], rec.after[step - 1]) if step > 1 else True, step
        if step + 1 in rec.after:
            assert not same_state(rec.after[step + 1], rec.after[step])  # the next (finite) step was applied
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert sum(r.get("skipped_steps", 0) for r in train) == 8 and t.skipped_steps == 8
    assert train[-1]["loss"] < 0.1 * train[0]["loss"]  # it still learned y = sum(x)
    log = (tmp_path / "skip" / "train.log").read_text()
    assert f"skipped 1 step(s) with a non-finite loss or gradient up to step 8 (first: step {rec.poisoned[0]}" in log


@pytest.mark.parametrize("cause", ["data", "grad"])
def test_nonfinite_stop_names_the_step_and_keeps_a_good_checkpoint(tmp_path, cause):
    t, rec = run_poisoned(tmp_path, "stop", "stop", cause)
    first = rec.poisoned[0]
    assert t.should_stop and t.halted and t.epoch == 0 and t.global_step == 8  # stopped at the logging step
    assert f"non-finite loss or gradient at step {first}; that update was not applied" in t.stop_reason
    assert first == 1 or same_state(rec.after[first], rec.after[first - 1])
    # no checkpoint existed yet: last.ckpt is written from the current (finite) weights, mid-epoch
    state = checkpoint.load(tmp_path / "stop" / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 8 and not state["epoch_done"] and state["skips"]["total"] == 1
    for k, v in t.model.state_dict().items():
        assert torch.equal(state["model"][k], v) and torch.isfinite(v).all()
    assert "stopped: non-finite loss or gradient at step" in (tmp_path / "stop" / "train.log").read_text()


def test_nonfinite_stop_keeps_the_previous_checkpoint_byte_identical(tmp_path):
    """Epoch 0 on clean data writes last.ckpt; resumed on data with a NaN sample, the run stops in
    epoch 1 and leaves that file exactly as it was."""
    def run(cause, **kw):
        torch.manual_seed(0)
        cfg = TrainerConfig(out_dir=str(tmp_path), run_name="r", save_top_k=0, **kw)
        t = Trainer(nn.Linear(4, 1), mse, Poisoned(cause), config=cfg, optim=OptimConfig(lr=0.05),
                    data=DataConfig(batch_size=8))
        t.fit()
        return t

    run("none", max_epochs=1)
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    t = run("data", max_epochs=8, resume="auto")
    assert t.halted and t.epoch == 1 and t.global_step == 10  # the first logging step after the NaN
    assert last.read_bytes() == before
    assert f"the last good checkpoint is {last}" in (tmp_path / "r" / "train.log").read_text()


def test_diverging_lr_with_skip_stops_after_max_skipped_steps_and_never_logs_a_zero_loss(tmp_path):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    t = Trainer(nn.Linear(4, 1), mse, TensorDataset(x, x.sum(1, keepdim=True) * 1e3),
                config=TrainerConfig(max_epochs=30, out_dir=str(tmp_path), run_name="d", nonfinite="skip",
                                     max_skipped_steps=5),
                optim=OptimConfig(name="sgd", lr=10.0, momentum=0.0), data=DataConfig(batch_size=8),
                log_config=LogConfig(every_n_steps=2))
    t.fit()
    assert t.halted and t.consecutive_skips >= 5 and t.epoch < 29
    assert "steps in a row had a non-finite loss or gradient (trainer.max_skipped_steps=5)" in t.stop_reason
    rows = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert any(r.get("skipped_steps") == 2 and "loss" not in r for r in train)  # all-skipped windows: no loss
    assert all(r["loss"] != 0.0 for r in train if "loss" in r)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_two_processes_stop_together_on_a_nonfinite_loss_of_one_rank(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "runs" / "nan"
    p = start(command(2, out, run_dir, ["--toy-poison=5", "trainer.nonfinite=stop", "trainer.save_top_k=0",
                                        "trainer.ckpt_every_n_steps=0"]))
    text = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 0, text[-3000:]
    stop_lines = [line for line in text.splitlines() if line.startswith("stopped: non-finite loss or gradient at step")]
    assert len(stop_lines) == 1, text[-3000:]  # rank 0's line (the run summary restates it, indented)
    end = [json.loads((out / f"end_rank{r}.json").read_text()) for r in (0, 1)]
    assert end[0] == end[1] and "non-finite loss or gradient at step" in end[0]["stop_reason"]
    state = checkpoint.load(run_dir / "checkpoints" / "last.ckpt")
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert state["global_step"] == end[0]["step"]
    assert all(torch.isfinite(v).all() and torch.equal(state["model"][k], v) for k, v in weights.items())


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    t = Trainer(nn.Linear(2, 1), mse, config=TrainerConfig(out_dir=str(tmp_path)))
    with torch.no_grad():
        t.model.weight[0, 0] = float("inf")
    t.state.run_dir = tmp_path
    assert t.save_checkpoint(tmp_path / "x.ckpt") is False
    assert not (tmp_path / "x.ckpt").exists()
    # the checkpoint callback acts on the declined save: no top-k entry, no best.ckpt link to a missing file
    (tmp_path / "checkpoints").mkdir()
    cb = ModelCheckpoint("val/loss", "min")
    t.state.global_step = 1
    cb.on_validation_end(t.state, {"val/loss": 0.5})
    assert cb.top_k == [] and cb.best is None and not list((tmp_path / "checkpoints").iterdir())


def test_the_ranks_loss_flag_is_exact():
    """local_stats' flag: NaN exactly when some loss is inf/NaN, never for large finite losses whose
    sum overflows; a loss or weight of shape [1] is as good as a scalar."""
    from trainlib.step import local_stats

    t = torch.tensor
    assert local_stats([(t(3e38), t(1.0)), (t(3e38), t(1.0))]).tolist() == [2.0, 0.0]
    assert local_stats([(t([2.0]), t([4.0]))]).tolist() == [4.0, 0.0]
    for bad in (float("inf"), float("-inf"), float("nan")):
        assert torch.isnan(local_stats([(t(1.0), t(1.0)), (t(bad), t(2.0))])[1])
        assert torch.isnan(local_stats([(t(bad, dtype=torch.bfloat16), t(2.0))])[1])


class Amplify(torch.autograd.Function):
    """Zero in the forward (the loss stays finite), x1e20 on the gradient in the backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1e20


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_a_gradient_that_overflows_only_when_normalised_is_never_applied(tmp_path, precision):
    """The step's normalisation multiplies the gradients by 1 / total weight, and the non-finite check
    reads a kernel's input (16-mixed: the GradScaler's check runs before it). With a tiny total
    weight, sample 5's finite gradient (1e30; 16-mixed: 6.5e34 scaled) becomes inf only then: that
    step is skipped and counted as non-finite, not applied."""
    def loss_fn(out, batch):
        loss = mse(out, batch)
        if batch[2].sum() > 0:
            loss = loss + Amplify.apply(Amplify.apply(t.model.weight)).sum()
        return {"loss": loss, "weight": torch.tensor(1e-10)}

    rec = StepRecorder()
    torch.manual_seed(0)
    t = Trainer(nn.Linear(4, 1), loss_fn, Poisoned("grad"), config=TrainerConfig(
        max_epochs=2, out_dir=str(tmp_path), run_name="r", nonfinite="skip", precision=precision,
        accumulate_grad_batches=2), optim=OptimConfig(lr=0.05), data=DataConfig(batch_size=8), callbacks=[rec])
    t.fit()
    assert t.skipped_steps == 2 and all(torch.isfinite(v).all() for v in t.model.state_dict().values())
