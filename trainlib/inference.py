"""Rebuild a trained model for inference, without a Trainer, a process group or the training data.

    model = trainlib.load_model("runs/pdan_20261123_101500")          # run directory
    model = trainlib.load_model("runs/.../model.safetensors")        # exported weights
    model = trainlib.load_model("runs/.../checkpoints/best.ckpt")    # any checkpoint
    model = trainlib.load_model(path, model=MyNet())                  # a plain module (notebook runs)

The config saved with the weights names the recipe (a registered name or a module path, resolved
by `trainlib.recipe.find_recipe`, so a user's own recipe package works as a built-in one does) and
its `model`/`data` sections, so the recipe's `build_model` rebuilds the exact architecture, after
the recipe's `inference_overrides` (e.g. no start-from weights to fetch). The model comes back in
eval mode on CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import checkpoint
from .ema import with_ema
from .config import Config, ConfigError, apply_dict, set_value
from .recipe import find_recipe


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise checkpoint.CheckpointError(f"nothing to load at {path} (expected a run directory, "
                                         f"a model.safetensors or a .ckpt file)")
    if path.suffix == ".safetensors":
        weights, meta = checkpoint.read_safetensors(path)
        config = yaml.safe_load(meta.get("config", "")) or {}
        return weights, config
    state = checkpoint.load(path)
    if state.get("frozen_left_out"):  # rebuilt here without its pretrained files, they could not be filled
        raise checkpoint.CheckpointError(
            f"{path} leaves out {len(state['frozen_left_out'])} frozen parameter(s) (trained with "
            f"trainer.save_frozen=false; they come from the pretrained files): load the run's model.safetensors, "
            f"which is complete, or evaluate the checkpoint with trainer.test_only=true trainer.ckpt_path={path}")
    return with_ema(state["model"], state), state.get("config", {})  # the averaged weights, when it has them


def load_model(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Weights from `path` in the recipe's model (rebuilt from the saved config) or in `model`."""
    weights, config = _read(Path(path))
    if model is None:
        name = config.get("recipe", "")
        if not name:
            raise ConfigError(f"{path} names no recipe; pass the module to fill: load_model(path, model=MyNet())")
        try:
            recipe = find_recipe(name)
        except ConfigError as e:
            raise ConfigError(f"{path} was trained by recipe {name!r}, which cannot be found here: {e}") from None
        cfg = Config(model=recipe.model_config(), data=recipe.data_config(), recipe=name)
        apply_dict(cfg, {k: v for k, v in config.items() if k in ("model", "data")}, str(path))
        for key, value in recipe.inference_overrides.items():
            try:
                set_value(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"recipe {name}: inference_overrides {key}={value!r}: {e}") from None
        model = recipe.build_model(cfg)
    checkpoint.load_model_state(model, weights, str(path))
    return model.eval()


def saved_config(path: str | Path) -> dict[str, Any]:
    """The resolved config stored with the weights (as a plain dict)."""
    return _read(Path(path))[1]
