"""trainer.gradient_checkpointing=true (issue #12): the recipe's blocks recompute their forward in
the backward. The gradients are the plain run's bit for bit (dropout and stochastic depth replay
their RNG), the state_dict keys are unchanged, the recomputation really runs, a model without
blocks is refused clearly, and PDAN and SegFormer name their blocks."""
import copy
import types

import pytest
import torch
from torch import nn

from recipes.pdan import PDANConfig, PDANData
from recipes.pdan import recipe as pdan_recipe
from recipes.segformer import SegFormerConfig
from recipes.segformer import recipe as segformer_recipe
from tests.test_fsdp import FSDP, assert_close, run
from tests.toy import Block, BlockNet, make_trainer
from trainlib import activation_checkpointing
from trainlib.config import Config, ConfigError
from trainlib.fsdp import resolve_blocks

BLOCKS = lambda m: [*m.blocks]  # noqa: E731


def checkpointed(model: nn.Module, blocks=BLOCKS) -> nn.Module:
    activation_checkpointing.apply(resolve_blocks(model, blocks))
    return model


def grads(model: nn.Module, *inputs, seed: int = 7, out=lambda y: y) -> dict[str, torch.Tensor]:
    """Gradients of one forward/backward in training mode, with the RNG seeded the same way."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out(model(*inputs)).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_equal_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


class DropBlock(Block):
    """The toy's block with dropout inside: its recomputation must draw the same mask."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.tanh(self.lin(x)))


def drop_net() -> BlockNet:
    net = BlockNet()
    torch.manual_seed(5)
    net.blocks = nn.ModuleList(DropBlock(16) for _ in range(3))
    return net


class CountingBlock(Block):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountingBlock.calls += 1
        return super().forward(x)


# ------------------------------------------------------------------------------------------------
# The mechanism

def test_gradients_equal_the_plain_run_and_keys_are_unchanged():
    x = torch.randn(8, 4, 6)
    plain, ckpt = BlockNet(), checkpointed(BlockNet())
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # no wrapper module: the same keys
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert all(activation_checkpointing.is_checkpointed(b) for b in ckpt.blocks)
    assert_equal_grads(grads(plain, x), grads(ckpt, x))
    ckpt.load_state_dict(plain.state_dict())  # loads both ways, strict
    plain.load_state_dict(ckpt.state_dict())

    # dropout inside a block: the recomputation replays the RNG, so the masks (and gradients) match
    plain, ckpt = drop_net(), checkpointed(drop_net())
    g = grads(plain, x)
    assert_equal_grads(g, grads(ckpt, x))
    assert not torch.equal(g["blocks.0.lin.weight"], grads(plain, x, seed=8)["blocks.0.lin.weight"])  # masks matter

    # a second apply (a second Trainer on the same model) does not nest; remove() gives the forward back
    assert activation_checkpointing.apply(resolve_blocks(ckpt, BLOCKS)) == ["blocks.0", "blocks.1", "blocks.2"]
    assert activation_checkpointing.remove(ckpt) == 3 and activation_checkpointing.remove(ckpt) == 0


def test_the_blocks_really_run_twice_in_training_once_under_no_grad():
    def counting_net():
        net = BlockNet()
        net.blocks = nn.ModuleList(CountingBlock(16) for _ in range(3))
        return net

    x = torch.randn(4, 6)
    for net, per_step in ((counting_net(), 3), (checkpointed(counting_net()), 6)):
        CountingBlock.calls = 0
        net(x).sum().backward()
        assert CountingBlock.calls == per_step  # forward, and the recomputation in the backward
        CountingBlock.calls = 0
        with torch.no_grad():
            net(x)
        assert CountingBlock.calls == 3  # evaluation: nothing to recompute

    # nested blocks: only the outer one is checkpointed (the inner would be recomputed twice)
    net = BlockNet()
    assert activation_checkpointing.apply(resolve_blocks(net, ["blocks.1.lin", "blocks.1"])) == ["blocks.1"]
    assert not activation_checkpointing.is_checkpointed(net.blocks[1].lin)


