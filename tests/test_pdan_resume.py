"""The checkpoint promise for a real recipe: PDAN (dropout, padding, multi-label) killed and resumed."""
import json
import random
import sys

import torch

from tests.test_resume import finish, kill_at_random_moments, start
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
    kill_at_random_moments(lambda resume: pdan(run, *["trainer.resume=auto"] * resume), last, random.Random(5),
                           times=2, max_delay=1.5)
    a = checkpoint.load(ref / "checkpoints" / "last.ckpt")
    b = checkpoint.load(last)
    assert a["global_step"] == b["global_step"] > 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k

    def rows(d):
        out = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in out]

    assert rows(ref) == rows(run)
