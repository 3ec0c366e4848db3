"""PDAN recipe: temporal action detection on per-video I3D features (Charades format).

    python -m recipes.pdan data.root=/data/charades_i3d_rgb          # real features
    python -m recipes.pdan                                           # synthetic demo

The loss is BCE over valid frames on the last stage (as PDAN), or on every stage with
`model.loss_all_stages=true`: `build_loss(cfg)` picks one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainlib.recipe import Recipe

from .data import (DataError, PDANData, build_collate, build_datasets, collate, frame_labels, length_buckets,
                   loc25_points, padded_length, resolved_input_channels)
from .metrics import FrameMAP, average_precision
from .model import DAL, PDAN, PDANConfig
from .synthetic import DEMO
from .synthetic import make_synthetic as write_synthetic

__all__ = ["recipe", "PDAN", "PDANConfig", "PDANData", "FrameMAP", "DAL", "DataError", "build_model",
           "build_datasets", "build_loss", "build_collate", "collate", "length_buckets", "padded_length",
           "forward", "blocks", "loss_last_stage", "loss_all_stages", "make_synthetic", "resolved_input_channels",
           "frame_labels", "loc25_points", "average_precision", "write_synthetic"]


def build_model(cfg: Any) -> PDAN:
    m = cfg.model
    return PDAN(num_stages=m.num_stages, num_layers=m.num_layers, num_channels=m.num_channels,
                input_channels=resolved_input_channels(cfg), num_classes=m.num_classes, dropout=m.dropout,
                mask_input=m.mask_input)


def forward(model: Any, batch: dict) -> torch.Tensor:
    return model(batch["features"], batch["mask"])


def _masked_bce(logits: torch.Tensor, batch: dict) -> dict:
    """logits [S', B, K, T] -> {"loss": sum over stages of (BCE summed over valid frames and
    classes) / valid frames, "weight": valid frames}. Padded frames add nothing."""
    mask = batch["mask"].float()                              # [B, T]
    x = logits.float().transpose(-1, -2)                      # [S', B, T, K]
    target = batch["labels"].float().unsqueeze(0).expand_as(x)
    per_frame = F.binary_cross_entropy_with_logits(x, target, reduction="none").sum(-1)  # [S', B, T]
    frames = mask.sum()
    total = (per_frame * mask).sum()
    return {"loss": total / frames.clamp(min=1.0), "weight": frames}


def loss_last_stage(outputs: torch.Tensor, batch: dict) -> dict:
    """PDAN's loss: BCE on the last stage only."""
    return _masked_bce(outputs[-1:], batch)


def loss_all_stages(outputs: torch.Tensor, batch: dict) -> dict:
    """BCE summed over every stage (multi-stage supervision)."""
    return _masked_bce(outputs, batch)


def build_loss(cfg: Any):
    return loss_all_stages if cfg.model.loss_all_stages else loss_last_stage


def blocks(model: PDAN) -> list:
    """The repeated blocks: every stage's dilated attention layers (PDANBlock), the FSDP units
    under trainer.strategy=fsdp and the recomputed blocks with trainer.gradient_checkpointing=true."""
    return [layer for stage in (model.stage1, *model.stages) for layer in stage.layers]


def make_synthetic(root: str, cfg: Any) -> dict:
    """The demo dataset (fixed seed, so every process writes the same bytes) sized by cfg.model."""
    k = int(cfg.model.num_classes)
    return write_synthetic(root, n_train=DEMO["n_train"], n_test=max(DEMO["n_test"], k), num_classes=k,
                           dim=resolved_input_channels(cfg), seed=0)


recipe = Recipe(
    name="pdan",
    model_config=PDANConfig,
    data_config=PDANData,
    build_model=build_model,
    build_datasets=build_datasets,
    loss=loss_last_stage,
    build_loss=build_loss,
    metrics=lambda cfg: [FrameMAP()],
    forward=forward,
    collate=build_collate,
    make_synthetic=make_synthetic,
    blocks=blocks,
    defaults={"optim.name": "adamw", "optim.lr": 1e-4, "optim.scheduler": "cosine",
              "trainer.max_epochs": 50, "trainer.monitor": "val/map", "trainer.mode": "max"},
    demo={"model.num_classes": DEMO["num_classes"], "trainer.max_epochs": 10, "optim.lr": 1e-3},
    aliases={"lr": "optim.lr", "optimizer": "optim.name", "scheduler": "optim.scheduler",
             "batch_size": "data.batch_size", "mode": "data.mode"},
    description="PDAN temporal action detection on I3D features (Charades format)",
)
