"""Multi-stage runs (e.g. a VLM: vision -> resampler -> finetune): a recipe declares named stages,
each training its own parts of the model with its own config overrides, and starting from the
previous stage's final weights.

    python -m recipes.X stage=all                               every stage in order
    python -m recipes.X stage=second trainer.run_name=exp1      one stage, from exp1/first's weights
    python -m recipes.X stage=all trainer.run_name=exp1 trainer.resume=auto
                                                                continue at the stage and step where it stopped

Each stage is an ordinary run in `<out_dir>/<run_name>/<stage>/` (its own checkpoints, logs and
resume). At its end it writes `model_final.safetensors` (the final weights; the averaged ones with
EMA on), which the next stage starts from; `trainer.ckpt_path` replaces that start for the first
stage run. Config order per stage: code defaults < recipe defaults < the stage's overrides < demo
settings (the recipe's, then the stage's `demo`) < YAML file < command line (what the user types
still wins). Each stage's config has `stage` set to its name, so a recipe's builders can tell them apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from . import checkpoint, dist, rundir, training_state
from .config import ConfigError, dump_yaml
from .freezing import resolve
from .loggers import log

FINAL = "model_final.safetensors"


@dataclass
class Stage:
    name: str
    trains: list[str] | Callable[[Any], list[str]] | None = None  # module-name prefixes that train in this
    # stage, the rest frozen (None: all); or (stage config) -> prefixes, when they depend on the config
    overrides: dict[str, Any] = field(default_factory=dict)  # config keys for this stage, e.g. {"optim.lr": 2e-5}
    demo: dict[str, Any] = field(default_factory=dict)       # this stage's demo settings (over the recipe's demo)
    from_previous: bool = True       # start from the previous stage's model_final.safetensors


def select(stages: list[Stage], wanted: str) -> list[Stage]:
    """The stages `stage=` names, in the recipe's order ('' or 'all': every one)."""
    if wanted in ("", "all"):
        return list(stages)
    names = [s.name for s in stages]
    if wanted not in names:
        raise ConfigError(f"stage={wanted}: this recipe's stages are {', '.join(names)} (or all)")
    return [stages[names.index(wanted)]]


def freeze_except(model: nn.Module, trains: list[str] | None) -> None:
    """Only the parameters under the module names in `trains` require a gradient (the same name rule
    and errors as set_trainable: freezing.resolve)."""
    if trains is not None:
        for name, train in resolve(model, {"": False, **dict.fromkeys(trains, True)}).items():
            model.get_parameter(name).requires_grad_(train)


def _base_dir(cfg: Any, recipe_name: str, stages: list[str]) -> Path:
    """The run's folder: trainer.run_name, or with resume=auto the newest <recipe>_* run that has a
    stage folder, or a new <recipe>_<time> (made by rank 0, unique; the same on every rank)."""
    out, tc = Path(cfg.trainer.out_dir), cfg.trainer
    if tc.run_name:
        return out / tc.run_name
    if tc.resume == "auto":
        runs = [r for r in out.glob(f"{recipe_name}_*") if r.is_dir() and any((r / s).is_dir() for s in stages)]
        if runs:
            return dist.broadcast_object(max(runs, key=lambda r: r.stat().st_mtime))
    new = rundir.make_unique(out / f"{recipe_name}_{time.strftime('%Y%m%d_%H%M%S')}") if dist.rank() == 0 else None
    return Path(dist.broadcast_object(str(new) if new else None))  # (-2, -3, ... when the name is taken)


def run_stages(recipe: Any, argv: list[str], cfg: Any, build_config: Callable, build_trainer: Callable) -> dict:
    """Run the stages `cfg.stage` names, each from its own config (`build_config(recipe, argv,
    stage=...)`) and Trainer (`build_trainer(recipe, cfg, demo, trains=...)`)."""
    order = [s.name for s in recipe.stages]
    base = _base_dir(cfg, recipe.name, order)
    chosen = select(recipe.stages, cfg.stage)
    result: dict = {}
    for i, stage in enumerate(chosen):
        folder = base / stage.name
        if cfg.trainer.resume == "auto" and dist.broadcast_object((folder / FINAL).is_file()):
            log.info(f"stage {stage.name}: finished before ({folder / FINAL})")
            continue
        scfg, _, demo = build_config(recipe, argv, stage=stage)
        scfg.trainer.out_dir, scfg.trainer.run_name = str(base), stage.name
        scfg.stage = stage.name  # what the recipe's build_model / metrics read to know which stage this is
        previous = order.index(stage.name) - 1
        if stage.from_previous and previous >= 0 and not (i == 0 and scfg.trainer.ckpt_path):
            start = base / order[previous] / FINAL
            if not dist.broadcast_object(start.is_file()):
                raise ConfigError(f"stage {stage.name} starts from stage {order[previous]}'s final weights, and "
                                  f"{start} does not exist: run stage={order[previous]} (or stage=all) with "
                                  f"trainer.run_name={base.name} first, or give trainer.ckpt_path")
            scfg.trainer.ckpt_path = str(start)
        trainer = build_trainer(recipe, scfg, demo, trains=stage.trains(scfg) if callable(stage.trains) else stage.trains)
        result = trainer.fit()
        if trainer.halted:  # non-finite training: the next stage would start from a failed one
            raise ConfigError(f"stage {stage.name} stopped: {trainer.stop_reason}; the later stages did not run")
        final = training_state.final_weights(trainer)  # (a collective under FSDP)
        if dist.rank() == 0:
            checkpoint.export_safetensors(final, folder / FINAL, {"format": "trainlib", "recipe": scfg.recipe,
                                                                  "stage": stage.name, "config": dump_yaml(scfg)})
            log.info(f"stage {stage.name}: final weights in {folder / FINAL}")
    return result
