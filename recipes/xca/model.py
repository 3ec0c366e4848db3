"""The `model` section and the one module the Trainer sees for all three systems.

`VesselSegmenter.forward(image, label)` is the training forward of the configured arch (what the
loss takes); `predict(image)` is evaluation: whole images through a sliding window of
`model.roi_size` (gaussian blend, as MONAI's SlidingWindowInferer), and for the generative models an
ensemble of `num_ensemble` samples per window averaged (the seed: 5), returning the vessel
probability {"prob": [B, 1, H, W]} and, for the flow model, a few states of the first sample's
trajectory {"trajectory": [B, K, H, W]} for the validation images.

    dhariwal_concat_unet   flow matching (flow.py): the ADM UNet (unet.py) sees [x_t, image] and t,
                           predicts the velocity x1 - x0; sampling integrates from noise to the mask
    csnet                  CS-Net (csnet.py): 2-class logits, cross-entropy; probability = softmax[1]
    medsegdiff             Gaussian diffusion predicting x0 (diffusion.py) with the same ADM UNet as
                           denoiser (a deviation: diffusion.py says why); EMA via trainer.ema_decay
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainlib.config import ConfigError, opt, rule

from .csnet import CSNet
from .diffusion import GaussianDiffusion
from .flow import FlowMatcher, sample
from .sliding import sliding_window

ARCHS = ("dhariwal_concat_unet", "csnet", "medsegdiff")
DEFAULT_TIMESTEPS = {"dhariwal_concat_unet": 30, "medsegdiff": 50, "csnet": 0}
CSNET_DOWNSAMPLING = 16
_levels = rule("1 to 6 levels", lambda v: 1 <= len(v) <= 6)


@dataclass
class XCAModel:
    arch_name: Literal["dhariwal_concat_unet", "csnet", "medsegdiff"] = opt(
        "dhariwal_concat_unet", "dhariwal_concat_unet: flow matching; csnet: supervised CS-Net; medsegdiff: "
                                "diffusion predicting x0")
    model_channels: int = opt(32, "UNet (flow, medsegdiff): channels of the first level (the seed's `dim`)",
                              ge=1, le=1024)
    channel_mult: list[int] = opt([1, 2, 4, 8], "UNet: channel multiplier per level (one 2x downsampling "
                                                "between levels)", ge=1, le=64, check=_levels)
    channel_mult_emb: int = opt(4, "UNet: time-embedding width as a multiple of model_channels", ge=1, le=64)
    num_blocks: int = opt(3, "UNet: residual blocks per level", ge=1, le=16)
    attn_resolutions: list[int] = opt([16, 16, 8, 8], "UNet: self-attention at the levels of these resolutions "
                                                      "(of model.image_size; the bottleneck always has it)",
                                      ge=1, le=8192)
    dropout: float = opt(0.0, "UNet: dropout in the residual blocks", ge=0, lt=1)
    csnet_channels: int = opt(32, "CS-Net: channels of the first level, doubling to 16x (the paper: 32)",
                              ge=1, le=512)
    sigma: float = opt(0.25, "flow: noise scale of the bridge path sigma sqrt(t (1 - t))", ge=0, le=10)
    bce_weight: float = opt(0.5, "flow: weight of the BCE term of the seed's l1_bce loss (no gradient: "
                                 "flow.py)", ge=0, le=100)
    noise_copies: int = opt(1, "flow: noise draws per training crop (the seed's patch_plan [[320, 8]] is 8)",
                            ge=1, le=64)
    timesteps: int = opt(0, "flow: sampler steps (the seed: 30); medsegdiff: diffusion timesteps (the seed: 50); "
                            "0: that default", ge=0, le=10_000)
    sampling_steps: int = opt(0, "medsegdiff: timesteps walked when sampling, evenly spaced (0: all)",
                              ge=0, le=10_000)
    sampler: Literal["euler", "heun", "dopri5"] = opt("euler", "flow: ODE solver (dopri5 needs torchdiffeq; "
                                                                "the seed's)")
    num_ensemble: int = opt(5, "flow, medsegdiff: samples averaged per image before thresholding", ge=1, le=100)
    roi_size: int = opt(0, "evaluation sliding-window side (0: data.image_size, the training crop; the seed's "
                           "CS-Net: 224)", ge=0, le=8192)
    sw_overlap: float = opt(0.25, "sliding-window overlap", ge=0, lt=1)
    sw_mode: Literal["gaussian", "constant"] = opt("gaussian", "sliding-window blend weights")
    sw_batch_size: int = opt(4, "windows per forward at evaluation", ge=1, le=1024)
    threshold: float = opt(0.5, "vessel where the probability exceeds this (metrics, PNG masks)", gt=0, lt=1)
    log_image_enabled: bool = opt(False, "log image | label | probability (| flow trajectory) of the validation "
                                         "images in log_image_names at every validation (<run>/images/, "
                                         "TensorBoard with log.loggers=[...,tensorboard])")
    log_image_names: list[str] = opt([], "file names of the validation images to log (empty: the first one)")
    log_trajectory_steps: int = opt(4, "flow: sampling states x(t) shown after each logged image (0: none)",
                                    check=rule("0 or 2..32", lambda v: v == 0 or 2 <= v <= 32))


def timesteps(m: XCAModel) -> int:
    return m.timesteps or DEFAULT_TIMESTEPS[m.arch_name]


def downsampling(m: XCAModel) -> int:
    """What the network's input sides must be divisible by."""
    return CSNET_DOWNSAMPLING if m.arch_name == "csnet" else 2 ** (len(m.channel_mult) - 1)


