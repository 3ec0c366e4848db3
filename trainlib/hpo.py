"""Hyper-parameter search with Optuna over any recipe, in one process or under torchrun.

    torchrun --nproc_per_node=4 -m launch.hyperopt recipe=pdan hpo.n_trials=20 hpo.storage=sqlite:///pdan.db
    python -m launch.hyperopt recipe=pdan --skip-hyperopt --hyperparams-file runs/pdan_hpo/best_hyperparams.json

The workflow of the seed system (SideFormer): trials train on a fixed-seed subset of the train
split (`hpo.train_fraction`), the best values go to best_hyperparams.json, and the final model is
trained with them on train+valid together; `--skip-hyperopt` runs only that final training.

How the ranks cooperate (one process group for the whole study, the pattern of optuna-examples'
pytorch_distributed_simple.py without optuna-integration):

    rank 0 owns the study: ask -> sample the params -> broadcast {trial number, params}
    every rank trains the trial, params applied as config overrides, in <out_dir>/<study>/trial_<n>
        each validation (metrics already reduced across ranks, so identical everywhere):
        rank 0 trial.report + should_prune -> broadcast -> every rank stops at the same step
    every rank posts its outcome (complete / pruned / failed + reason) in the rendezvous store
        and reads the others': every rank takes the same decision, whatever happened to its peers
    a failure on any rank fails the trial on every rank. The failing rank leaves the process group
        at once, so a peer waiting for it inside a collective gets an error instead of hanging;
        then every rank builds a fresh process group and the study goes on
    rank 0: tell(trial, best value | PRUNED | FAIL); best_hyperparams.json rewritten atomically

Optuna is imported only on rank 0 and only here (`pip install optuna`, or trainlib's [optuna] extra).
"""
from __future__ import annotations

import copy
import datetime
import gc
import json
import math
import os
import shutil
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as torch_dist

from . import dist
from .callbacks import Callback
from .checkpoint import atomic_write_bytes
from .config import (ConfigError, UserError, apply_dict, check_key, help_text, opt, read_yaml, resolve_key, rule,
                     set_value, validate)
from .preemption import Preempted
from .recipe import (ENGINE_ALIASES, Recipe, _is_recipe, _peer_failure, available_recipes, find_recipe, guarded,
                     make_config, parse_cli, recipe_ref, run)

# ------------------------------------------------------------------------------------------------
# Configuration: the `hpo` section

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
                            "<out_dir>/<study_name>/final")
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

USAGE = """usage: python -m launch.hyperopt recipe=NAME [--config FILE.yaml] [hpo.key=value ...] [section.key=value ...]
       torchrun --nproc_per_node=N -m launch.hyperopt recipe=NAME [...]
       python -m launch.hyperopt recipe=NAME --skip-hyperopt [--hyperparams-file FILE.json] [section.key=value ...]

An Optuna study over a recipe: every trial trains with sampled values applied as config overrides,
best_hyperparams.json keeps the best, then the final model is trained with them (docs/hyperopt.md).
`recipe=NAME` picks a registered recipe (entry-point group trainlib.recipes) or a module path
(mypkg.myrecipe, whose `recipe` is a Recipe, or mypkg.mod:attr); other arguments are the recipe's
overrides, as for `python -m recipes.NAME`. The `hpo` section may also come from the YAML file."""


class StudyError(ConfigError):
    """A mistake that would fail every trial alike (not a bad sample): ends the study."""


class _StudyPreempted(Preempted):
    def __str__(self) -> str:
        return (f"{super().__str__().split(';')[0]} during a trial; run the same command again to continue the "
                f"study (with hpo.storage, e.g. sqlite:///study.db)")


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


load_recipe = find_recipe  # the older name of the registry's lookup


