"""SegFormer (Xie et al., NeurIPS 2021) in plain PyTorch: the MiT encoder and the all-MLP decode head.

Shapes: pixel_values [B, 3, H, W] float -> logits [B, num_labels, H/4, W/4] (ceil when H, W are not
multiples of 4; the loss and the metric upsample the logits to the label size).

Module names follow Hugging Face's checkpoint keys (`SegformerForSemanticSegmentation`, as stored on
the hub) so that a HF state dict maps onto ours with four string rules (see pretrained.py):

    HF key                                           ours
    segformer.<rest>                                 <rest>
    ...attention.self.{query,key,value,sr,layer_norm}  ...attention.{query,key,value,sr,layer_norm}
    ...attention.output.dense                        ...attention.proj
    ...mlp.dwconv.dwconv                             ...mlp.dwconv
    decode_head.*                                    decode_head.*   (unchanged)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainlib.config import ConfigError, opt, rule

# MiT variants (the reference convert script): hidden sizes, depths, decoder width.
VARIANTS: dict[str, dict] = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
# The same for every variant.
FIXED = {"num_attention_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1], "patch_sizes": [7, 3, 3, 3],
         "strides": [4, 2, 2, 2], "mlp_ratios": [4, 4, 4, 4], "num_channels": 3}
PER_STAGE = rule("empty or 4 values, one per stage", lambda v: len(v) in (0, 4))


@dataclass
class SegFormerConfig:
    variant: Literal["b0", "b1", "b2", "b3", "b4", "b5"] = opt("b0", "MiT encoder size (nvidia/mit-b0 .. mit-b5)")
    num_labels: int = opt(35, "number of classes (35 for segments/sidewalk-semantic)", ge=1)
    drop_path_rate: float = opt(0.1, "stochastic depth, linearly spaced from 0 over all encoder blocks", ge=0, lt=1)
    classifier_dropout: float = opt(0.1, "dropout before the decode head's classifier", ge=0, lt=1)
    pretrained: str = opt("", "local folder in the Hugging Face layout (config.json + model.safetensors): "
                              "nvidia/mit-b* encoder, or a full SegformerForSemanticSegmentation")
    hidden_sizes: list[int] = opt([], "channels of the 4 stages (empty: from model.variant)", ge=1, check=PER_STAGE)
    depths: list[int] = opt([], "blocks per stage (empty: from model.variant)", ge=1, check=PER_STAGE)
    num_attention_heads: list[int] = opt([], "heads per stage (empty: [1, 2, 5, 8])", ge=1, check=PER_STAGE)
    decoder_hidden_size: int = opt(0, "decode head width (0: from model.variant, 256 for b0/b1, 768 for b2-b5)", ge=0)


def architecture(cfg: SegFormerConfig) -> dict:
    """Keyword arguments of SegFormer for a model config (variant, then explicit overrides)."""
    arch = {**FIXED, **{k: list(v) if isinstance(v, list) else v for k, v in VARIANTS[cfg.variant].items()}}
    for key in ("hidden_sizes", "depths", "num_attention_heads"):
        value = list(getattr(cfg, key))
        if value:
            if len(value) != 4:
                raise ConfigError(f"config key 'model.{key}': expected 4 values (one per stage), got {value}")
            arch[key] = value
    if cfg.decoder_hidden_size:
        arch["decoder_hidden_size"] = int(cfg.decoder_hidden_size)
    for size, heads in zip(arch["hidden_sizes"], arch["num_attention_heads"]):
        if heads < 1 or size % heads:
            raise ConfigError(f"model.hidden_sizes {arch['hidden_sizes']} must be divisible by "
                              f"model.num_attention_heads {arch['num_attention_heads']} stage by stage")
    if cfg.num_labels < 1:
        raise ConfigError(f"config key 'model.num_labels': expected a positive number of classes, got {cfg.num_labels}")
    arch.update(num_labels=int(cfg.num_labels), drop_path_rate=float(cfg.drop_path_rate),
                classifier_dropout=float(cfg.classifier_dropout))
    return arch


# ------------------------------------------------------------------------------------------------
# Encoder

class OverlapPatchEmbed(nn.Module):
    """Conv2d(k=patch, stride, pad=patch//2) -> tokens [B, H*W, C] -> LayerNorm."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=stride, padding=patch_size // 2)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.layer_norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a map reduced by a strided conv (sr_ratio)."""

    def __init__(self, hidden_size: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=sr_ratio, stride=sr_ratio)
            self.layer_norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.heads(self.query(x))
        kv = x
        if self.sr_ratio > 1:
            kv = self.sr(x.transpose(1, 2).reshape(b, c, h, w))
            kv = self.layer_norm(kv.flatten(2).transpose(1, 2))
        out = F.scaled_dot_product_attention(q, self.heads(self.key(kv)), self.heads(self.value(kv)))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """dense1 -> depthwise 3x3 conv on the token map -> GELU -> dense2."""

    def __init__(self, hidden_size: int, mlp_ratio: int) -> None:
        super().__init__()
        inner = hidden_size * mlp_ratio
        self.dense1 = nn.Linear(hidden_size, inner)
        self.dwconv = nn.Conv2d(inner, inner, 3, 1, 1, groups=inner)
        self.act = nn.GELU()
        self.dense2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.dense1(x)
        b, n, c = x.shape
        # contiguous: a channels-last input would give the depthwise weight a gradient of other strides
        # than the weight's, which DDP reports as a bucket-view mismatch
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w).contiguous()).flatten(2).transpose(1, 2)
        return self.dense2(self.act(x))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device))
        return x / keep * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(hidden_size)
        self.attention = EfficientSelfAttention(hidden_size, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.layer_norm_2 = nn.LayerNorm(hidden_size)
        self.mlp = MixFFN(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.layer_norm_1(x), h, w))
        return x + self.drop_path(self.mlp(self.layer_norm_2(x), h, w))


