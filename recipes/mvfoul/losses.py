"""Per-task classification losses for the two VARS heads, and their sum.

VARS (main.py, --weighted_loss Yes, its default) trains each head with
`nn.CrossEntropyLoss(weight=w)`, w = 1 / (class count / number of Train actions) = N / count
(dataset.py getWeights), not normalised further; the two losses are added with weight 1. The
scale of w does not matter: a class-weighted mean divides by the sum of the batch's weights.

Every loss here reduces the same way: sum_i w[y_i] * loss_i / sum_i w[y_i] (torch's weighted
cross-entropy), the plain mean without weights. A batch whose weights sum to 0 gives 0, not NaN.
Nothing syncs with the host.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainlib.config import ConfigError

LOSS_KINDS = ("plain", "weighted", "focal")


def class_weights_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """VARS's weights: N / count (inverse frequency). A class with 0 samples gets weight 0 (VARS
    divides by zero and gets inf): it never appears in Train, and elsewhere it adds no loss."""
    counts = counts.float()
    return torch.where(counts > 0, counts.sum() / counts.clamp_min(1.0), 0.0)


class TaskLoss(nn.Module):
    """One head's loss on logits [B, C] and class indices [B].

    plain     cross-entropy, class_weights ignored;
    weighted  cross-entropy with class_weights (required);
    focal     focal loss (Lin et al. 2017): -(1 - p_t)^gamma * log p_t, class_weights as alpha when
              given; gamma = 0 is (weighted) cross-entropy."""

    def __init__(self, kind: str = "plain", class_weights: torch.Tensor | None = None, focal_gamma: float = 2.0):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ConfigError(f"loss kind {kind!r}: expected one of {', '.join(LOSS_KINDS)}")
        if kind == "weighted" and class_weights is None:
            raise ConfigError("loss kind 'weighted' needs class weights (class_weights_from_counts of Train's labels)")
        if focal_gamma < 0:
            raise ConfigError(f"focal_gamma={focal_gamma}: expected >= 0")
        self.kind = kind
        self.focal_gamma = float(focal_gamma)
        weights = None if kind == "plain" or class_weights is None else class_weights.detach().float()
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)  # log p_t, [B]
        per_sample = -log_p
        if self.kind == "focal":
            per_sample = (1.0 - log_p.exp()).pow(self.focal_gamma) * per_sample
        if self.class_weights is None:
            return per_sample.mean()
        alpha = self.class_weights[target]
        return (alpha * per_sample).sum() / alpha.sum().clamp_min(torch.finfo(alpha.dtype).tiny)


class MultiTaskLoss(nn.Module):
    """offence_weight * offence loss + action_weight * action loss (VARS: 1 and 1), with both parts."""

    def __init__(self, offence_loss: TaskLoss, action_loss: TaskLoss, offence_weight: float = 1.0,
                 action_weight: float = 1.0):
        super().__init__()
        self.offence_loss = offence_loss
        self.action_loss = action_loss
        self.offence_weight = float(offence_weight)
        self.action_weight = float(action_weight)

    def forward(self, outputs: dict[str, torch.Tensor], offence_target: torch.Tensor,
                action_target: torch.Tensor) -> dict[str, torch.Tensor]:
        """outputs: MVNetwork's {"offence": [B, 4], "action": [B, 8], ...}."""
        offence = self.offence_loss(outputs["offence"], offence_target)
        action = self.action_loss(outputs["action"], action_target)
        return {"loss": self.offence_weight * offence + self.action_weight * action,
                "loss_offence": offence, "loss_action": action}