def parse_args(argv: list[str]) -> tuple[Setup | None, str]:
    """-> (setup, help text). Order, lowest first: code defaults < recipe defaults < demo settings <
    YAML file (its `hpo:` section and `recipe:` key included) < command line."""
    config_path, pairs, want_help = parse_cli(argv)
    recipe_name, hpo_pairs, rest = "", [], []
    for k, v in pairs:
        if k == "recipe":
            recipe_name = v
        elif k.startswith("hpo.") or k in HPO_ALIASES:
            hpo_pairs.append((k, v))
        else:
            rest.append((k, v))

    section = HPOSection()
    yaml_hpo, yaml_space, file_data, yaml_recipe = {}, None, {}, ""
    if config_path:
        file_data = read_yaml(config_path)  # the recipe's sections, once `recipe:` and `hpo:` are taken out
        yaml_recipe = str(file_data.pop("recipe", None) or "")  # checked against the recipe below
        recipe_name = recipe_name or yaml_recipe
        if "hpo" in file_data:
            yaml_hpo = file_data.pop("hpo") or {}
            if not isinstance(yaml_hpo, dict):
                raise ConfigError(f"{config_path}: the hpo section must be a mapping")
            yaml_hpo = dict(yaml_hpo)
            yaml_space = yaml_hpo.pop("space", None)
        apply_dict(section, {"hpo": yaml_hpo}, config_path)
        if yaml_space is not None:
            section.hpo.space = yaml_space
    for k, v in hpo_pairs:
        set_value(section, k, v, HPO_ALIASES)
    validate(section)
    h = section.hpo

    if not recipe_name:
        if want_help:
            return None, (USAGE + "\n\nKeys of the hpo section (type, default, description):" + help_text(section)
                          + f"\n\nRecipes: {', '.join(available_recipes())} (recipe=NAME --help lists their keys)")
        raise ConfigError(f"name the recipe to tune: recipe=NAME (available: {', '.join(available_recipes())}; "
                          f"or a module path: recipe=mypkg.myrecipe)")
    recipe = find_recipe(recipe_name)
    if yaml_recipe and yaml_recipe != recipe_name and not _is_recipe(yaml_recipe, recipe, recipe_ref(recipe)):
        raise ConfigError(f"config file {config_path} is for recipe {yaml_recipe}, but this study tunes "
                          f"recipe={recipe_name}: drop recipe={recipe_name}, or pass a config file of that recipe")
    cfg, demo = make_config(recipe, file_data, config_path or "", rest, want_help)
    if want_help:
        return None, (USAGE + "\n\nKeys of the hpo section (type, default, description):" + help_text(section)
                      + f"\n\nKeys of recipe {recipe.name}:" + help_text(cfg))

    if cfg.trainer.test_only:
        raise ConfigError("trainer.test_only=true: hyperopt trains; evaluate with python -m recipes.<name> instead")
    if cfg.trainer.check_val_every_n_epoch < 1:
        raise ConfigError("hyperopt scores trials on the validation split: "
                          "trainer.check_val_every_n_epoch must be >= 1")
    if h.pruner == "threshold" and not (math.isfinite(h.prune_below) or math.isfinite(h.prune_above)):
        raise ConfigError("hpo.pruner=threshold needs hpo.prune_below and/or hpo.prune_above")
    metric = h.metric or cfg.trainer.monitor
    if h.metric and h.metric != cfg.trainer.monitor and not h.direction:
        raise ConfigError(f"hpo.metric={h.metric} is not trainer.monitor ({cfg.trainer.monitor}): "
                          f"say hpo.direction=maximize or minimize")
    direction = h.direction or ("maximize" if cfg.trainer.mode == "max" else "minimize")
    aliases = {**ENGINE_ALIASES, **recipe.aliases}
    s = Setup(recipe=recipe, cfg=cfg, demo=demo, hpo=h, aliases=aliases, metric=metric, direction=direction)
    if h.space:
        h.space = check_space(h.space, cfg, aliases, "hpo.space")
    elif recipe.search_space is not None and not h.skip_hyperopt:
        probe_search_space(s)
    return s, ""


def name_study(s: Setup) -> None:
    """Study name (rank 0's clock when it has a time in it), folder and best_hyperparams.json path."""
    h = s.hpo
    name = h.study_name
    if not name:
        name = f"{s.recipe.name}_hpo"
        if not h.storage and not h.skip_hyperopt:  # an in-memory study cannot be continued: never reuse a folder
            name = dist.broadcast_object(f"{name}_{time.strftime('%Y%m%d_%H%M%S')}")
    s.study_name = name
    s.study_dir = Path(s.cfg.trainer.out_dir) / name
    s.out = Path(h.out) if h.out else s.study_dir / "best_hyperparams.json"


# ------------------------------------------------------------------------------------------------
# Search spaces

SPEC_FIELDS = {"type", "low", "high", "log", "step", "choices"}


def default_space(cfg: Any) -> dict:
    """Used when neither hpo.space nor the recipe's search_space is given."""
    b = int(cfg.data.batch_size)
    return {
        "optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "data.batch_size": {"type": "categorical", "choices": sorted({max(1, b // 2), b, 2 * b})},
        "optim.name": {"type": "categorical", "choices": ["adamw", "adam", "sgd"]},
        "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True},
        "optim.scheduler": {"type": "categorical", "choices": ["cosine", "onecycle", "none"]},
    }


