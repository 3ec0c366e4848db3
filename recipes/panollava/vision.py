"""The SigLIP vision tower in plain PyTorch, loadable from a Hugging Face checkpoint folder.

PanoLLaVA encodes each perspective view with SigLIP-base's vision model and uses its last hidden
state (14x14 patch tokens, no CLS); the attention-pooling head is not used, so it is not built.
Parameter names follow the Hugging Face layout, so the vision tower of a full SigLIP checkpoint
(`vision_model.*` beside `text_model.*`) or a SiglipVisionModel folder loads as is:

    x = patch_conv(pixels) + position_embedding            [B, N, D]
    for each layer:  x = x + out_proj(attention(LN1(x)))    (bidirectional, SDPA)
                     x = x + fc2(gelu_tanh(fc1(LN2(x))))
    last_hidden_state = post_layernorm(x)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainlib.config import ConfigError

from .lm import _read_config, load_into, read_safetensors


@dataclass
class SiglipVisionConfig:
    """The vision_config keys this module reads (defaults: google/siglip-base-patch16-224)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "SiglipVisionConfig":
        """A SigLIP config.json (full model: its vision_config; or a vision model's own) -> config."""
        kind = d.get("model_type")
        if kind == "siglip":
            d = d.get("vision_config") or {}
        elif kind != "siglip_vision_model":
            raise ConfigError(f"{source}: model_type {kind!r} is not a SigLIP checkpoint "
                             "(expected 'siglip' or 'siglip_vision_model')")
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected 'gelu_pytorch_tanh')")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


class Attention(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = Attention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.num_patches, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class Encoder(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))


class SiglipVisionTower(nn.Module):
    """pixel_values [B, 3, H, W] (SigLIP-normalised, H = W = image_size) -> last hidden state [B, N, D]."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated encoder layers: FSDP units of a sharding plan."""
        return self.encoder.layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(f"SiglipVisionTower: pixel_values of shape {tuple(pixel_values.shape)}, expected "
                             f"[B, {self.config.num_channels}, {size}, {size}]")
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


def vision_from_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32) -> SiglipVisionTower:
    """A SigLIP Hugging Face folder (a full SiglipModel or a SiglipVisionModel: config.json +
    model.safetensors) -> SiglipVisionTower with its vision weights (text tower and head ignored)."""
    folder = Path(folder)
    config = SiglipVisionConfig.from_dict(_read_config(folder), str(folder / "config.json"))
    state = read_safetensors(folder)
    anchor = "embeddings.patch_embedding.weight"
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor) and "text_model" not in k]
    if not prefixes:
        raise ConfigError(f"{folder}: the checkpoint has no vision tower ({anchor} not found)")
    prefix = prefixes[0]
    tower = SiglipVisionTower(config)
    load_into(tower, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, str(folder))
    return tower.to(dtype)
