"""MVFoul recipe parts: the VARS network (pooling over views, masking of padded views, backbones,
weights from files), the per-task losses, and the batched clip augmentation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import video

from recipes.mvfoul.augment import augment_clips, normalize, severity_scale
from recipes.mvfoul.losses import MultiTaskLoss, TaskLoss, class_weights_from_counts
from recipes.mvfoul.model import (BACKBONES, FEATURE_DIMS, POOLINGS, WeightedAggregate, backbone_blocks,
                                  build_mvfoul_model)
from trainlib.config import ConfigError
from trainlib.fsdp import resolve_blocks

CLIP = (3, 4, 32, 32)   # C, T, H, W: enough for tiny3d and the ResNet3D family


def tiny_model(pooling: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_mvfoul_model("tiny3d", pooling).eval()


# ------------------------------------------------------------------------------------------------
# Pooling over views

def vars_attention_loop(feats: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VARS WeightedAggregate formula, one scalar at a time."""
    batch, views, dim = feats.shape
    pooled, attention = torch.zeros(batch, dim, dtype=torch.float64), torch.zeros(batch, views, dtype=torch.float64)
    for b in range(batch):
        lifted = [feats[b, v].double() @ weight.double() for v in range(views)]
        affinity = [[max(0.0, float(lifted[i] @ lifted[j])) for j in range(views)] for i in range(views)]
        total = sum(sum(row) for row in affinity)
        for j in range(views):
            attention[b, j] = sum(affinity[i][j] for i in range(views)) / total
            pooled[b] += attention[b, j] * lifted[j]
    return pooled, attention


