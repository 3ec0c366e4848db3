"""Config tree: typed overrides, YAML, errors that name the key, bounds, --help."""
import re

import pytest

from trainlib.config import Config, ConfigError, DataConfig, apply_overrides, help_text, leaves, load_yaml, set_value
from trainlib.recipe import parse_cli


def cfg():
    return Config(data=DataConfig())


def test_overrides_are_typed():
    c = cfg()
    apply_overrides(c, ["trainer.max_epochs=7", "optim.lr=3e-4", "trainer.compile=true", "data.root=001",
                        "log.loggers=jsonl,tensorboard", "optim.betas=[0.8,0.95]"])
    assert c.trainer.max_epochs == 7 and isinstance(c.trainer.max_epochs, int)
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
    assert c.trainer.compile is True
    assert c.data.root == "001"  # strings stay strings, not the int 1
    assert c.log.loggers == ["jsonl", "tensorboard"]
    assert c.optim.betas == [0.8, 0.95]


def test_int_or_float_limits_follow_lightning():
    c = cfg()
    apply_overrides(c, ["trainer.limit_train_batches=3", "trainer.limit_val_batches=0.25"])
    assert c.trainer.limit_train_batches == 3 and isinstance(c.trainer.limit_train_batches, int)
    assert c.trainer.limit_val_batches == 0.25


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_epoch'.*did you mean 'trainer.max_epochs'"):
        apply_overrides(cfg(), ["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr'"):
        apply_overrides(cfg(), ["optimizer.lr=3"])


def test_ill_typed_value_names_key_and_type():
    with pytest.raises(ConfigError, match=r"'trainer.max_epochs': expected int, got 'ten'"):
        apply_overrides(cfg(), ["trainer.max_epochs=ten"])
    with pytest.raises(ConfigError, match=r"'trainer.compile': expected bool"):
        apply_overrides(cfg(), ["trainer.compile=maybe"])
    with pytest.raises(ConfigError, match=r"'trainer.precision': expected one of 32-true, 16-mixed, bf16-mixed, bf16-true"):
        apply_overrides(cfg(), ["trainer.precision=fp8"])


def test_seed_spellings_and_leaf_shorthand():
    c = cfg()
    set_value(c, "precision", "16")
    assert c.trainer.precision == "16-mixed"
    set_value(c, "max_epochs", "50")
    assert c.trainer.max_epochs == 50
    from dataclasses import dataclass

    @dataclass
    class WithMode(DataConfig):
        mode: str = "rgb"

    with pytest.raises(ConfigError, match=r"'mode' is ambiguous: say one of trainer.mode, data.mode"):
        set_value(Config(data=WithMode()), "mode", "max")
    c2 = cfg()
    set_value(c2, "lr", "0.1", {"lr": "optim.lr"})
    assert c2.optim.lr == 0.1


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("recipe: toy\ntrainer:\n  max_epochs: 3\n  precision: bf16-mixed\noptim:\n  lr: 0.01\n")
    c = cfg()
    load_yaml(c, str(p))
    assert (c.trainer.max_epochs, c.trainer.precision, c.optim.lr) == (3, "bf16-mixed", 0.01)
    p.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match=rf"{p}: unknown config key 'trainer.max_epoch'"):
        load_yaml(cfg(), str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(cfg(), str(tmp_path / "nope.yaml"))


def test_help_lists_every_key_with_type_default_and_text():
    c = cfg()
    text = help_text(c)
    for key, (owner, f, _) in leaves(c).items():
        assert key in text
        assert f.metadata.get("help"), f"{key} has no description"
        assert f.metadata["help"] in text
    assert "trainer.precision" in text and "32-true|16-mixed|bf16-mixed|bf16-true" in text


def test_cli_forms():
    path, pairs, want_help = parse_cli(["--config", "x.yaml", "trainer.max_epochs=3", "--mode", "rgb",
                                        "--batch_size=4", "--fast_dev_run", "-h"])
    assert path == "x.yaml" and want_help
    assert pairs == [("trainer.max_epochs", "3"), ("mode", "rgb"), ("batch_size", "4"), ("fast_dev_run", "true")]
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        parse_cli(["oops"])


# ------------------------------------------------------------------------------------------------
# Bounds: every numeric key has a range, checked once when the config is built

BAD_VALUES = [("optim.lr=-0.1", "optim.lr", "-0.1"), ("data.batch_size=0", "data.batch_size", "0"),
              ("data.num_workers=-1", "data.num_workers", "-1"), ("log.every_n_steps=0", "log.every_n_steps", "0"),
              ("model.num_channels=0", "model.num_channels", "0"), ("optim.betas=[0.9]", "optim.betas", "[0.9]"),
              ("optim.betas=[0.9,1.0]", "optim.betas", "[0.9, 1.0]"), ("trainer.max_steps=0", "trainer.max_steps", "0"),
              ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches", "1.5"),
              ("trainer.max_time=soon", "trainer.max_time", "'soon'"), ("optim.lr=nan", "optim.lr", "nan"),
              ("model.input_channels=0", "model.input_channels", "0")]


@pytest.mark.parametrize("arg, key, got", BAD_VALUES)
def test_out_of_range_value_is_one_line_and_writes_nothing(arg, key, got, tmp_path, capsys):
    from recipes.pdan import recipe
    from trainlib.recipe import main

    out = tmp_path / "runs"
    assert main(recipe, [f"trainer.out_dir={out}", arg]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config key '{key}': expected ") and err.endswith(f", got {got}\n"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bound_messages_say_what_was_expected():
    from trainlib.config import validate

    for arg, expected in [("optim.betas=[0.9]", "a list of 2 values"), ("optim.betas=[0.9,1.0]", "values in [0, 1)"),
                          ("data.batch_size=0", "a value >= 1"), ("trainer.max_steps=0", "-1 (no limit) or a count >= 1"),
                          ("trainer.limit_val_batches=1.5", "a count >= 0 (an int) or a fraction in [0, 1] (a float)"),
                          ("trainer.max_time=1:2:3:4:5", "'DD:HH:MM:SS' (or fewer fields) or seconds, >= 0")]:
        c = cfg()
        apply_overrides(c, [arg])
        with pytest.raises(ConfigError, match=f"^config key '{arg.split('=')[0]}': expected {re.escape(expected)}"):
            validate(c)
    c = cfg()
    apply_overrides(c, ["trainer.limit_train_batches=7", "trainer.limit_val_batches=0.5", "trainer.max_time=01:00:00",
                        "trainer.fast_dev_run=true", "trainer.save_top_k=-1"])
    validate(c)  # counts, fractions, durations, bools where an int may go, -1 = all: all fine


def test_out_of_range_value_end_to_end(tmp_path):
    """The process: exit code 2, the one line, no traceback, no run directory."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "recipes.pdan", f"trainer.out_dir={out}", "data.batch_size=0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: config key 'data.batch_size': expected a value >= 1, got 0\n", r.stderr
    assert not out.exists()


def _numeric(tp) -> bool:
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_numeric(a) for a in typing.get_args(tp))
    if origin is list:
        return _numeric(typing.get_args(tp)[0])
    return tp in (int, float)


def test_every_numeric_key_has_bounds_and_its_default_fits():
    """A new int/float/list-of-number key without a range fails here (engine, hpo and every recipe)."""
    from trainlib.config import bounds_of, validate
    from trainlib.hpo import HPOSection, available_recipes, load_recipe
    from trainlib.recipe import build_config

    names = available_recipes()
    assert {"pdan", "segformer"} <= set(names)
    trees = [Config(data=DataConfig()), HPOSection()]
    for name in names:
        rec = load_recipe(name)
        trees.append(Config(model=rec.model_config(), data=rec.data_config(), recipe=rec.name))
        build_config(rec, [])                 # recipe defaults and demo settings fit too
        build_config(rec, ["data.root=/d"])
    checked = set()
    for tree in trees:
        for key, (_, f, tp) in leaves(tree).items():
            if _numeric(tp):
                where = type(tree.model).__name__ if key.startswith("model.") else type(tree).__name__
                assert bounds_of(f) is not None, f"{key} ({where}) has no bounds: opt(..., ge=/gt=/le=/lt=/check=)"
                checked.add(key)
        validate(tree)                        # every default fits its bounds
    assert {"optim.lr", "optim.betas", "data.batch_size", "model.num_channels", "model.num_labels", "hpo.n_trials",
            "trainer.limit_train_batches", "trainer.fast_dev_run"} <= checked


def test_help_shows_each_range_after_the_default():
    text = help_text(cfg())
    assert "default 1e-08, range > 0" in text                                   # optim.eps
    assert "default [0.9, 0.999], range in [0, 1), 2 values" in text            # optim.betas
    assert "default -1, range -1 (no limit) or a count >= 1" in text            # trainer.max_steps
    assert "default 0, range in [0, 4294967295]" in text                        # trainer.seed
    assert "default 'val/loss'\n" in text                                       # no range: nothing added


def test_config_file_that_is_a_directory_or_unreadable(tmp_path, capsys, monkeypatch):
    from recipes.pdan import recipe
    from trainlib.recipe import main

    assert main(recipe, ["--config", str(tmp_path), f"trainer.out_dir={tmp_path / 'runs'}"]) == 2
    assert capsys.readouterr().err == f"error: config file {tmp_path} is a directory; expected a YAML file\n"
    assert not (tmp_path / "runs").exists()
    p = tmp_path / "locked.yaml"
    p.write_text("trainer: {max_epochs: 2}\n")

    def denied(*args, **kwargs):  # a mode-000 file, even when the tests run as root
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ConfigError, match=rf"^config file {p} cannot be read: permission denied$"):
        load_yaml(cfg(), str(p))


def test_config_file_of_another_recipe_is_refused(tmp_path, capsys):
    from recipes.pdan import recipe
    from trainlib.recipe import build_config, main

    p = tmp_path / "seg.yaml"
    p.write_text("recipe: segformer\ntrainer: {max_epochs: 2}\n")
    assert main(recipe, ["--config", str(p), f"trainer.out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {p} is for recipe segformer, but this is recipe pdan") and err.count("\n") == 1
    for head in ("recipe: pdan\n", "recipe: recipes.pdan\n", ""):    # its own recipe, or none: as before
        p.write_text(head + "trainer: {max_epochs: 2}\n")
        assert build_config(recipe, ["--config", str(p)])[0].trainer.max_epochs == 2
    assert not (tmp_path / "runs").exists()


# ---- preset=demo: the recipe's demo settings as a named preset ---------------------------------------


def test_preset_demo_is_auto_without_data_root_and_named_on_any_data(tmp_path, capsys):
    from recipes.pdan import recipe
    from trainlib.recipe import build_config

    def built(*argv):
        c, _, synthetic = build_config(recipe, list(argv))
        return c.preset, synthetic, c.model.num_classes, c.trainer.max_epochs, c.optim.lr

    assert built() == ("demo", True, 10, 10, 1e-3)                              # as before: auto without data.root
    assert "[trainlib] preset demo (auto: no data.root): model.num_classes=10" in capsys.readouterr().out
    assert built("preset=none") == ("none", True, 157, 50, 1e-4)                # off, still the synthetic data
    assert built("data.root=/d") == ("none", False, 157, 50, 1e-4)              # real data: off unless asked
    # asked for on real data: the size settings, not the synthetic data's class count; your keys win
    assert built("data.root=/d", "--preset", "demo") == ("demo", False, 157, 10, 1e-3)
    assert built("data.root=/d", "preset=demo", "--lr", "0.01", "model.num_classes=20") == ("demo", False, 20, 10, 0.01)
    p = tmp_path / "c.yaml"
    p.write_text("preset: demo\ndata: {root: /d}\ntrainer: {max_epochs: 3}\n")
    assert built("--config", str(p)) == ("demo", False, 157, 3, 1e-3)
    assert built("--config", str(p), "preset=none") == ("none", False, 157, 3, 1e-4)
    with pytest.raises(ConfigError, match=r"^config key 'preset': expected '' \(auto\), demo or none, got 'fast'$"):
        build_config(recipe, ["preset=fast"])


def test_preset_demo_is_what_help_shows():
    from recipes.segformer import recipe
    from trainlib.recipe import USAGE, build_config, preset_help

    text = USAGE.format(module="recipes.segformer", description="", preset=preset_help(recipe))
    for k, v in recipe.demo.items():
        assert f"    {k}={v}" in text
    assert "model.num_labels=6   (synthetic data only)" in text and "preset=none" in text
    c = build_config(recipe, ["--help"])[0]                   # --help shows the defaults ...
    assert (c.data.image_size, c.trainer.max_epochs) == (512, 50)
    c = build_config(recipe, ["--help", "preset=demo"])[0]    # ... or, asked, the preset's values
    assert (c.data.image_size, c.trainer.max_epochs) == (64, 12)


def test_preset_demo_of_a_recipe_without_demo_settings_is_refused():
    import dataclasses

    from recipes.pdan import recipe
    from trainlib.recipe import build_config

    bare = dataclasses.replace(recipe, demo={})
    assert build_config(bare, [])[0].trainer.max_epochs == 50
    with pytest.raises(ConfigError, match="preset=demo: recipe pdan has no demo settings"):
        build_config(bare, ["preset=demo"])
