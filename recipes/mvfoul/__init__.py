"""Multi-view multi-task foul recognition (SoccerNet-MVFoul, the VARS model).

    torchrun --nproc_per_node=2 -m recipes.mvfoul                                  # synthetic demo
    torchrun --nproc_per_node=4 -m recipes.mvfoul --dataset_root /data/mvfouls \\
        --backbone_name r2plus1d_18 --weights /models/r2plus1d_18-91a641e6.pth --pooling_type attention

Each action's views (2 to 4 camera clips) go through one video backbone, are pooled across views
(max, mean or VARS's attention) and feed two heads: the action class (8) and offence + severity
(4). Loss: the two tasks' losses summed with task weights, each plain, class-weighted (inverse
Train frequency, VARS's default) or focal. Metric: SoccerNet's balanced accuracies and their mean,
the leaderboard value, computed as the official evaluator does (metrics.py); predictions_test.json
and predictions_challenge.json in SoccerNet's format are written to the run directory at the end.
docs/recipes/mvfoul.md: data layout, flags, expected numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from trainlib import dist
from trainlib.config import opt

from .annotations import ACTION_CLASSES, OFFENCE_SEVERITY_CLASSES, official_labels, read_split
from .data import MVFoulClips, MVFoulData, build_datasets, class_counts, collate
from .freezing import freezing_callbacks
from .losses import MultiTaskLoss, TaskLoss, class_weights_from_counts
from .metrics import FoulMetrics, Predictions, write_predictions
from .model import BACKBONES, POOLINGS, MVNetwork, backbone_blocks, build_mvfoul_model
from .recognizer import FoulRecognizer
from .synthetic import DEMO
from .synthetic import make_synthetic as write_synthetic

from trainlib.recipe import Recipe

__all__ = ["recipe", "MVFoulModel", "MVFoulData", "MVFoulClips", "FoulRecognizer", "MVNetwork", "FoulMetrics",
           "Predictions", "build_model", "build_datasets", "build_loss", "forward", "make_synthetic", "collate",
           "ACTION_CLASSES", "OFFENCE_SEVERITY_CLASSES", "official_labels", "read_split", "write_predictions"]


@dataclass
class MVFoulModel:
    backbone_name: Literal["r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "tiny3d"] = opt(
        "r2plus1d_18", "video backbone (torchvision's; tiny3d: a small 3D CNN for CPU demos)")
    weights: str = opt("", "local file of the backbone's pretrained weights (e.g. torchvision's Kinetics-400 "
                           "r2plus1d_18-91a641e6.pth); empty: random init. Nothing is downloaded")
    pooling_type: Literal["max", "mean", "attention"] = opt("max", "how views are pooled (attention: VARS's "
                                                                   "WeightedAggregate)")
    loss_function: Literal["plain", "weighted", "focal"] = opt(
        "weighted", "per-task loss: cross-entropy, class-weighted by inverse Train frequency (VARS), or focal")
    focal_gamma: float = opt(2.0, "focal loss exponent (0: cross-entropy)", ge=0, le=10)
    offence_weight: float = opt(1.0, "weight of the offence-severity loss in the sum", ge=0, le=100)
    action_weight: float = opt(1.0, "weight of the action-class loss in the sum", ge=0, le=100)
    freezing_strategy: Literal["none", "fixed", "gradual", "advanced"] = opt(
        "none", "which backbone stages train when (recipes/mvfoul/freezing.py; docs/recipes/mvfoul.md)")
    freeze_epochs: int = opt(3, "fixed: epochs with the backbone frozen (0: all run); gradual: epochs between "
                                "unfreezing one stage and the next", ge=0, le=1000)
    adaptive_patience: int = opt(2, "advanced: validations without improvement of the smoothed monitored metric "
                                    "before the next stage unfreezes", ge=1, le=1000)
    gradient_momentum: float = opt(0.9, "advanced: momentum of the moving average of the monitored metric",
                                   ge=0, lt=1)


def build_model(cfg: Any) -> FoulRecognizer:
    m, d = cfg.model, cfg.data
    net = build_mvfoul_model(m.backbone_name, m.pooling_type, m.weights)
    on_device = d.augmentation and d.gpu_augmentation
    counts = class_counts(d.root)[1] if on_device and d.severity_aware_augmentation else None
    return FoulRecognizer(net, d.augmentation_strength if on_device else "", counts)


def forward(model: Any, batch: dict) -> dict:
    return model(batch["clips"], batch["view_mask"], batch["offence"])


def build_loss(cfg: Any) -> Any:
    """Both heads' losses (model.loss_function), class weights from the Train split's kept actions."""
    m = cfg.model
    action_counts, offence_counts = class_counts(cfg.data.root)
    weighted = m.loss_function != "plain"
    task = MultiTaskLoss(
        TaskLoss(m.loss_function, class_weights_from_counts(offence_counts) if weighted else None, m.focal_gamma),
        TaskLoss(m.loss_function, class_weights_from_counts(action_counts) if weighted else None, m.focal_gamma),
        m.offence_weight, m.action_weight)

    def loss(outputs: dict, batch: dict) -> dict:
        if task.offence_loss.class_weights is not None and task.offence_loss.class_weights.device != batch["offence"].device:
            task.to(batch["offence"].device)  # the class weights, once
        return task(outputs, batch["offence"], batch["action"])

    return loss


def callbacks(cfg: Any) -> list:
    with torch.device("meta"):  # only the stage names: no weights allocated
        stages = [f"net.{name}" for name in backbone_blocks(build_mvfoul_model(cfg.model.backbone_name, "max"))]
    return freezing_callbacks(cfg, stages)


def blocks(model: FoulRecognizer) -> list:
    """The backbone's stages: FSDP units and activation-checkpoint blocks."""
    return [model.get_submodule(f"net.{name}") for name in backbone_blocks(model.net)]


