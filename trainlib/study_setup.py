"""What a hyper-parameter study runs from: the `hpo` config section, the resolved `Setup` every
rank shares, and `StudyError`, the mistake that ends a study.

The `hpo` keys live apart from the recipe's Config (the recipe does not know them), so they have a
tree of their own, `HPOSection`. `Setup` is what trainlib.hpo.parse_args makes of the command line:
the recipe, the config every trial starts from, the `hpo` values, and (once the study is named) its
folder. The search space (trainlib/search_space.py), the trials (trainlib/trials.py) and the study
loop (trainlib/hpo.py) all read them, so they live below those three, and the imports run one way:
study_setup <- search_space <- trials <- hpo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, opt, rule
from .recipe import Recipe


NOT_NAN = rule("a number (not nan; -inf/inf: off)", lambda v: v == v)


@dataclass
class HPOConfig:
    n_trials: int = opt(20, "trials the study holds when it ends (complete, pruned or failed; a trial cut short "
                            "by a killed session is run again and not counted)", ge=1)
    direction: Literal["", "maximize", "minimize"] = opt("", "maximize or minimize hpo.metric; empty: from "
                                                             "trainer.mode (max -> maximize)")
    metric: str = opt("", "validation metric to optimise, e.g. val/map; empty: trainer.monitor")
    storage: str = opt("", "optuna storage URL; empty: in memory. sqlite:///study.db makes a killed study "
                           "resumable: run the same command again")
    study_name: str = opt("", "study name, also its folder under trainer.out_dir; empty: <recipe>_hpo "
                              "(in memory: <recipe>_hpo_<date>_<time>)")
    seed: int = opt(0, "seed of the sampler and of the trials' train subset", ge=0, le=2**32 - 1)
    sampler: Literal["tpe", "random"] = opt("tpe", "optuna sampler")
    pruner: Literal["median", "threshold", "none"] = opt("median", "stop unpromising trials at a validation: "
                                                                   "median (optuna MedianPruner), threshold, none")
    pruner_startup_trials: int = opt(5, "median: trials that must finish before any trial is pruned", ge=0)
    pruner_warmup_epochs: int = opt(0, "median/threshold: no pruning before this epoch", ge=0)
    prune_below: float = opt(-math.inf, "threshold: prune a trial whose metric is below this value", check=NOT_NAN)
    prune_above: float = opt(math.inf, "threshold: prune a trial whose metric is above this value", check=NOT_NAN)
    train_fraction: float = opt(1.0, "fraction of the train split every trial trains on (a fixed-seed subset, as "
                                     "the seed system does); the final training uses the whole split", gt=0, le=1)
    space: Any = opt({}, "search space {config key: {type: float|int|categorical, low, high, log, step, "
                         "choices}} (YAML or inline); empty: the recipe's search_space, else the default space")
    final: bool = opt(True, "after the study, train the final model with the best values in "
                            "<out_dir>/<study_name>/final (run again: skipped when done with the same values, "
                            "continued when cut short, trained again when they changed)")
    final_on_train_val: bool = opt(True, "final training on the train and val splits together (validation still "
                                         "runs on val, so its numbers are optimistic)")
    out: str = opt("", "path of best_hyperparams.json; empty: <trainer.out_dir>/<study_name>/best_hyperparams.json")
    skip_hyperopt: bool = opt(False, "run only the final training with hpo.hyperparams_file (--skip-hyperopt)")
    hyperparams_file: str = opt("", "JSON whose params the final training applies (--hyperparams-file); "
                                    "empty: hpo.out")


@dataclass
class HPOSection:
    """The `hpo` keys as a tree of their own (the recipe's Config does not know them)."""
    hpo: HPOConfig = field(default_factory=HPOConfig)


HPO_ALIASES = {"skip_hyperopt": "hpo.skip_hyperopt", "hyperparams_file": "hpo.hyperparams_file"}


class StudyError(ConfigError):
    """A mistake that would fail every trial alike (not a bad sample): ends the study."""


@dataclass
class Setup:
    recipe: Recipe
    cfg: Any                 # the resolved recipe config every trial starts from
    demo: bool
    hpo: HPOConfig
    aliases: dict
    study_name: str = ""
    study_dir: Path = Path(".")
    out: Path = Path(".")
    metric: str = ""
    direction: str = ""

