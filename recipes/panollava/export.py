"""Fold the LoRA adapters of a finetune stage's weights into the LM: one file a plain model loads.

    python -m recipes.panollava.export runs/vlm/finetune/model_final.safetensors [OUT]

OUT defaults to model_merged.safetensors beside the input. The scale (model.lora_alpha / model.lora_r)
comes from the config the stage recorded in the file's metadata. launch/train_all_stages.sh and
train_stage3_finetune.sh run it after the finetune stage.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from trainlib.checkpoint import CheckpointError, export_safetensors, read_safetensors
from trainlib.config import ConfigError

from .model import merge_lora


def export_merged(src: str | Path, dst: str | Path | None = None) -> Path:
    """Writes the merged weights; their metadata's config says model.lora_r=0, so that the file loads
    as the weights of a model without adapters (trainer.ckpt_path, trainlib.load_model)."""
    src = Path(src)
    dst = Path(dst) if dst else src.with_name("model_merged.safetensors")
    state, meta = read_safetensors(src)
    try:
        config = yaml.safe_load(meta.get("config", "")) or {}
        r, alpha = int(config["model"]["lora_r"]), float(config["model"]["lora_alpha"])
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        raise ConfigError(f"{src}: its metadata has no model.lora_alpha / model.lora_r (not a panollava "
                          "stage's model_final.safetensors?)") from None
    if r == 0 or not any(k.startswith("lora.") for k in state):
        raise ConfigError(f"{src}: no LoRA adapters to merge (model.lora_r={r}, no lora.* keys)")
    config["model"]["lora_r"] = 0
    merged = merge_lora(state, alpha / r)
    export_safetensors(merged, dst, {**meta, "config": yaml.safe_dump(config, sort_keys=False),
                                     "lora": f"merged (r={r}, alpha={alpha:g})"})
    return dst


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        print(f"[panollava] merged LoRA weights: {export_merged(*argv)}")
    except ConfigError as e:
        if "no LoRA adapters to merge" not in str(e):
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"[panollava] nothing to merge: {e}")      # a finetune without adapters: its file is the model
    except (OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