def _number(v: Any, integer: bool, where: str, name: str) -> float | int:
    if isinstance(v, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: '{name}' must be a number, got {v!r}")
    if integer:
        if not float(v).is_integer():
            raise ConfigError(f"{where}: '{name}' must be an integer for type int, got {v!r}")
        return int(v)
    return float(v)


def check_space(space: Any, cfg: Any, aliases: dict, source: str) -> dict:
    """Validate a space spec against the config: known keys, well-formed ranges, values the key
    accepts. Returns it with full config keys ('lr' -> 'optim.lr')."""
    if not isinstance(space, dict):
        raise ConfigError(f"{source}: expected a mapping {{config key: {{type: float|int|categorical, ...}}}}, "
                          f"got {space!r}")
    out: dict[str, dict] = {}
    for key, spec in space.items():
        where = f"{source}[{key!r}]"
        try:
            full = resolve_key(cfg, str(key), aliases)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected {{type: float|int|categorical, low, high, log, step, choices}}, "
                              f"got {spec!r}")
        extra = set(spec) - SPEC_FIELDS
        if extra:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, extra)))}; "
                              f"allowed: {', '.join(sorted(SPEC_FIELDS))}")
        kind = spec.get("type")
        if kind not in ("float", "int", "categorical"):
            raise ConfigError(f"{where}: 'type' must be float, int or categorical, got {kind!r}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
            for c in choices:
                if c is not None and not isinstance(c, (bool, int, float, str)):
                    raise ConfigError(f"{where}: choice {c!r} is not a number, string or bool (for structured "
                                      f"values write a search_space function in the recipe)")
            if set(spec) - {"type", "choices"}:
                raise ConfigError(f"{where}: categorical takes only 'choices'")
            norm: dict = {"type": kind, "choices": list(choices)}
            values = list(choices)
        else:
            if "choices" in spec:
                raise ConfigError(f"{where}: 'choices' is for type categorical")
            if "low" not in spec or "high" not in spec:
                raise ConfigError(f"{where}: type {kind} needs 'low' and 'high'")
            integer = kind == "int"
            low = _number(spec["low"], integer, where, "low")
            high = _number(spec["high"], integer, where, "high")
            log = spec.get("log", False)
            if not isinstance(log, bool):
                raise ConfigError(f"{where}: 'log' must be true or false, got {log!r}")
            if low > high:
                raise ConfigError(f"{where}: low ({low}) must not exceed high ({high})")
            if log and low <= 0:
                raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
            norm = {"type": kind, "low": low, "high": high, "log": log}
            if spec.get("step") is not None:
                step = _number(spec["step"], integer, where, "step")
                if step <= 0 or log:
                    raise ConfigError(f"{where}: 'step' must be > 0 and cannot go with log: true")
                norm["step"] = step
            values = [low, high]
        scratch = copy.deepcopy(cfg)
        for what, v in zip(("low", "high") if kind != "categorical" else ("choice",) * len(values), values):
            try:  # the key's type, then its bounds (the range between low and high lies within them)
                set_value(scratch, full, v)
                check_key(scratch, full)
            except ConfigError as e:
                raise ConfigError(f"{where} {what}: {e}") from None
        out[full] = norm
    return out


def sample_space(trial: Any, space: dict) -> dict:
    """{config key: value} drawn by the trial from a checked space spec (optuna names = config keys)."""
    params: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "float":
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"], step=spec.get("step"))
        elif kind == "int":
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec["log"], step=spec.get("step", 1))
        else:
            params[key] = trial.suggest_categorical(key, spec["choices"])
    return params


def draw_params(s: Setup, trial: Any) -> dict:
    """hpo.space (YAML/command line) > the recipe's search_space(trial) > default_space. Keys come back
    as full config keys, values checked against the config (a bad key ends the study)."""
    if s.hpo.space:
        return sample_space(trial, s.hpo.space)
    if s.recipe.search_space is not None:
        return recipe_params(s, s.recipe.search_space(trial))
    return sample_space(trial, check_space(default_space(s.cfg), s.cfg, s.aliases, "default space"))


def recipe_params(s: Setup, raw: Any) -> dict:
    """What the recipe's search_space returned, as full config keys; a key it does not know or a value
    out of the key's bounds would fail every trial alike: StudyError."""
    if not isinstance(raw, dict):
        raise StudyError(f"recipe {s.recipe.name}: search_space(trial) must return a dict "
                         f"{{config key: value}}, got {type(raw).__name__}")
    params = {}
    scratch = copy.deepcopy(s.cfg)
    for k, v in raw.items():
        try:
            full = set_value(scratch, str(k), v, s.aliases)
            check_key(scratch, full)
        except ConfigError as e:
            raise StudyError(f"recipe {s.recipe.name}: search_space returned {k}={v!r}: {e}") from None
        params[full] = _plain(v)
    return params


class _EdgeTrial:
    """A stand-in optuna trial whose suggest_* return pass 0: every range's low end and first choice,
    pass 1: every high end and second choice, pass i: the i-th choice."""

    def __init__(self, i: int) -> None:
        self.i, self.widest = i, 2

    def suggest_float(self, name: str, low: Any, high: Any, *args: Any, **kwargs: Any) -> Any:
        return low if self.i == 0 else high

    suggest_int = suggest_uniform = suggest_loguniform = suggest_discrete_uniform = suggest_float

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.widest = max(self.widest, len(choices))
        return choices[min(self.i, len(choices) - 1)]


