"""The recipe contract: what a training system supplies, and `main()` that runs it.

A recipe owns only what is specific to its system (model, data, loss, metrics); everything else
(loop, DDP, AMP, accumulation, compile, checkpoints, early stopping, logging, resume, export)
comes from the engine. `recipes/<name>/__main__.py` is one line: `main(recipe)`.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import dist
from .preemption import Preempted
from .rundir import disk_error
from .config import (Config, ConfigError, DataConfig, DataError, UserError, help_text, load_yaml, set_value,
                     to_dict)


@dataclass
class Recipe:
    name: str
    model_config: type                      # dataclass of the `model` section (seed's own key names)
    data_config: type                       # dataclass of the `data` section (subclass of DataConfig)
    build_model: Callable[[Any], Any]       # (cfg: Config) -> nn.Module
    build_datasets: Callable[[Any], dict]   # (cfg) -> {"train": ds, "val": ds, "test": ds (optional)}
    loss: Callable[[Any, Any], Any]         # (outputs, batch) -> Tensor | {"loss": t, "weight": n, ...parts}
    build_loss: Optional[Callable[[Any], Callable]] = None    # (cfg) -> loss; wins over `loss` when the loss depends on cfg
    metrics: Callable[[Any], list] = lambda cfg: []          # (cfg) -> [Metric, ...]
    forward: Optional[Callable[[Any, Any], Any]] = None      # (model, batch) -> outputs
    collate: Optional[Callable[[Any], Callable]] = None      # (cfg) -> collate_fn
    make_synthetic: Optional[Callable[..., Any]] = None      # (root, cfg) -> writes a dataset in the real format
    defaults: dict[str, Any] = field(default_factory=dict)   # engine-section defaults of the seed, e.g. {"optim.lr": 1e-4}
    demo: dict[str, Any] = field(default_factory=dict)       # applied only to the synthetic demo (no data.root)
    aliases: dict[str, str] = field(default_factory=dict)    # seed flag names -> config keys, e.g. {"lr": "optim.lr"}
    param_groups: Optional[Callable[[Any, Any], list]] = None  # (model, cfg) -> torch param groups
    callbacks: Optional[Callable[[Any], list]] = None        # (cfg) -> [Callback, ...]
    description: str = ""
    search_space: Optional[Callable[[Any], dict]] = None     # (optuna trial) -> {config key: value}; launch/hyperopt.py


# ------------------------------------------------------------------------------------------------
# Command line

ENGINE_ALIASES = {
    "lr": "optim.lr", "optimizer": "optim.name", "scheduler": "optim.scheduler", "weight_decay": "optim.weight_decay",
    "batch_size": "data.batch_size", "logger": "log.loggers", "wandb_project": "log.wandb_project",
    "log_every_n_steps": "log.every_n_steps", "gradient_clip_val": "trainer.grad_clip",
}
LAUNCHER_FLAGS = {"gpus", "devices", "nproc_per_node", "num_nodes"}

USAGE = """usage: python -m recipes.{name} [--config FILE.yaml] [section.key=value ...]
       torchrun --nproc_per_node=N -m recipes.{name} [--config FILE.yaml] [section.key=value ...]

{description}