def test_attention_pooling_is_the_vars_formula():
    torch.manual_seed(0)
    pool = WeightedAggregate(6)
    assert -1 <= pool.attention_weights.min() < 0 < pool.attention_weights.max() <= 1
    feats = torch.randn(3, 4, 6)
    pooled, attention = pool(feats)
    want_pooled, want_attention = vars_attention_loop(feats, pool.attention_weights.detach())
    assert pooled.shape == (3, 6) and attention.shape == (3, 4)
    torch.testing.assert_close(pooled.double(), want_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention.double(), want_attention, rtol=1e-5, atol=1e-6)
    # masked: the same as the real views alone, padded views weigh nothing
    mask = torch.tensor([[True, True, False, False]] * 3)
    masked_pooled, masked_attention = pool(feats, mask)
    alone_pooled, alone_attention = vars_attention_loop(feats[:, :2], pool.attention_weights.detach())
    torch.testing.assert_close(masked_pooled.double(), alone_pooled, rtol=1e-5, atol=1e-5)
    assert masked_attention[:, 2:].abs().max() == 0
    torch.testing.assert_close(masked_attention[:, :2].double(), alone_attention, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_ignores_view_order(pooling):
    model = tiny_model(pooling)
    clips = torch.rand(2, 3, *CLIP)
    with torch.no_grad():
        out = model(clips)
        permuted = model(clips[:, [2, 0, 1]])
    assert out["offence"].shape == (2, 4) and out["action"].shape == (2, 8)
    assert (out["attention"] is None) == (pooling != "attention")
    torch.testing.assert_close(permuted["offence"], out["offence"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted["action"], out["action"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padded_views_have_no_influence(pooling):
    """An action with 2 views, alone, gives the logits it gives padded to 4 next to a 4-view action."""
    model = tiny_model(pooling)
    two_views, four_views = torch.rand(1, 2, *CLIP), torch.rand(1, 4, *CLIP)
    padded = torch.cat([two_views, 10 * torch.rand(1, 2, *CLIP)], dim=1)   # padding content must not matter
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.no_grad():
        alone = model(two_views)
        batch = model(torch.cat([padded, four_views]), mask)
        four_alone = model(four_views)
    for key in ("offence", "action"):
        torch.testing.assert_close(batch[key][:1], alone[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch[key][1:], four_alone[key], rtol=1e-5, atol=1e-5)
    if pooling == "attention":
        assert batch["attention"][0, 2:].abs().max() == 0
        torch.testing.assert_close(batch["attention"][:1, :2], alone["attention"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Backbones

@pytest.mark.parametrize("backbone", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_resnet3d_backbones_forward(backbone):
    torch.manual_seed(0)
    model = build_mvfoul_model(backbone, "max").eval()
    assert model.feat_dim == 512 and model.inter[1].in_features == 512
    with torch.no_grad():
        out = model(torch.rand(1, 2, *CLIP))
    assert out["offence"].shape == (1, 4) and out["action"].shape == (1, 8)
    assert backbone_blocks(model) == ["backbone.stem", *(f"backbone.layer{i}" for i in range(1, 5))]
    assert [name for name, _ in resolve_blocks(model, backbone_blocks(model))] == backbone_blocks(model)


@pytest.mark.parametrize("backbone", ["s3d", "mvit_v2_s"])
def test_s3d_and_mvit_keep_their_kinetics_classifier(backbone):
    """Too slow on CPU at the 16x224x224 they need: the forward runs on the meta device (shapes only)."""
    with torch.device("meta"):
        model = build_mvfoul_model(backbone, "attention")
        out = model(torch.empty(2, 3, 3, 16, 224, 224))
    assert model.feat_dim == FEATURE_DIMS[backbone] == 400
    assert out["offence"].shape == (2, 4) and out["action"].shape == (2, 8) and out["attention"].shape == (2, 3)
    blocks = backbone_blocks(model)
    assert blocks[-1] == ("backbone.classifier" if backbone == "s3d" else "backbone.head")
    assert len(resolve_blocks(model, blocks)) == len(blocks)


def test_tiny3d_trains():
    model = tiny_model("attention").train()
    out = model(torch.rand(2, 2, *CLIP))
    assert model.feat_dim == 64 and out["attention"].shape == (2, 2)
    (out["offence"].sum() + out["action"].sum()).backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert model.aggregation.attention_weights.grad.abs().sum() > 0
    assert backbone_blocks(model) == ["backbone.stem", "backbone.layer1", "backbone.layer2", "backbone.layer3"]


def test_unknown_choices_are_config_errors():
    with pytest.raises(ConfigError, match="r2plus1d_18"):
        build_mvfoul_model("resnet50", "max")
    with pytest.raises(ConfigError, match="attention"):
        build_mvfoul_model("tiny3d", "sum")
    assert "tiny3d" in BACKBONES


# ------------------------------------------------------------------------------------------------
# Backbone weights from a file

@pytest.fixture(scope="module")
def r3d_file(tmp_path_factory):
    torch.manual_seed(1)
    model = build_mvfoul_model("r3d_18", "max")
    path = tmp_path_factory.mktemp("weights") / "r3d.pth"
    torch.save({"state_dict": model.backbone.state_dict()}, path)
    return str(path), model.backbone.state_dict()


def test_backbone_weights_load(r3d_file):
    path, saved = r3d_file
    model = build_mvfoul_model("r3d_18", "max", weights=path)
    loaded = model.backbone.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_weights_of_another_backbone_are_named(r3d_file):
    path, _ = r3d_file
    with pytest.raises(ConfigError, match=r"r3d\.pth holds r3d_18 weights \(by its keys and shapes\), not r2plus1d_18"):
        build_mvfoul_model("r2plus1d_18", "max", weights=path)
    with pytest.raises(ConfigError, match="holds r3d_18 weights .*, not tiny3d"):
        build_mvfoul_model("tiny3d", "max", weights=path)


def test_weights_that_fit_no_backbone_say_what_differs(tmp_path):
    state = build_mvfoul_model("tiny3d", "max").backbone.state_dict()
    path = tmp_path / "tiny.pt"
    torch.save({k: v for k, v in state.items() if k != "layer3.1.weight"}, path)
    with pytest.raises(ConfigError, match=r"tiny.pt does not fit tiny3d: 1 missing \(e.g. layer3.1.weight\)"):
        build_mvfoul_model("tiny3d", "max", weights=str(path))
    with pytest.raises(ConfigError, match="tiny.pt does not fit mc3_18: .* missing"):
        build_mvfoul_model("mc3_18", "max", weights=str(path))


def test_mc3_weights_are_told_from_r3d_by_shapes(tmp_path):
    """r3d_18 and mc3_18 have the same keys; only kernel shapes tell them apart."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in video.mc3_18().state_dict().items()}
    path = tmp_path / "mc3.safetensors"
    from safetensors.torch import save_file
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    with pytest.raises(ConfigError, match="holds mc3_18 weights"):
        build_mvfoul_model("r3d_18", "max", weights=str(path))


def test_torchvision_file_loads_with_its_classifier_ignored(tmp_path):
    torch.manual_seed(2)
    full = video.mc3_18()
    path = tmp_path / "mc3_18-a90a0ba3.pth"
    torch.save(full.state_dict(), path)
    model = build_mvfoul_model("mc3_18", "mean", weights=str(path))
    assert torch.equal(model.backbone.layer4[1].conv2[0].weight, full.layer4[1].conv2[0].weight)
    assert not any(k.startswith("fc.") for k in model.backbone.state_dict())


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.pth: no such file"):
        build_mvfoul_model("tiny3d", "max", weights=str(tmp_path / "nowhere.pth"))


# ------------------------------------------------------------------------------------------------
# Losses: two samples, three classes; p = softmax([0, 0, 0]) = 1/3 each, softmax([0, ln 2, 0]) = (1/4, 1/2, 1/4)

LOGITS = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])
TARGET = torch.tensor([0, 1])          # p_t = 1/3 and 1/2
WEIGHTS = torch.tensor([1.0, 2.0, 3.0])


@pytest.mark.parametrize("kind, weights, gamma, expected", [
    ("plain", None, 2.0, (math.log(3) + math.log(2)) / 2),
    ("weighted", WEIGHTS, 2.0, (1 * math.log(3) + 2 * math.log(2)) / 3),
    ("focal", None, 2.0, ((2 / 3) ** 2 * math.log(3) + (1 / 2) ** 2 * math.log(2)) / 2),
    ("focal", WEIGHTS, 2.0, (1 * (2 / 3) ** 2 * math.log(3) + 2 * (1 / 2) ** 2 * math.log(2)) / 3),
    ("focal", None, 1.0, ((2 / 3) * math.log(3) + (1 / 2) * math.log(2)) / 2),
])
def test_task_loss_values(kind, weights, gamma, expected):
    loss = TaskLoss(kind, weights, focal_gamma=gamma)(LOGITS, TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    weights = torch.rand(5) + 0.1
    torch.testing.assert_close(TaskLoss("focal", None, 0.0)(logits, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(TaskLoss("focal", weights, 0.0)(logits, target),
                               F.cross_entropy(logits, target, weight=weights))
    torch.testing.assert_close(TaskLoss("weighted", weights)(logits, target),
                               F.cross_entropy(logits, target, weight=weights))


def test_class_weights_and_multitask_sum():
    torch.testing.assert_close(class_weights_from_counts(torch.tensor([6, 3, 0, 1])),
                               torch.tensor([10 / 6, 10 / 3, 0.0, 10.0]))
    with pytest.raises(ConfigError, match="needs class weights"):
        TaskLoss("weighted", None)
    loss = MultiTaskLoss(TaskLoss("plain"), TaskLoss("weighted", WEIGHTS), offence_weight=2.0, action_weight=0.5)
    parts = loss({"offence": LOGITS, "action": LOGITS, "attention": None}, TARGET, TARGET)
    assert parts["loss_offence"].item() == pytest.approx((math.log(3) + math.log(2)) / 2, rel=1e-6)
    assert parts["loss_action"].item() == pytest.approx((math.log(3) + 2 * math.log(2)) / 3, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(2 * parts["loss_offence"].item() + 0.5 * parts["loss_action"].item())


# ------------------------------------------------------------------------------------------------
# Augmentation

def smooth_clips(n: int, frames: int = 3, size: int = 24) -> torch.Tensor:
    """Clips of identical frames with some structure (a blurred random image), in [0, 1]."""
    torch.manual_seed(0)
    image = F.avg_pool2d(torch.rand(n, 3, size, size), 5, stride=1, padding=2)
    return image[:, :, None].expand(n, 3, frames, size, size).contiguous()


def change(strength: str, clips: torch.Tensor, seed: int = 0, scale: torch.Tensor | None = None) -> torch.Tensor:
    out = augment_clips(clips, strength, torch.Generator().manual_seed(seed), scale)
    return (out - clips).abs().mean(dim=(1, 2, 3, 4))


def test_augmentation_is_one_transform_per_clip():
    clips = smooth_clips(4)
    out = augment_clips(clips, "moderate", torch.Generator().manual_seed(0))
    assert out.shape == clips.shape and out.dtype == clips.dtype
    assert 0 <= out.min() and out.max() <= 1
    for t in range(1, clips.shape[2]):
        torch.testing.assert_close(out[:, :, t], out[:, :, 0], rtol=0, atol=1e-6)
    same = augment_clips(clips[:1].expand(4, -1, -1, -1, -1), "moderate", torch.Generator().manual_seed(0))
    for a in range(4):
        for b in range(a + 1, 4):
            assert (same[a] - same[b]).abs().mean() > 1e-3


def test_augmentation_strengths_and_scales():
    clips = smooth_clips(16)
    assert change("mild", clips).mean() < change("moderate", clips).mean() < change("aggressive", clips).mean()
    scale = torch.tensor([0.0, 1.0] * 8)
    moved = change("aggressive", clips, scale=scale)
    assert moved[0::2].max() == 0 and moved[1::2].min() > 0
    assert severity_scale(torch.tensor([0, 1, 2, 3]), torch.tensor([100, 25, 4, 1])).tolist() == [1.0, 2.0, 2.0, 2.0]
    assert severity_scale(torch.tensor([1]), torch.tensor([100, 64, 4, 1])).item() == pytest.approx(1.25)


def test_augmentation_is_reproducible():
    clips = smooth_clips(3)
    first = augment_clips(clips, "aggressive", torch.Generator().manual_seed(7))
    assert torch.equal(first, augment_clips(clips, "aggressive", torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment_clips(clips, "aggressive", torch.Generator().manual_seed(8)))
    with pytest.raises(ConfigError, match="mild"):
        augment_clips(clips, "extreme", None)


def test_normalize_uses_kinetics_statistics():
    mean, std = torch.tensor([0.43216, 0.394666, 0.37645]), torch.tensor([0.22803, 0.22145, 0.216989])
    x = (mean + std).view(1, 3, 1, 1, 1).expand(2, 3, 2, 4, 4)
    torch.testing.assert_close(normalize(x), torch.ones_like(x))
    torch.testing.assert_close(normalize(torch.full((1, 3, 1, 2, 2), 0.45), "mvit_v2_s"), torch.zeros(1, 3, 1, 2, 2))
