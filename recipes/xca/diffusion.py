"""Gaussian diffusion for segmentation, the MedSegDiff baseline of soft-seg
(src/archs/components/gaussian_diffusion.py, `create_medsegdiff`): predict-x0 objective, cosine beta
schedule, 50 timesteps, hybrid loss, ancestral DDPM sampling.

Conventions (as the original):
- masks in [0, 1] (soft labels allowed) are diffused as x0 = 2 * mask - 1;
- the denoiser maps (x_t, t, image) to x0_hat; its mask probability is (clamp(x0_hat, -1, 1) + 1) / 2;
- hybrid loss = 0.1 * MSE(x0_hat, x0) + 0.9 * (BCE(prob, mask) + Dice(prob, mask)), with MSE in the
  [-1, 1] space, BCE averaged over all pixels, Dice per sample with smoothing 1 then averaged;
- sampling is ancestral: x_T ~ N(0, I), x0_hat clamped to [-1, 1] at every step, x_{t-1} drawn from the
  posterior q(x_{t-1} | x_t, x0_hat), and the last step returns x0_hat itself. Ensembles (5 in the
  original) are averaged by the caller.

Deviations: the original's denoiser is MedSegDiffUNet (a separate image encoder path, FFT-based
conditioning at every level and a mid transformer), and it feeds the integer timestep to its
embedding. Here the denoiser is any `net(x_t, t, image)`; the recipe uses the ADM `DhariwalUNet`
(recipes/xca/unet.py) with in_channels=2 (x_t and image concatenated) and t = t_index / timesteps in
[0, 1], the same network and time convention as soft-seg's flow models, so the baselines differ in the
generative process rather than the backbone. `sample(steps=k)` with k < timesteps is an addition:
it walks k evenly spaced timesteps with the same posterior formula, which for k = timesteps is exactly
the original chain.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MSE_WEIGHT, SEGMENTATION_WEIGHT = 0.1, 0.9


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021: alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), betas clipped at 0.999."""
    steps = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos((steps / timesteps + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over samples of (2|P.T| + 1) / (|P| + |T| + 1), the original's DiceLoss."""
    prob, target = prob.flatten(1), target.flatten(1)
    dice = (2 * (prob * target).sum(1) + smooth) / (prob.sum(1) + target.sum(1) + smooth)
    return 1 - dice.mean()


def x0_to_probability(x0: torch.Tensor) -> torch.Tensor:
    """Predicted x0 in [-1, 1] space -> mask probability in [0, 1]."""
    return (x0.clamp(-1, 1) + 1) / 2


def _per_sample(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Schedule values at each sample's timestep, shaped to broadcast over [B, C, H, W]."""
    return values[index].view(-1, 1, 1, 1)


class GaussianDiffusion(nn.Module):
    """Schedule buffers (moved with .to()) and the training loss / sampler around an x0-predicting net."""

    def __init__(self, timesteps: int = 50):
        super().__init__()
        self.timesteps = timesteps
        alphas_cumprod = torch.cumprod(1 - cosine_beta_schedule(timesteps), dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t_index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        alpha_bar = _per_sample(self.alphas_cumprod, t_index)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def denoise(self, net: Denoiser, x_t: torch.Tensor, t_index: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The net's x0 prediction; the time it sees is t_index / timesteps in [0, 1)."""
        return net(x_t, t_index.to(x_t.dtype) / self.timesteps, image)

    def loss(self, net: Denoiser, mask: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hybrid loss at one uniformly drawn timestep per sample; mask in [0, 1], image as the net takes it.
        Returns the total and its parts ("dice" is the Dice *loss*, 1 - Dice)."""
        x0 = mask * 2 - 1
        t_index = torch.randint(0, self.timesteps, (mask.shape[0],), device=mask.device)
        x0_hat = self.denoise(net, self.q_sample(x0, t_index, torch.randn_like(x0)), t_index, image).float()
        mse = F.mse_loss(x0_hat, x0)
        prob = x0_to_probability(x0_hat)
        with torch.autocast(prob.device.type, enabled=False):  # BCE is refused under CUDA autocast
            bce = F.binary_cross_entropy(prob, mask.float())
        dice = dice_loss(prob, mask)
        return {"loss": MSE_WEIGHT * mse + SEGMENTATION_WEIGHT * (bce + dice), "mse": mse, "bce": bce, "dice": dice}

    @torch.no_grad()
    def sample(self, net: Denoiser, image: torch.Tensor, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) over `steps` timesteps (all of them by default);
        returns the mask probability [B, 1, H, W] in [0, 1]."""
        steps = self.timesteps if steps is None else steps
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        schedule = torch.linspace(self.timesteps - 1, 0, steps, device=image.device).round().long().tolist()
        shape = (image.shape[0], 1, *image.shape[2:])
        x_t = torch.randn(shape, generator=generator, device=image.device, dtype=image.dtype)
        for t, t_prev in zip(schedule[:-1], schedule[1:]):
            x_t = self._posterior_sample(x_t, self._clamped_x0(net, x_t, t, image), t, t_prev, generator)
        return x0_to_probability(self._clamped_x0(net, x_t, schedule[-1], image))

    def _clamped_x0(self, net: Denoiser, x_t: torch.Tensor, t: int, image: torch.Tensor) -> torch.Tensor:
        t_index = torch.full((x_t.shape[0],), t, device=x_t.device)
        return self.denoise(net, x_t, t_index, image).clamp(-1, 1)

    def _posterior_sample(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, t_prev: int,
                          generator: torch.Generator | None) -> torch.Tensor:
        """Draw from q(x_{t_prev} | x_t, x0_hat); for t_prev = t - 1 these are DDPM's posterior coefficients."""
        alpha_bar, alpha_bar_prev = self.alphas_cumprod[t], self.alphas_cumprod[t_prev]
        beta = 1 - alpha_bar / alpha_bar_prev
        mean = (alpha_bar_prev.sqrt() * beta * x0_hat + (1 - beta).sqrt() * (1 - alpha_bar_prev) * x_t)
        mean = mean / (1 - alpha_bar)
        variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + variance.sqrt() * noise
