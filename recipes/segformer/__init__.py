"""SegFormer recipe: semantic segmentation (sidewalk scenes) with a MiT encoder and an all-MLP head.

    python -m recipes.segformer data.root=/data/indo_walking/surface_masking      # the seed's layout
    python -m recipes.segformer model.pretrained=/models/mit-b0 data.root=...      # ImageNet encoder
    torchrun --nproc_per_node=2 -m recipes.segformer                             # synthetic demo

Loss: cross-entropy on the logits upsampled (bilinear, align_corners=False) to the label size,
pixels labelled 255 ignored, averaged over the valid pixels of the whole optimizer step (its
weight is the valid-pixel count). Metric: mIoU over the whole split (metrics.MeanIoU).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainlib import dist
from trainlib.recipe import Recipe

from .data import (IGNORE_INDEX, SegFormerData, SegmentationPairs, build_datasets, class_names, label_lut,
                   read_metadata)
from .metrics import MeanIoU, upsample
from .model import VARIANTS, SegFormer, SegFormerConfig, architecture
from .pretrained import from_pretrained, hf_to_ours, load_pretrained, ours_to_hf, to_hf_state_dict
from .synthetic import DEMO
from .synthetic import make_synthetic as write_synthetic

__all__ = ["recipe", "SegFormer", "SegFormerConfig", "SegFormerData", "SegmentationPairs", "MeanIoU", "VARIANTS",
           "architecture", "build_model", "build_datasets", "loss", "forward", "blocks", "metrics", "make_synthetic",
           "write_synthetic", "search_space", "from_pretrained", "load_pretrained", "hf_to_ours", "ours_to_hf",
           "to_hf_state_dict", "class_names", "label_lut", "read_metadata", "IGNORE_INDEX"]


def build_model(cfg: Any) -> SegFormer:
    model = SegFormer.from_config(cfg.model)
    if cfg.model.pretrained:
        say = (lambda text: print(f"[segformer] {text}", flush=True)) if dist.rank() == 0 else None
        load_pretrained(model, cfg.model.pretrained, log=say)
    return model


def forward(model: Any, batch: dict) -> torch.Tensor:
    return model(batch["pixel_values"])


def loss(outputs: torch.Tensor, batch: dict) -> dict:
    """Pixel cross-entropy, 255 ignored: {"loss": mean over valid pixels, "weight": valid pixels} (no host sync)."""
    labels = batch["labels"]
    logits = upsample(outputs.float(), labels.shape[-2:])
    valid = (labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return {"loss": total / valid.clamp(min=1), "weight": valid}


def metrics(cfg: Any) -> list:
    return [MeanIoU(cfg.model.num_labels, class_names(cfg), cfg.data.eval_ignore_labels)]


def blocks(model: SegFormer) -> list:
    """The repeated blocks: the encoder's transformer blocks of every stage, the FSDP units under
    trainer.strategy=fsdp and the recomputed blocks with trainer.gradient_checkpointing=true."""
    return [blk for stage in model.encoder.block for blk in stage]


def make_synthetic(root: str, cfg: Any) -> dict:
    """The demo dataset (fixed seed: every process would write the same bytes) with model.num_labels classes."""
    return write_synthetic(root, num_labels=int(cfg.model.num_labels), seed=0)


def search_space(trial: Any) -> dict[str, Any]:
    """Optuna hint (the seed's search: learning rate, batch size, optimizer, ...): config key -> value."""
    return {
        "optim.lr": trial.suggest_float("optim.lr", 1e-5, 1e-3, log=True),
        "data.batch_size": trial.suggest_categorical("data.batch_size", [2, 4, 8]),
        "optim.name": trial.suggest_categorical("optim.name", ["adamw", "adam", "sgd"]),
        "optim.weight_decay": trial.suggest_float("optim.weight_decay", 1e-6, 1e-2, log=True),
        "optim.scheduler": trial.suggest_categorical("optim.scheduler", ["none", "cosine", "onecycle"]),
    }


recipe = Recipe(
    name="segformer",
    model_config=SegFormerConfig,
    data_config=SegFormerData,
    build_model=build_model,
    build_datasets=build_datasets,
    loss=loss,
    metrics=metrics,
    forward=forward,
    make_synthetic=make_synthetic,
    search_space=search_space,
    blocks=blocks,
    inference_overrides={"model.pretrained": ""},  # load_model: the saved weights replace the start-from weights
    defaults={"optim.name": "adamw", "optim.lr": 6e-5, "optim.scheduler": "none", "trainer.max_epochs": 50,
              "trainer.monitor": "val/miou", "trainer.mode": "max"},
    demo={"model.num_labels": DEMO["num_labels"], "data.image_size": 64, "data.batch_size": 8,
          "trainer.max_epochs": 12, "optim.lr": 1e-3, "optim.scheduler": "cosine", "optim.warmup_steps": 20},
    aliases={"learning_rate": "optim.lr", "epochs": "trainer.max_epochs", "num_train_epochs": "trainer.max_epochs",
             "per_device_train_batch_size": "data.batch_size", "model_name_or_path": "model.pretrained",
             "pretrained_model_name_or_path": "model.pretrained", "patience": "trainer.early_stop_patience",
             "early_stopping_patience": "trainer.early_stop_patience", "num_classes": "model.num_labels",
             "num_workers": "data.num_workers"},
    description="SegFormer semantic segmentation (MiT-b0..b5 + all-MLP head), sidewalk-semantic defaults",
)
