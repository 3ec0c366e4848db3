"""XCA models: the ADM U-Net denoiser, CS-Net, and the MedSegDiff-style Gaussian diffusion (tiny sizes, CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from recipes.xca.csnet import CSNet
from recipes.xca.diffusion import GaussianDiffusion, cosine_beta_schedule, dice_loss
from recipes.xca.unet import DhariwalUNet


def tiny_unet(resolution: int = 16, attn_resolutions: tuple[int, ...] = (16,)) -> DhariwalUNet:
    return DhariwalUNet(resolution, in_channels=2, out_channels=1, model_channels=8, channel_mult=(1, 2),
                        num_blocks=1, attn_resolutions=attn_resolutions)


def perturb_(net: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every weight off its init (zero convs included) so every path carries signal."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


def heads(net: DhariwalUNet) -> dict[str, int]:
    return {f"{part}.{name}": block.num_heads for part in ("enc", "dec")
            for name, block in getattr(net, part).items() if hasattr(block, "num_heads")}


def test_unet_shape_any_size_and_exact_zero_at_init():
    torch.manual_seed(0)
    net = DhariwalUNet(32, 2, 1, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1)
    x, image = torch.randn(2, 1, 32, 64), torch.randn(2, 1, 32, 64)
    out = net(x, torch.rand(2), image)
    assert out.shape == (2, 1, 32, 64)
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 30, 32), torch.rand(1), torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError):
        net(x, torch.rand(2))  # in_channels counts the image too


def test_unet_gradient_reaches_every_parameter_after_one_step():
    torch.manual_seed(0)
    net = tiny_unet()
    with torch.no_grad():
        net.out_conv.weight.normal_(0, 0.1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, t, image, target = torch.randn(2, 1, 16, 16), torch.rand(2), torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    for _ in range(2):  # the first step wakes the zero-initialised convs, the second must reach everything
        optimizer.zero_grad()
        (net(x, t, image) - target).square().mean().backward()
        optimizer.step()
    silent = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_unet_output_depends_on_image_and_time():
    torch.manual_seed(0)
    net = tiny_unet()
    perturb_(net)
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([0.3])
    reference = net(x, t, torch.randn(1, 1, 16, 16))
    assert not torch.allclose(reference, net(x, t, torch.randn(1, 1, 16, 16)))
    assert not torch.allclose(reference, net(x, torch.tensor([0.7]), torch.randn(1, 1, 16, 16)))


def test_attention_where_resolution_is_listed_and_always_in_the_bottleneck():
    at_16 = heads(tiny_unet(16, attn_resolutions=(16,)))
    assert at_16["enc.16x16_block0"] and at_16["dec.16x16_block0"] and at_16["dec.16x16_block1"]
    assert not at_16["enc.8x8_block0"] and not at_16["dec.8x8_block0"]
    at_8 = heads(tiny_unet(16, attn_resolutions=(8,)))
    assert not at_8["enc.16x16_block0"] and not at_8["dec.16x16_block0"]
    assert at_8["enc.8x8_block0"] and at_8["dec.8x8_block0"]
    assert at_16["dec.8x8_in0"] and not at_16["dec.8x8_in1"]
    with torch.device("meta"):  # XCA config at 320 px: no level reaches 16 or 8, only in0 attends (256 ch, 4 heads)
        xca = heads(DhariwalUNet(320, 2, 1))
    assert {name: n for name, n in xca.items() if n} == {"dec.40x40_in0": 4}


def test_csnet_shape_and_size_rule():
    net = CSNet(base=8)
    assert net(torch.randn(2, 1, 32, 48)).shape == (2, 2, 32, 48)
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 24, 32))


def test_csnet_attention_blocks_are_identity_at_init():
    torch.manual_seed(0)
    net = CSNet(base=8).eval()
    _, features = net.encode(torch.randn(2, 1, 32, 32))
    attention = net.affinity_attention
    assert torch.equal(attention.spatial(features), features)
    assert torch.equal(attention.channel(features), features)
    assert torch.equal(attention(features), 2 * features)  # so the fused bottleneck starts at 3x features
    with torch.no_grad():
        attention.spatial.gamma.fill_(0.5)
        attention.channel.gamma.fill_(0.5)
    assert not torch.allclose(attention.spatial(features), features)
    assert not torch.allclose(attention.channel(features), features)


def test_csnet_paper_width_has_8_4m_parameters():
    with torch.device("meta"):
        count = sum(p.numel() for p in CSNet(base=32).parameters())
    assert abs(count - 8.4e6) / 8.4e6 < 0.05


def test_cosine_schedule():
    diffusion = GaussianDiffusion(timesteps=50)
    alphas_cumprod = diffusion.alphas_cumprod
    assert alphas_cumprod.shape == (50,)
    assert (alphas_cumprod > 0).all() and (alphas_cumprod <= 1).all()
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    f = lambda step: math.cos((step / 50 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert alphas_cumprod[10].item() == pytest.approx(f(11) / f(0), rel=1e-5)
    assert cosine_beta_schedule(50).max() <= 0.999


def test_q_sample_ends():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(timesteps=50)
    x0, noise = torch.randn(4, 1, 8, 8).sign(), torch.randn(4, 1, 8, 8)
    assert (diffusion.q_sample(x0, torch.zeros(4, dtype=torch.long), noise) - x0).abs().mean() < 0.05
    last = diffusion.q_sample(x0, torch.full((4,), 49), noise)
    assert torch.corrcoef(torch.stack([last.flatten(), noise.flatten()]))[0, 1] > 0.99


def test_loss_parts_at_init_are_exact():
    """A zero-output net predicts x0 = 0, i.e. probability 0.5 everywhere: MSE 1 and BCE ln 2 on binary masks."""
    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 16, 16) > 0.7).float()
    parts = GaussianDiffusion(timesteps=50).loss(tiny_unet(), mask, torch.randn(2, 1, 16, 16))
    assert set(parts) == {"loss", "mse", "bce", "dice"}
    assert all(torch.isfinite(v) for v in parts.values())
    assert parts["mse"].item() == pytest.approx(1.0)
    assert parts["bce"].item() == pytest.approx(math.log(2), rel=1e-5)
    assert parts["dice"].item() == pytest.approx(dice_loss(torch.full_like(mask, 0.5), mask).item())
    expected = 0.1 * parts["mse"] + 0.9 * (parts["bce"] + parts["dice"])
    assert parts["loss"].item() == pytest.approx(expected.item())


def test_full_chain_step_uses_ddpm_posterior():
    diffusion = GaussianDiffusion(timesteps=50)
    betas = cosine_beta_schedule(50).float()
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    t = 20
    coef_x0 = betas[t] * alphas_cumprod[t - 1].sqrt() / (1 - alphas_cumprod[t])
    coef_xt = (1 - alphas_cumprod[t - 1]) * (1 - betas[t]).sqrt() / (1 - alphas_cumprod[t])
    variance = betas[t] * (1 - alphas_cumprod[t - 1]) / (1 - alphas_cumprod[t])
    x_t, x0_hat = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4).clamp(-1, 1)
    drawn = diffusion._posterior_sample(x_t, x0_hat, t, t - 1, torch.Generator().manual_seed(3))
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(drawn, coef_x0 * x0_hat + coef_xt * x_t + variance.sqrt() * noise)


def test_sampling_returns_reproducible_probabilities():
    torch.manual_seed(0)
    net = tiny_unet()
    perturb_(net)
    diffusion, image = GaussianDiffusion(timesteps=10), torch.randn(2, 1, 16, 16)
    for steps in (None, 4):
        prob = diffusion.sample(net, image, steps=steps, generator=torch.Generator().manual_seed(1))
        assert prob.shape == (2, 1, 16, 16)
        assert prob.min() >= 0 and prob.max() <= 1
        again = diffusion.sample(net, image, steps=steps, generator=torch.Generator().manual_seed(1))
        assert torch.equal(prob, again)
    with pytest.raises(ValueError):
        diffusion.sample(net, image, steps=11)


def test_tiny_denoiser_overfits_one_mask():
    """40 Adam steps at 16x16 (~5 s on a shared CPU) must be enough to sample the mask back."""
    torch.manual_seed(0)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 6:10] = 1
    mask[..., 7:9, 2:14] = 1
    image = mask * 2 - 1 + 0.1 * torch.randn_like(mask)
    net, diffusion = tiny_unet(attn_resolutions=()), GaussianDiffusion(timesteps=50)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(40):
        optimizer.zero_grad()
        diffusion.loss(net, mask.expand(2, -1, -1, -1), image.expand(2, -1, -1, -1))["loss"].backward()
        optimizer.step()
    predicted = (diffusion.sample(net.eval(), image, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    dice = 2 * (predicted * mask).sum() / (predicted.sum() + mask.sum())
    assert dice > 0.8
