"""Clip augmentation on the device, for a whole batch at once: clips [N, 3, T, H, W] in [0, 1], one
random transform per clip, the same for all its frames (a view must stay a coherent video).

VARS (main.py) augments each Train clip with RandomAffine(translate 0.1, scale 0.9-1),
RandomPerspective(0.3, p=0.5), RandomRotation(5), ColorJitter(brightness/contrast/saturation
0.5), RandomHorizontalFlip(0.5), one torchvision call per clip on the CPU. Here the geometric
part (affine, perspective, rotation, flip) is one homography per clip, applied by a single
grid_sample over the batch (zeros outside the image, as torchvision's fill); then colour jitter.

Strengths (STRENGTHS): translate is a fraction of the width/height, scale is drawn in
[scale_min, 1], rotation in +-degrees, jitter factors in [1 - j, 1 + j], perspective moves each
corner inward by up to `perspective` x half the side, with probability perspective_p:

    mild        flip .5, translate .05, scale .95-1, 2.5 deg, jitter .2, no perspective
    moderate    flip .5, translate .10, scale .90-1, 5 deg,   jitter .5, perspective .3 p=.5  (VARS)
    aggressive  flip .5, translate .15, scale .80-1, 10 deg,  jitter .8, perspective .4 p=.5

Differences from torchvision: the jitter order is fixed (brightness, contrast, saturation) and
contrast blends toward the clip's mean grey (torchvision, fed a clip, uses each frame's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainlib.config import ConfigError

KINETICS_MEAN, KINETICS_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)
MVIT_MEAN, MVIT_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # MViT_V2_S_Weights.KINETICS400_V1.transforms
MAX_JITTER = 0.9       # a jitter factor never reaches 0 (a black or grey clip), however large the scale
MIN_ZOOM = 0.5         # nor does the zoom shrink a clip below half its size
GREY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentStrength:
    flip_p: float
    translate: float
    scale_min: float
    degrees: float
    jitter: float
    perspective: float
    perspective_p: float


STRENGTHS = {
    "mild": AugmentStrength(0.5, 0.05, 0.95, 2.5, 0.2, 0.0, 0.0),
    "moderate": AugmentStrength(0.5, 0.10, 0.90, 5.0, 0.5, 0.3, 0.5),
    "aggressive": AugmentStrength(0.5, 0.15, 0.80, 10.0, 0.8, 0.4, 0.5),
}


def severity_scale(offence_labels: torch.Tensor, class_counts: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Per-action augmentation scale sqrt(max count / count of its class), at most `cap`: 1 for the
    commonest offence-severity class, larger for rarer ones (red cards), so the few rare examples are
    seen in more varied forms. Repeat it over views (repeat_interleave(V)) for per_clip_scale."""
    counts = class_counts.to(offence_labels.device).float()
    return (counts.max() / counts[offence_labels].clamp_min(1.0)).sqrt().clamp(max=cap)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """`values` as a tensor on like's device and dtype, made once: building it each step from a Python
    list is a blocking host-to-device copy on CUDA (a sync in the hot loop) and breaks graph capture."""
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def normalize(x: torch.Tensor, backbone: str = "r2plus1d_18") -> torch.Tensor:
    """(x - mean) / std per channel of [N, 3, T, H, W]: Kinetics statistics as torchvision's video
    weights (r3d_18, mc3_18, r2plus1d_18, s3d), MViT's own for mvit_v2_s."""
    mean, std = (MVIT_MEAN, MVIT_STD) if backbone == "mvit_v2_s" else (KINETICS_MEAN, KINETICS_STD)
    shape = (1, 3, 1, 1, 1)
    return (x - constant(mean, x).view(shape)) / constant(std, x).view(shape)


def _perspective_sampling(corner_moves: torch.Tensor) -> torch.Tensor:
    """Homographies [N, 3, 3] (normalised coords) sending each output corner, moved inward by
    corner_moves [N, 4, 2] (fractions of the half side), back to the input corner: the image
    shrinks into a random quadrilateral, as torchvision's RandomPerspective."""
    corners = constant(((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)), corner_moves).expand_as(corner_moves)
    moved = corners - corners.sign() * corner_moves
    x, y = moved.unbind(-1)
    u, v = corners.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)                       # [N, 8, 8]
    h = torch.linalg.solve_ex(system, torch.cat([u, v], dim=1))[0]    # no error check: no host sync
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1).view(-1, 3, 3)


