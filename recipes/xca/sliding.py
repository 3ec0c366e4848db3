"""Whole-image inference from a patch model, as MONAI's `SlidingWindowInferer` does it.

soft-seg evaluates every XCA model with SlidingWindowInferer(roi_size=(image_size,) * 2,
sw_batch_size=4, overlap=0.25, mode="gaussian") (src/archs/flow_model.py); this reproduces
monai.inferers.sliding_window_inference for 2D with the default options:

- an image smaller than the roi along a dim is zero-padded there, half before (floor) and the rest
  after (MONAI's padding_mode="constant", cval=0), and the output is cropped back;
- window starts along a dim: interval = int(roi * (1 - overlap)) (at least 1; the whole dim when
  roi == size), starts 0, interval, 2 * interval, ... until a window reaches the border, the last one
  shifted back to end exactly at the border (monai.data.utils.dense_patch_slices);
- each window output is weighted by the importance map (gaussian: outer product of
  exp(-x^2 / (2 (sigma_scale * roi)^2)) over the centred pixel coordinates, clamped below at 1e-3;
  constant: ones) and the blend divides by the summed weights (compute_importance_map);
- windows of all images are batched `sw_batch_size` at a time, image-major like MONAI's.
Not covered: predictors whose output size differs from the roi (MONAI rescales), the buffered mode.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

MODES = ("gaussian", "constant")


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one (padded) dimension of `size` >= `roi`."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    n = -(-(size - roi) // interval) + 1  # first d with d * interval + roi >= size, plus one
    return [min(d * interval, size - roi) for d in range(n)]


def importance_map(
    roi: tuple[int, int],
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[h, w] blending weights (float32): centre-heavy gaussian or flat, never below 1e-3."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "constant":
        return torch.ones(roi, device=device)
    axes = []
    for n in roi:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        axes.append(torch.exp(x**2 / (-2 * (sigma_scale * n) ** 2)))
    return (axes[0][:, None] * axes[1][None, :]).clamp(min=1e-3)


def sliding_window(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi: tuple[int, int],
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """Blend predict_fn([n, C, h, w]) -> [n, K, h, w] over windows of image [B, C, H, W] -> [B, K, H, W]."""
    b, _, h, w = image.shape
    rh, rw = roi
    ph, pw = max(rh - h, 0), max(rw - w, 0)
    if ph or pw:
        image = F.pad(image, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    hp, wp = image.shape[-2:]
    weight = importance_map(roi, mode, sigma_scale, image.device)
    cells = [(y, x) for y in window_starts(hp, rh, overlap) for x in window_starts(wp, rw, overlap)]
    count = torch.zeros(hp, wp, device=image.device)
    for y, x in cells:
        count[y : y + rh, x : x + rw] += weight
    windows = [(i, y, x) for i in range(b) for y, x in cells]
    out: torch.Tensor | None = None
    for first in range(0, len(windows), sw_batch_size):
        chunk = windows[first : first + sw_batch_size]
        pred = predict_fn(torch.stack([image[i, :, y : y + rh, x : x + rw] for i, y, x in chunk]))
        if pred.shape[-2:] != (rh, rw):
            raise ValueError(f"predict_fn must keep the window size {roi}, got {tuple(pred.shape[-2:])}")
        if out is None:
            out = torch.zeros(b, pred.shape[1], hp, wp, device=image.device, dtype=torch.float32)
        for p, (i, y, x) in zip(pred, chunk):
            out[i, :, y : y + rh, x : x + rw] += p * weight
    assert out is not None  # at least one window always exists
    out = out / count
    return out[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
