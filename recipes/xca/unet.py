"""ADM U-Net (Dhariwal & Nichol 2021) as re-implemented in NVIDIA EDM's networks.py (`DhariwalUNet`).

soft-seg registers it as `dhariwal_concat_unet`: the noisy mask x_t and the angiogram are concatenated
on the channel axis, and the time t in [0, 1] goes through the sinusoidal `PositionalEmbedding` as
the noise label. XCA config: model_channels 32, channel_mult (1, 2, 4, 8), channel_mult_emb 4,
num_blocks 3, attn_resolutions (16, 16, 8, 8), dropout 0.

Faithful to EDM: module names (`enc` / `dec` dicts keyed `{res}x{res}_...`), the initialisation (EDM's
kaiming_uniform * sqrt(1/3) is exactly PyTorch's default Linear/Conv2d init; the last conv of every
block, the attention projection and the output conv start at zero), the [1, 1] resample filter (which
is exactly 2x2 average pooling down and nearest-neighbour up), GroupNorm(min(32, C // 4) groups).
Attention rule: a block at level L attends when `img_resolution >> L` is in attn_resolutions, and the
bottleneck's `in0` block always does; img_resolution only decides placement, any H, W divisible by
2 ** (len(channel_mult) - 1) runs.

Deviation: EDM gives a block C // 64 heads, i.e. none below 64 channels, so an `attention=True`
block silently has no attention in a narrow net; here it gets max(1, C // 64) heads, identical for
C >= 64 (every attention block of the XCA config) and testable at tiny widths.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS_PER_HEAD = 64


def group_norm(channels: int) -> nn.GroupNorm:
    """EDM's GroupNorm: 32 groups, but never fewer than 4 channels per group."""
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=1e-5)


def zero_conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    """A conv that starts at zero, so a residual branch (or the whole net) starts as a no-op."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    """EDM's [1, 1] filter: a 2x2 box average to go down, its transpose (nearest) to go up."""
    if down:
        return F.avg_pool2d(x, 2)
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal noise-level embedding (EDM, endpoint=False): [cos(t f_i), sin(t f_i)], f_i = 1e-4^(i/n)."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        half = num_channels // 2
        self.register_buffer("freqs", (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(torch.float32).outer(self.freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class UNetBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, adaptive scale/shift from the embedding, GN-SiLU-conv, skip,
    then optional multi-head self-attention (its own residual)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0):
        super().__init__()
        self.out_channels = out_channels  # read by DhariwalUNet to size the decoder skips
        self.up, self.down, self.dropout = up, down, dropout
        self.num_heads = max(1, out_channels // CHANNELS_PER_HEAD) if attention else 0
        self.norm0 = group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = group_norm(out_channels)
        self.conv1 = zero_conv(out_channels, out_channels, 3)
        # EDM resamples the skip without a conv when only the resolution changes.
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        if self.num_heads:
            self.norm2 = group_norm(out_channels)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = zero_conv(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(resample(F.silu(self.norm0(x)), self.up, self.down))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        skip = resample(orig, self.up, self.down)
        x = x + (self.skip(skip) if self.skip is not None else skip)
        if self.num_heads:
            x = x + self.proj(self._attend(self.norm2(x)))
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """EDM's layout: qkv channels interleaved per head as [head, C/head, 3]; softmax in float32."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
        weights = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1])).softmax(dim=2)
        return torch.einsum("nqk,nck->ncq", weights.to(v.dtype), v).reshape(b, c, h, w)


class DhariwalUNet(nn.Module):
    """x_t (+ image) and t in [0, 1] -> predicted mask (x0); exactly zero at init (zero output conv)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, model_channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2, 4, 8), channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: tuple[int, ...] = (16, 16, 8, 8), dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.downsampling = 2 ** (len(channel_mult) - 1)
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, dropout=dropout)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cout, model_channels * mult, 3, padding=1)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        takes_skip = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
                takes_skip += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
                takes_skip.append(False)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                takes_skip.append(True)
        self.dec_takes_skip = tuple(takes_skip)
        self.out_norm = group_norm(cout)
        self.out_conv = zero_conv(cout, out_channels, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = torch.cat([x, cond], dim=1)
        if x.shape[1] != self.in_channels or x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(f"expected {self.in_channels} channels (x and cond together) and H, W divisible by "
                             f"{self.downsampling}; got {tuple(x.shape)}")
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(self.map_noise(t)))))

        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        for module, takes_skip in zip(self.dec.values(), self.dec_takes_skip):
            if takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
