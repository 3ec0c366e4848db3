"""VARS multi-view network (SoccerNet-MVFoul, sn-mvfoul "VARS model"): a video backbone shared by
every view, a pooling over views, and two heads (offence-severity, action) on a shared layer.

    model = build_mvfoul_model("r2plus1d_18", "attention", weights="/models/r2plus1d_18-91a641e6.pth")
    out = model(clips, view_mask)       # clips [B, V, 3, T, H, W] normalised, view_mask [B, V] bool
    out["offence"] [B, 4], out["action"] [B, 8], out["attention"] [B, V] (attention pooling) or None

As VARS: the ResNet3D family (r3d_18, mc3_18, r2plus1d_18) loses its classifier (`fc` becomes an
empty Sequential) and gives 512 features; s3d and mvit_v2_s KEEP their Kinetics classifier (VARS
replaces an `fc` they do not have), so their features are the 400 Kinetics logits. `tiny3d` is a
small 3D CNN (64 features) for CPU demos and tests.

Backbone stages (`backbone_blocks`, for freezing and activation checkpointing):
ResNet3D: backbone.stem, backbone.layer1..layer4; tiny3d: backbone.stem, backbone.layer1..layer3;
s3d: backbone.features.<i> (the 12 stages with weights; pools skipped), backbone.classifier;
mvit_v2_s: backbone.conv_proj, backbone.pos_encoding, backbone.blocks.0..15, backbone.norm, backbone.head.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
from torchvision.models import video

from trainlib.config import ConfigError
from trainlib.loggers import log

TORCHVISION_BACKBONES = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s")
BACKBONES = (*TORCHVISION_BACKBONES, "tiny3d")
POOLINGS = ("max", "mean", "attention")
FEATURE_DIMS = {"r3d_18": 512, "mc3_18": 512, "r2plus1d_18": 512, "s3d": 400, "mvit_v2_s": 400, "tiny3d": 64}
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.")  # torchvision classifiers, dropped when the backbone has none


def _conv_block(cin: int, cout: int, stride: int | tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


class Tiny3D(nn.Module):
    """A few strided Conv3d+BN+ReLU stages and a global average pool: runs on CPU in milliseconds,
    named like the ResNet3D family (stem, layer1..) so freezing and checkpointing code is shared."""

    def __init__(self, feat_dim: int = FEATURE_DIMS["tiny3d"]):
        super().__init__()
        self.stem = _conv_block(3, 16, (1, 2, 2))
        self.layer1 = _conv_block(16, 32, 2)
        self.layer2 = _conv_block(32, 64, 2)
        self.layer3 = _conv_block(64, feat_dim, 2)
        self.pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))).flatten(1)


def build_backbone(name: str) -> nn.Module:
    """Randomly initialised backbone as VARS builds it (never downloads: weights come from a file)."""
    if name == "tiny3d":
        return Tiny3D()
    network = getattr(video, name)(weights=None)
    if name not in ("s3d", "mvit_v2_s"):
        network.fc = nn.Sequential()
    return network


class ViewMaxPool(nn.Module):
    """Feature-wise max over the real views (VARS ViewMaxAggregate); padded views are -inf."""

    def forward(self, feats: torch.Tensor, view_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if view_mask is not None:
            feats = feats.masked_fill(~view_mask[..., None], float("-inf"))
        return feats.max(dim=1).values, None


class ViewMeanPool(nn.Module):
    """Mean over the real views (VARS ViewAvgAggregate)."""

    def forward(self, feats: torch.Tensor, view_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if view_mask is None:
            return feats.mean(dim=1), None
        real = view_mask[..., None]
        return torch.where(real, feats, 0.0).sum(dim=1) / real.sum(dim=1).clamp_min(1), None


class WeightedAggregate(nn.Module):
    """VARS view attention: A = feats @ W (W: F x F, U(-1, 1)); S = relu(A A^T) [B, V, V] divided by
    its sum over all V*V entries; view weight w_j = sum_i S_ij; output = sum_j w_j A_j.

    Padded views have A = 0, hence zero affinity with every view: zero weight, and the
    normalisation runs over the real views only. Computed in float32 with autocast off: the
    affinities are sums of F products of values ~sqrt(F) in size and overflow float16. (VARS also
    builds an unused LayerNorm+ReLU `normReLu`, left out.)"""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.attention_weights = nn.Parameter(torch.empty(feat_dim, feat_dim).uniform_(-1.0, 1.0))

    def forward(self, feats: torch.Tensor, view_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda" if feats.is_cuda else "cpu", enabled=False):
            lifted = feats.float() @ self.attention_weights.float()                 # [B, V, F]
            if view_mask is not None:
                lifted = torch.where(view_mask[..., None], lifted, 0.0)
            affinity = torch.relu(lifted @ lifted.transpose(1, 2))                   # [B, V, V]
            total = affinity.sum(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(affinity.dtype).tiny)
            weights = (affinity / total).sum(dim=1)                                  # [B, V], sums to 1
            return (weights.unsqueeze(-1) * lifted).sum(dim=1), weights


def _head(feat_dim: int, out_dim: int) -> nn.Sequential:
    """VARS head: LayerNorm, then two Linears with no nonlinearity between them."""
    return nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, feat_dim), nn.Linear(feat_dim, out_dim))


class MVNetwork(nn.Module):
    """Views folded into the batch through one backbone, pooled, then inter -> fc_offence / fc_action."""

    def __init__(self, backbone: str = "r2plus1d_18", pooling: str = "max", num_action: int = 8, num_offence: int = 4):
        super().__init__()
        _check_choice("model.backbone_name", backbone, BACKBONES)
        _check_choice("model.pooling_type", pooling, POOLINGS)
        self.backbone_name = backbone
        self.feat_dim = FEATURE_DIMS[backbone]
        self.backbone = build_backbone(backbone)
        self.aggregation = (WeightedAggregate(self.feat_dim) if pooling == "attention"
                            else ViewMaxPool() if pooling == "max" else ViewMeanPool())
        self.inter = _head(self.feat_dim, self.feat_dim)
        self.fc_action = _head(self.feat_dim, num_action)
        self.fc_offence = _head(self.feat_dim, num_offence)

    def forward(self, clips: torch.Tensor, view_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """clips [B, V, 3, T, H, W]; view_mask [B, V] True for real views (every action needs one).
        Padded views go through the backbone (static shapes, no host sync) but do not reach the output;
        in train mode BatchNorm statistics still see them (VARS trains on exactly 2 views: no padding)."""
        batch, views = clips.shape[:2]
        feats = self.backbone(clips.flatten(0, 1)).reshape(batch, views, -1)
        pooled, attention = self.aggregation(feats, view_mask)
        shared = self.inter(pooled)
        return {"offence": self.fc_offence(shared), "action": self.fc_action(shared), "attention": attention}


def backbone_blocks(model: MVNetwork) -> list[str]:
    """Dotted names of the backbone's stages in forward order (see the module docstring)."""
    net = model.backbone
    if model.backbone_name == "s3d":
        stages = [f"features.{i}" for i, m in enumerate(net.features) if any(True for _ in m.parameters())]
        stages.append("classifier")
    elif model.backbone_name == "mvit_v2_s":
        stages = ["conv_proj", "pos_encoding", *(f"blocks.{i}" for i in range(len(net.blocks))), "norm", "head"]
    else:
        stages = [name for name in ("stem", "layer1", "layer2", "layer3", "layer4") if hasattr(net, name)]
    return [f"backbone.{s}" for s in stages]