class MiTEncoder(nn.Module):
    """Mix Transformer: 4 stages at strides 4, 8, 16, 32; returns the 4 maps [B, C_i, H_i, W_i]."""

    def __init__(self, hidden_sizes: list[int], depths: list[int], num_attention_heads: list[int],
                 sr_ratios: list[int], patch_sizes: list[int], strides: list[int], mlp_ratios: list[int],
                 num_channels: int = 3, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        self.patch_embeddings = nn.ModuleList()
        self.block = nn.ModuleList()
        self.layer_norm = nn.ModuleList()
        start = 0
        for i, (size, depth) in enumerate(zip(hidden_sizes, depths)):
            self.patch_embeddings.append(OverlapPatchEmbed(num_channels if i == 0 else hidden_sizes[i - 1], size,
                                                           patch_sizes[i], strides[i]))
            self.block.append(nn.ModuleList(Block(size, num_attention_heads[i], sr_ratios[i], mlp_ratios[i],
                                                  rates[start + j]) for j in range(depth)))
            self.layer_norm.append(nn.LayerNorm(size))
            start += depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for embed, blocks, norm in zip(self.patch_embeddings, self.block, self.layer_norm):
            x, h, w = embed(x)
            for blk in blocks:
                x = blk(x, h, w)
            x = norm(x)
            x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            maps.append(x)
        return maps


# ------------------------------------------------------------------------------------------------
# Decode head

class MLP(nn.Module):
    """Per-pixel Linear on a map: [B, C, H, W] -> [B, H*W, D]."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2))


class DecodeHead(nn.Module):
    """All-MLP head: project every stage to D, upsample to 1/4, concat (stage 4 first), fuse, classify."""

    def __init__(self, hidden_sizes: list[int], decoder_hidden_size: int, num_labels: int,
                 classifier_dropout: float = 0.1) -> None:
        super().__init__()
        d = decoder_hidden_size
        self.linear_c = nn.ModuleList(MLP(c, d) for c in hidden_sizes)
        self.linear_fuse = nn.Conv2d(d * len(hidden_sizes), d, kernel_size=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(d)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Conv2d(d, num_labels, kernel_size=1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        ups = []
        for x, mlp in zip(maps, self.linear_c):
            b, _, h, w = x.shape
            y = mlp(x).transpose(1, 2).reshape(b, -1, h, w)
            ups.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        x = self.linear_fuse(torch.cat(ups[::-1], dim=1))
        return self.classifier(self.dropout(self.activation(self.batch_norm(x))))


class SegFormer(nn.Module):
    """MiT encoder + all-MLP decode head. forward(pixel_values) -> logits at 1/4 resolution."""

    def __init__(self, hidden_sizes: list[int], depths: list[int], num_labels: int,
                 decoder_hidden_size: int = 256, num_attention_heads: list[int] = FIXED["num_attention_heads"],
                 sr_ratios: list[int] = FIXED["sr_ratios"], patch_sizes: list[int] = FIXED["patch_sizes"],
                 strides: list[int] = FIXED["strides"], mlp_ratios: list[int] = FIXED["mlp_ratios"],
                 num_channels: int = 3, drop_path_rate: float = 0.1, classifier_dropout: float = 0.1) -> None:
        super().__init__()
        self.arch = dict(hidden_sizes=list(hidden_sizes), depths=list(depths), num_labels=int(num_labels),
                         decoder_hidden_size=int(decoder_hidden_size), num_attention_heads=list(num_attention_heads),
                         sr_ratios=list(sr_ratios), patch_sizes=list(patch_sizes), strides=list(strides),
                         mlp_ratios=list(mlp_ratios), num_channels=int(num_channels))
        self.encoder = MiTEncoder(hidden_sizes, depths, num_attention_heads, sr_ratios, patch_sizes, strides,
                                  mlp_ratios, num_channels, drop_path_rate)
        self.decode_head = DecodeHead(hidden_sizes, decoder_hidden_size, num_labels, classifier_dropout)
        self.apply(_init_weights)

    @classmethod
    def from_config(cls, cfg: SegFormerConfig) -> "SegFormer":
        return cls(**architecture(cfg))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.encoder(pixel_values))


def _init_weights(m: nn.Module) -> None:
    """As the reference: Linear/Conv normal(0, 0.02) with zero bias; norms weight 1, bias 0."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
