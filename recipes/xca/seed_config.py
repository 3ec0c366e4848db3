"""The seed project's YAML shape (soft-seg's Lightning configs) read as written.

    model:   {arch_name, image_size, learning_rate, weight_decay, dim, timesteps, num_ensemble, sigma,
              patch_plan, loss, use_ema, ema_decay, log_image_enabled, log_image_names, UNet sizes, ...}
    data:    {name, train_dir, val_dir, test_dir, train_bs, crop_size, image_size, num_samples_per_image}
    trainer: {max_epochs, devices, strategy, precision, check_val_every_n_epoch, accumulate_grad_batches,
              gradient_clip_val, log_every_n_steps, enable_progress_bar, accelerator, callbacks, logger}

`translate(mapping, path)` moves each seed key to its trainlib key (SEED_KEYS says where) and leaves
trainlib's own keys alone, so a file may mix both. A key that is neither ends the run with one line
naming the file and the key, with the closest name of either vocabulary. Keys that only steer
Lightning's machinery and have no effect here (accelerator, experiment_name, data_name, logger
init_args) are accepted and dropped; `trainer.devices` is the launcher's (launch/train_ddp.sh reads
it when neither -g nor -d is given): a run with another process count says so in one line.
A file that names data.train_dir but no data.root trains on real data: root becomes the train
folder's parent (the other splits keep their own folders).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import fields
from typing import Any

from trainlib.config import ConfigError, Config

from .data import XCAData
from .model import XCAModel

# seed key -> trainlib key ("" = accepted and dropped; None = handled by code below)
SEED_KEYS: dict[str, dict[str, str | None]] = {
    "model": {"image_size": "data.image_size", "learning_rate": "optim.lr", "weight_decay": "optim.weight_decay",
              "dim": "model.model_channels", "ema_decay": None, "use_ema": None, "patch_plan": None,
              "loss": None, "num_classes": None, "in_channels": None, "label_dim": None, "augment_dim": None,
              "experiment_name": "", "data_name": ""},
    "data": {"train_bs": "data.batch_size", "crop_size": "data.image_size", "val_bs": "data.val_batch_size"},
    "trainer": {"gradient_clip_val": "trainer.grad_clip", "log_every_n_steps": "log.every_n_steps",
                "devices": None, "strategy": None, "enable_progress_bar": None, "accelerator": "",
                "callbacks": None, "logger": None},
}
EMA_DECAY = 0.9999  # the seed's MedSegDiff default when use_ema is true without ema_decay
_LOGGERS = {"TensorBoardLogger": "tensorboard", "WandbLogger": "wandb", "CSVLogger": "csv"}


def _own_keys() -> dict[str, set[str]]:
    cfg = Config(model=XCAModel(), data=XCAData())
    return {section: {f.name for f in fields(getattr(cfg, section))} for section in ("model", "data", "trainer")}


def _unknown(path: str, section: str, key: str, own: set[str]) -> ConfigError:
    names = sorted(own | set(SEED_KEYS[section]))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {section}.{close[0]}?" if close else f" (keys of {section}: {', '.join(names)})"
    return ConfigError(f"{path}: unknown key {section}.{key}{hint}")


def _put(out: dict, key: str, value: Any) -> None:
    section, name = key.split(".", 1)
    out.setdefault(section, {})[name] = value


def translate(data: dict, path: str) -> dict:
    """The file's mapping with the seed's keys moved to trainlib's (see the module docstring)."""
    out: dict[str, Any] = {}
    own = _own_keys()
    top_images = data.get("log_image_enabled")
    seed_loggers: list[str] = []
    for section, body in data.items():
        if section == "log_image_enabled":
            continue
        if section in SEED_KEYS and body is None:
            body = {}
        if section not in SEED_KEYS or not isinstance(body, dict):  # trainlib's own sections and top-level keys
            if isinstance(body, dict) and isinstance(out.get(section), dict):
                out[section].update(body)  # (a seed key already put something there)
            else:
                out[section] = body
            continue
        for key, value in body.items():
            if key in own[section] and key not in SEED_KEYS[section]:
                _put(out, f"{section}.{key}", value)
            elif key not in SEED_KEYS[section]:
                raise _unknown(path, section, key, own[section])
            elif SEED_KEYS[section][key]:
                _put(out, str(SEED_KEYS[section][key]), value)
            elif SEED_KEYS[section][key] is None:
                _special(out, path, section, key, value, body, seed_loggers)
    if top_images is not None:
        model = out.setdefault("model", {})
        if isinstance(model, dict):
            model.setdefault("log_image_enabled", top_images)
    if seed_loggers:  # after every section: a `log:` section of the file may come before or after
        log = out.setdefault("log", {})
        if isinstance(log, dict):
            log["loggers"] = list(dict.fromkeys([*(log.get("loggers") or ["console", "jsonl"]), *seed_loggers]))
    d = out.get("data", {})
    if isinstance(d, dict) and d.get("train_dir") and not d.get("root"):
        d["root"] = os.path.dirname(str(d["train_dir"]).rstrip("/")) or "."  # real data: no synthetic demo
    return out


