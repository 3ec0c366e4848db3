"""Frame-level mAP for PDAN (Superevent/PDAN apmeter and the Charades_v1_localize 25-point variant).

AP per class is non-interpolated: sort every frame's score for that class (descending), then
average the precision at the rank of each positive frame.
"""
from __future__ import annotations

import torch

from trainlib.metrics import Metric

_CHUNK_ELEMENTS = 1 << 23  # scores processed per class chunk (bounds the memory of the sort)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class non-interpolated AP. scores, labels: [N, K] -> [K] float64 (nan: no positive)."""
    n, k = scores.shape
    out = torch.full((k,), float("nan"), dtype=torch.float64)
    if n == 0 or k == 0:
        return out
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=scores.device).unsqueeze(1)
    step = max(1, _CHUNK_ELEMENTS // n)
    for lo in range(0, k, step):  # chunks of classes, never a loop over frames
        s = scores[:, lo:lo + step].double()
        order = torch.sort(s, dim=0, descending=True, stable=True).indices
        hits = labels[:, lo:lo + step].gather(0, order).double()
        precision = hits.cumsum(0) / ranks
        npos = hits.sum(0)
        ap = (precision * hits).sum(0) / npos.clamp(min=1)
        out[lo:lo + step] = torch.where(npos > 0, ap, torch.full_like(ap, float("nan"))).cpu()
    return out


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")


class FrameMAP(Metric):
    """Frame mAP of the last stage's sigmoid scores.

    Returns {"map": mean AP over classes with a positive frame, "map_nonzero": PDAN's mean over
    classes with nonzero AP, "map_loc25": mean AP over classes with a positive, scored at 25
    points per video (Charades_v1_localize)}, all fractions in [0, 1].

    update() does no host sync: it keeps every (padded) frame with its validity flag and drops
    padded frames in compute_from().
    """

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", "cat")      # [B*T, K] float32
        self.add_state("labels", "cat")      # [B*T, K] uint8
        self.add_state("valid", "cat")       # [B*T] uint8
        self.add_state("scores25", "cat")    # [B*25, K] float32
        self.add_state("labels25", "cat")    # [B*25, K] uint8

    def update(self, outputs: torch.Tensor, batch: dict) -> None:
        logits = outputs[-1].detach().float()                    # [B, K, T]
        b, k, t = logits.shape
        probs = torch.sigmoid(logits)
        self.scores.append(probs.transpose(1, 2).reshape(b * t, k))
        self.labels.append(batch["labels"].detach().reshape(b * t, k).to(torch.uint8))
        self.valid.append(batch["mask"].detach().reshape(b * t).to(torch.uint8))
        index = batch["loc25_index"].to(logits.device)
        n = index.shape[1]
        picked = probs.gather(2, index.unsqueeze(1).expand(b, k, n))  # [B, K, 25]
        self.scores25.append(picked.transpose(1, 2).reshape(b * n, k))
        self.labels25.append(batch["loc25_labels"].detach().reshape(b * n, k).to(torch.uint8))

    def compute_from(self, s: dict[str, torch.Tensor]) -> dict[str, float]:
        nan = float("nan")
        result = {"map": nan, "map_nonzero": nan, "map_loc25": nan}
        scores, labels, valid = s["scores"], s["labels"], s["valid"]
        if scores.dim() == 2 and scores.shape[0] > 0:
            keep = valid.bool()
            ap = average_precision(scores[keep], labels[keep])
            has_pos = ~torch.isnan(ap)
            result["map"] = _mean(ap[has_pos])
            result["map_nonzero"] = _mean(ap[has_pos & (ap != 0)])
        if s["scores25"].dim() == 2 and s["scores25"].shape[0] > 0:
            ap25 = average_precision(s["scores25"], s["labels25"])
            result["map_loc25"] = _mean(ap25[~torch.isnan(ap25)])
        return result
