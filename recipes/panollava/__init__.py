"""PanoLLaVA: a panoramic vision-language model trained in three stages (seed: wooseungw/panollava).

    python -m recipes.panollava                                   # synthetic demo: all three stages
    python -m recipes.panollava stage=vision trainer.run_name=exp1        # one stage at a time
    torchrun --nproc_per_node=2 -m recipes.panollava trainer.strategy=fsdp data.root=/data/quic360 \\
        model.vision_pretrained=/models/siglip-base-patch16-224 model.lm_pretrained=/models/Qwen2.5-0.5B
    bash launch/train_all_stages.sh                               # the seed's scripts (launch/)

Stages (the engine's, trainlib/stages.py; each starts from the previous one's model_final.safetensors):
  vision     VICReg between the overlapping strips of adjacent views; trains resampler + VICReg projector
  resampler  captions, LM frozen; trains resampler + projection
  finetune   captions; trains resampler + projection + LoRA adapters on the LM (merged on export)
The SigLIP encoder stays frozen throughout, as in the seed's stable revision (7227614).
Models in plain PyTorch (lm.py, vision.py), loaded from Hugging Face folders; metrics BLEU-1..4,
ROUGE-L, CIDEr on greedy captions (captions.py). docs/recipes/panollava.md: data, stages, numbers.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from trainlib.recipe import Recipe
from trainlib.stages import Stage

from .captions import caption_scores
from .data import PanoCaptions, PanoData, all_texts, make_collate, split_paths
from .evaluation import CaptionScores, CaptionWriter, ViewAgreement
from .lm import Qwen2Config, Qwen2LM, lm_from_pretrained
from .model import PanoModel, PanoVLM
from .synthetic import make_synthetic
from .text import IM_END, PAD, VISION, load_tokenizer
from .views import erp_to_views
from .vision import SiglipVisionConfig, SiglipVisionTower, vision_from_pretrained

__all__ = ["recipe", "PanoModel", "PanoData", "PanoVLM", "Qwen2Config", "Qwen2LM", "lm_from_pretrained",
           "SiglipVisionConfig", "SiglipVisionTower", "vision_from_pretrained", "erp_to_views", "caption_scores",
           "tokenizer", "build_model", "build_datasets"]


@lru_cache(maxsize=4)
def _tokenizer(lm_folder: str, root: str, csvs: tuple[str, ...]) -> Any:
    data = PanoData(root=root, train_csv=csvs[0], val_csv=csvs[1], test_csv=csvs[2])
    return load_tokenizer(lm_folder, [] if lm_folder else all_texts(data))


def tokenizer(cfg: Any) -> Any:
    """The LM folder's tokenizer.json, or the words of the data's CSVs (the same on every rank)."""
    d = cfg.data
    return _tokenizer(cfg.model.lm_pretrained, d.root, (d.train_csv, d.val_csv, d.test_csv))


def build_model(cfg: Any) -> PanoVLM:
    tok = tokenizer(cfg)
    ids = {"vision": tok.token_id(VISION), "pad": tok.token_id(PAD), "eos": tok.token_id(IM_END)}
    model = PanoVLM(cfg.model, len(tok), ids)
    model.objective = "vicreg" if cfg.stage == "vision" else "caption"
    return model


def build_datasets(cfg: Any) -> dict[str, PanoCaptions]:
    tok, root = tokenizer(cfg), Path(cfg.data.root)
    return {split: PanoCaptions(path, root, tok, cfg.data, cfg.model.system_prompt, cfg.model.prompt_template)
            for split, path in split_paths(cfg.data).items()}


def predict(model: PanoVLM, batch: dict) -> dict:
    """Stage vision: how well the views' strips agree; otherwise greedy captions (model.forward)."""
    return model(batch, predict=True)


def metrics(cfg: Any) -> list:
    return [ViewAgreement()] if cfg.stage == "vision" else [CaptionScores(tokenizer(cfg))]


def blocks(model: PanoVLM) -> list:
    """FSDP units: the LM's decoder layers and the vision tower's encoder layers."""
    return [*model.lm.blocks, *model.vision.blocks]