def _sampling_matrices(u: torch.Tensor, scale: torch.Tensor, cfg: AugmentStrength, aspect: float) -> torch.Tensor:
    """Per clip, output -> input coordinates [N, 3, 3]: undo flip, rotation, perspective, affine
    (the reverse of VARS's order: affine, perspective, rotation, flip)."""
    n = u.shape[0]
    eye = torch.eye(3, device=u.device).repeat(n, 1, 1)
    flip = eye.clone()
    flip[:, 0, 0] = torch.where(u[:, 0] < cfg.flip_p * scale.clamp(max=1.0), -1.0, 1.0)
    angle = torch.deg2rad((2 * u[:, 1] - 1) * cfg.degrees * scale)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = eye.clone()   # a rotation of pixels, written in normalised coords (x spans W, y spans H)
    rotation[:, 0, 0], rotation[:, 0, 1] = cos, sin / aspect
    rotation[:, 1, 0], rotation[:, 1, 1] = -sin * aspect, cos
    apply_perspective = (u[:, 2] < cfg.perspective_p).float()
    moves = u[:, 3:11].view(n, 4, 2) * (cfg.perspective * scale * apply_perspective)[:, None, None]
    perspective = _perspective_sampling(moves)
    zoom = (1 - (1 - cfg.scale_min) * scale * u[:, 11]).clamp_min(MIN_ZOOM)
    shift = (2 * u[:, 12:14] - 1) * (2 * cfg.translate) * scale[:, None]   # fraction of the side -> normalised
    affine = eye.clone()
    affine[:, 0, 0], affine[:, 1, 1] = 1 / zoom, 1 / zoom
    affine[:, :2, 2] = -shift / zoom[:, None]
    return affine @ perspective @ rotation @ flip


def _warp(x: torch.Tensor, sampling: torch.Tensor) -> torch.Tensor:
    """One bilinear grid_sample over the batch; frames share their clip's grid (T folded into channels)."""
    n, c, t, h, w = x.shape
    xs = (torch.arange(w, device=x.device, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=x.device, dtype=torch.float32) * 2 + 1) / h - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1)      # [H, W, 3]
    mapped = torch.einsum("nij,hwj->nhwi", sampling, points)
    grid = (mapped[..., :2] / mapped[..., 2:]).to(x.dtype)
    out = F.grid_sample(x.reshape(n, c * t, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(n, c, t, h, w)


def _jitter(x: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, cfg: AugmentStrength) -> torch.Tensor:
    """Brightness, contrast (toward the clip's mean grey), saturation (toward each pixel's grey)."""
    amount = (cfg.jitter * scale).clamp(max=MAX_JITTER)
    bright, contrast, saturation = ((1 + (2 * u[:, i] - 1) * amount).view(-1, 1, 1, 1, 1) for i in range(3))
    grey_weights = constant(GREY, x).view(1, 3, 1, 1, 1)
    x = (x * bright).clamp(0, 1)
    mean_grey = (x * grey_weights).sum(dim=1, keepdim=True).mean(dim=(2, 3, 4), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean_grey).clamp(0, 1)
    grey = (x * grey_weights).sum(dim=1, keepdim=True)
    return (saturation * x + (1 - saturation) * grey).clamp(0, 1)


def augment_clips(x: torch.Tensor, strength: str = "moderate", generator: torch.Generator | None = None,
                  per_clip_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Augmented copy of clips [N, 3, T, H, W] in [0, 1] (normalise afterwards).

    per_clip_scale [N] (>= 0, default 1) multiplies every magnitude of a clip (translation,
    rotation, 1 - scale, perspective, jitter up to MAX_JITTER) and its flip probability (capped at
    the strength's); a clip with scale 0 comes back unchanged. Random numbers are drawn on the
    generator's device (give one on x's device to avoid a copy), so a seeded generator repeats."""
    if strength not in STRENGTHS:
        raise ConfigError(f"augmentation strength {strength!r}: expected one of {', '.join(STRENGTHS)}")
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"augment_clips expects clips [N, 3, T, H, W], got {list(x.shape)}")
    cfg, n = STRENGTHS[strength], x.shape[0]
    device = generator.device if generator is not None else x.device
    u = torch.rand(n, 17, generator=generator, device=device).to(x.device)
    scale = (torch.ones(n, device=x.device) if per_clip_scale is None
             else per_clip_scale.to(x.device, torch.float32).clamp_min(0))
    out = _warp(x, _sampling_matrices(u[:, :14], scale, cfg, aspect=x.shape[-1] / x.shape[-2]))
    out = _jitter(out, u[:, 14:], scale, cfg)
    return torch.where((scale > 0).view(-1, 1, 1, 1, 1), out, x)