def _fit(x: torch.Tensor, d: int) -> torch.Tensor:
    """The top-left part whose sides are multiples of d (whole images in the training-style forward)."""
    h, w = x.shape[-2:]
    return x[..., : h - h % d, : w - w % d]


class VesselSegmenter(nn.Module):
    """The arch's network (`net`) with its training objective and its evaluation sampler."""

    def __init__(self, m: XCAModel, image_size: int) -> None:
        super().__init__()
        if m.arch_name not in ARCHS:
            raise ConfigError(f"model.arch_name={m.arch_name!r}: expected one of {', '.join(ARCHS)}")
        self.arch, self.m = m.arch_name, m
        self.roi = m.roi_size or image_size
        self.divisor = downsampling(m)
        for key, side in (("model.roi_size" if m.roi_size else "data.image_size", self.roi),
                          ("data.image_size", image_size)):
            if side % self.divisor:
                raise ConfigError(f"{key}={side}: {self.arch} needs sides divisible by {self.divisor}")
        if self.arch == "csnet":
            self.net: nn.Module = CSNet(1, 2, m.csnet_channels)
        else:
            self.net = _unet(m, image_size, in_channels=2)
        self.flow = FlowMatcher(m.sigma)
        self.diffusion = GaussianDiffusion(timesteps(m)) if self.arch == "medsegdiff" else None

    # ------------------------------------------------------------------------------ training
    def forward(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        image, label = _fit(image, self.divisor), _fit(label, self.divisor)
        if self.arch == "csnet":
            return {"logits": self.net(image), "label": label}
        if self.diffusion is not None:
            return self.diffusion.loss(self.net, label, image)
        if self.m.noise_copies > 1:
            image = image.repeat_interleave(self.m.noise_copies, 0)
            label = label.repeat_interleave(self.m.noise_copies, 0)
        t, x_t, u_t = self.flow.sample_path(label)
        return {"v": self.net(x_t, t, image), "u_t": u_t, "x_t": x_t, "x1": label, "t": t}

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(self, image: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """image [B, 1, H, W] -> {"prob", "trajectory"}. The noise of image i comes from a generator seeded
        by its dataset index, so N processes (and every validation) sample what one process samples."""
        m = self.m
        keep = m.log_trajectory_steps if self.arch == "dhariwal_concat_unet" and m.log_image_enabled else 0
        seeds = index.tolist() if index is not None else [None] * image.shape[0]  # host read: evaluation only
        outs = []
        for i, seed in enumerate(seeds):
            g = None
            if seed is not None and self.arch != "csnet":
                g = torch.Generator(device=image.device).manual_seed(int(seed))
            outs.append(sliding_window(lambda w: self._window(w, keep, g), image[i : i + 1], (self.roi, self.roi),
                                       m.sw_overlap, m.sw_mode, sw_batch_size=m.sw_batch_size))
        out = torch.cat(outs)
        return {"prob": out[:, :1], **({"trajectory": out[:, 1:]} if keep else {})}

    def _window(self, w: torch.Tensor, keep: int, g: torch.Generator | None) -> torch.Tensor:
        """[n, 1, r, r] image windows -> [n, 1 + keep, r, r]: probability (+ trajectory states)."""
        m = self.m
        if self.arch == "csnet":
            return self.net(w).float().softmax(1)[:, 1:2]
        shape = (w.shape[0], 1, *w.shape[-2:])
        total, states = torch.zeros(shape, device=w.device), []
        for k in range(m.num_ensemble):
            if self.diffusion is not None:
                total += self.diffusion.sample(self.net, w, m.sampling_steps or None, generator=g).float()
                continue
            x0 = torch.randn(shape, generator=g, device=w.device, dtype=w.dtype)
            velocity = lambda x, t: self.net(x, t, w)  # noqa: E731
            if keep and k == 0:
                x, states = sample(velocity, x0, timesteps(m), m.sampler, keep=keep)
            else:
                x = sample(velocity, x0, timesteps(m), m.sampler)
            total += x.float()
        prob = (total / m.num_ensemble).clamp(0, 1)  # the seed's ensemble: mean of raw x(1), then > 0.5
        return torch.cat([prob, *(s.float() for s in states)], 1) if keep else prob


def _unet(m: XCAModel, image_size: int, in_channels: int) -> nn.Module:
    from .unet import DhariwalUNet

    return DhariwalUNet(image_size, in_channels, 1, m.model_channels, tuple(m.channel_mult), m.channel_mult_emb,
                        m.num_blocks, tuple(m.attn_resolutions), m.dropout)


def loss_fn(arch: str, bce_weight: float) -> Any:
    """(outputs, batch) -> {"loss", ...parts}: cross-entropy (csnet), the seed's l1_bce (flow), or the
    hybrid loss the diffusion forward already computed (medsegdiff)."""
    from .flow import flow_loss

    def loss(outputs: dict, batch: dict) -> dict:
        if arch == "csnet":
            target = (outputs["label"][:, 0] > 0.5).long()
            return {"loss": F.cross_entropy(outputs["logits"].float(), target)}
        if arch == "medsegdiff":
            return outputs
        parts = flow_loss(outputs["v"].float(), outputs["u_t"], outputs["x_t"], outputs["x1"], outputs["t"],
                          bce_weight)
        return parts

    return loss
