"""The checkpoint promise: a run SIGKILLed at any moment and resumed with trainer.resume=auto ends
with bit-identical weights and the same metrics.jsonl rows as the uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from trainlib import checkpoint
from trainlib.loggers import TIMING_KEYS

# dropout + random augmentation from torch, numpy and python: every RNG stream must be restored
TOY = ["--toy-augment=1", "--toy-dropout=0.2", "--toy-delay=0.002"]
CFG = ["trainer.max_epochs=3", "trainer.ckpt_every_n_steps=1", "log.every_n_steps=2", "optim.name=adamw",
       "optim.scheduler=cosine", "optim.warmup_steps=3", "trainer.save_top_k=2"]


def command(nproc, out, run_dir, extra):
    args = ["tests/toy.py", str(out), f"trainer.out_dir={run_dir.parent}", f"trainer.run_name={run_dir.name}",
            *TOY, *CFG, *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def start(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: SIGKILL reaches torchrun and workers


def kill_group(p):
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def wait_for(pred, p, timeout=120):
    deadline = time.monotonic() + timeout  # a timeout guard, not a measurement
    while not pred():
        if p.poll() is not None:
            return False
        assert time.monotonic() < deadline, "run did not make progress"
        time.sleep(0.001)
    return True


def kill_at_random_moments(command_for, last, rng, times, max_delay):
    """Start the run, SIGKILL its process group at a random moment after its first checkpoint, and
    start it again with resume (command_for(resume)), `times` times; then let it finish."""
    kills = 0
    for _ in range(times):
        p = start(command_for(kills > 0))
        if not wait_for(last.exists, p):
            break
        time.sleep(rng.uniform(0.0, max_delay))
        if p.poll() is not None:
            break
        kill_group(p)
        kills += 1
        state = checkpoint.load(last)  # whatever moment it died at, last.ckpt is whole
        assert state["global_step"] >= 1
    assert kills >= 1
    finish(start(command_for(True)))


def finish(p):
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-4000:]


def rows(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in TIMING_KEYS})  # wall-clock fields may differ
    return out


def compare(ref_out, ref_dir, out, run_dir):
    a, b = torch.load(ref_out / "weights.pt"), torch.load(out / "weights.pt")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume: max {(a[k] - b[k]).abs().max()}"
    assert rows(ref_dir) == rows(run_dir)
    assert json.loads((ref_dir / "history.json").read_text())[-1]["val/loss"] == \
        json.loads((run_dir / "history.json").read_text())[-1]["val/loss"]


@pytest.mark.parametrize("nproc, seed, workers, strategy", [(1, 11, 0, "ddp"), (2, 23, 0, "ddp"), (1, 37, 2, "ddp"),
                                                        (2, 41, 0, "fsdp"), (2, 43, 0, "ddp+ema"),
                                                        (2, 47, 0, "utilities")])
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path, nproc, seed, workers, strategy):
    ref_out, ref_dir = tmp_path / "ref_out", tmp_path / "runs" / "ref"
    base = [f"data.num_workers={workers}"]  # augmentation drawn in worker processes must replay exactly too
    if strategy == "ddp+ema":  # the averaged weights (compared too: toy.py saves them) and their update count
        base += ["trainer.ema_decay=0.9", "trainer.ema_warmup=true"]
    if strategy == "utilities":  # issue #12's: out of memory on rank 1 from step 5 (the micro-batch halves and
        # is checkpointed), the gradient norm in the rows, activation checkpointing of BlockNet's blocks
        base += ["trainer.oom_recovery=true", "--toy-oom_above=4", "--toy-oom_step=5", "--toy-oom_rank=1",
                 "trainer.track_grad_norm=2", "--toy-blocks=1", "trainer.gradient_checkpointing=true"]
    if strategy == "fsdp":  # sharded weights and optimizer state, gathered into the same files
        base += ["trainer.strategy=fsdp", "trainer.fsdp_min_params=1"]
    finish(start(command(nproc, ref_out, ref_dir, base)))

    rng = random.Random(seed)
    out, run_dir = tmp_path / "out", tmp_path / "runs" / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    # three SIGKILLs at random moments, each followed by resume=auto
    kill_at_random_moments(lambda resume: command(nproc, out, run_dir, base + ["trainer.resume=auto"] * resume),
                           last, rng, times=3, max_delay=0.6)
    compare(ref_out, ref_dir, out, run_dir)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_file(tmp_path):
    big = ["--toy-buffer_mb=48", "trainer.ckpt_every_n_steps=3"]
    ref_out, ref_dir = tmp_path / "ref_out", tmp_path / "runs" / "ref"
    finish(start(command(1, ref_out, ref_dir, big)))

    out, run_dir = tmp_path / "out", tmp_path / "runs" / "killed"
    ckpts = run_dir / "checkpoints"
    p = start(command(1, out, run_dir, big))
    assert wait_for(lambda: (ckpts / "last.ckpt").exists(), p)
    before = checkpoint.load(ckpts / "last.ckpt")["global_step"]
    # wait for the NEXT write of last.ckpt to be in flight, and kill it there
    assert wait_for(lambda: any(f.name.startswith(".last.ckpt.tmp-") for f in ckpts.iterdir()), p)
    kill_group(p)
    assert any(f.name.startswith(".last.ckpt.tmp-") for f in ckpts.iterdir()), "killed outside the write"
    state = checkpoint.load(ckpts / "last.ckpt")  # the previous last.ckpt, intact
    assert state["global_step"] >= before
    p = start(command(1, out, run_dir, big + ["trainer.resume=auto"]))
    finish(p)
    compare(ref_out, ref_dir, out, run_dir)
    assert not any(f.name.startswith(".") for f in ckpts.iterdir()), "stale temp files are cleaned up"