def prediction_writer(cfg: Any, split: str) -> Predictions:
    return Predictions(MVFoulClips(cfg.data.root, split, cfg.data, train=False).actions)


def make_synthetic(root: str, cfg: Any) -> dict:
    """The demo dataset (fixed seed: every process would write the same bytes)."""
    return write_synthetic(root, seed=0)


recipe = Recipe(
    name="mvfoul",
    model_config=MVFoulModel,
    data_config=MVFoulData,
    build_model=build_model,
    build_datasets=build_datasets,
    build_loss=build_loss,  # the class weights come from the Train split's counts
    metrics=lambda cfg: [FoulMetrics()],
    forward=forward,
    collate=lambda cfg: collate,
    make_synthetic=make_synthetic,
    callbacks=callbacks,
    blocks=blocks,
    prediction_writer=prediction_writer,
    # load_model rebuilds the network only: no pretrained file to read, no Train counts for augmentation
    inference_overrides={"model.weights": "", "data.severity_aware_augmentation": False},
    defaults={"optim.name": "adamw", "optim.lr": 1e-4, "optim.weight_decay": 1e-3, "optim.scheduler": "step",
              "optim.step_size": 3,
              "trainer.max_epochs": 60, "trainer.monitor": "val/leaderboard_value", "trainer.mode": "max"},
    demo={"model.backbone_name": "tiny3d", "data.img_height": 32, "data.img_width": 32, "data.batch_size": 8,
          "data.augmentation_strength": "mild", "trainer.max_epochs": 12, "optim.lr": 3e-3,
          "optim.scheduler": "cosine"},
    aliases={"dataset_root": "data.root", "epochs": "trainer.max_epochs", "save_dir": "trainer.out_dir",
             "mixed_precision": "trainer.precision=16-mixed", "test_run": "trainer.fast_dev_run=true",
             "test_batches": "trainer.fast_dev_run", "backbone": "model.backbone_name",
             "pooling": "model.pooling_type"},
    description="SoccerNet-MVFoul multi-view foul recognition (VARS: video backbone, view pooling, two task heads)",
)
