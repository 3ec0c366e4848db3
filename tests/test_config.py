"""Config tree: typed overrides, YAML, errors that name the key, --help."""
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
