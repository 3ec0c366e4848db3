"""The checkpoint promise for a real recipe: PDAN (dropout, padding, multi-label) killed and resumed."""
import json
import random
import sys
import time

import torch

from tests.test_resume import finish, kill_group, start, wait_for
from trainlib import checkpoint
from trainlib.loggers import TIMING_KEYS

ARGS = ["model.num_channels=32", "model.num_layers=3", "trainer.max_epochs=3", "data.batch_size=16",
        "trainer.ckpt_every_n_steps=2", "log.every_n_steps=3", "log.loggers=jsonl", "optim.lr=2e-3"]


def pdan(run_dir, *extra):
    return [sys.executable, "-m", "recipes.pdan", f"trainer.out_dir={run_dir.parent}",
            f"trainer.run_name={run_dir.name}", *ARGS, *extra]


def test_pdan_killed_twice_and_resumed_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    finish(start(pdan(ref)))
    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    rng = random.Random(5)
    extra: list[str] = []
    kills = 0
    for _ in range(2):
        p = start(pdan(run, *extra))
        if not wait_for(last.exists, p):
            break
        time.sleep(rng.uniform(0.0, 1.5))
        if p.poll() is not None:
            break
        kill_group(p)
        kills += 1
        extra = ["trainer.resume=auto"]
    assert kills >= 1
    finish(start(pdan(run, "trainer.resume=auto")))
    a = checkpoint.load(ref / "checkpoints" / "last.ckpt")
    b = checkpoint.load(last)
    assert a["global_step"] == b["global_step"] > 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k

    def rows(d):
        out = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in out]

    assert rows(ref) == rows(run)
