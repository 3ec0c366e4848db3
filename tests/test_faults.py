"""Preemption (SIGTERM), a rank that raises, elastic restarts, non-finite losses."""
import json
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from tests.test_resume import command, compare, finish, start, wait_for
from trainlib import DataConfig, OptimConfig, Trainer, TrainerConfig, checkpoint


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
    """A regression set whose sample 5 makes the loss NaN."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return self.x[i], self.y[i] * (float("nan") if i == 5 else 1.0)


def mse(out, batch):
    return ((out - batch[1]) ** 2).mean()


def test_nonfinite_skip_goes_on_and_stop_stops_without_applying_the_update(tmp_path):
    def run(mode, name):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        t = Trainer(model, mse, Poisoned(), config=TrainerConfig(max_epochs=8, out_dir=str(tmp_path), run_name=name,
                                                                 nonfinite=mode),
                    optim=OptimConfig(lr=0.05), data=DataConfig(batch_size=8))
        t.fit()
        return t

    skip = run("skip", "skip")
    assert skip.epoch == 8 and not skip.should_stop
    assert all(torch.isfinite(p).all() for p in skip.model.parameters())
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in rows) == 8  # one poisoned batch per epoch
    assert rows[-1]["loss"] < 0.1 * rows[0]["loss"]  # it still learned y = sum(x)

    stop = run("stop", "stop")
    assert stop.should_stop and "non-finite training loss" in stop.stop_reason and stop.epoch == 1
    # stop mode does not guard the step (no per-step cost): the weights went NaN, so nothing was saved
    assert not (tmp_path / "stop" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "stop" / "model.safetensors").exists()


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    t = Trainer(nn.Linear(2, 1), mse, config=TrainerConfig(out_dir=str(tmp_path)))
    with torch.no_grad():
        t.model.weight[0, 0] = float("inf")
    t.run_dir = tmp_path
    t.save_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
