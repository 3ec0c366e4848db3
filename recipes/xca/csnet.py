"""CS-Net (Mou et al., MICCAI 2019): a U-Net with channel and spatial self-attention at the bottleneck,
built for thin curvilinear structures; the supervised baseline of soft-seg (src/archs/components/csnet.py,
itself the official iMED-Lab/CS-Net code).

Shapes: image [B, in_channels, H, W] (H, W divisible by 16) -> logits [B, num_classes, H, W].
Widths are base * (1, 2, 4, 8, 16); base=32 is the paper's 32..512 (8.4M parameters).
Initialisation as the original: Kaiming-normal Conv2d weights with zero bias, BatchNorm 1/0, and the
transposed convs left at PyTorch's default (the original's `isinstance(m, nn.Conv2d)` skips them).
The attention gammas start at 0, so each attention block is the identity at init; the original then
adds the *sum* of the two blocks to the features, so the fused bottleneck starts at 3x the features.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int | tuple[int, int] = 3,
                 padding: int | tuple[int, int] = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU()]


class ResEncoder(nn.Module):
    """(conv3x3-BN-ReLU) x2 plus a 1x1-conv shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn_relu(cin, cout), *conv_bn_relu(cout, cout))
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SpatialAttentionBlock(nn.Module):
    """Position attention over all HW pixels; asymmetric 1x3 / 3x1 query / key convs follow thin
    horizontal and vertical structures. out = gamma * attended + x."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Sequential(*conv_bn_relu(channels, channels // 8, (1, 3), (0, 1)))
        self.key = nn.Sequential(*conv_bn_relu(channels, channels // 8, (3, 1), (1, 0)))
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        query = self.query(x).flatten(2).transpose(1, 2)  # [B, HW, C/8]
        key = self.key(x).flatten(2)  # [B, C/8, HW]
        affinity = torch.softmax(query @ key, dim=-1)  # [B, HW, HW]
        attended = self.value(x).flatten(2) @ affinity.transpose(1, 2)
        return self.gamma * attended.view(b, c, h, w) + x


class ChannelAttentionBlock(nn.Module):
    """Channel attention from the Gram matrix X X^T; softmax(max - affinity) as in the original,
    which favours the *least* similar channels. out = gamma * attended + x."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.flatten(2)  # [B, C, HW]
        affinity = flat @ flat.transpose(1, 2)  # [B, C, C]
        affinity = torch.softmax(affinity.amax(dim=-1, keepdim=True) - affinity, dim=-1)
        return self.gamma * (affinity @ flat).view(b, c, h, w) + x


class AffinityAttention(nn.Module):
    """Spatial and channel attention run in parallel and summed."""

    def __init__(self, channels: int):
        super().__init__()
        self.spatial = SpatialAttentionBlock(channels)
        self.channel = ChannelAttentionBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(x) + self.channel(x)


class Decoder(nn.Module):
    """Transposed-conv x2 upsampling, concat the encoder skip, (conv3x3-BN-ReLU) x2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        self.body = nn.Sequential(*conv_bn_relu(2 * cout, cout), *conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([skip, self.up(x)], dim=1))


class CSNet(nn.Module):
    """Five ResEncoder levels with 2x max-pooling, affinity attention at 1/16, four decoder levels."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base: int = 32):
        super().__init__()
        widths = [base * 2**i for i in range(5)]
        self.encoders = nn.ModuleList(ResEncoder(cin, cout) for cin, cout in zip([in_channels, *widths], widths))
        self.pool = nn.MaxPool2d(2)
        self.affinity_attention = AffinityAttention(widths[-1])
        self.decoders = nn.ModuleList(Decoder(cin, cout) for cin, cout in zip(widths[:0:-1], widths[-2::-1]))
        self.final = nn.Conv2d(base, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder skips (full to 1/8 resolution) and the raw 1/16 bottleneck features."""
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"CSNet needs H and W divisible by 16, got {tuple(x.shape[-2:])}")
        skips = []
        for encoder in self.encoders[:-1]:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        return skips, self.encoders[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, features = self.encode(x)
        x = features + self.affinity_attention(features)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
        return self.final(x)
