"""launch.hyperopt: an Optuna study over a recipe, under torchrun and in one process.

What is checked with real runs (PDAN, tiny model, 2 epochs per trial):
- 2 processes: best_hyperparams.json holds the best trial's values and score (cross-checked against
  the trials' metrics.jsonl and config.yaml), the final training used them, trial weights are gone;
  a trial that raises on rank 1 only, mid-training, is FAILED on every rank and the study goes on;
- 2 processes: a pruner that prunes at the first report stops every rank at the same step;
- 1 process without torchrun: an exception and a NaN loss fail their trials, the study goes on;
- an sqlite study SIGKILLed during its second trial continues to n_trials when run again;
- --skip-hyperopt --hyperparams-file runs only the final training, with the params applied;
- the same command run again extends the study to hpo.n_trials and finishes its final training.

The toy recipe below is PDAN with a search space of its own and failures on demand: the workers
of a run import it as `recipe=tests.test_hyperopt`; HPO_TOY_FAIL="1=rank1,2=nan" makes trial 1
raise on rank 1 at step 2 and trial 2 train on a NaN loss.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recipes.pdan import build_loss as pdan_build_loss
from recipes.pdan import recipe as pdan_recipe
from tests.conftest import ROOT, torchrun
from trainlib.callbacks import Callback
from trainlib.config import ConfigError
from trainlib.hpo import check_space, main, read_hyperparams, sqlite_folder

optuna = pytest.importorskip("optuna")

TINY = ["model.num_channels=32", "model.num_layers=2", "model.input_channels=64", "trainer.max_epochs=2",
        "log.loggers=jsonl"]
LR_SPACE = "hpo.space={optim.lr: {type: float, low: 1e-3, high: 2e-2, log: true}}"


# ------------------------------------------------------------------------------------------------
# The toy recipe

def _failure(cfg) -> str:
    plan = dict(item.split("=") for item in os.environ.get("HPO_TOY_FAIL", "").split(",") if item)
    return plan.get(cfg.trainer.run_name.removeprefix("trial_"), "")


class Saboteur(Callback):
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def on_fit_start(self, trainer) -> None:
        if self.mode == "raise":
            raise RuntimeError("simulated out of memory on every rank")

    def on_train_step_end(self, trainer) -> None:
        if self.mode == "rank1" and trainer.rank == 1 and trainer.global_step == 2:
            raise RuntimeError("simulated failure on rank 1 only")


def _toy_loss(cfg):
    base = pdan_build_loss(cfg)
    if _failure(cfg) != "nan":
        return base

    def nan_loss(outputs, batch):
        out = base(outputs, batch)
        return {**out, "loss": out["loss"] * float("nan")}
    return nan_loss


def _toy_space(trial) -> dict:
    # aliases and optuna names of its own: best_hyperparams.json must hold the full config keys
    return {"lr": trial.suggest_float("learning_rate", 1e-3, 2e-2, log=True),
            "batch_size": trial.suggest_categorical("bs", [8, 16])}


recipe = dataclasses.replace(pdan_recipe, name="hpo_toy", build_loss=_toy_loss,
                             callbacks=lambda cfg: [Saboteur(_failure(cfg))], search_space=_toy_space)


# ------------------------------------------------------------------------------------------------
# Helpers

def val_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "val"]


def config_value(run_dir, key):
    node = yaml.safe_load((run_dir / "config.yaml").read_text())
    for part in key.split("."):
        node = node[part]
    return node


def trials_of(db, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials


def check_best_file(study_dir, trials, metric="map"):
    """best_hyperparams.json against what the trials logged and were configured with."""
    best = json.loads((study_dir / "best_hyperparams.json").read_text())
    assert set(best) == {"params", "value", "metric", "direction", "trial", "n_complete"}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    scores = {t.number: max(r[metric] for r in val_rows(study_dir / f"trial_{t.number}")) for t in complete}
    winner = max(scores, key=scores.get)
    assert best["trial"] == winner and best["value"] == scores[winner]
    assert best["metric"] == f"val/{metric}" and best["direction"] == "maximize"
    assert best["n_complete"] == len(complete)
    for key, value in best["params"].items():
        assert config_value(study_dir / f"trial_{winner}", key) == value, key
    return best


# ------------------------------------------------------------------------------------------------
# Real studies

def test_two_process_study_survives_a_one_rank_failure_and_trains_the_final_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HPO_TOY_FAIL", "1=rank1")
    db = tmp_path / "study.db"
    r = torchrun(2, ["-m", "launch.hyperopt", "recipe=tests.test_hyperopt", "hpo.n_trials=3", "hpo.study_name=s",
                     f"hpo.storage=sqlite:///{db}", "hpo.train_fraction=0.5", f"trainer.out_dir={tmp_path}", *TINY],
                 timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    study_dir = tmp_path / "s"
    trials = trials_of(db, "s")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "simulated failure on rank 1 only (rank 1)" in trials[1].user_attrs["fail_reason"]
    assert "trial 1 failed" in r.stdout and "the study goes on" in r.stdout
    best = check_best_file(study_dir, trials)
    assert set(best["params"]) == {"optim.lr", "data.batch_size"}
    # trials train on a fixed half of the 192 training videos (96: 48 per rank), the final training on
    # train+val (256: 128 per rank), with the best values; its model is written
    for t in (trials[0], trials[2]):
        bs = config_value(study_dir / f"trial_{t.number}", "data.batch_size")
        assert val_rows(study_dir / f"trial_{t.number}")[0]["step"] == math.ceil(48 / bs)
    final = study_dir / "final"
    for key, value in best["params"].items():
        assert config_value(final, key) == value
    assert "final training on train+val: 192 + 64 samples" in r.stdout
    assert val_rows(final)[0]["step"] == math.ceil(128 / best["params"]["data.batch_size"])
    assert (final / "model.safetensors").is_file() and (final / "checkpoints" / "best.ckpt").is_file()
    # trials keep their logs, not their weights
    for n in range(3):
        assert (study_dir / f"trial_{n}" / "metrics.jsonl").is_file()
        assert not (study_dir / f"trial_{n}" / "checkpoints").exists()
        assert not (study_dir / f"trial_{n}" / "model.safetensors").exists()


def test_pruning_stops_every_rank_at_the_same_step(tmp_path):
    db = tmp_path / "study.db"
    r = torchrun(2, ["-m", "launch.hyperopt", "recipe=pdan", "hpo.n_trials=2", "hpo.study_name=p",
                     f"hpo.storage=sqlite:///{db}", "hpo.pruner=threshold", "hpo.prune_below=2.0", LR_SPACE,
                     f"trainer.out_dir={tmp_path}", *TINY], timeout=240)
    # every trial pruned: no best values, and no final training to run with them (exit 1)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no trial completed (2 pruned, 0 failed)" in r.stderr
    for t in trials_of(db, "p"):
        assert t.state == optuna.trial.TrialState.PRUNED
        steps_per_epoch = val_rows(tmp_path / "p" / f"trial_{t.number}")[0]["step"]
        assert t.user_attrs["rank_steps"] == [steps_per_epoch, steps_per_epoch]  # both ranks, first validation
        assert len(val_rows(tmp_path / "p" / f"trial_{t.number}")) == 1 and t.user_attrs["pruned_epoch"] == 0
    assert not (tmp_path / "p" / "best_hyperparams.json").exists() and not (tmp_path / "p" / "final").exists()


def test_one_process_failed_and_nonfinite_trials_are_recorded_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HPO_TOY_FAIL", "0=raise,1=nan")
    db = tmp_path / "studies" / "study.db"  # a folder that does not exist yet: created for the sqlite file
    args = ["recipe=tests.test_hyperopt", "hpo.n_trials=3", "hpo.study_name=one", f"hpo.storage=sqlite:///{db}",
            "hpo.final=false", f"trainer.out_dir={tmp_path}", *TINY]
    assert main(args) == 0
    trials = trials_of(db, "one")
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"] == "RuntimeError: simulated out of memory on every rank"
    assert "non-finite training loss" in trials[1].user_attrs["fail_reason"]
    assert check_best_file(tmp_path / "one", trials)["trial"] == 2
    assert not (tmp_path / "one" / "final").exists()
    # an in-memory study cannot continue that one: it refuses the folder rather than overwrite it
    capsys.readouterr()
    assert main([a for a in args if not a.startswith("hpo.storage=")]) == 2
    assert f"{tmp_path / 'one'} already holds another study" in capsys.readouterr().err


def test_sqlite_study_killed_mid_trial_continues_to_n_trials(tmp_path):
    db = tmp_path / "study.db"
    cmd = [sys.executable, "-m", "launch.hyperopt", "recipe=pdan", "hpo.n_trials=3", "hpo.study_name=k",
           f"hpo.storage=sqlite:///{db}", "hpo.final=false", LR_SPACE, f"trainer.out_dir={tmp_path}", *TINY]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen, deadline = [], time.monotonic() + 120  # a timeout guard
    try:
        for line in proc.stdout:  # kill once trial 1 has been asked for (RUNNING in the storage)
            seen.append(line)
            if line.startswith("[hpo] trial 1 (2/3)") or time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(line.startswith("[hpo] trial 0 complete") for line in seen), "".join(seen)[-3000:]
    first = trials_of(db, "k")
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trial 1 was cut short by an earlier session" in r.stdout
    assert "continuing with 1 trial(s) done" in r.stdout
    trials = trials_of(db, "k")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == first[1].params  # the interrupted trial, run again with its values
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    assert study.user_attrs["interrupted"] == [1]
    assert check_best_file(tmp_path / "k", trials)["n_complete"] == 3


def test_skip_hyperopt_runs_only_the_final_training_with_the_file(tmp_path, capsys):
    params = tmp_path / "my_params.json"
    params.write_text(json.dumps({"params": {"optim.lr": 0.004, "data.batch_size": 16, "optim.scheduler": "none"},
                                  "value": 0.5, "metric": "val/map", "direction": "maximize", "trial": 3,
                                  "n_complete": 4}))
    args = ["recipe=pdan", "--skip-hyperopt", "--hyperparams-file", str(params), "hpo.study_name=only_final",
            f"trainer.out_dir={tmp_path}", *TINY]
    assert main(args) == 0
    study_dir = tmp_path / "only_final"
    assert sorted(p.name for p in study_dir.iterdir()) == ["final"]
    final = study_dir / "final"
    assert config_value(final, "optim.lr") == 0.004 and config_value(final, "data.batch_size") == 16
    assert config_value(final, "optim.scheduler") == "none"
    assert (final / "model.safetensors").is_file() and len(val_rows(final)) == 2
    assert "final training on train+val" in capsys.readouterr().out
    # the seed system's file is a flat object of values; its flag names work as keys
    params.write_text(json.dumps({"lr": 0.002, "batch_size": 8}))
    assert read_hyperparams(str(params)) == {"lr": 0.002, "batch_size": 8}


# ------------------------------------------------------------------------------------------------
# Configuration (no training)

def test_bad_input_is_one_clear_error_before_anything_runs(tmp_path, capsys):
    base = [f"trainer.out_dir={tmp_path}"]
    assert main(base) == 2
    assert "name the recipe to tune: recipe=NAME (available: mvfoul, panollava, pdan, segformer, xca;" in capsys.readouterr().err
    assert main(["recipe=nosuch", *base]) == 2
    assert "unknown recipe 'nosuch': neither a registered name (registered: mvfoul, panollava, pdan" in capsys.readouterr().err
    assert main(["recipe=pdan", "hpo.n_trial=3", *base]) == 2
    assert "did you mean 'hpo.n_trials'" in capsys.readouterr().err
    assert main(["recipe=pdan", "hpo.space={optim.lrr: {type: float, low: 1, high: 2}}", *base]) == 2
    assert "hpo.space['optim.lrr']: unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in capsys.readouterr().err
    assert main(["recipe=pdan", "--skip-hyperopt", f"--hyperparams-file={tmp_path / 'none.json'}", *base]) == 2
    assert "hyperparams file not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["recipe=pdan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "hpo.train_fraction" in out and "model.num_channels" in out and "optim.lr" in out


def test_sqlite_folder_of_storage_urls():
    assert sqlite_folder("sqlite:////abs/dir/s.db") == Path("/abs/dir")
    assert sqlite_folder("sqlite:///rel/s.db?timeout=30") == Path("rel")
    assert sqlite_folder("sqlite:///s.db") == Path(".")
    assert sqlite_folder("sqlite:///:memory:") == sqlite_folder("postgresql://u@h/db") == Path(".")


def test_space_checks_and_yaml_section(tmp_path):
    from trainlib.recipe import build_config

    cfg, _, _ = build_config(pdan_recipe, [])
    space = check_space({"lr": {"type": "float", "low": "1e-4", "high": 1e-2, "log": True},
                         "optim.name": {"type": "categorical", "choices": ["adam", "sgd"]}}, cfg,
                        {"lr": "optim.lr"}, "s")
    assert space["optim.lr"] == {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    bad = [({"optim.name": {"type": "categorical", "choices": ["adam", "lion"]}}, "expected one of"),
           ({"optim.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "a log scale needs low > 0"),
           ({"data.batch_size": {"type": "int", "low": 8}}, "needs 'low' and 'high'"),
           ({"optim.lr": {"type": "uniform", "low": 1, "high": 2}}, "'type' must be float, int or categorical"),
           ({"optim.lr": {"type": "float", "low": 1, "high": 2, "scale": 3}}, "unknown field(s) scale")]
    for spec, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_space(spec, cfg, {}, "s")
    # the hpo section may come from the YAML file, next to the recipe's own keys
    from trainlib.hpo import parse_args

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("recipe: pdan\ntrainer: {max_epochs: 3}\nhpo:\n  n_trials: 7\n  space:\n"
                        "    optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n")
    s, _ = parse_args(["--config", str(run_yaml), "hpo.n_trials=9"])
    assert s.recipe.name == "pdan" and s.cfg.trainer.max_epochs == 3 and s.hpo.n_trials == 9
    assert list(s.hpo.space) == ["optim.lr"] and s.direction == "maximize" and s.metric == "val/map"
    assert math.isclose(s.hpo.space["optim.lr"]["low"], 1e-4)
    # trials: their own folder, no weights kept, wandb runs grouped by study
    from trainlib.hpo import name_study, trial_config

    s, _ = parse_args(["recipe=pdan", "hpo.study_name=st", f"trainer.out_dir={tmp_path}", "log.loggers=jsonl,wandb"])
    name_study(s)
    t = trial_config(s, 4, {"optim.lr": 0.01, "data.batch_size": 4})
    assert (t.trainer.out_dir, t.trainer.run_name) == (str(tmp_path / "st"), "trial_4")
    assert t.optim.lr == 0.01 and t.data.batch_size == 4 and t.log.wandb_group == "st"
    assert t.trainer.save_top_k == 0 and not t.trainer.save_last and not t.trainer.export
    assert s.out == tmp_path / "st" / "best_hyperparams.json"


def test_running_a_study_again_extends_it_and_finishes_its_final_training_whatever_its_stage(tmp_path, capsys):
    """The same command run again continues the study to hpo.n_trials, then finishes the final training:
    skipped when it is done with the same values, continued when it was cut short, trained again when
    the values changed; raising hpo.n_trials extends the study."""
    db = tmp_path / "study.db"
    args = ["recipe=pdan", "hpo.study_name=done", f"hpo.storage=sqlite:///{db}", LR_SPACE, "hpo.train_fraction=0.25",
            f"trainer.out_dir={tmp_path}", *TINY, "trainer.max_epochs=1"]
    final = tmp_path / "done" / "final"

    def losses():
        return [(r["split"], r["step"], r.get("loss")) for r in map(json.loads, (final / "metrics.jsonl").open())]

    def best_params():
        return json.loads((tmp_path / "done" / "best_hyperparams.json").read_text())["params"]

    assert main([*args, "hpo.n_trials=2"]) == 0
    first, kept = losses(), {p.name: p.read_bytes() for p in final.iterdir() if p.is_file() and p.name != ".lock"}
    assert len(trials_of(db, "done")) == 2 and config_value(final, "optim.lr") == best_params()["optim.lr"]
    capsys.readouterr()
    assert main([*args, "hpo.n_trials=2"]) == 0                       # all done: nothing is trained or written
    assert f"{final} already holds the finished final training with these values" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.is_file() and p.name != ".lock"} == kept
    (final / "model.safetensors").unlink()                           # as a kill before the end leaves it
    (final / "summary.json").unlink(missing_ok=True)
    assert main([*args, "hpo.n_trials=2"]) == 0
    assert "cut short: continuing it (trainer.resume=auto)" in capsys.readouterr().out
    assert f"resumed from {final / 'checkpoints' / 'last.ckpt'}" in (final / "train.log").read_text()
    assert (final / "model.safetensors").is_file() and losses() == first
    assert main([*args, "hpo.n_trials=3"]) == 0                       # extended: one more trial, the final follows
    out = capsys.readouterr().out
    assert "continuing with 2 trial(s) done" in out and len(trials_of(db, "done")) == 3
    assert config_value(final, "optim.lr") == best_params()["optim.lr"] and (final / "model.safetensors").is_file()
    assert main([*args, "hpo.n_trials=3", "optim.weight_decay=0.01"]) == 0    # other values: trained again
    assert "holds a final training with other values (optim.weight_decay: 0.0 -> 0.01)" in capsys.readouterr().out
    assert config_value(final, "optim.weight_decay") == 0.01 and len(trials_of(db, "done")) == 3
    assert "trainer.overwrite=true: removed the previous run's files" in (final / "train.log").read_text()
    # --skip-hyperopt follows the same rule
    assert main([*args, "hpo.n_trials=3", "optim.weight_decay=0.01", "--skip-hyperopt"]) == 0
    assert "already holds the finished final training" in capsys.readouterr().out


def test_values_out_of_a_keys_bounds_are_refused_before_any_trial(tmp_path, capsys):
    base = ["recipe=pdan", f"trainer.out_dir={tmp_path}"]
    assert main([*base, "hpo.space={optim.lr: {type: float, low: -0.1, high: 0.01}}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hpo.space['optim.lr'] low: config key 'optim.lr': expected a value ")
    assert err.endswith(", got -0.1\n") and err.count("\n") == 1
    assert main([*base, "hpo.space={batch_size: {type: categorical, choices: [8, 0]}}"]) == 2
    assert capsys.readouterr().err == ("error: hpo.space['batch_size'] choice: config key 'data.batch_size': "
                                       "expected a value >= 1, got 0\n")
    assert main([*base, "hpo.train_fraction=0"]) == 2
    assert capsys.readouterr().err == "error: config key 'hpo.train_fraction': expected a value in (0, 1], got 0.0\n"
    assert main([*base, "optim.betas=[0.9]"]) == 2
    assert "config key 'optim.betas': expected a list of 2 values" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_search_space_out_of_bounds_ends_the_study(tmp_path):
    from trainlib.hpo import StudyError, draw_params, parse_args, probe_search_space

    s, _ = parse_args(["recipe=pdan", f"trainer.out_dir={tmp_path}"])
    # the stand-in trial picks each range's ends and each choice: a bad end is found before the study
    s.recipe = dataclasses.replace(pdan_recipe, search_space=lambda t: {
        "lr": t.suggest_float("lr", 1e-4, 1e-2, log=True), "dropout": t.suggest_float("p", 0.1, 1.0),
        "optim.name": t.suggest_categorical("opt", ["adam", "sgd"])})
    with pytest.raises(StudyError, match=r"search_space returned dropout=1.0: config key 'model.dropout': "
                                         r"expected a value in \[0, 1\), got 1.0"):
        probe_search_space(s)
    # a space the stand-in cannot drive is checked at each draw: the study ends at the first bad value
    s.recipe = dataclasses.replace(pdan_recipe, search_space=lambda t: {"lr": 0.5 if t.number % 2 else -0.5})
    probe_search_space(s)
    assert draw_params(s, optuna.trial.FixedTrial({}, number=1)) == {"optim.lr": 0.5}
    with pytest.raises(StudyError, match=r"search_space returned lr=-0.5: config key 'optim.lr': expected"):
        draw_params(s, optuna.trial.FixedTrial({}, number=2))


def test_a_config_file_names_its_recipe(tmp_path):
    from trainlib.hpo import parse_args

    p = tmp_path / "run.yaml"
    p.write_text("recipe: pdan\ntrainer: {max_epochs: 3}\n")
    for args in ([], ["recipe=pdan"], ["recipe=recipes.pdan"]):
        s, _ = parse_args(["--config", str(p), *args])
        assert s.recipe is pdan_recipe and s.cfg.trainer.max_epochs == 3
    p.write_text("recipe: segformer\ntrainer: {max_epochs: 3}\n")
    with pytest.raises(ConfigError, match=f"config file {p} is for recipe segformer, but this study tunes recipe=pdan"):
        parse_args(["--config", str(p), "recipe=pdan"])


def test_a_switch_in_the_space_is_named_with_the_key_to_search(tmp_path):
    """mvfoul's --mixed_precision is a switch (trainer.precision=16-mixed), not a key with values."""
    from trainlib.hpo import parse_args

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("recipe: mvfoul\nhpo:\n  space:\n    mixed_precision: {type: categorical, choices: [true, false]}\n")
    with pytest.raises(ConfigError, match=r"^hpo.space\['mixed_precision'\]: mixed_precision is a switch \(it sets "
                                          r"trainer.precision=16-mixed\); search over trainer.precision instead$"):
        parse_args(["--config", str(run_yaml)])
