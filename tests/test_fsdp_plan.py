"""The recipe's sharding plan (`blocks`), bf16 all-gathers under FSDP, and frozen parameters: no
optimizer state, and with trainer.save_frozen=false not in the checkpoints (resume stays exact).
The torchrun tests use 2 gloo ranks like tests/test_fsdp.py; the others run in this process."""
import json

import pytest
import torch
from torch import nn

from tests.test_fsdp import FSDP, assert_close, run
from tests.toy import BlockNet, ToyData, make_trainer
from trainlib import ConfigError, checkpoint, load_model
from trainlib.fsdp import plan, resolve_blocks

BLOCKS = ["--toy-blocks=1", "--toy-freeze=1"]  # BlockNet, stem and blocks.0 frozen, its blocks as the plan
FROZEN = ["blocks.0.lin.bias", "blocks.0.lin.weight", "stem.bias", "stem.weight"]  # 384 of its 945 parameters


def held(tmp_path, name):
    return [json.loads((tmp_path / name / f"held_rank{r}.json").read_text()) for r in (0, 1)]


def test_blocks_are_the_units_frozen_parameters_have_no_optimizer_state_and_stay_out_of_checkpoints(tmp_path):
    ddp, _ = run(tmp_path, "ddp", BLOCKS)
    sharded, r = run(tmp_path, "fsdp", FSDP + BLOCKS + ["trainer.save_frozen=false"])
    # the plan wins over the size rule (trainer.fsdp_min_params=1 would make every Linear a unit)
    assert ("trainer.strategy=fsdp: 4 sharding unit(s) over 2 ranks (the recipe blocks): "
            "blocks.0, blocks.1, blocks.2, <root>") in r.stdout, r.stdout[-2000:]
    assert "trainer.save_frozen=false: 4 frozen parameter(s) left out of checkpoints" in r.stdout
    assert_close(ddp, sharded)
    start = BlockNet(freeze=True).state_dict()
    assert all(torch.equal(sharded[k], start[k]) for k in FROZEN)
    assert not torch.equal(sharded["head.weight"], start["head.weight"])  # it trained

    # optimizer state for the 561 trainable parameters only: split across the ranks, whole under DDP
    assert sum(h["params"] for h in held(tmp_path, "fsdp")) == 945
    assert sum(h["exp_avg"] for h in held(tmp_path, "fsdp")) == 561
    assert [(h["params"], h["exp_avg"]) for h in held(tmp_path, "ddp")] == [(945, 561)] * 2
    a = checkpoint.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt")
    b = checkpoint.load(tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt")
    for saved in a, b:
        assert [g["params"] for g in saved["optimizer"]["param_groups"]] == [[0, 1, 2, 3, 4, 5]]
        assert sorted(saved["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]

    # the default keeps every key; save_frozen=false leaves the frozen ones out, and says which
    assert sorted(a["model"]) == sorted(start) and a["frozen_left_out"] == []
    assert b["frozen_left_out"] == FROZEN and sorted(b["model"]) == sorted(set(start) - set(FROZEN))
    size = lambda name: (tmp_path / "runs" / name / "checkpoints" / "last.ckpt").stat().st_size  # noqa: E731
    assert size("fsdp") < size("ddp") - 384 * 4, (size("fsdp"), size("ddp"))

    # model.safetensors stays complete: best.ckpt's weights plus the frozen ones
    exported = load_model(tmp_path / "runs" / "fsdp" / "model.safetensors", model=BlockNet()).state_dict()
    best = checkpoint.load(tmp_path / "runs" / "fsdp" / "checkpoints" / "best.ckpt")["model"]
    assert all(torch.equal(exported[k], best[k] if k in best else start[k]) for k in start)
    with pytest.raises(checkpoint.CheckpointError,
                       match="leaves out 4 frozen parameter.*load the run's model.safetensors"):
        load_model(tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt", model=BlockNet())

    # one epoch, then resume=auto from the file without the frozen keys: they come from the model as
    # built, and the run ends on the uninterrupted run's weights, bit for bit
    run(tmp_path, "part", FSDP + BLOCKS + ["trainer.save_frozen=false"], epochs=1)
    resumed, r = run(tmp_path, "part", FSDP + BLOCKS + ["trainer.save_frozen=false", "trainer.resume=auto"])
    assert "resumed from" in r.stdout
    assert_close(sharded, resumed, atol=0)


def test_bf16_mixed_under_fsdp_all_gathers_bf16_and_trains_like_ddp(tmp_path):
    bf16 = ["trainer.precision=bf16-mixed"]
    ddp, _ = run(tmp_path, "ddp", BLOCKS + bf16, epochs=2)
    sharded, r = run(tmp_path, "fsdp", FSDP + BLOCKS + bf16, epochs=2)
    assert ("trainer.precision=bf16-mixed under FSDP: parameters all-gathered in bf16, gradients reduce-scattered "
            "in fp32 (MixedPrecisionPolicy)") in r.stdout, r.stdout[-2000:]
    # inside the forward the blocks' weights are the bf16 all-gathered copies; DDP's stay fp32 (autocast casts per op)
    assert [h["forward_dtype"] for h in held(tmp_path, "fsdp")] == [["torch.bfloat16"] * 3] * 2
    assert [h["forward_dtype"] for h in held(tmp_path, "ddp")] == [["torch.float32"] * 3] * 2
    assert all(v.dtype == torch.float32 for v in sharded.values())  # the fp32 master weights are what is saved
    assert_close(ddp, sharded)  # (measured equal here: under DDP autocast rounds the same weights to bf16)


def test_blocks_resolve_to_submodules_innermost_first_or_fail_clearly(tmp_path):
    net = BlockNet()
    names = lambda blocks: [n for n, _ in resolve_blocks(net, blocks)]  # noqa: E731
    # model order, each once, the root left to `plan` (always the last unit); inner before outer
    assert names(lambda m: [m.blocks[2], "blocks.0", m.blocks[0], m]) == ["blocks.0", "blocks.2"]
    assert names(["blocks.1", "blocks.1.lin"]) == ["blocks.1.lin", "blocks.1"]
    assert [n for n, _ in plan(net, 1, resolve_blocks(net, [*net.blocks]))] == ["blocks.0", "blocks.1", "blocks.2", ""]
    with pytest.raises(ConfigError, match=r"blocks: blocks is a ModuleList, a container without a forward of its "
                                          r"own: name its elements instead \(e.g. \[\*model.blocks\]\)"):
        resolve_blocks(net, lambda m: [m.blocks])
    with pytest.raises(ConfigError, match="blocks: the model has no submodule 'blocks.7'"):
        resolve_blocks(net, ["blocks.7"])
    with pytest.raises(ConfigError, match="blocks: a Linear that is not a submodule of the model"):
        resolve_blocks(net, [nn.Linear(2, 2)])
    with pytest.raises(ConfigError, match="blocks: expected a list of submodules or their dotted names, got Block"):
        resolve_blocks(net, lambda m: m.blocks[0])
    # checked under every strategy: a wrong plan fails in one process, before any run directory
    with pytest.raises(ConfigError, match="blocks: blocks is a ModuleList"):
        make_trainer([f"trainer.out_dir={tmp_path}"], ToyData(16), BlockNet(), blocks=lambda m: [m.blocks])
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_may_lack_only_the_keys_it_declares_left_out():
    model = BlockNet(freeze=True)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.full_like(v, 0.5) for k, v in own.items() if k not in FROZEN}
    checkpoint.load_model_state(model, state, "x.ckpt", left_out=FROZEN)
    now = model.state_dict()
    assert all(torch.equal(now[k], own[k]) for k in FROZEN) and all(torch.equal(now[k], state[k]) for k in state)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"x.ckpt does not fit this model .*missing \(1\): head.weight"):
        checkpoint.load_model_state(model, {k: v for k, v in state.items() if k != "head.weight"}, "x.ckpt",
                                    left_out=FROZEN)


def test_save_frozen_false_in_one_process_resumes_exactly_and_saves_what_was_unfrozen(tmp_path):
    def trainer(name, epochs, *extra):
        model = BlockNet(freeze=True)
        # a group holding the frozen parameters too (a recipe's param_groups): still no state for them
        return make_trainer([f"trainer.out_dir={tmp_path}", f"trainer.run_name={name}", f"trainer.max_epochs={epochs}",
                             "optim.name=adamw", "trainer.save_frozen=false", *extra], ToyData(32), model,
                            param_groups=[{"params": list(model.parameters())}])

    full = trainer("full", 2)
    full.fit()
    names = {id(p): n for n, p in full.model.named_parameters()}
    assert sorted(names[id(p)] for p in full.optimizer.state) == sorted(set(names.values()) - set(FROZEN))
    saved = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert saved["frozen_left_out"] == FROZEN and not set(FROZEN) & set(saved["model"])
    assert len(saved["optimizer"]["param_groups"][0]["params"]) == 10 and len(saved["optimizer"]["state"]) == 6

    trainer("part", 1).fit()
    resumed = trainer("part", 2, "trainer.resume=auto")
    resumed.fit()
    assert resumed.global_step == full.global_step
    assert all(torch.equal(v, full.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())

    # a parameter unfrozen at a save (a freezing schedule) is saved from then on, even once frozen again
    full.model.stem.requires_grad_(True)
    assert full.wrapped.checkpoint_model()["frozen_left_out"] == ["blocks.0.lin.bias", "blocks.0.lin.weight"]
    full.model.stem.requires_grad_(False)
    assert "stem.weight" in full.wrapped.checkpoint_model()["model"]


def test_a_frozen_tied_weight_is_left_out_under_both_keys(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 1)
            self.b.weight = self.a.weight  # one parameter, two state_dict keys
            self.a.weight.requires_grad_(False)

        def forward(self, x):
            return self.head(self.b(self.a(x)))

    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.save_frozen=false"], ToyData(16), Tied())
    saved = t.wrapped.checkpoint_model()
    assert saved["frozen_left_out"] == ["a.weight", "b.weight"]
    assert sorted(saved["model"]) == ["a.bias", "b.bias", "head.bias", "head.weight"]
    t.wrapped.load_state_dict(saved["model"], "x.ckpt", saved["frozen_left_out"])  # loads back
