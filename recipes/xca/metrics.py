"""XCA vessel metrics, pure numpy / torch: overlap scores, clDice, Betti errors, and `VesselMetrics`.

What soft-seg reports (src/metrics/{general,vessel}_metrics.py, src/archs/flow_model.py, commit era of
the XCA l1_bce config): val/test batch size 1, every metric's per-batch (= per-image) value logged and
averaged over images by Lightning. So its numbers are *means over images*:

- "dice": torchmetrics DiceScore(num_classes=2, average="macro") fed index maps [1, H, W] with the
  default input_format="one-hot", which reads the H axis as classes: the logged "dice" is the mean over
  image rows of the per-row foreground Dice (rows empty in both maps skipped), not a 2-class Dice
  (checked against torchmetrics 1.8.2). Reproduced here as `dice_orig`.
- "precision", "recall", "specificity", "iou": MulticlassPrecision / Recall / Specificity /
  JaccardIndex(2, average="macro"): per image, the mean of the background and vessel scores (a class
  absent from both maps is left out, 0/0 -> 0). Here `*_macro`. With two classes, background
  specificity is vessel recall and vice versa, so specificity_macro == recall_macro always.
- "cldice": per image 2 tprec tsens / (tprec + tsens + 1e-5), tprec = |S(pred) & gt| / (|S(pred)| +
  1e-5), tsens = |S(gt) & pred| / (|S(gt)| + 1e-5), S = skimage.morphology.skeletonize. Here `cldice`,
  with S our textbook Zhang-Suen `skeletonize` (a few pixels off skimage's; see there).
- "betti_0_error": |#components(pred) - #components(gt)| with scipy.ndimage.label's default
  4-connectivity (not skimage.measure.label's 8). Here `betti0_error` (same connectivity).
- "betti_1_error": max(0, #components(erode(m)) - #components(m)) per map, erosion by the 4-cross with
  a zero border: it counts components split by erosion, not holes (a ring and a disc both give 0).
  Reproduced as `betti1_error_orig`; `betti1_error` counts holes exactly (components of the
  8-connected background, the dual of 4-connected vessels, that do not touch the border).

Added, pooled over all pixels of all images (the dataset-level numbers): foreground `dice`, `iou`,
`precision`, `recall`, `specificity` (0/0 -> 0). `dice_macro` is the true 2-class macro Dice per image.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainlib.metrics import Metric


def skeletonize(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a 2D mask, written from the paper's rules (T. Y. Zhang and C. Y. Suen,
    "A fast parallel algorithm for thinning digital patterns", CACM 27(3), 1984).

    Neighbours of a pixel P1, clockwise from north: P2 = N, P3 = NE, P4 = E, P5 = SE, P6 = S,
    P7 = SW, P8 = W, P9 = NW (outside the image is background). B(P1) = the number of foreground
    neighbours; A(P1) = the number of 0 -> 1 transitions in the cyclic sequence P2, P3, ..., P9, P2.
    A foreground pixel is removed when 2 <= B(P1) <= 6, A(P1) == 1 and
      sub-iteration 1: P2 * P4 * P6 == 0 and P4 * P6 * P8 == 0 (south / east boundary, north-west corner)
      sub-iteration 2: P2 * P4 * P8 == 0 and P2 * P6 * P8 == 0 (north / west boundary, south-east corner)
    Each sub-iteration decides every pixel from the same state (the paper's parallel step), here on
    whole neighbour arrays taken from the zero-padded mask; the pair repeats until neither removes a
    pixel.

    It is the textbook algorithm, so it differs slightly from skimage.morphology.skeletonize, which
    the original metric used: skimage runs Zhang-Suen from its own modified removal table. On diagonal
    runs the paper's rules keep the corner pixel of each 4-connected step (skimage removes it, leaving
    a strictly 8-connected line), line ends may lie a pixel apart, and a lone 2x2 block is removed
    entirely (skimage keeps its top row). On random vessel-like 96x96 pairs clDice moves by about 0.01
    on average, up to about 0.05 on single images (tests/test_xca_flow_metrics.py).
    """
    sk = np.pad(np.asarray(mask, dtype=bool), 1)
    centre = sk[1:-1, 1:-1]  # a view: removals write through to sk
    while True:
        changed = False
        for first in (True, False):
            # P2 .. P9 (N, NE, E, SE, S, SW, W, NW), each aligned with centre
            nb = [sk[:-2, 1:-1], sk[:-2, 2:], sk[1:-1, 2:], sk[2:, 2:],
                  sk[2:, 1:-1], sk[2:, :-2], sk[1:-1, :-2], sk[:-2, :-2]]
            b = sum(n.astype(np.uint8) for n in nb)
            a = sum((~nb[i] & nb[(i + 1) % 8]).astype(np.uint8) for i in range(8))
            p2, p4, p6, p8 = nb[0], nb[2], nb[4], nb[6]
            if first:
                keep_shape = (p2 & p4 & p6) | (p4 & p6 & p8)
            else:
                keep_shape = (p2 & p4 & p8) | (p2 & p6 & p8)
            kill = centre & (b >= 2) & (b <= 6) & (a == 1) & ~keep_shape
            if kill.any():  # kill is fully computed from the old state before this write
                centre[kill] = False
                changed = True
        if not changed:
            return centre.copy()