def probe_search_space(s: Setup, max_passes: int = 64) -> None:
    """Check the recipe's search_space before the study: called with stand-in trials that pick every
    range's ends and every choice, each value must fit its key's bounds (one error at start, not a
    failed study later). A space the stand-in cannot drive is left to the check of each draw."""
    i, passes = 0, 2
    while i < min(passes, max_passes):
        trial = _EdgeTrial(i)
        try:
            raw = s.recipe.search_space(trial)
        except Exception:  # noqa: BLE001 - it needs a real trial: every draw is still checked
            return
        recipe_params(s, raw)
        i, passes = i + 1, max(passes, trial.widest)


def _plain(v: Any) -> Any:
    """JSON-friendly value (numpy scalars, tuples)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def apply_params(cfg: Any, params: dict, aliases: dict, source: str) -> Any:
    """A copy of cfg with the params applied as overrides (what `key=value` on the command line does)."""
    cfg = copy.deepcopy(cfg)
    try:
        for k, v in params.items():
            set_value(cfg, str(k), v, aliases)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("hyperopt needs optuna, which is not installed: pip install optuna "
                          "(or pip install -e \".[optuna]\")") from None
    return optuna


# ------------------------------------------------------------------------------------------------
# The process group of the study


class StudyGroup:
    """One process group for the study, rebuilt after a failed trial.

    A trial that fails on one rank may leave its peers inside a collective waiting for it. The
    failing rank destroys its group at once (`abandon`): its peers' pending gloo collectives then
    fail with "Connection closed by peer" instead of hanging. Outcomes are exchanged through the
    rendezvous store (independent of the group), and after a failure every rank joins a fresh
    group (`renew`) under a new store prefix. With NCCL a peer blocked inside a GPU collective only
    notices after trainer.ddp_timeout (the NCCL watchdog then ends the process): on GPU, a failure
    on a single rank mid-step ends the study (resume it with hpo.storage).
    """

    def __init__(self, device: torch.device, timeout_s: float) -> None:
        self.env = dist.env_from_torchrun()
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store: Any = None
        self.generation = 0
        self.round = 0
        if self.env.world_size > 1:
            # DDP imports this module lazily; its functions capture the default group in their default
            # arguments (group=group.WORLD) at import time, which would keep every group we destroy
            # alive, sockets open, and a peer waiting on them would hang. Import it while none exists.
            import torch.distributed.nn.functional  # noqa: F401
            store, _, _ = next(torch_dist.rendezvous("env://", rank=self.env.rank, world_size=self.env.world_size,
                                                     timeout=self.timeout))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self.store = torch_dist.PrefixStore(f"trainlib/hpo/attempt_{attempt}", store)
            self._init()

    def _init(self) -> None:
        kwargs: dict[str, Any] = {
            "backend": "nccl" if self.device.type == "cuda" else "gloo",
            "store": torch_dist.PrefixStore(f"group_{self.generation}", self.store),
            "rank": self.env.rank, "world_size": self.env.world_size, "timeout": self.timeout}
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            kwargs["device_id"] = self.device
        torch_dist.init_process_group(**kwargs)

    def abandon(self) -> None:
        """This rank failed inside a trial: close the group so no peer waits for it. Gloo closes its
        connections only when the group object dies, so the caller must have dropped the trial's
        objects (trainer, DDP module, traceback) first."""
        if self.store is None or not torch_dist.is_initialized():
            return
        ref = weakref.ref(torch_dist.group.WORLD)
        torch_dist.destroy_process_group()
        gc.collect()
        if ref() is not None:
            print(f"[rank {self.env.rank}] [hpo] warning: the failed trial's process group is still referenced; "
                  f"ranks waiting for this one stop only after trainer.ddp_timeout", file=sys.stderr, flush=True)

    def agree(self, status: dict) -> list[dict]:
        """Every rank's status, on every rank (through the store, so it works with a broken group)."""
        if self.store is None:
            return [status]
        key = f"status_{self.round}"
        self.round += 1
        self.store.set(f"{key}/{self.env.rank}", json.dumps(status))
        keys = [f"{key}/{r}" for r in range(self.env.world_size)]
        self.store.wait(keys, self.timeout)
        return [json.loads(self.store.get(k)) for k in keys]

    def renew(self) -> None:
        if self.store is None:
            return
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        self.generation += 1
        self._init()


# ------------------------------------------------------------------------------------------------
# One trial


