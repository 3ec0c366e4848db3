"""Validation images: a recipe's picture of what the model predicts, logged at every validation.

A recipe gives `Recipe.image_logger(cfg) -> ImageCollector | None`; at each validation the engine
passes it every batch next to the metrics (`update(outputs, batch)`, what predict_fn returned), then
gathers each rank's `images()` (an image may live on any rank) and rank 0 writes them:

    <run>/images/<split>/step_<N>/<tag>.png     always (no logger needed to look at them)
    TensorBoard add_image / wandb.Image           when that logger is on (Logger.log_images)

Images are uint8 arrays, [H, W] (gray) or [H, W, 3] (RGB). Validation only: the final test writes
prediction files instead (evaluation.PredictionWriter).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import dist


class ImageCollector(Protocol):
    """Picks the images to log from the batches it sees (no host sync needed in update)."""

    def update(self, outputs: Any, batch: Any) -> None: ...
    def images(self) -> dict[str, np.ndarray]: ...


def to_uint8(x: Any, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """A tensor or array with values in [low, high] -> uint8 [0, 255] (clipped), on the host."""
    arr = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    return (np.clip((arr - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def row(panels: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Gray panels of one height side by side, separated by `gap` white columns."""
    h = max(p.shape[0] for p in panels)
    out: list[np.ndarray] = []
    for i, p in enumerate(panels):
        if p.shape[0] != h:
            p = np.pad(p, ((0, h - p.shape[0]), (0, 0)))
        out += ([np.full((h, gap), 255, np.uint8)] if i else []) + [p]
    return np.concatenate(out, axis=1)


def _file_name(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag).strip("_") or "image"


class ImagesToLog:
    """The evaluation writer (update/write) that hands a collector's images to the loggers."""

    def __init__(self, collector: ImageCollector, loggers: list, step: int) -> None:
        self.collector, self.loggers, self.step = collector, loggers, step

    def update(self, outputs: Any, batch: Any) -> None:
        self.collector.update(outputs, batch)

    def write(self, run_dir: Path, split: str) -> None:
        """Every rank calls (a gather); rank 0 saves the PNGs and feeds the loggers."""
        merged: dict[str, np.ndarray] = {}
        for part in dist.all_gather_object(self.collector.images()):
            merged.update(part)
        if dist.rank() != 0 or not merged:
            return
        from PIL import Image

        folder = Path(run_dir) / "images" / split / f"step_{self.step}"
        folder.mkdir(parents=True, exist_ok=True)
        for tag, img in sorted(merged.items()):
            name = _file_name(tag)
            Image.fromarray(img).save(folder / (name if name.lower().endswith(".png") else f"{name}.png"))
        for lg in self.loggers:
            if hasattr(lg, "log_images"):
                lg.log_images({f"{split}_images/{tag}": img for tag, img in merged.items()}, self.step)
