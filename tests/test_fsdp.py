"""trainer.strategy=fsdp (FSDP2) on 2 gloo ranks: the same training as DDP, the same checkpoint
files (plain keys, optimizer state by parameter position), and resumes across strategies."""
import json
import re

import pytest
import torch
from torch import nn

from tests.conftest import torchrun
from tests.toy import ToyData, make_trainer, toy_model
from trainlib import ConfigError, checkpoint, load_model
from trainlib.fsdp import _named_groups, plan

# accumulation (FSDP's no_sync), clipping (a DTensor norm), the device-side skip of the fused step
FLAGS = ["optim.name=adamw", "trainer.grad_clip=0.5", "trainer.accumulate_grad_batches=2",
         "trainer.nonfinite=skip", "trainer.save_top_k=1"]
FSDP = ["trainer.strategy=fsdp", "trainer.fsdp_min_params=1"]  # every Linear its own unit, plus the root


def run(tmp_path, name, extra, epochs=3):
    r = torchrun(2, ["tests/toy.py", str(tmp_path / name), f"trainer.out_dir={tmp_path / 'runs'}",
                     f"trainer.run_name={name}", f"trainer.max_epochs={epochs}", *FLAGS, *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / name / "weights.pt"), r


def assert_close(a, b, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


def test_fsdp_trains_like_ddp_and_writes_the_same_checkpoint_layout(tmp_path):
    ddp, _ = run(tmp_path, "ddp", [])
    sharded, r = run(tmp_path, "fsdp", [*FSDP, "--toy-count_all_reduce=1"])
    assert "trainer.strategy=fsdp: 3 sharding unit(s) over 2 ranks: 0, 2, <root>" in r.stdout
    # per step: the [weight, loss flag] all-reduce runs during the last backward (async), and the
    # one blocking collective is the gradient shards' non-finite verdict; [2] blocking: epoch ends only
    for rank in (0, 1):
        sizes = json.loads((tmp_path / "fsdp" / f"all_reduce_rank{rank}.json").read_text())
        steps = json.loads((tmp_path / "fsdp" / f"end_rank{rank}.json").read_text())["step"]
        per_step = sum(a == [2, True] and b == [1, False] for a, b in zip(sizes, sizes[1:]))
        assert steps == 9 and sizes.count([2, True]) == per_step == steps, sizes[:12]
        assert sizes.count([2, False]) == 3
    assert_close(ddp, sharded)  # reduce-scatter vs all-reduce: the same mean, other rounding
    # each rank holds its dim-0 shard of the 129 parameters and of the Adam moments (DDP: all of
    # them): 8 of the 16 rows of layer 0 (+ bias) each; the 1-row output layer sits on rank 0
    held = [json.loads((tmp_path / "fsdp" / f"held_rank{r}.json").read_text()) for r in (0, 1)]
    assert [h["params"] for h in held] == [h["exp_avg"] for h in held] == [48 + 8 + 16 + 1, 48 + 8]
    assert json.loads((tmp_path / "ddp" / "held_rank1.json").read_text()) == {"params": 129, "exp_avg": 129}
    assert not torch.equal(sharded["0.weight"], toy_model().state_dict()["0.weight"])  # it trained
    a = checkpoint.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt")
    b = checkpoint.load(tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt")
    assert list(a["model"]) == list(b["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(type(v) is torch.Tensor for v in b["model"].values())  # whole tensors, not shards
    assert_close(b["model"], sharded, atol=0)
    oa, ob = a["optimizer"], b["optimizer"]
    assert [g["params"] for g in ob["param_groups"]] == [g["params"] for g in oa["param_groups"]] == [[0, 1, 2, 3]]
    assert sorted(ob["state"]) == sorted(oa["state"]) == [0, 1, 2, 3]
    for i in range(4):
        assert ob["state"][i]["exp_avg"].shape == oa["state"][i]["exp_avg"].shape
        assert torch.allclose(ob["state"][i]["exp_avg_sq"], oa["state"][i]["exp_avg_sq"], atol=1e-6)
    # the export is plain safetensors, loadable without FSDP or a process group
    model = load_model(tmp_path / "runs" / "fsdp" / "model.safetensors", model=toy_model())
    best = checkpoint.load(tmp_path / "runs" / "fsdp" / "checkpoints" / "best.ckpt")["model"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_a_ddp_checkpoint_resumes_under_fsdp_and_compile(tmp_path):
    """One epoch under DDP, then resume=auto under FSDP with torch.compile: the optimizer moments
    are sharded from the DDP file, and the run ends where three DDP epochs end."""
    ddp, _ = run(tmp_path, "ddp", [])
    run(tmp_path, "mixed", [], epochs=1)
    mixed, r = run(tmp_path, "mixed", FSDP + ["trainer.resume=auto", "trainer.compile=true"])
    assert re.search(r"resumed from .*last.ckpt: epoch 1, step 3", r.stdout), r.stdout[-2000:]
    assert_close(ddp, mixed)


def test_param_groups_follow_the_parameters_fsdp_replaces(tmp_path):
    """Groups built from the model's parameters before sharding (a recipe's param_groups) must
    reach the sharded DTensors: layer 0 trains like DDP, layer 2 (lr 0) stays where it started."""
    ddp, _ = run(tmp_path, "ddp", ["--toy-freeze_last=1"], epochs=2)
    sharded, _ = run(tmp_path, "fsdp", FSDP + ["--toy-freeze_last=1"], epochs=2)
    start = toy_model().state_dict()
    assert not torch.equal(sharded["0.weight"], start["0.weight"])
    assert torch.equal(sharded["2.weight"], start["2.weight"]) and torch.equal(ddp["2.weight"], start["2.weight"])
    assert_close(ddp, sharded)


def test_sharding_units_skip_containers_without_forward():
    class Block(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.a, self.b = nn.Linear(n, n), nn.Linear(n, n)  # 2 x (n*n + n)

        def forward(self, x):
            return self.b(self.a(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 16)                                  # 80
            self.blocks = nn.ModuleList([Block(16), Block(16)])           # 544 each
            self.heads = nn.ModuleDict({"x": nn.Linear(16, 2)})           # 34

    names = [n for n, _ in plan(Net(), 300)]
    assert names == ["blocks.0", "blocks.1", ""]  # a Linear (272) is too small; the ModuleList cannot be one
    assert [n for n, _ in plan(Net(), 80)] == ["stem", "blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b", ""]
    assert [n for n, _ in plan(Net(), 10_000)] == [""]
    net = Net()  # param groups travel by name: dict groups and a plain list of parameters alike
    assert _named_groups(net, [{"params": net.stem.parameters(), "lr": 0.1}]) == \
        [{"params": ["stem.weight", "stem.bias"], "lr": 0.1}]
    assert _named_groups(net, list(net.heads.parameters())) == [{"params": ["heads.x.weight", "heads.x.bias"]}]
    with pytest.raises(ConfigError, match="a group holds a parameter that is not in the model"):
        _named_groups(net, [nn.Parameter(torch.zeros(2))])


def test_fsdp_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config key 'trainer.fsdp_min_params': expected a value >= 1, got 0"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.strategy=fsdp", "trainer.fsdp_min_params=0"], ToyData(16))
    with pytest.raises(ConfigError, match="config key 'trainer.strategy': expected one of ddp, fsdp, none, got 'deepspeed'"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.strategy=deepspeed"], ToyData(16))


@pytest.mark.parametrize("val_n", [17, 1])
def test_evaluation_with_unequal_batch_counts_per_rank_ends_and_scores_every_sample_once(tmp_path, val_n):
    """17 samples in batches of 8 on 2 ranks: 2 batches on rank 0, 1 on rank 1 (1 sample: none on
    rank 1). Each forward is an all-gather under FSDP, so the rank with fewer batches must keep pace
    (without that, rank 0's last forward waits until the process group times out)."""
    weights, _ = run(tmp_path, "uneven", [*FSDP, f"--toy-val_n={val_n}", "trainer.ddp_timeout=60"], epochs=1)
    model = toy_model()
    model.load_state_dict(weights)
    data = ToyData(val_n, seed=1)
    with torch.no_grad():
        batch = {k: torch.stack([data[i][k] for i in range(val_n)]) for k in ("x", "y", "valid")}
        err = ((model(batch["x"]) - batch["y"]) ** 2).squeeze(-1) * batch["valid"]
    rows = [json.loads(x) for x in (tmp_path / "runs" / "uneven" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"][-1]
    assert val["loss"] == pytest.approx(float(err.sum() / batch["valid"].sum()), rel=1e-5)


def test_an_fp16_overflow_one_rank_finds_is_skipped_on_every_rank(tmp_path):
    """16-mixed under FSDP: each rank's GradScaler checks only its own gradient shards. An overflow
    found by rank 1 alone (injected at step 9) is agreed, so every rank skips that step and halves
    its scale: the run equals one where every rank found it (unagreed, rank 0 applied the step and
    the two ranks' loss scales parted)."""
    fp16 = [*FSDP, "trainer.precision=16-mixed", "data.batch_size=4", "--toy-overflow_step=9"]
    one, _ = run(tmp_path, "one", [*fp16, "--toy-overflow_rank=1"], epochs=2)
    every, _ = run(tmp_path, "every", [*fp16, "--toy-overflow_rank=-1"], epochs=2)
    assert_close(one, every, atol=0)
    ends = [json.loads((tmp_path / name / f"end_rank{r}.json").read_text()) for name in ("one", "every") for r in (0, 1)]
    assert {e["step"] for e in ends} == {12} and len({e["scale"] for e in ends}) == 1