class TrialMonitor(Callback):
    """Tracks the trial's best metric; reports every validation to optuna (rank 0) and stops all
    ranks together when rank 0's pruner says so. Notes non-finite training losses."""

    def __init__(self, trial: Any, metric: str, direction: str, prune: bool) -> None:
        self.trial, self.metric, self.direction, self.prune = trial, metric, direction, prune
        self.trainer: Any = None
        self.best: float | None = None
        self.best_epoch = -1
        self.last: float | None = None
        self.validations = 0
        self.pruned_epoch: int | None = None
        self.nonfinite_loss = False

    def on_fit_start(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_log(self, trainer: Any, row: dict) -> None:
        if row.get("skipped_steps") or not math.isfinite(row.get("loss", 0.0)):
            self.nonfinite_loss = True

    def on_fit_end(self, trainer: Any) -> None:
        # trainer.nonfinite=stop ends the run with this reason (decided from reduced values: same on every rank)
        if trainer.should_stop and "non-finite" in trainer.stop_reason:
            self.nonfinite_loss = True

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        if self.metric not in metrics:
            raise StudyError(f"hpo.metric={self.metric!r} is not a validation metric; "
                             f"available: {', '.join(sorted(metrics))}")
        value = float(metrics[self.metric])
        self.validations += 1
        self.last = value
        if math.isfinite(value) and (self.best is None or (value > self.best if self.direction == "maximize"
                                                           else value < self.best)):
            self.best, self.best_epoch = value, trainer.epoch
        prune = False
        if self.trial is not None and math.isfinite(value):  # rank 0
            self.trial.report(value, step=trainer.epoch)
            prune = self.prune and self.trial.should_prune()
        if self.prune:
            prune = dist.broadcast_object(prune)  # rank 0 decides; every rank stops after this validation
        if prune:
            self.pruned_epoch = trainer.epoch
            trainer.request_stop(f"pruned by hpo.pruner at epoch {trainer.epoch} ({self.metric}={value:.6g})")

    def outcome(self, nonfinite_policy: str) -> dict:
        if self.pruned_epoch is not None:
            return {"state": "pruned", "value": self.last, "epoch": self.pruned_epoch}
        if self.nonfinite_loss and nonfinite_policy == "stop":
            return {"state": "fail", "reason": "non-finite training loss (value nan; trainer.nonfinite=stop)"}
        if self.best is None:
            what = "never finite" if self.validations else "never computed (no validation ran)"
            return {"state": "fail", "reason": f"{self.metric} was {what}"}
        return {"state": "complete", "value": self.best, "epoch": self.best_epoch}


def trial_datasets(fraction: float, seed: int, splits: dict) -> dict:
    """Trials: a fixed-seed subset of the train split (the same on every rank and every trial)."""
    if splits.get("val") is None:
        raise StudyError("hyperopt scores trials on the val split, and the recipe's build_datasets returned none")
    if fraction < 1.0:
        train = splits["train"]
        n = len(train)
        k = max(1, round(n * fraction))
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(n, generator=g)[:k].tolist())
        splits = {**splits, "train": torch.utils.data.Subset(train, idx)}
    return splits


def final_datasets(on_train_val: bool, splits: dict) -> dict:
    """The final training: train+val concatenated (validation still runs on val)."""
    train, val = splits.get("train"), splits.get("val")
    if on_train_val and val is not None and val is not train:
        if dist.rank() == 0:
            print(f"[hpo] final training on train+val: {len(train)} + {len(val)} samples "
                  f"(validation still runs on val)", flush=True)
        splits = {**splits, "train": torch.utils.data.ConcatDataset([train, val])}
    return splits


def _wandb_group(cfg: Any, study_name: str) -> None:
    if "wandb" in cfg.log.loggers and not cfg.log.wandb_group:
        cfg.log.wandb_group = study_name


def trial_config(s: Setup, number: int, params: dict) -> Any:
    cfg = apply_params(s.cfg, params, s.aliases, f"trial {number}")
    t = cfg.trainer
    t.out_dir, t.run_name = str(s.study_dir), f"trial_{number}"
    t.resume, t.overwrite = "", True     # the study owns its trial folders
    t.save_top_k, t.save_last, t.ckpt_every_n_steps, t.export = 0, False, 0, False  # trials keep no weights
    _wandb_group(cfg, s.study_name)
    return cfg


