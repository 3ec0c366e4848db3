"""Hyper-parameter search with Optuna over any recipe, in one process or under torchrun: the
command line, the study loop and the final training.

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

This module is that loop and the entry point around it; the pieces it drives have modules of their own:
trainlib/study_setup.py (the `hpo` section, `Setup`, `StudyError`), trainlib/search_space.py (what a
trial varies: checking and sampling the space) and trainlib/trials.py (one trial on every rank, the
study's process group). Their public names are importable from here too.

Optuna is imported only on rank 0 and only here (`pip install optuna`, or trainlib's [optuna] extra).
"""
from __future__ import annotations

import copy
import gc
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import dist
from .checkpoint import atomic_write_bytes
from .config import ConfigError, UserError, apply_dict, help_text, read_yaml, set_value, validate
from .recipe import (ENGINE_ALIASES, _is_recipe, available_recipes, find_recipe, guarded, make_config, parse_cli,
                     recipe_ref, run, synthetic_root)
from .search_space import apply_params, check_space, default_space, draw_params, probe_search_space, sample_space
from .study_setup import HPO_ALIASES, HPOConfig, HPOSection, Setup, StudyError
from .rundir import (LENGTH_KEYS, RESUME_MAY_DIFFER, config_differences, differences_text, holds_run, newest_checkpoint,
                     read_config)
from .trials import StudyGroup, TrialMonitor, cleanup_trial, combine, run_trial, wandb_group
from .trials import trial_config  # noqa: F401 - importable from here, as before the split


# ------------------------------------------------------------------------------------------------
# The command line


USAGE = """usage: python -m launch.hyperopt recipe=NAME [--config FILE.yaml] [hpo.key=value ...] [section.key=value ...]
       torchrun --nproc_per_node=N -m launch.hyperopt recipe=NAME [...]
       python -m launch.hyperopt recipe=NAME --skip-hyperopt [--hyperparams-file FILE.json] [section.key=value ...]

An Optuna study over a recipe: every trial trains with sampled values applied as config overrides,
best_hyperparams.json keeps the best, then the final model is trained with them (docs/hyperopt.md).
`recipe=NAME` picks a registered recipe (entry-point group trainlib.recipes) or a module path
(mypkg.myrecipe, whose `recipe` is a Recipe, or mypkg.mod:attr); other arguments are the recipe's
overrides, as for `python -m recipes.NAME`. The `hpo` section may also come from the YAML file."""


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
    switches = {k: v for k, v in aliases.items() if "=" in v}  # flags that set a value (--test_run): not searchable
    aliases = {k: v for k, v in aliases.items() if k not in switches}
    for key in (h.space or {}) if isinstance(h.space, dict) else ():
        if key in switches:
            raise ConfigError(f"hpo.space[{key!r}]: {key} is a switch (it sets {switches[key]}); "
                              f"search over {switches[key].split('=', 1)[0]} instead")
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
# The study (rank 0)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("hyperopt needs optuna, which is not installed: pip install optuna "
                          "(or pip install -e \".[optuna]\")") from None
    return optuna


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


def final_datasets(on_train_val: bool, splits: dict) -> dict:
    """The final training: train+val concatenated (validation still runs on val)."""
    train, val = splits.get("train"), splits.get("val")
    if on_train_val and val is not None and val is not train:
        if dist.rank() == 0:
            print(f"[hpo] final training on train+val: {len(train)} + {len(val)} samples "
                  f"(validation still runs on val)", flush=True)
        splits = {**splits, "train": torch.utils.data.ConcatDataset([train, val])}
    return splits


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


def plan_final(s: Setup, cfg: Any) -> tuple[str, str]:
    """Rank 0: what the final training does with what <study>/final already holds, so that the same
    command run again finishes the job whatever stage the previous attempt reached. -> (action, line):
    'train': nothing there, or trainer.resume / trainer.overwrite given (they decide, as in any run);
    'skip': a finished final training with this config (best params included, same run length);
    'resume': one with this config cut short, or trained for less (trainer.max_epochs raised): trainer.resume=auto;
    'redo': one with other values (the best params changed, another base config: keys as in
    rundir.config_differences), or cut short before its first checkpoint: trainer.overwrite=true."""
    final, t = s.study_dir / "final", cfg.trainer
    if t.overwrite or t.resume or not holds_run(final):
        return "train", ""
    saved, current = read_config(final), cfg
    if s.demo and not cfg.data.root:  # the demo's data folder is filled in when the run starts
        current = copy.deepcopy(cfg)
        current.data.root = str(synthetic_root(s.recipe, cfg))
    diffs = config_differences(saved, current) if saved else ["config.yaml missing or unreadable"]
    if diffs:
        return "redo", (f"[hpo] {final} holds a final training with other values ({differences_text(diffs)}): "
                        f"training it again with these (trainer.overwrite: its files are replaced)")
    finished = (final / "summary.json").is_file() or (final / "model.safetensors").is_file()
    same_length = not config_differences(saved, current, tuple(k for k in RESUME_MAY_DIFFER if k not in LENGTH_KEYS))
    if finished and same_length:
        return "skip", (f"[hpo] {final} already holds the finished final training with these values: nothing to "
                        f"train (trainer.overwrite=true trains it again)")
    if newest_checkpoint(final) is None:
        return "redo", f"[hpo] {final} holds a final training cut short before its first checkpoint: starting it over"
    return "resume", (f"[hpo] {final} holds the final training with these values, "
                      f"{'trained for less' if finished else 'cut short'}: continuing it (trainer.resume=auto)")


def final_training(s: Setup, params: dict, source: str) -> dict:
    cfg = apply_params(s.cfg, params, s.aliases, source)
    cfg.trainer.out_dir, cfg.trainer.run_name = str(s.study_dir), "final"
    wandb_group(cfg, s.study_name)
    action, said = dist.broadcast_object(plan_final(s, cfg) if dist.rank() == 0 else None)  # rank 0 decides
    if dist.rank() == 0:
        print(f"[hpo] final training with {_show(params) or 'the config as given'} (from {source}) in "
              f"{s.study_dir / 'final'}", flush=True)
        if said:
            print(said, flush=True)
    if action == "skip":
        return {}
    cfg.trainer.resume = "auto" if action == "resume" else cfg.trainer.resume
    cfg.trainer.overwrite = cfg.trainer.overwrite or action == "redo"
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
