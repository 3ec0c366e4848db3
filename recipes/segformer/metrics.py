"""Mean IoU over a whole split, as Hugging Face `evaluate`'s mean_iou.

Per class c, summed over every pixel of the split (all ranks): intersect_c (pred == label == c),
area_pred_c, area_label_c; union_c = area_pred_c + area_label_c - intersect_c. Pixels labelled 255
(and any class listed in data.eval_ignore_labels) are removed first. Predictions are the argmax of
the logits upsampled bilinearly (align_corners=False) to the label size.

    miou   nanmean over classes with union > 0 of intersect / union
    acc    overall pixel accuracy: sum(intersect) / sum(area_label)
    macc   nanmean over classes with area_label > 0 of intersect / area_label
    iou_<class name or index>   per class (nan when the class is absent from labels and predictions)
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F

from trainlib.metrics import Metric

from .data import IGNORE_INDEX


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def metric_names(num_labels: int, class_names: Sequence[str] | None) -> list[str]:
    """iou_<name> with anything but [A-Za-z0-9_.-] replaced by '_'; iou_<index> without names."""
    if not class_names:
        return [f"iou_{i}" for i in range(num_labels)]
    names = [f"iou_{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(n)).strip('_') or i}" for i, n in enumerate(class_names)]
    if len(set(names)) != len(names):
        return [f"iou_{i}" for i in range(num_labels)]
    return names


class MeanIoU(Metric):
    """States are three per-class count vectors [K] (reduce "sum"); update() does no host sync."""

    STATES = ("intersect", "area_pred", "area_label")

    def __init__(self, num_labels: int, class_names: Sequence[str] | None = None,
                 ignore_labels: Sequence[int] = (), ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.num_labels = int(num_labels)
        self.names = metric_names(self.num_labels, class_names)
        self.ignore_labels = tuple(int(c) for c in ignore_labels)
        self.ignore_index = int(ignore_index)
        for name in self.STATES:
            self.add_state(name, "sum", shape=(self.num_labels,))

    def counts(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(intersect, area_pred, area_label) int64 [K] of one batch."""
        k = self.num_labels
        pred = upsample(logits.detach().float(), labels.shape[-2:]).argmax(1)
        valid = labels != self.ignore_index
        for c in self.ignore_labels:
            valid &= labels != c
        trash = torch.full_like(labels, k)  # bin k collects the pixels that do not count
        out = []
        for idx in (torch.where(valid & (pred == labels), labels, trash), torch.where(valid, pred, trash),
                    torch.where(valid, labels, trash)):
            idx = idx.flatten()
            out.append(torch.zeros(k + 1, dtype=torch.int64, device=idx.device)
                       .scatter_add_(0, idx, torch.ones_like(idx))[:k])
        return out[0], out[1], out[2]

    def update(self, outputs: torch.Tensor, batch: dict) -> None:
        for name, c in zip(self.STATES, self.counts(outputs, batch["labels"])):
            setattr(self, name, getattr(self, name).to(c.device) + c.double())

    def compute_from(self, s: dict[str, torch.Tensor]) -> dict[str, float]:
        inter, pred, label = (s[n].double().reshape(-1) for n in self.STATES)
        union = pred + label - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, math.nan))
        acc_c = torch.where(label > 0, inter / label.clamp(min=1), torch.full_like(label, math.nan))
        result = {
            "miou": float(iou[union > 0].mean()) if bool((union > 0).any()) else math.nan,
            "acc": float(inter.sum() / label.sum()) if float(label.sum()) > 0 else math.nan,
            "macc": float(acc_c[label > 0].mean()) if bool((label > 0).any()) else math.nan,
        }
        result.update({name: float(v) for name, v in zip(self.names, iou)})
        return result
