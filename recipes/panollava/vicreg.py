"""PanoLLaVA's stage-1 objective: VICReg between the overlapping strips of adjacent views.

Adjacent views (45 degrees apart, 90 degrees wide) share half their field: the right `k` patch
columns of view v see what the left `k` columns of view v+1 see (k = int(grid_w * overlap)).
VICReg (Bardes, Ponce, LeCun 2022) pulls each such pair together (invariance) while keeping every
feature's spread up (variance) and the features decorrelated (covariance). As in the seed, the
statistics are over the L = grid_h * k tokens of one pair, not over the batch, and the loss is the
mean of the per-pair losses:

    inv = mean((x - y)^2)
    var = (mean_d relu(1 - sqrt(var_L(x) + 1e-4)) + same for y) / 2          (population variance)
    cov = (sum offdiag(C_x)^2 / D + same for y) / 2,  C = Xc^T Xc / (L - 1)
    per pair: 25 inv + 25 var + 1 cov
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class VICRegWeights:
    invariance: float = 25.0
    variance: float = 25.0
    covariance: float = 1.0


def overlap_pairs(tokens: torch.Tensor, num_views: int, overlap: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens [B*V, h*w, D] (views of a panorama consecutive, square grid) -> the right strip of
    every view and the left strip of the next one (view V-1's neighbour is view 0: the panorama
    closes), each [B*V, h*k, D]."""
    n, t, d = tokens.shape
    side = int(round(t ** 0.5))
    if side * side != t or n % num_views:
        raise ValueError(f"overlap_pairs: {n} x {t} tokens is not B*{num_views} views of a square patch grid")
    k = int(side * overlap)
    if k < 1:
        raise ValueError(f"overlap_pairs: overlap={overlap} of {side} patch columns keeps none")
    grid = tokens.view(n // num_views, num_views, side, side, d)
    right = grid[..., side - k:, :]
    left = grid.roll(-1, dims=1)[..., :k, :]               # view v+1's left columns, at v
    return right.reshape(n, side * k, d), left.reshape(n, side * k, d)


def vicreg_per_pair(x: torch.Tensor, y: torch.Tensor, w: VICRegWeights = VICRegWeights()) -> dict[str, torch.Tensor]:
    """x, y [P, L, D] -> per-pair terms [P] by name (`loss` weighted, `invariance`, `variance`, `covariance`)."""
    x, y = x.float(), y.float()
    p, L, d = x.shape
    inv = (x - y).pow(2).mean(dim=(1, 2))

    def spread(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        std = torch.sqrt(z.var(dim=1, unbiased=False) + 1e-4)
        zc = z - z.mean(dim=1, keepdim=True)
        cov = zc.transpose(1, 2) @ zc / max(L - 1, 1)
        off = cov.pow(2).sum(dim=(1, 2)) - torch.diagonal(cov, dim1=1, dim2=2).pow(2).sum(-1)
        return F.relu(1.0 - std).mean(-1), off / d

    var_x, cov_x = spread(x)
    var_y, cov_y = spread(y)
    var, cov = 0.5 * (var_x + var_y), 0.5 * (cov_x + cov_y)
    loss = w.invariance * inv + w.variance * var + w.covariance * cov
    return {"loss": loss, "invariance": inv, "variance": var, "covariance": cov}


def vicreg_loss(tokens: torch.Tensor, num_views: int, overlap: float = 0.5,
                w: VICRegWeights = VICRegWeights()) -> dict[str, torch.Tensor]:
    """The stage-1 loss of projected patch tokens [B*V, N, D]: means over all adjacent pairs, by name
    (`loss` clamped at 1e6 as the seed does, so one exploding pair cannot poison a run)."""
    terms = vicreg_per_pair(*overlap_pairs(tokens, num_views, overlap), w)
    out = {k: v.mean() for k, v in terms.items()}
    out["loss"] = out["loss"].clamp(max=1e6)
    return out


def agreement(features: torch.Tensor, num_views: int, overlap: float) -> dict[str, torch.Tensor]:
    """Features [B*V, N, D] -> per-panorama mean cosine of adjacent and of opposite strips [B], the
    features centred first (their mean over the batch's tokens, which every strip shares, would make
    every cosine near 1)."""
    features = features - features.mean(dim=(0, 1), keepdim=True)
    right, left = overlap_pairs(features, num_views, overlap)
    b = features.shape[0] // num_views
    r, l = right.mean(1).view(b, num_views, -1), left.mean(1).view(b, num_views, -1)
    opposite = l.roll(-(num_views // 2) + 1, dims=1)          # left strip of view v + V/2 (l is already at v+1)
    return {"adjacent": F.cosine_similarity(r, l, dim=-1).mean(1),
            "distant": F.cosine_similarity(r, opposite, dim=-1).mean(1)}
