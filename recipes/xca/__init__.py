"""XCA vessel segmentation: flow matching, CS-Net and MedSegDiff (the soft-seg project's three systems).

    torchrun --nproc_per_node=2 -m recipes.xca                                   # synthetic demo, flow model
    python -m recipes.xca --config configs/supervised/xca/csnet.yaml             # the seed's YAML, as written
    bash launch/train_ddp.sh -c configs/flow/xca/flow.yaml -g "0,1"              # DDP on GPUs 0 and 1

Training sees random crops (data.image_size, num_samples_per_image per image, half centred on
vessels); validation and test see whole images through a sliding window (model.roi_size), the
generative models as an ensemble of num_ensemble samples. Loss by arch: flow matching L1 (+ the
seed's gradient-free BCE term), cross-entropy (csnet), hybrid MSE + BCE + Dice on x0 (medsegdiff).
Metrics: foreground Dice/IoU/precision/recall/specificity, the seed's 2-class macro versions
(*_macro), clDice, Betti-0/1 errors (metrics.py). Test masks: <run>/predictions/test/<name>.png.
docs/recipes/xca.md: data layout, configs, expected numbers.
"""
from __future__ import annotations

from typing import Any

from trainlib import dist
from trainlib.callbacks import Callback
from trainlib.recipe import Recipe

from .data import VesselDataset, XCAData, collate, read_pairs
from .data import build_datasets as build_splits
from .metrics import VesselMetrics
from .model import ARCHS, VesselSegmenter, XCAModel, loss_fn
from .seed_config import translate
from .synthetic import DEMO, DEMO_IMAGE_SIZE
from .synthetic import make_synthetic as write_synthetic
from .writers import MaskWriter, ValidationImages

__all__ = ["recipe", "XCAModel", "XCAData", "VesselSegmenter", "VesselDataset", "VesselMetrics", "MaskWriter",
           "ValidationImages", "ARCHS", "build_model", "build_datasets", "forward", "predict", "make_synthetic",
           "read_pairs", "translate", "effective_batch"]


def build_model(cfg: Any) -> VesselSegmenter:
    return VesselSegmenter(cfg.model, cfg.data.image_size)


def build_datasets(cfg: Any) -> dict[str, VesselDataset]:
    return build_splits(cfg.data)


def forward(model: Any, batch: dict) -> dict:
    return model(batch["image"], batch["label"])


def predict(model: VesselSegmenter, batch: dict) -> dict:
    return model.predict(batch["image"], batch["index"])


def blocks(model: VesselSegmenter) -> list:
    """The repeated blocks: UNet encoder/decoder blocks, CS-Net encoder/decoder levels."""
    net = model.net
    if hasattr(net, "enc"):
        return [*net.enc.values(), *net.dec.values()]
    return [*net.encoders, *net.decoders]


def effective_batch(cfg: Any, processes: int) -> str:
    """The crops per optimizer step, and the seed guide's count (which multiplies by num_samples_per_image)."""
    d, k = cfg.data, cfg.trainer.accumulate_grad_batches
    ours = d.batch_size * processes * k
    guide = d.batch_size * d.num_samples_per_image * processes * k
    copies = f" x {cfg.model.noise_copies} noise draws" if cfg.model.arch_name == "dhariwal_concat_unet" \
        and cfg.model.noise_copies > 1 else ""
    return (f"effective batch: {d.batch_size} crops x {processes} process(es) x {k} accumulated = {ours} crops per "
            f"optimizer step{copies}; the seed's guide counts train_bs x num_samples_per_image x GPUs x accumulation "
            f"= {guide}, but num_samples_per_image multiplies the crops per epoch (dataset items), not per step")


class PrintEffectiveBatch(Callback):
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def on_fit_start(self, state: Any) -> None:
        if state.rank == 0:
            print(f"[xca] {effective_batch(self.cfg, state.world_size)}", flush=True)


def image_logger(cfg: Any) -> ValidationImages | None:
    """On every rank (the images are gathered: a collective all ranks join), or on none."""
    m = cfg.model
    return ValidationImages(list(m.log_image_names), dist.rank()) if m.log_image_enabled else None


def make_synthetic(root: str, cfg: Any) -> dict:
    """The demo dataset (fixed seed: every process would write the same bytes)."""
    return write_synthetic(root, seed=0)


recipe = Recipe(
    name="xca",
    model_config=XCAModel,
    data_config=XCAData,
    build_model=build_model,
    build_datasets=build_datasets,
    build_loss=lambda cfg: loss_fn(cfg.model.arch_name, cfg.model.bce_weight),
    metrics=lambda cfg: [VesselMetrics(cfg.model.threshold)],
    forward=forward,
    predict=predict,
    collate=lambda cfg: collate,
    make_synthetic=make_synthetic,
    callbacks=lambda cfg: [PrintEffectiveBatch(cfg)],
    blocks=blocks,
    prediction_writer=lambda cfg, split: MaskWriter(cfg.model.threshold),
    image_logger=image_logger,
    config_file=translate,
    # the seed's flow.yaml (AdamW 2e-4, wd 1e-5, plateau on val/dice, clip 1.0, 500 epochs)
    defaults={"optim.name": "adamw", "optim.lr": 2e-4, "optim.weight_decay": 1e-5, "optim.scheduler": "plateau",
              "optim.plateau_patience": 3, "optim.plateau_factor": 0.5, "trainer.grad_clip": 1.0,
              "trainer.max_epochs": 500, "trainer.monitor": "val/dice", "trainer.mode": "max"},
    demo={"data.image_size": DEMO_IMAGE_SIZE, "data.batch_size": 8, "model.model_channels": 16,
          "model.channel_mult": [1, 2, 2], "model.num_blocks": 1, "model.attn_resolutions": [],
          "model.csnet_channels": 8, "model.timesteps": 8, "model.num_ensemble": 2,
          "model.roi_size": DEMO["size"], "trainer.max_epochs": 4, "optim.lr": 2e-3, "optim.scheduler": "cosine",
          "trainer.check_val_every_n_epoch": 2},
    aliases={"train_bs": "data.batch_size", "learning_rate": "optim.lr", "epochs": "trainer.max_epochs",
             "crop_size": "data.image_size", "gradient_clip_val": "trainer.grad_clip", "arch": "model.arch_name"},
    description="XCA vessel segmentation: flow matching (ADM UNet), CS-Net, MedSegDiff; soft-seg's configs",
)