def _mapping(path: str, key: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {key} must be a mapping of keys, got {value!r}")
    return value


def _number(path: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: {key}={value!r}: expected a number")
    return float(value)


def _must(path: str, key: str, value: Any, expected: Any, why: str) -> None:
    if value != expected:
        raise ConfigError(f"{path}: {key}={value!r}: only {expected!r} is supported ({why})")


def _special(out: dict, path: str, section: str, key: str, value: Any, body: dict, loggers: list[str]) -> None:
    where = f"{section}.{key}"
    if where == "model.use_ema":
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: model.use_ema={value!r}: expected true or false")
        _put(out, "trainer.ema_decay", body.get("ema_decay", EMA_DECAY) if value else 0.0)
    elif where == "model.ema_decay":
        if "use_ema" not in body:  # (with use_ema, that key decides)
            _put(out, "trainer.ema_decay", value)
    elif where == "model.patch_plan":
        plan = value if isinstance(value, list) else [value]
        crop = body.get("image_size")
        if len(plan) != 1 or not isinstance(plan[0], (list, tuple)) or len(plan[0]) != 2 or \
                (crop is not None and plan[0][0] != crop):
            raise ConfigError(f"{path}: model.patch_plan={value!r}: only one [size, count] entry whose size is the "
                              f"training crop (model.image_size) is supported: the count becomes model.noise_copies")
        _put(out, "model.noise_copies", plan[0][1])
    elif where == "model.loss":
        loss = _mapping(path, "model.loss", value)
        params = _mapping(path, "model.loss.params", loss.get("params"))
        weights = _mapping(path, "model.loss.params.weights", params.get("weights"))
        scheme = params.get("scheme", "l1_bce")
        _must(path, "model.loss.name", loss.get("name", "flow_matching"), "flow_matching", "the seed's flow loss")
        if scheme not in ("l1", "l1_bce"):
            raise ConfigError(f"{path}: model.loss.params.scheme={scheme!r}: expected l1 or l1_bce")
        _must(path, "model.loss.params.weights.l1", _number(path, "model.loss.params.weights.l1", weights.get("l1", 1.0)),
              1.0, "the L1 term is the loss")
        bce = _number(path, "model.loss.params.weights.bce", weights.get("bce", 0.5))
        _put(out, "model.bce_weight", bce if scheme == "l1_bce" else 0.0)
    elif where == "model.num_classes":
        _must(path, where, value, 2, "vessel and background")
    elif where == "model.in_channels":
        _must(path, where, value, 1, "grayscale X-ray images")
    elif where in ("model.label_dim", "model.augment_dim"):
        _must(path, where, value, 0, "no class or augmentation conditioning")
    elif where == "trainer.devices":
        _check_devices(path, value)
    elif where == "trainer.strategy":
        mapped = {"auto": {}, "ddp": {"strategy": "ddp"}, "ddp_spawn": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"},
                  "none": {"strategy": "none"},
                  "ddp_find_unused_parameters_true": {"strategy": "ddp", "find_unused_parameters": True}}
        if value not in mapped:
            raise ConfigError(f"{path}: trainer.strategy={value!r}: expected one of {', '.join(mapped)}")
        for k, v in mapped[value].items():
            _put(out, f"trainer.{k}", v)
    elif where == "trainer.enable_progress_bar":
        _put(out, "log.progress", "auto" if value else "lines")
    elif where == "trainer.callbacks":
        if not isinstance(value, (list, type(None))):
            raise ConfigError(f"{path}: trainer.callbacks must be a list of {{class_path, init_args}}, got {value!r}")
        for cb in value or []:
            _callback(out, path, cb)
    elif where == "trainer.logger":
        for lg in value if isinstance(value, list) else [value]:
            name = str((lg or {}).get("class_path", "")).rsplit(".", 1)[-1] if isinstance(lg, dict) else str(lg)
            if name not in _LOGGERS:
                raise ConfigError(f"{path}: trainer.logger {name or lg!r}: expected one of {', '.join(_LOGGERS)}")
            loggers.append(_LOGGERS[name])


def _callback(out: dict, path: str, cb: Any) -> None:
    name = str(cb.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(cb, dict) else str(cb)
    args = _mapping(path, f"trainer.callbacks {name}.init_args", cb.get("init_args")) if isinstance(cb, dict) else {}
    keys = {"ModelCheckpoint": {"monitor": "trainer.monitor", "mode": "trainer.mode", "save_last": "trainer.save_last",
                                "save_top_k": "trainer.save_top_k", "verbose": "", "filename": "", "dirpath": ""},
            "EarlyStopping": {"monitor": "trainer.monitor", "mode": "trainer.mode",
                              "patience": "trainer.early_stop_patience", "min_delta": "trainer.early_stop_min_delta",
                              "verbose": ""},
            "LearningRateMonitor": {"logging_interval": ""}}
    if name not in keys:
        raise ConfigError(f"{path}: trainer.callbacks: {name or cb!r} has no counterpart here; expected one of "
                          f"{', '.join(keys)} (the engine's checkpointing, early stopping and lr logging)")
    for k, v in args.items():
        if k not in keys[name]:
            raise ConfigError(f"{path}: trainer.callbacks {name}.init_args.{k}: expected one of {', '.join(keys[name])}")
        if keys[name][k]:
            _put(out, keys[name][k], v)


def _check_devices(path: str, value: Any) -> None:
    """trainer.devices is the launcher's: compare with the processes actually running."""
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or value >= 1):
        raise ConfigError(f"{path}: trainer.devices={value!r}: expected -1 (every GPU) or a count >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if value not in (-1, world) and os.environ.get("RANK", "0") == "0":
        print(f"[xca] note: {path} says trainer.devices={value} but {world} process(es) run: the launcher starts "
              f"processes (bash launch/train_ddp.sh -c {path} -d {value}, or torchrun --nproc_per_node={value})",
              flush=True)
