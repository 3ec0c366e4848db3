"""The trained module: uint8 clips in, both tasks' logits out.

Preprocessing lives inside the module's forward, not in the DataLoader, because batches travel as
uint8 (a quarter of float32's bytes to copy to the device) and the engine calls the (DDP-wrapped)
module with the batch: scaling to [0, 1], with data.gpu_augmentation=true the batched clip
augmentation (training only; augment.py), and the backbone's normalisation all run on the device.
"""
from __future__ import annotations

import torch
from torch import nn

from .augment import augment_clips, normalize, severity_scale
from .model import MVNetwork


class FoulRecognizer(nn.Module):
    def __init__(self, net: MVNetwork, augment: str = "", offence_counts: torch.Tensor | None = None) -> None:
        """augment: a strength (mild|moderate|aggressive) to augment on the device in training, '' for
        none; offence_counts [4]: train class counts for severity-aware augmentation (None: off)."""
        super().__init__()
        self.net, self.augment = net, augment
        self.register_buffer("offence_counts", offence_counts, persistent=False)

    def forward(self, clips: torch.Tensor, view_mask: torch.Tensor | None = None,
                offence: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """clips uint8 [B, V, 3, T, H, W]; view_mask bool [B, V]; offence [B] (severity-aware scale)."""
        batch, views = clips.shape[:2]
        x = clips.flatten(0, 1).float().div_(255)
        if self.training and self.augment:
            scale = None
            if self.offence_counts is not None and offence is not None:
                scale = severity_scale(offence, self.offence_counts).repeat_interleave(views)
            x = augment_clips(x, self.augment, None, scale)
        x = normalize(x, self.net.backbone_name).to(self.net.fc_action[1].weight.dtype)  # bf16-true: the weights' dtype
        return self.net(x.unflatten(0, (batch, views)), view_mask)
