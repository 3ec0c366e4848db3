"""Perspective views of a panorama: our batched grid_sample projection against py360convert.e2p (the
seed's own, a test-only reference), the central crop, and the wrap-around at the 0/360 seam."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipes.panollava.views import erp_to_views, sampling_grid, siglip_normalize, view_yaws


def _panorama(seed: int = 0, hw=(64, 128)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(2, 3, 16, 32, generator=g), size=hw, mode="bilinear")


def test_views_match_py360convert_e2p():
    py360convert = pytest.importorskip("py360convert")
    erp = _panorama()
    ours = erp_to_views(erp, num_views=8, fov_deg=90.0, out_hw=(32, 48), central_crop=1.0)
    assert ours.shape == (2, 8, 3, 32, 48)
    assert view_yaws(8) == [0.0, 45.0, 90.0, 135.0, 180.0, -135.0, -90.0, -45.0]
    worst = 0.0
    for b in range(2):
        for v, yaw in enumerate(view_yaws(8)):
            ref = py360convert.e2p(erp[b].permute(1, 2, 0).numpy(), fov_deg=90.0, u_deg=yaw, v_deg=0.0,
                                   out_hw=(32, 48), mode="bilinear")
            worst = max(worst, float(np.abs(ours[b, v].permute(1, 2, 0).numpy() - ref).mean()))
    assert worst <= 2 / 255, worst
    # a wrong yaw convention would fail by far: the view at 45 degrees is not the one at -45
    assert (ours[:, 1] - ours[:, 7]).abs().mean() > 20 / 255


def test_the_seam_wraps_and_the_central_crop_is_resized_back():
    erp = _panorama(1)
    full = erp_to_views(erp, central_crop=1.0, out_hw=(40, 40), num_views=4)
    # turning the panorama by half its width turns the views by 180 degrees: view 0 becomes view 2
    turned = erp_to_views(erp.roll(64, dims=-1), central_crop=1.0, out_hw=(40, 40), num_views=4)
    assert (turned[:, 0] - full[:, 2]).abs().max() < 1e-5
    cropped = erp_to_views(erp, central_crop=0.9, out_hw=(40, 40), num_views=4)
    want = F.interpolate(full.flatten(0, 1)[:, :, 2:38], size=(40, 40), mode="bicubic", align_corners=False)
    assert cropped.shape == full.shape and torch.allclose(cropped.flatten(0, 1), want, atol=1e-6)
    grid = sampling_grid((64, 128), 4, 90.0, (40, 40))
    assert torch.equal(erp_to_views(erp, central_crop=1.0, out_hw=(40, 40), num_views=4, grid=grid), full)
    assert siglip_normalize(torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]


def test_bad_view_arguments_are_named():
    with pytest.raises(ValueError, match=r"expected panoramas \[B, C, H, W\], got shape \(3, 8, 16\)"):
        erp_to_views(torch.rand(3, 8, 16))
    with pytest.raises(ValueError, match=r"central_crop=1.5, expected a fraction in \(0, 1\]"):
        erp_to_views(torch.rand(1, 3, 8, 16), central_crop=1.5)