Overrides follow the YAML file and win over it. Seed-style flags work too: `--max_epochs 50`,
`--lr 1e-4`, `--mode flow` (a key's last part is enough when it is unique).
Keys (type, default, description):"""


def parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], bool]:
    """-> (yaml path, [(key, raw value)], help wanted). Accepts k=v, --k v, --k=v and bare --flag (true)."""
    config_path, pairs, want_help = None, [], False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            want_help = True
        elif a in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{a} needs a YAML file path")
            config_path, i = argv[i + 1], i + 1
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        elif a.startswith("--"):
            body = a[2:]
            if "=" in body:
                k, v = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1] \
                    and argv[i + 1] not in ("-h", "-c"):
                k, v, i = body, argv[i + 1], i + 1
            else:
                k, v = body, "true"
            pairs.append((k.replace("-", "_"), v))
        elif "=" in a:
            k, v = a.split("=", 1)
            pairs.append((k, v))
        else:
            raise ConfigError(f"unexpected argument {a!r}: overrides look like section.key=value (see --help)")
        i += 1
    return config_path, pairs, want_help


def build_config(recipe: Recipe, argv: list[str]) -> tuple[Config, bool, bool]:
    """-> (config, help wanted, synthetic demo). Order: code defaults < recipe defaults <
    demo settings (only without data.root) < YAML file < command line."""
    from .config import validate

    config_path, pairs, want_help = parse_cli(argv)
    aliases = {**ENGINE_ALIASES, **recipe.aliases}
    for k, v in pairs:
        if k in LAUNCHER_FLAGS:
            raise ConfigError(f"--{k} picks the number of processes, which the launcher owns: use "
                              f"`torchrun --nproc_per_node=N -m recipes.{recipe.name}` or `launch/train_ddp.sh -g/-d`")
        if k == "recipe" and v != recipe.name:
            raise ConfigError(f"recipe={v}: this is recipe {recipe.name}; run python -m recipes.{v} instead")

    def fresh() -> Config:
        cfg = Config(model=recipe.model_config(), data=recipe.data_config(), recipe=recipe.name)
        for k, v in recipe.defaults.items():
            set_value(cfg, k, v)
        return cfg

    def apply_user(cfg: Config) -> None:
        if config_path:
            load_yaml(cfg, config_path)
        for k, v in pairs:
            set_value(cfg, k, v, aliases)

    probe = fresh()
    apply_user(probe)
    demo = not probe.data.root and not want_help
    cfg = fresh()
    if demo:
        user_keys = set()
        scratch = fresh()
        if config_path:
            user_keys |= _yaml_keys(config_path)
        for k, v in pairs:
            user_keys.add(set_value(scratch, k, v, aliases))
        for k, v in recipe.demo.items():
            if k not in user_keys:
                set_value(cfg, k, v)
    apply_user(cfg)
    if not want_help:
        validate(cfg)  # every range, once, before a process group, a dataset or a run directory exists
    return cfg, want_help, demo


def _yaml_keys(path: str) -> set[str]:
    from .config import read_yaml

    data = read_yaml(path)

    def walk(d: dict, prefix: str) -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            out |= walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return out

    return walk(data, "")


def synthetic_root(recipe: Recipe, cfg: Config) -> Path:
    """Cache folder for the demo dataset, keyed by everything that shapes it."""
    common = {f.name for f in dataclasses.fields(DataConfig)}
    key_src = json.dumps({"recipe": recipe.name, "model": to_dict(cfg.model),
                          "data": {k: v for k, v in to_dict(cfg.data).items() if k not in common}}, sort_keys=True)
    digest = hashlib.sha1(key_src.encode()).hexdigest()[:10]
    base = Path(os.environ.get("TRAINLIB_CACHE", Path.home() / ".cache" / "trainlib"))
    return base / f"{recipe.name}-synthetic-{digest}"


def prepare_synthetic(recipe: Recipe, cfg: Config) -> None:
    """Rank 0 writes the demo dataset once (into a temp folder, renamed when complete); all ranks use it."""
    if recipe.make_synthetic is None:
        raise ConfigError(f"data.root is required: recipe {recipe.name} has no synthetic demo data")
    root = synthetic_root(recipe, cfg)
    error = ""
    if dist.rank() == 0 and not (root / ".complete").exists():
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            recipe.make_synthetic(str(tmp), cfg)
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        except Exception as e:  # reported on every rank below
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"could not write the synthetic dataset to {root}: {type(e).__name__}: {e}"
    error = dist.broadcast_object(error)
    if error:
        raise DataError(error)
    cfg.data.root = str(root)
    if dist.rank() == 0:
        print(f"[trainlib] no data.root given: training on a synthetic {recipe.name} dataset in the real format at {root}",
              flush=True)


def run(recipe: Recipe, cfg: Config, demo: bool = False, *, callbacks: Sequence[Any] = (),
        datasets_hook: Optional[Callable[[dict], dict]] = None) -> dict[str, float]:
    """Build everything from a resolved config and train (or test). `callbacks` join the recipe's;
    `datasets_hook(splits) -> splits` may replace the splits (hyperopt: a train subset, train+val)."""
    from .trainer import Trainer

    device = dist.pick_device(cfg.trainer.device, dist.env_from_torchrun())
    dist.init(device, cfg.trainer.ddp_timeout)
    if demo:
        prepare_synthetic(recipe, cfg)
    datasets = recipe.build_datasets(cfg)
    if datasets_hook is not None:
        datasets = datasets_hook(datasets)
    dist.seed_everything(cfg.trainer.seed, 0)  # identical, reproducible initial weights on every rank
    model = recipe.build_model(cfg)
    trainer = Trainer(
        model, recipe.build_loss(cfg) if recipe.build_loss else recipe.loss, datasets.get("train") if not cfg.trainer.test_only else None,
        datasets.get("val"), datasets.get("test"), config=cfg,
        metrics=lambda: recipe.metrics(cfg), forward_fn=recipe.forward,
        collate_fn=recipe.collate(cfg) if recipe.collate else None,
        callbacks=[*(recipe.callbacks(cfg) if recipe.callbacks else ()), *callbacks],
        param_groups=recipe.param_groups(model, cfg) if recipe.param_groups else None, name=recipe.name)
    if cfg.trainer.test_only:
        if not cfg.trainer.ckpt_path:
            raise ConfigError("trainer.test_only=true needs trainer.ckpt_path=<checkpoint to evaluate>")
        result = trainer.test(cfg.trainer.ckpt_path)
    else:
        result = trainer.fit()
    if dist.rank() == 0:
        shown = "  ".join(f"{k}={v:.4f}" for k, v in result.items())
        print(f"[trainlib] final: {shown}  (run directory: {trainer.run_dir})", flush=True)
    return result


def guarded(body: Callable[[], Any]) -> int:
    """Run `body` with trainlib's exit policy and return the process exit code.

    bad input (UserError)      one line `error: ...`, exit 2, nothing written is touched
    full / read-only disk      one line `error: cannot write <file>: ...`, exit 2
    SIGTERM / SIGINT           last.ckpt saved by the trainer, exit 143 / 130 (Preempted)
    any other exception        under torchrun: `[rank r] failed: ...` then the traceback (exit 1), so
                               torchrun's summary and the log both name the failing rank; a rank whose
                               collective broke because a peer died says so in one line (exit 1)
    """
    def say(text: str) -> None:
        prefix = f"[rank {dist.rank()}] " if dist.world_size() > 1 else ""
        print(prefix + text, file=sys.stderr, flush=True)

    try:
        body()
        dist.barrier()  # leave together: a gloo peer torn down while the other still talks aborts the process
        return 0
    except UserError as e:
        say(f"error: {e}")
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # a write the trainer does not guard itself (a log file, history.json): still one line
        say(f"error: {disk_error(e, e.filename or 'a file')}")
        return 2
    except Preempted as e:
        say(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as e:
        if dist.world_size() > 1:
            if _peer_failure(e):
                say("stopped: a collective failed, most likely because another rank died (its error is reported "
                    f"above or by torchrun): {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                return 1
            say(f"failed: {type(e).__name__}: {e}")
        raise
    finally:
        dist.shutdown()


def _peer_failure(e: BaseException) -> bool:
    import torch.distributed as torch_dist

    text = str(e)
    return isinstance(e, getattr(torch_dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Broken pipe"))


def exit_process(code: int) -> None:
    """End the process with `code`. Under torchrun, skip the interpreter's teardown once everything
    is flushed and the process group is destroyed: gloo's C++ threads were seen (rarely, on a loaded
    machine) to abort a finished rank in teardown ("terminate called without an active exception"),
    turning a successful run into a failure that torchrun would even restart."""
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)


def main(recipe: Recipe, argv: list[str] | None = None) -> int:
    """Entry point of `python -m recipes.<name>` (see `guarded` for the exit codes)."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        cfg, want_help, demo = build_config(recipe, argv)
        if want_help:
            print(USAGE.format(name=recipe.name, description=recipe.description) + help_text(cfg))
            return
        run(recipe, cfg, demo)

    return guarded(body)
