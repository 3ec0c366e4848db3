"""Perspective views of an equirectangular (ERP) panorama, on the device, batched.

PanoLLaVA's image processor (crop_strategy "e2p") cuts a 360-degree panorama into `num_views`
perspective views at yaws 0, 360/V, ... (pitch 0) with py360convert.e2p, keeps the central 90% of
each view's height and hands it to SigLIP's processor (resize, (x - 0.5) / 0.5). Here the same
projection is one `grid_sample` over the whole batch (py360convert is a test-only reference:
tests/test_panollava_views.py), so views are cut in the training step, not by CPU workers.

Geometry (py360convert's): output pixel (i, j) is the ray (x_j, -y_i, 1) on the plane at distance 1,
x, y spanning [-tan(fov/2), tan(fov/2)] corner to corner; it is turned by the pitch about X, then
by the yaw about Y; its longitude atan2(x, z) and latitude atan2(y, hypot(x, z)) index the ERP with
pixel centres at (k + 0.5) / W of 360 degrees, -180 at the left edge. The ERP wraps horizontally.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIGLIP_MEAN = SIGLIP_STD = 0.5


def view_yaws(num_views: int) -> list[float]:
    """Yaw of each view in degrees, in (-180, 180]: 0, 45, 90, 135, 180, -135, -90, -45 for 8."""
    yaws = []
    for k in range(num_views):
        y = (360.0 * k / num_views) % 360.0
        yaws.append(y - 360.0 if y > 180.0 else y)
    return yaws


def _rays(fov_deg: float, out_hw: tuple[int, int], yaw_deg: float, pitch_deg: float,
          device: torch.device) -> torch.Tensor:
    """Unit-plane rays of one view turned to (yaw, pitch) -> [h, w, 3] (x right, y up, z forward)."""
    h, w = out_hw
    t = math.tan(math.radians(fov_deg) / 2)
    xs = torch.linspace(-t, t, w, dtype=torch.float64, device=device)
    ys = torch.linspace(-t, t, h, dtype=torch.float64, device=device)
    yy, xx = torch.meshgrid(-ys, xs, indexing="ij")
    xyz = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1)
    p, u = math.radians(pitch_deg), -math.radians(yaw_deg)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]], dtype=torch.float64)
    ry = torch.tensor([[math.cos(u), 0, math.sin(u)], [0, 1, 0], [-math.sin(u), 0, math.cos(u)]], dtype=torch.float64)
    return xyz @ rx.to(device) @ ry.to(device)          # row vectors, as py360convert's xyz.dot(Rx).dot(Ry)


def _pad_sphere(erp: torch.Tensor) -> torch.Tensor:
    """One pixel around the ERP: columns wrap, the row beyond a pole is that row turned by 180 degrees."""
    w = erp.shape[-1]
    top, bottom = erp[..., :1, :].roll(w // 2, dims=-1), erp[..., -1:, :].roll(w // 2, dims=-1)
    x = torch.cat([top, erp, bottom], dim=-2)
    return torch.cat([x[..., -1:], x, x[..., :1]], dim=-1)


def sampling_grid(erp_hw: tuple[int, int], num_views: int = 8, fov_deg: float = 90.0,
                  out_hw: tuple[int, int] = (224, 224), pitch_deg: float = 0.0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """grid_sample coordinates of every view in the padded ERP -> [V, h, w, 2] (align_corners=True)."""
    device = torch.device(device)
    H, W = erp_hw
    grids = []
    for yaw in view_yaws(num_views):
        xyz = _rays(fov_deg, out_hw, yaw, pitch_deg, device)
        lon = torch.atan2(xyz[..., 0], xyz[..., 2])
        lat = torch.atan2(xyz[..., 1], torch.hypot(xyz[..., 0], xyz[..., 2]))
        cx = (lon / (2 * math.pi) + 0.5) * W - 0.5 + 1          # +1: the padding column
        cy = (-lat / math.pi + 0.5) * H - 0.5 + 1
        grids.append(torch.stack([cx / (W + 1) * 2 - 1, cy / (H + 1) * 2 - 1], dim=-1))
    return torch.stack(grids).float()


def erp_to_views(erp: torch.Tensor, num_views: int = 8, fov_deg: float = 90.0,
                 out_hw: tuple[int, int] = (224, 224), central_crop: float = 0.9,
                 grid: torch.Tensor | None = None) -> torch.Tensor:
    """Panoramas [B, C, H, W] -> views [B, V, C, h, w]: each view projected at out_hw (bilinear),
    then (central_crop < 1) its central `central_crop` of the height kept and resized back to out_hw
    (bicubic, as SigLIP's processor resizes). Values keep the input's range; `siglip_normalize` after.
    `grid` (from sampling_grid) skips recomputing the projection for a fixed panorama size."""
    if erp.dim() != 4:
        raise ValueError(f"erp_to_views: expected panoramas [B, C, H, W], got shape {tuple(erp.shape)}")
    if not 0.0 < central_crop <= 1.0:
        raise ValueError(f"erp_to_views: central_crop={central_crop}, expected a fraction in (0, 1]")
    b, c, H, W = erp.shape
    if grid is None:
        grid = sampling_grid((H, W), num_views, fov_deg, out_hw, device=erp.device)
    v, h, w = grid.shape[:3]
    # all views side by side in one grid [B, h, V*w, 2]: one sampling pass, no copy of the panorama
    side_by_side = grid.to(erp.device).permute(1, 0, 2, 3).reshape(1, h, v * w, 2).expand(b, -1, -1, -1)
    views = F.grid_sample(_pad_sphere(erp.float()), side_by_side, mode="bilinear", padding_mode="border",
                          align_corners=True)                             # [B, C, h, V*w]
    views = views.view(b, c, h, v, w).permute(0, 3, 1, 2, 4).reshape(b * v, c, h, w)
    if central_crop < 1.0:
        keep = int(round(h * central_crop))
        top = (h - keep) // 2
        views = F.interpolate(views[:, :, top: top + keep], size=(h, w), mode="bicubic", align_corners=False)
    return views.view(b, v, c, h, w).to(erp.dtype if erp.is_floating_point() else torch.float32)


def siglip_normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> SigLIP's input range: (x - 0.5) / 0.5."""
    return (x - SIGLIP_MEAN) / SIGLIP_STD
