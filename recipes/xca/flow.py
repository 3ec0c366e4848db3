"""Flow matching from Gaussian noise to the vessel mask, as in soft-seg's `FlowModel` (XCA config).

Training path (soft-seg src/archs/components/flow.py, `SchrodingerBridgeConditionalFlowMatcher`,
sigma 0.25): x0 ~ N(0, I) shaped like the mask x1 in [0, 1], t ~ U[0, 1) per sample,
x_t = (1 - t) x0 + t x1 + sigma * sqrt(t (1 - t) + 1e-8) * eps, target u_t = x1 - x0 (torchcfm's
Schrodinger-bridge correction term of u_t is dropped there, and here).

Loss `l1_bce` (soft-seg src/losses/flow_matching_loss.py, XCA weights l1 1.0, bce 0.5): mean |v - u_t|
plus 0.5 * BCE(clamp(x_t, 1e-7, 1 - 1e-7), clamp(x1, 0, 1)). The BCE is computed on the *path sample
x_t*, which does not depend on the network, so it adds no gradient: training is pure L1 flow
matching and the BCE only shifts the logged loss. Reproduced for parity of the logged numbers.

Sampling: the original integrates with torchdiffeq dopri5 (atol = rtol = 1e-4) over
linspace(0, 1, timesteps = 30), which only sets the output grid (the step count is adaptive), and
thresholds x(1) at 0.5 after averaging 5 samples, each a whole sliding-window pass with fresh noise
per window. Here fixed-step Euler / Heun on t_k = k / steps (no host syncs), and dopri5 on the grid
k / steps when torchdiffeq is installed.
"""
from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("euler", "heun", "dopri5")
BCE_EPS = 1e-7


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so a per-sample time multiplies a batch of maps."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class FlowMatcher:
    """Samples the noisy straight path between noise and mask and its target velocity."""

    def __init__(self, sigma: float = 0.25) -> None:
        self.sigma = sigma

    def sigma_t(self, t: torch.Tensor) -> torch.Tensor:
        """Bridge noise scale: 0 at both ends, largest at t = 0.5 (the 1e-8 is the original's)."""
        t = t.clamp(0.0, 1.0)
        return self.sigma * torch.sqrt(t * (1 - t) + 1e-8)

    def sample_path(
        self,
        x1: torch.Tensor,
        generator: torch.Generator | None = None,
        x0: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t [B], x_t, u_t) for masks x1 [B, ...]; x0 and t are drawn unless given (tests, analysis)."""
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        if t is None:
            t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        eps = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        tb = _bcast(t, x1)
        x_t = (1 - tb) * x0 + tb * x1 + _bcast(self.sigma_t(t), x1) * eps
        return t, x_t, x1 - x0


def flow_loss(
    v: torch.Tensor,
    u_t: torch.Tensor,
    x_t: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    bce_weight: float = 0.5,
) -> dict[str, torch.Tensor]:
    """soft-seg's `l1_bce`: {"loss", "l1", "bce"}. `t` is accepted for a uniform call signature;
    neither term uses it. The BCE is on x_t (no gradient to the model), exactly as the original."""
    l1 = (v - u_t).abs().mean()
    p = x_t.clamp(0.0, 1.0).clamp(BCE_EPS, 1 - BCE_EPS)
    y = x1.clamp(0.0, 1.0)
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    return {"loss": l1 + bce_weight * bce, "l1": l1, "bce": bce}


def _keep_indices(steps: int, keep: int) -> list[int]:
    """`keep` (>= 2) step indices spread evenly over 0..steps, both ends included."""
    if keep < 2:
        raise ValueError(f"keep must be 0 (no trajectory) or >= 2, got {keep}")
    return sorted({round(i * steps / (keep - 1)) for i in range(keep)})


def _dopri5(velocity_fn: VelocityFn, x0: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The original's solver: adaptive dopri5 (atol = rtol = 1e-4), reported on t_k = k / steps."""
    try:
        from torchdiffeq import odeint
    except ImportError as e:  # optional extra
        raise ImportError("method='dopri5' needs torchdiffeq (pip install torchdiffeq)") from e

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return velocity_fn(x, t.to(x.dtype).expand(x.shape[0]))

    grid = torch.linspace(0, 1, steps + 1, device=x0.device, dtype=x0.dtype)
    return list(odeint(f, x0, grid, method="dopri5", atol=1e-4, rtol=1e-4))


def sample(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    steps: int,
    method: str = "euler",
    keep: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate dx/dt = velocity_fn(x, t [B]) from t = 0 (x0) to t = 1 in `steps` steps of 1/steps.

    euler: x += h v(x, t_k). heun (explicit trapezoid, 2 calls a step): x += h/2 (v(x, t_k) +
    v(x + h v(x, t_k), t_k+1)). dopri5: adaptive (torchdiffeq; host syncs for step control).
    keep >= 2 also returns `keep` states x(t_k) spread evenly over k = 0..steps, for image logs.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    wanted = set(_keep_indices(steps, keep)) if keep else set()
    if method == "dopri5":
        traj = _dopri5(velocity_fn, x0, steps)
        x, states = traj[-1], [traj[k] for k in sorted(wanted)]
        return (x, states) if keep else x
    h = 1.0 / steps
    x, states = x0, [x0] if 0 in wanted else []
    ones = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
    for k in range(steps):
        v = velocity_fn(x, ones * (k * h))
        if method == "euler":
            x = x + h * v
        else:
            v_next = velocity_fn(x + h * v, ones * ((k + 1) * h))
            x = x + (0.5 * h) * (v + v_next)
        if k + 1 in wanted:
            states.append(x)
    return (x, states) if keep else x


@torch.no_grad()
def ensemble_predict(
    velocity_fn: VelocityFn,
    shape: tuple[int, ...],
    steps: int,
    k: int = 5,
    method: str = "euler",
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Mean of x(1) over `k` independent noise draws, clamped to [0, 1] (the original's ensemble:
    averaged raw x(1), then > 0.5; clamping after the mean leaves that threshold unchanged)."""
    total = torch.zeros(shape, device=device, dtype=dtype)
    for _ in range(k):
        x0 = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        total = total + sample(velocity_fn, x0, steps, method)
    return (total / k).clamp(0.0, 1.0)

