"""The search space of a study: which config keys a trial varies, and over which values.

A space comes from `hpo.space` (YAML or the command line: {config key: {type: float|int|categorical,
low, high, log, step, choices}}), else from the recipe's `search_space(trial)` function, else from
`default_space`. Every value a trial may get is checked against the config before the study starts
(`check_space`; `probe_search_space` drives a recipe's function with stand-in trials), so a bad key
or an out-of-bounds end is one error at start, not the same failure in every trial. A trial's
values are then plain config overrides (`apply_params`), as `key=value` on the command line.

Optuna is not imported here: the functions take its trial object (or a stand-in) as given.
"""
from __future__ import annotations

import copy
from typing import Any

from .config import ConfigError, check_key, resolve_key, set_value, validate
from .study_setup import Setup, StudyError


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