def run_trial(s: Setup, group: StudyGroup, number: int, params: dict, trial: Any) -> dict:
    """Every rank: train one trial; -> this rank's status {state, value | reason, step}."""
    monitor = TrialMonitor(trial, s.metric, s.direction, s.hpo.pruner != "none")
    status: dict[str, Any] = {"rank": group.env.rank}
    failure: tuple[str, bool, str] | None = None
    try:
        cfg = trial_config(s, number, params)
        run(s.recipe, cfg, s.demo, callbacks=[monitor],
            datasets_hook=partial(trial_datasets, s.hpo.train_fraction, s.hpo.seed))
        status.update(monitor.outcome(cfg.trainer.nonfinite))
    except StudyError:
        raise
    except Preempted as e:
        raise _StudyPreempted(e.signum, e.checkpoint) from None
    except Exception as e:  # noqa: BLE001 - any error fails this trial only
        text = str(e).strip()
        failure = (f"{type(e).__name__}: {text.splitlines()[0][:500] if text else ''}",
                   group.env.world_size > 1 and _peer_failure(e), traceback.format_exc())
    # the exception (and with it the trial's frames) is gone here; drop the trainer too
    status["step"] = monitor.trainer.global_step if monitor.trainer is not None else None
    monitor.trainer = None
    if failure is not None:
        reason, peer, trace = failure
        prefix = f"[rank {group.env.rank}] " if group.env.world_size > 1 else ""
        if peer:
            print(f"{prefix}[hpo] trial {number}: a collective failed because another rank failed ({reason[:200]})",
                  file=sys.stderr, flush=True)
        else:
            print(f"{prefix}[hpo] trial {number} failed: {reason}\n{trace}", file=sys.stderr, flush=True)
        group.abandon()
        status.update(state="fail", reason=reason, peer=peer)
    return status


def combine(statuses: list[dict]) -> dict:
    """The trial's outcome from every rank's status (identical on every rank)."""
    steps = [st.get("step") for st in statuses]
    fails = [st for st in statuses if st["state"] == "fail"]
    if fails:
        own = [st for st in fails if not st.get("peer")] or fails
        ranks = ", ".join(str(st["rank"]) for st in own)
        reason = own[0]["reason"] + (f" (rank {ranks})" if len(statuses) > 1 else "")
        return {"state": "fail", "reason": reason, "rank_steps": steps}
    states = {st["state"] for st in statuses}
    if len(states) > 1 or len(set(steps)) > 1:
        return {"state": "fail", "reason": f"ranks disagree: states {[st['state'] for st in statuses]}, "
                                           f"steps {steps}", "rank_steps": steps}
    return {**statuses[0], "rank_steps": steps}


def cleanup_trial(run_dir: Path) -> None:
    """Temporary weights go; config.yaml, metrics.jsonl, train.log and history.json stay."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "model.safetensors").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# The study (rank 0)


def sqlite_folder(url: str) -> Path:
    """The folder of an sqlite:/// storage file ('.' for other URLs and in-memory sqlite)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix):] in ("", ":memory:"):
        return Path(".")
    return Path(url[len(prefix):].split("?", 1)[0]).parent


def open_study(s: Setup) -> Any:
    """Create, or continue (same name in the same storage), the study. Trials a killed session left
    RUNNING are marked failed, listed in the study's `interrupted` attribute (not counted) and queued
    again with the same params."""
    optuna = _import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    h = s.hpo
    storage = h.storage or None
    existing = 0
    if storage:
        sqlite_folder(storage).mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its folder
        try:
            existing = len(optuna.load_study(study_name=s.study_name, storage=storage).trials)
        except KeyError:
            existing = 0
        except Exception as e:  # a bad URL, an unreadable file
            raise ConfigError(f"hpo.storage={h.storage}: {type(e).__name__}: {e}") from None
    seed = h.seed + existing  # a continued study draws a new stream, not the first trials' values again
    sampler = (optuna.samplers.TPESampler(seed=seed) if h.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    if h.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=h.pruner_startup_trials,
                                             n_warmup_steps=h.pruner_warmup_epochs)
    elif h.pruner == "threshold":
        pruner = optuna.pruners.ThresholdPruner(
            lower=h.prune_below if math.isfinite(h.prune_below) else None,
            upper=h.prune_above if math.isfinite(h.prune_above) else None, n_warmup_steps=h.pruner_warmup_epochs)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=s.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=s.direction, load_if_exists=True)
    if study.direction.name.lower() != s.direction:
        raise ConfigError(f"study {s.study_name} in {h.storage} was created to {study.direction.name.lower()}, "
                          f"this run asks to {s.direction}: use another hpo.study_name")
    if not study.trials:
        leftovers = sorted(p.name for p in s.study_dir.glob("trial_*")) + (["best_hyperparams.json"]
                                                                            if s.out.exists() else [])
        if leftovers:
            raise ConfigError(f"{s.study_dir} already holds another study ({', '.join(leftovers[:3])}"
                              f"{', ...' if len(leftovers) > 3 else ''}); pick another hpo.study_name "
                              f"(a study in hpo.storage is continued by running the same command again)")
        study.set_user_attr("metric", s.metric)
        study.set_user_attr("recipe", s.recipe.name)
    elif study.user_attrs.get("metric", s.metric) != s.metric:
        raise ConfigError(f"study {s.study_name} optimises {study.user_attrs['metric']}, this run asks for "
                          f"{s.metric}: use another hpo.study_name")
    TrialState = optuna.trial.TrialState
    interrupted = list(study.user_attrs.get("interrupted", []))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        study.tell(t.number, state=TrialState.FAIL)
        interrupted.append(t.number)
        print(f"[hpo] trial {t.number} was cut short by an earlier session: marked failed and run again with "
              f"the same params", flush=True)
    if len(interrupted) != len(study.user_attrs.get("interrupted", [])):
        study.set_user_attr("interrupted", sorted(interrupted))
    return study