def build_mvfoul_model(backbone: str, pooling: str, weights: str = "", num_action: int = 8,
                       num_offence: int = 4) -> MVNetwork:
    """The VARS network; `weights`: a local backbone state dict file ('' = random init)."""
    model = MVNetwork(backbone, pooling, num_action, num_offence)
    if weights:
        load_backbone_weights(model.backbone, backbone, weights)
    return model


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}")


# ------------------------------------------------------------------------------------------------
# Backbone weights from a local file

def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch.save'd state dict (possibly under "state_dict"
    or "model"); a DDP "module." prefix is dropped."""
    if not os.path.isfile(path):
        raise ConfigError(f"model.weights={path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's input, reported as one line
        raise ConfigError(f"model.weights={path} cannot be read as a state dict: {e}") from None
    while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in ("state_dict", "model")):
        state = state["state_dict"] if isinstance(state.get("state_dict"), dict) else state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights={path} is not a state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


@functools.lru_cache(maxsize=None)
def _torchvision_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a full torchvision model (classifier included), built on the meta device: no memory, no init."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in getattr(video, name)().state_dict().items()}


def _without_classifier(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s in shapes.items() if not k.startswith(CLASSIFIER_PREFIXES)}


def guess_backbone(state: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(torchvision backbone, 'by its keys and shapes' | 'by its keys') that `state` was made for, or None.
    The classifier is left out of the comparison (it may be dropped or fine-tuned); r3d_18 and mc3_18
    share their keys and differ in kernel shapes."""
    given = _without_classifier({k: tuple(v.shape) for k, v in state.items()})
    same_keys = [n for n in TORCHVISION_BACKBONES
                 if given.keys() == _without_classifier(_torchvision_shapes(n)).keys()]
    exact = [n for n in same_keys if given == _without_classifier(_torchvision_shapes(n))]
    if exact:
        return exact[0], "by its keys and shapes"
    return (same_keys[0], "by its keys") if same_keys else None


def _mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """'' when `given` fits `own`, else what differs (a few examples of each kind)."""
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    reshaped = [f"{k} {list(given[k].shape)} in the file, {list(own[k].shape)} here"
                for k in own if k in given and given[k].shape != own[k].shape]
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped))
             if keys]
    return "; ".join(parts)


def load_backbone_weights(backbone: nn.Module, name: str, path: str) -> list[str]:
    """Load `path` into `backbone` (built by build_backbone(name)); returns the classifier keys
    ignored because the backbone has no classifier. ConfigError for a missing file or one made for
    another backbone (naming the one it looks like)."""
    state = read_state_dict(path)
    own = backbone.state_dict()
    ignored = [k for k in state if k not in own and k.startswith(CLASSIFIER_PREFIXES)]
    kept = {k: v for k, v in state.items() if k not in ignored}
    problem = _mismatch(own, kept)
    if problem:
        guess = guess_backbone(state)
        if guess is not None and guess[0] != name:
            raise ConfigError(f"model.weights={path} holds {guess[0]} weights ({guess[1]}), not {name}")
        raise ConfigError(f"model.weights={path} does not fit {name}: {problem}")
    backbone.load_state_dict(kept)
    log.info("model.weights=%s: %d tensors loaded into %s, %d classifier tensors ignored%s", path, len(kept), name,
             len(ignored), f" ({', '.join(ignored)})" if ignored else "")
    return ignored
