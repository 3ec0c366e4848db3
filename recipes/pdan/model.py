"""PDAN: Pyramid Dilated Attention Network (Dai et al., WACV 2021) in plain PyTorch.

Shapes: features [B, D, T], mask [B, T] (1 = real frame, 0 = padding) -> logits [S, B, K, T]
(S stages, K classes). Padded frames are exactly 0 in every block output and in the logits.

One deviation from the original PDAN.py, on by default (model.mask_input=true): the input 1x1
projection's output is masked too. The original leaves that conv's bias on padded frames, where the
first block's dilated taps read it, so a shorter video's outputs near its end depend on how much
padding its batch has; masked, a video's outputs equal its batch-size-1 outputs at any padding.
model.mask_input=false gives the original's forward exactly.

The Dilated Attention Layer (DAL) attends, per channel, over three taps t-d, t, t+d of a
zero-padded key/value sequence; a learned relative-position term is added to the values.
The taps are three slices of one padded tensor (no unfold, no data-dependent control flow),
so the model traces cleanly under torch.compile.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainlib.config import opt, rule


@dataclass
class PDANConfig:
    num_stages: int = opt(1, "number of stages (stage s>1 refines the logits of stage s-1)", ge=1)
    num_layers: int = opt(5, "dilated attention blocks per stage (dilations 1, 2, 4, ...)", ge=1)
    num_channels: int = opt(512, "feature maps inside each stage", ge=1)
    input_channels: int = opt(-1, "-1: auto, 256 for data.mode=skeleton, else 1024",
                              check=rule("-1 (auto) or a size >= 1", lambda v: v == -1 or v >= 1))
    num_classes: int = opt(157, "number of action classes (157 for Charades)", ge=1)
    dropout: float = opt(0.5, "dropout after each block's 1x1 convolution", ge=0, lt=1)
    loss_all_stages: bool = opt(False, "BCE on every stage instead of only the last")
    mask_input: bool = opt(True, "mask the input 1x1 projection's output, so a video's outputs do not depend on "
                                 "its batch's padding; false: as the original PDAN.py (its bias leaks into the "
                                 "frames next to a padded video's end)")


class DAL(nn.Module):
    """Dilated Attention Layer: per-channel softmax attention over the taps t-d, t, t+d."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.dilation = int(dilation)
        self.query_conv = nn.Conv1d(channels, channels, kernel_size=1, bias=False)
        self.key_conv = nn.Conv1d(channels, channels, kernel_size=1, bias=False)
        self.value_conv = nn.Conv1d(channels, channels, kernel_size=1, bias=False)
        # Relative position term for the 3 taps, added to the values; broadcasts over batch and time.
        self.rel_t = nn.Parameter(torch.empty(channels, 1, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.query_conv, self.key_conv, self.value_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.rel_t, 0.0, 1.0)

    def taps(self, y: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [3, B, C, T]: y[t-d], y[t], y[t+d] with zeros outside [0, T)."""
        d, T = self.dilation, y.shape[-1]
        padded = F.pad(y, (d, d))
        # Taps on a leading dim: softmax/sum over a leading size-3 dim are ~4x faster on CPU
        # than over a trailing one.
        return torch.stack((padded[..., 0:T], padded[..., d:d + T], padded[..., 2 * d:2 * d + T]), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query_conv(x)
        # The 1x1 convs have no bias, so conv(pad(x)) == pad(conv(x)): project first, pad in taps().
        k = self.taps(self.key_conv(x))
        rel = self.rel_t.permute(2, 0, 1).unsqueeze(1)           # [C, 1, 3] -> [3, 1, C, 1]
        v = self.taps(self.value_conv(x)) + rel
        attn = torch.softmax(q.unsqueeze(0) * k, dim=0)         # per channel, over the 3 taps
        return (attn * v).sum(dim=0)


class PDANBlock(nn.Module):
    def __init__(self, channels: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.attention = DAL(channels, dilation)
        self.conv_1x1 = nn.Conv1d(channels, channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.attention(x))
        h = self.dropout(self.conv_1x1(h))
        return (x + h) * mask


class PDANStage(nn.Module):
    """Single-stage PDAN (SSPDAN): 1x1 in, dilated attention blocks, 1x1 out."""

    def __init__(self, num_layers: int, num_channels: int, input_channels: int, num_classes: int,
                 dropout: float, mask_input: bool = True) -> None:
        super().__init__()
        self.mask_input = bool(mask_input)
        self.conv_1x1 = nn.Conv1d(input_channels, num_channels, kernel_size=1)
        self.layers = nn.ModuleList(
            PDANBlock(num_channels, 2 ** i, dropout) for i in range(num_layers))
        self.conv_out = nn.Conv1d(num_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Masking the input projection (the original leaves this conv's bias on padded frames)
        # keeps padded frames at 0 from the first block on: a video's output then does not
        # depend on how much padding its batch has and equals its batch-size-1 output.
        # mask_input=False: the original PDAN.py (no mask here).
        h = self.conv_1x1(x)
        if self.mask_input:
            h = h * mask
        for layer in self.layers:
            h = layer(h, mask)
        return self.conv_out(h) * mask


class PDAN(nn.Module):
    def __init__(self, num_stages: int = 1, num_layers: int = 5, num_channels: int = 512,
                 input_channels: int = 1024, num_classes: int = 157, dropout: float = 0.5,
                 mask_input: bool = True) -> None:
        super().__init__()
        if num_stages < 1 or num_layers < 1:
            raise ValueError(f"PDAN needs num_stages >= 1 and num_layers >= 1, got {num_stages}, {num_layers}")
        if input_channels < 1:
            raise ValueError(f"PDAN input_channels must be resolved to a positive size, got {input_channels}")
        self.stage1 = PDANStage(num_layers, num_channels, input_channels, num_classes, dropout, mask_input)
        self.stages = nn.ModuleList(
            PDANStage(num_layers, num_channels, num_classes, num_classes, dropout, mask_input)
            for _ in range(num_stages - 1))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features [B, D, T], mask [B, T] (0/1) -> logits [S, B, K, T]."""
        m = mask.to(features.dtype).unsqueeze(1)
        out = self.stage1(features, m)
        outputs = [out]
        for stage in self.stages:
            out = stage(out * m, m)  # raw logits of the previous stage, as in the original
            outputs.append(out)
        return torch.stack(outputs, dim=0)