def connected_components(mask: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """(labels int32, count): 4- or 8-connected components, labelled 1.. in raster order of their
    first pixel (as scipy.ndimage.label). Nodes are row runs, joined to the runs they touch in the
    next row, then merged by union-find with pointer jumping (all vectorised)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    labels = np.zeros((h, w), dtype=np.int32)
    starts = m.copy()
    starts[:, 1:] &= ~m[:, :-1]
    n = int(starts.sum())
    if n == 0:
        return labels, 0
    run = np.cumsum(starts.ravel()).reshape(h, w) - 1  # run id of every foreground pixel
    src, dst = [], []
    for dx in (0,) if connectivity == 4 else (-1, 0, 1):
        left = max(0, -dx)  # pair (y, x) - (y + 1, x + dx) sits at column x - left
        pair = m[:-1, left : w - max(0, dx)] & m[1:, max(0, dx) : w + min(0, dx)]
        first = pair.copy()
        first[:, 1:] &= ~pair[:, :-1]  # the pair left of it joins the same two runs
        ys, xs = np.nonzero(first)
        src.append(run[ys, xs + left])
        dst.append(run[ys + 1, xs + left + dx])
    u, v = np.concatenate(src), np.concatenate(dst)
    parent = np.arange(n)
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        # hook the larger root under the smaller: parents only decrease, so no cycles
        np.minimum.at(parent, np.maximum(pu[differ], pv[differ]), np.minimum(pu[differ], pv[differ]))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    _, order = np.unique(parent, return_inverse=True)  # roots are raster-first runs
    labels[m] = order[run[m]] + 1
    return labels, int(order.max()) + 1


def count_holes(mask: np.ndarray, connectivity: int = 4) -> int:
    """Betti-1: background components (dual connectivity) that do not touch the image border."""
    background = np.pad(~np.asarray(mask, dtype=bool), 1, constant_values=True)
    return connected_components(background, 8 if connectivity == 4 else 4)[1] - 1


def betti1_erosion(mask: np.ndarray) -> int:
    """soft-seg's Betti-1 "approximation": components gained by one 4-cross erosion (zero border)."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1)
    eroded = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return max(0, connected_components(eroded, 4)[1] - connected_components(m, 4)[1])


def cl_dice(pred: np.ndarray, gt: np.ndarray, smooth: float = 1e-5) -> float:
    """Centerline Dice of two 2D masks with the original's smoothing (0 when either map is empty)."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    sp, sg = skeletonize(p), skeletonize(g)
    tprec = (sp & g).sum() / (sp.sum() + smooth)
    tsens = (sg & p).sum() / (sg.sum() + smooth)
    return float(2 * tprec * tsens / (tprec + tsens + smooth))


def betti_errors(pred: np.ndarray, gt: np.ndarray, connectivity: int = 4) -> tuple[int, int]:
    """(|b0(pred) - b0(gt)|, |b1(pred) - b1(gt)|), b0 = components, b1 = exact holes."""
    b0 = abs(connected_components(pred, connectivity)[1] - connected_components(gt, connectivity)[1])
    b1 = abs(count_holes(pred, connectivity) - count_holes(gt, connectivity))
    return b0, b1


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b with 0 where b == 0 (torchmetrics' zero_division=0)."""
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _macro(fg: torch.Tensor, bg: torch.Tensor, w_fg: torch.Tensor, w_bg: torch.Tensor) -> torch.Tensor:
    """torchmetrics' macro average over {background, vessel}: classes absent from both maps drop out."""
    return _div(w_fg * fg + w_bg * bg, w_fg + w_bg)


PER_IMAGE = ("dice_macro", "iou_macro", "precision_macro", "recall_macro", "specificity_macro",
             "dice_orig", "cldice", "betti0_error", "betti1_error", "betti1_error_orig")


class VesselMetrics(Metric):
    """Whole-image vessel metrics from outputs [B, 1, H, W] (binary or probability, > threshold) and
    batch["label"] [B, 1, H, W] (> 0.5). Overlap counts stay on the device; topology (skeletons,
    components) runs per image on the host, which costs a device sync per update (evaluation only)."""

    def __init__(self, threshold: float = 0.5, connectivity: int = 4) -> None:
        super().__init__()
        self.threshold = threshold
        self.connectivity = connectivity
        for name in ("tp", "fp", "fn", "tn", "images", "dice_orig_images", *PER_IMAGE):
            self.add_state(name, "sum")

    def _add(self, name: str, values: torch.Tensor) -> None:
        setattr(self, name, getattr(self, name).to(values.device) + values.double().sum())

    def update(self, outputs: torch.Tensor | dict, batch: Any) -> None:
        if isinstance(outputs, dict):  # the recipe's predict: {"prob": ..., "trajectory": ...}
            outputs = outputs["prob"]
        pred = (outputs.detach() > self.threshold).flatten(0, 1)  # [B, H, W]
        gt = (batch["label"] > 0.5).flatten(0, 1)
        tp = (pred & gt).sum((1, 2)).double()
        fp = (pred & ~gt).sum((1, 2)).double()
        fn = (~pred & gt).sum((1, 2)).double()
        tn = (~pred & ~gt).sum((1, 2)).double()
        for name, value in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn)):
            self._add(name, value)
        self._add("images", torch.ones_like(tp))
        # per image, class vessel = (tp, fp, fn, tn) and class background = (tn, fn, fp, tp)
        w_fg, w_bg = (tp + fp + fn > 0).double(), (tn + fn + fp > 0).double()
        dice_fg, dice_bg = _div(2 * tp, 2 * tp + fp + fn), _div(2 * tn, 2 * tn + fn + fp)
        self._add("dice_macro", _macro(dice_fg, dice_bg, w_fg, w_bg))
        self._add("iou_macro", _macro(_div(tp, tp + fp + fn), _div(tn, tn + fn + fp), w_fg, w_bg))
        self._add("precision_macro", _macro(_div(tp, tp + fp), _div(tn, tn + fn), w_fg, w_bg))
        self._add("recall_macro", _macro(_div(tp, tp + fn), _div(tn, tn + fp), w_fg, w_bg))
        self._add("specificity_macro", _macro(_div(tn, tn + fp), _div(tp, tp + fn), w_fg, w_bg))
        # the original's "dice": per-row foreground Dice, rows empty in both maps skipped
        row_den = (pred.sum(2) + gt.sum(2)).double()
        rows = (row_den > 0).double()
        row_dice = _div(2 * (pred & gt).sum(2).double(), row_den)  # 0 on skipped rows
        self._add("dice_orig", _div(row_dice.sum(1), rows.sum(1)))
        self._add("dice_orig_images", (rows.sum(1) > 0).double())  # images with any vessel pixel
        self._add_topology(pred.cpu().numpy(), gt.cpu().numpy(), tp.device)

    def _add_topology(self, pred: np.ndarray, gt: np.ndarray, device: torch.device) -> None:
        values = []
        for p, g in zip(pred, gt):
            b0, b1 = betti_errors(p, g, self.connectivity)
            values.append((cl_dice(p, g), b0, b1, abs(betti1_erosion(p) - betti1_erosion(g))))
        per = torch.tensor(values, dtype=torch.float64, device=device)
        for i, name in enumerate(("cldice", "betti0_error", "betti1_error", "betti1_error_orig")):
            self._add(name, per[:, i])

    def compute_from(self, s: dict[str, torch.Tensor]) -> dict[str, float]:
        tp, fp, fn, tn, n = (float(s[k]) for k in ("tp", "fp", "fn", "tn", "images"))

        def div(a: float, b: float) -> float:
            return a / b if b > 0 else 0.0

        out = {
            "dice": div(2 * tp, 2 * tp + fp + fn),
            "iou": div(tp, tp + fp + fn),
            "precision": div(tp, tp + fp),
            "recall": div(tp, tp + fn),
            "specificity": div(tn, tn + fp),
        }
        for name in PER_IMAGE:
            count = float(s["dice_orig_images"]) if name == "dice_orig" else n
            out[name] = float(s[name]) / count if count > 0 else float("nan")
        return out
