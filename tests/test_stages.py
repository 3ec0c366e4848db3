"""Multi-stage runs (trainlib/stages.py) with the two-stage recipe in tests/staged_toy.py: each stage
trains only its part, with its own overrides, from the previous stage's final weights, in its own
run directory; one stage can run alone; a run killed in the middle of its second stage and resumed
with resume=auto ends bit-identical to the uninterrupted run."""
import random
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.test_resume import finish, kill_at_random_moments, start
from tests.toy import toy_model
from trainlib import checkpoint
from trainlib.stages import FINAL

SCRIPT = str(ROOT / "tests" / "staged_toy.py")


def staged(out, name, *extra):
    return [sys.executable, SCRIPT, f"trainer.out_dir={out}", f"trainer.run_name={name}", *extra]


def test_stage_all_trains_each_part_from_the_previous_stage(tmp_path):
    finish(start(staged(tmp_path, "run", "stage=all", "optim.weight_decay=0.01")))
    run = tmp_path / "run"
    init = toy_model().state_dict()
    first, second = load_file(str(run / "first" / FINAL)), load_file(str(run / "second" / FINAL))
    assert not torch.equal(first["0.weight"], init["0.weight"])      # first trains layer 0 ...
    assert torch.equal(first["2.weight"], init["2.weight"])          # ... and not layer 2
    assert torch.equal(second["0.weight"], first["0.weight"])        # second starts from first, layer 0 frozen
    assert not torch.equal(second["2.weight"], first["2.weight"])    # and trains layer 2
    cfgs = {s: yaml.safe_load((run / s / "config.yaml").read_text()) for s in ("first", "second")}
    assert cfgs["first"]["optim"]["lr"] == 0.05 and cfgs["second"]["optim"]["lr"] == 0.02  # each stage's own
    assert cfgs["second"]["optim"]["scheduler"] == "cosine" and cfgs["first"]["optim"]["scheduler"] == "none"
    assert cfgs["first"]["optim"]["weight_decay"] == cfgs["second"]["optim"]["weight_decay"] == 0.01  # user wins
    assert cfgs["second"]["trainer"]["ckpt_path"] == str(run / "first" / FINAL)
    opt = checkpoint.load(run / "second" / "checkpoints" / "last.ckpt")["optimizer"]
    # the optimizer holds the trainable layer 2 only: the frozen layer 0 carries no optimizer state
    assert [g["params"] for g in opt["param_groups"]] == [[0, 1]]
    assert [tuple(opt["state"][i]["exp_avg"].shape) for i in (0, 1)] == [(1, 16), (1,)]


def test_one_stage_alone_starts_from_the_named_run_or_says_what_it_needs(tmp_path):
    finish(start(staged(tmp_path, "run", "stage=first")))
    assert (tmp_path / "run" / "first" / FINAL).is_file() and not (tmp_path / "run" / "second").exists()
    finish(start(staged(tmp_path, "run", "stage=second")))
    assert torch.equal(load_file(str(tmp_path / "run" / "second" / FINAL))["0.weight"],
                       load_file(str(tmp_path / "run" / "first" / FINAL))["0.weight"])
    r = subprocess.run(staged(tmp_path, "other", "stage=second"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and not (tmp_path / "other").exists()
    assert (f"error: stage second starts from stage first's final weights, and {tmp_path / 'other' / 'first' / FINAL}"
            " does not exist: run stage=first (or stage=all) with trainer.run_name=other first, or give "
            "trainer.ckpt_path") in r.stderr
    r = subprocess.run(staged(tmp_path, "x", "stage=third"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "error: stage=third: this recipe's stages are first, second (or all)" in r.stderr


@pytest.mark.slow
def test_killed_in_the_second_stage_and_resumed_is_bit_exact(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "killed"
    finish(start(staged(tmp_path, "ref", "stage=all")))
    last = run / "second" / "checkpoints" / "last.ckpt"
    kill_at_random_moments(lambda resume: staged(tmp_path, "killed", "stage=all", *["trainer.resume=auto"] * resume),
                           last, random.Random(3), times=2, max_delay=0.4)
    for stage in ("first", "second"):
        a, b = load_file(str(ref / stage / FINAL)), load_file(str(run / stage / FINAL))
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    rows = lambda d: [line for line in (d / "second" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda line: {k: v for k, v in yaml.safe_load(line).items() if k not in  # noqa: E731
                          ("steps_per_s", "samples_per_s", "step_ms", "data_wait")}
    assert [strip(x) for x in rows(ref)] == [strip(x) for x in rows(run)]