def test_without_blocks_it_is_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.gradient_checkpointing=true needs the model's blocks: give "
                                          r"Recipe.blocks / Trainer\(blocks=...\)"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.gradient_checkpointing=true"], model=BlockNet())
    with pytest.raises(ConfigError, match="needs the model's blocks"):  # a plan that names only the root
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.gradient_checkpointing=true"], model=BlockNet(),
                     blocks=lambda m: [m])


def test_a_trainer_run_ends_on_the_weights_of_the_run_without_it(tmp_path):
    def train(name, extra):
        t = make_trainer([f"trainer.out_dir={tmp_path}", f"trainer.run_name={name}", "trainer.max_epochs=2",
                          "trainer.accumulate_grad_batches=2", *extra], model=drop_net(), blocks=BLOCKS)
        t.fit()
        return t

    plain = train("plain", [])
    ckpt = train("ckpt", ["trainer.gradient_checkpointing=true"])
    assert all(activation_checkpointing.is_checkpointed(b) for b in ckpt.model.blocks)
    a, b = plain.model_state_dict(), ckpt.model_state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], drop_net().state_dict()["head.weight"])  # it trained
    log = (tmp_path / "ckpt" / "train.log").read_text()
    assert ("trainer.gradient_checkpointing=true: 3 block(s) recompute their forward in the backward "
            "(non-reentrant activation checkpointing): blocks.0, blocks.1, blocks.2") in log
    assert "gradient_checkpointing" not in (tmp_path / "plain" / "train.log").read_text()


def test_fsdp_units_around_checkpointed_blocks_train_like_ddp(tmp_path):
    """torchtitan's order: checkpointing inside, the FSDP unit outside (2 gloo ranks)."""
    ddp, _ = run(tmp_path, "ddp", ["--toy-blocks=1"], epochs=1)
    sharded, r = run(tmp_path, "fsdp", [*FSDP, "--toy-blocks=1", "trainer.gradient_checkpointing=true"], epochs=1)
    assert "trainer.gradient_checkpointing=true: 3 block(s)" in r.stdout
    assert "4 sharding unit(s) over 2 ranks (the recipe blocks): blocks.0, blocks.1, blocks.2, <root>" in r.stdout
    assert_close(ddp, sharded)  # reduce-scatter vs all-reduce: the same mean, other rounding


# ------------------------------------------------------------------------------------------------
# The recipes' blocks

def test_pdan_blocks_are_every_stages_layers_and_checkpoint_exactly():
    cfg = Config(model=PDANConfig(num_stages=2, num_layers=3, num_channels=16, input_channels=12, num_classes=5,
                                  dropout=0.5), data=PDANData(), recipe="pdan")
    model = pdan_recipe.build_model(cfg)
    names = [n for n, _ in resolve_blocks(model, pdan_recipe.blocks)]
    assert names == [f"stage1.layers.{i}" for i in range(3)] + [f"stages.0.layers.{i}" for i in range(3)]
    ckpt = copy.deepcopy(model)
    assert activation_checkpointing.apply(resolve_blocks(ckpt, pdan_recipe.blocks)) == names
    assert list(ckpt.state_dict()) == list(model.state_dict())
    g = torch.Generator().manual_seed(0)
    features, mask = torch.randn(2, 12, 20, generator=g), torch.ones(2, 20)
    mask[1, 14:] = 0  # a padded video
    assert_equal_grads(grads(model, features, mask), grads(ckpt, features, mask))  # dropout 0.5 in every block


def test_segformer_blocks_are_the_encoder_blocks_and_checkpoint_exactly():
    cfg = types.SimpleNamespace(model=SegFormerConfig(num_labels=3, hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 1, 2],
                                                      num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16,
                                                      drop_path_rate=0.3))
    model = segformer_recipe.build_model(cfg)
    names = [n for n, _ in resolve_blocks(model, segformer_recipe.blocks)]
    assert names == ["encoder.block.0.0", "encoder.block.0.1", "encoder.block.1.0", "encoder.block.2.0",
                     "encoder.block.3.0", "encoder.block.3.1"]
    ckpt = copy.deepcopy(model)
    assert activation_checkpointing.apply(resolve_blocks(ckpt, segformer_recipe.blocks)) == names
    assert list(ckpt.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert_equal_grads(grads(model, x), grads(ckpt, x))  # stochastic depth (0.3) draws again in the backward