def counted_trials(study: Any) -> int:
    skip = set(study.user_attrs.get("interrupted", []))
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.number not in skip)


def best_record(study: Any, s: Setup) -> dict | None:
    """The best_hyperparams.json object, or None before any trial completed."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    return {"params": best.user_attrs.get("overrides", best.params), "value": best.value, "metric": s.metric,
            "direction": s.direction, "trial": best.number, "n_complete": len(complete)}


def write_best(record: dict, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def tell(study: Any, trial: Any, outcome: dict) -> None:
    import optuna

    TrialState = optuna.trial.TrialState
    trial.set_user_attr("rank_steps", outcome.get("rank_steps"))
    if outcome["state"] == "complete":
        trial.set_user_attr("best_epoch", outcome.get("epoch"))
        study.tell(trial, outcome["value"])
    elif outcome["state"] == "pruned":
        trial.set_user_attr("pruned_epoch", outcome.get("epoch"))
        study.tell(trial, state=TrialState.PRUNED)
    else:
        trial.set_user_attr("fail_reason", outcome["reason"])
        study.tell(trial, state=TrialState.FAIL)


def _show(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def run_study(s: Setup, group: StudyGroup) -> dict | None:
    """Every rank. Returns the best record (as in best_hyperparams.json), None if no trial completed."""
    h, main_rank = s.hpo, group.env.rank == 0
    study, error = None, ""
    if main_rank:
        try:
            study = open_study(s)
        except UserError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"could not open the study: {type(e).__name__}: {e}"
    error = dist.broadcast_object(error)
    if error:
        raise StudyError(error)
    if main_rank:
        done = counted_trials(study)
        print(f"[hpo] study {s.study_name}: {'continuing with ' + str(done) + ' trial(s) done, ' if done else ''}"
              f"{h.n_trials} trials, {s.direction} {s.metric}, {group.env.world_size} process(es), "
              f"folder {s.study_dir}", flush=True)
    while True:
        order: dict[str, Any] = {}
        trial = None
        if main_rank:
            done = counted_trials(study)
            if done >= h.n_trials:
                order = {"stop": True}
            else:
                trial = study.ask()
                try:
                    params = draw_params(s, trial)
                    trial.set_user_attr("overrides", params)
                    trial.set_user_attr("run_dir", str(s.study_dir / f"trial_{trial.number}"))
                    order = {"number": trial.number, "params": params, "index": done + 1}
                except Exception as e:  # noqa: BLE001 - a broken space would break every trial: end the study
                    study.tell(trial, state=_import_optuna().trial.TrialState.FAIL)
                    order = {"error": str(e) if isinstance(e, UserError) else
                             f"sampling trial {trial.number} failed: {type(e).__name__}: {e}"}
        order = dist.broadcast_object(order)
        if order.get("stop"):
            break
        if "error" in order:
            raise StudyError(order["error"])
        number, params = order["number"], order["params"]
        if main_rank:
            print(f"[hpo] trial {number} ({order['index']}/{h.n_trials}): {_show(params)}", flush=True)
        try:
            status = run_trial(s, group, number, params, trial)
        except StudyError as e:  # raised alike on every rank: recorded, then the study ends
            if main_rank:
                tell(study, trial, {"state": "fail", "reason": str(e)})
            raise
        finally:
            if main_rank:
                cleanup_trial(s.study_dir / f"trial_{number}")
        outcome = combine(group.agree(status))
        if outcome["state"] == "fail" and group.env.world_size > 1:
            group.renew()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if main_rank:
            tell(study, trial, outcome)
            record = best_record(study, s)
            if outcome["state"] == "complete" and record is not None:
                write_best(record, s.out)
            best_txt = (f"best: trial {record['trial']}, {record['value']:.6g}" if record else "no trial complete yet")
            if outcome["state"] == "complete":
                print(f"[hpo] trial {number} complete: {s.metric}={outcome['value']:.6g} ({best_txt})", flush=True)
            elif outcome["state"] == "pruned":
                print(f"[hpo] trial {number} pruned at epoch {outcome['epoch']} "
                      f"(steps per rank {outcome['rank_steps']}; {best_txt})", flush=True)
            else:
                print(f"[hpo] trial {number} failed: {outcome['reason']} ({best_txt}); the study goes on", flush=True)
    record = None
    if main_rank:
        record = best_record(study, s)
        if record is not None:
            write_best(record, s.out)
            print(f"[hpo] best: trial {record['trial']} {s.metric}={record['value']:.6g} with {_show(record['params'])}"
                  f" ({record['n_complete']} complete of {len(study.trials)}); wrote {s.out}", flush=True)
        else:
            import optuna

            states = [t.state for t in study.trials]
            failed = [t.user_attrs.get("fail_reason", "") for t in study.trials
                      if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("fail_reason")]
            print(f"[hpo] no trial completed ({sum(st.name == 'PRUNED' for st in states)} pruned, "
                  f"{sum(st.name == 'FAIL' for st in states)} failed"
                  f"{'; first failure: ' + failed[0] if failed else ''})", file=sys.stderr, flush=True)
    return dist.broadcast_object(record)


# ------------------------------------------------------------------------------------------------
# Final training


def read_hyperparams(path: str) -> dict:
    """params of a best_hyperparams.json, or of a flat {key: value} object (the seed's file)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"hyperparams file not found: {path} (--hyperparams-file FILE, or run the study first)") \
            from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"hyperparams file {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("params"), dict):
        return data["params"]
    if isinstance(data, dict) and "params" not in data and all(
            v is None or isinstance(v, (bool, int, float, str, list)) for v in data.values()):
        return data
    raise ConfigError(f"hyperparams file {path}: expected {{\"params\": {{config key: value, ...}}, ...}} "
                      f"or a flat {{config key: value}} object")


def check_final_free(s: Setup) -> None:
    """The final training always runs in <study>/final (run_name is forced), so the trainer's advice for
    an occupied run directory (another trainer.run_name) cannot work here: say what does, at start."""
    final, t, h = s.study_dir / "final", s.cfg.trainer, s.hpo
    metrics = final / "metrics.jsonl"
    held = ((metrics.is_file() and metrics.stat().st_size > 0) or (final / "model.safetensors").exists()
            or any((final / "checkpoints").glob("*.ckpt")))
    # a new in-memory study refuses a folder with trials anyway, with its own advice (open_study)
    other = not h.storage and not h.skip_hyperopt and any(s.study_dir.glob("trial_*"))
    if dist.broadcast_object(held and not (t.overwrite or t.resume or other)):  # rank 0 decides for all
        new = (f"train in a new folder with hpo.study_name=<new name> --hyperparams-file "
               f"{h.hyperparams_file or s.out}" if h.skip_hyperopt
               else "start a new study with hpo.study_name=<new name>")
        raise ConfigError(f"{final} already holds the final training of study {s.study_name}: train it again with "
                          f"trainer.overwrite=true, continue it with trainer.resume=auto, or {new}")


def final_training(s: Setup, params: dict, source: str) -> dict:
    cfg = apply_params(s.cfg, params, s.aliases, source)
    cfg.trainer.out_dir, cfg.trainer.run_name = str(s.study_dir), "final"
    _wandb_group(cfg, s.study_name)
    if dist.rank() == 0:
        print(f"[hpo] final training with {_show(params) or 'the config as given'} (from {source}) in "
              f"{s.study_dir / 'final'}", flush=True)
    return run(s.recipe, cfg, s.demo, datasets_hook=partial(final_datasets, s.hpo.final_on_train_val))


# ------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """`python -m launch.hyperopt` / `torchrun ... -m launch.hyperopt`. Exit codes as trainlib's
    (2: bad input, 143/130: stopped by a signal), and 1 when no trial completed but a final
    training was asked for."""
    argv = sys.argv[1:] if argv is None else argv
    code = 0

    def body() -> None:
        nonlocal code
        s, help_out = parse_args(argv)
        if s is None:
            print(help_out)
            return
        h = s.hpo
        device = dist.pick_device(s.cfg.trainer.device, dist.env_from_torchrun())
        group = StudyGroup(device, s.cfg.trainer.ddp_timeout)
        name_study(s)
        if h.final or h.skip_hyperopt:
            check_final_free(s)  # before any trial: a finished study run again stops here, not after it
        if h.skip_hyperopt:
            path = h.hyperparams_file or str(s.out)
            params = read_hyperparams(path)
            apply_params(s.cfg, params, s.aliases, path)  # fail before anything is written
            final_training(s, params, path)
            return
        if h.hyperparams_file:
            raise ConfigError("hpo.hyperparams_file (--hyperparams-file) goes with --skip-hyperopt")
        record = run_study(s, group)
        if not h.final:
            return
        if record is None:
            code = 1
            if dist.rank() == 0:
                print("error: no trial completed, so there is no final training", file=sys.stderr, flush=True)
            return
        final_training(s, record["params"], f"trial {record['trial']}, {s.out}")

    rc = guarded(body)
    return rc or code


__all__ = ["HPOConfig", "StudyGroup", "TrialMonitor", "default_space", "check_space", "sample_space",
           "read_hyperparams", "main", "load_recipe"]