_CAPTION = {"trainer.monitor": "val/bleu4", "trainer.mode": "max"}


def _resampler_trains(cfg: Any) -> list[str]:
    """Resampler and projection, plus the whole LM when it starts from scratch (no model.lm_pretrained:
    the synthetic demo): a frozen random LM cannot learn to write. With a pretrained LM, as the seed."""
    return ["resampler", "projection", *([] if cfg.model.lm_pretrained else ["lm"])]


def _finetune_trains(cfg: Any) -> list[str]:
    """Resampler, projection and the LoRA adapters; the whole LM with model.lora_r=0 (the seed's
    "LM or LoRA")."""
    return ["resampler", "projection", "lora" if cfg.model.lora_r else "lm"]


STAGES = [
    # the seed's config.json @7227614: epochs, lr, batch, accumulation per stage
    Stage("vision", trains=["resampler", "vicreg_projector"],
          overrides={"trainer.max_epochs": 5, "optim.lr": 1e-4, "data.batch_size": 64,
                     "trainer.accumulate_grad_batches": 2, "trainer.monitor": "val/loss", "trainer.mode": "min"},
          demo={"trainer.max_epochs": 3, "optim.lr": 2e-3, "trainer.accumulate_grad_batches": 1}),
    Stage("resampler", trains=_resampler_trains,
          overrides={"trainer.max_epochs": 1, "optim.lr": 2e-6, "data.batch_size": 2, **_CAPTION},
          demo={"trainer.max_epochs": 8, "optim.lr": 4e-3}),
    Stage("finetune", trains=_finetune_trains,
          overrides={"trainer.max_epochs": 1, "optim.lr": 2e-6, "data.batch_size": 2, **_CAPTION},
          demo={"trainer.max_epochs": 3, "optim.lr": 2e-3}),
]

recipe = Recipe(
    name="panollava",
    model_config=PanoModel,
    data_config=PanoData,
    build_model=build_model,
    build_datasets=build_datasets,
    loss=lambda outputs, batch: outputs,  # the model computes its own {"loss", "weight"} (the LM shifts the labels)
    forward=lambda model, batch: model(batch),
    predict=predict,
    metrics=metrics,
    collate=lambda cfg: make_collate(tokenizer(cfg).token_id(PAD), cfg.data.max_caption_tokens),
    make_synthetic=lambda root, cfg: make_synthetic(Path(root), cfg),
    prediction_writer=lambda cfg, split: (CaptionWriter(tokenizer(cfg), split_paths(cfg.data)[split])
                                          if cfg.stage != "vision" else None),
    blocks=blocks,
    stages=STAGES,
    # AdamW(0.9, 0.98), weight decay 0.01, linear decay after a 10% warmup (the seed's optimiser)
    defaults={"optim.name": "adamw", "optim.betas": [0.9, 0.98], "optim.weight_decay": 0.01,
              "optim.scheduler": "linear", "optim.warmup_ratio": 0.1, "trainer.grad_clip": 1.0},
    demo={"data.erp_height": 64, "data.erp_width": 128, "data.batch_size": 8, "data.max_caption_tokens": 24,
          "model.view_size": 32, "model.patch_size": 8, "model.vision_hidden": 48, "model.vision_layers": 2,
          "model.vision_heads": 4, "model.vision_intermediate": 96, "model.lm_hidden": 64, "model.lm_layers": 2,
          "model.lm_heads": 4, "model.lm_kv_heads": 2, "model.lm_intermediate": 128, "model.rope_theta": 10000.0,
          "model.latent_dim": 64, "model.resampler_hidden": 128, "model.lora_r": 8, "model.lora_alpha": 16.0,
          "model.lora_dropout": 0.0, "model.max_new_tokens": 16},
    aliases={"epochs": "trainer.max_epochs", "batch_size": "data.batch_size", "lr": "optim.lr",
             "data_dir": "data.root"},
    description="PanoLLaVA: panoramic captions from SigLIP views + Qwen2, three stages (vision, resampler, finetune)",
)
