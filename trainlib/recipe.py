"""The recipe contract: what a training system supplies, the registry that finds one, and `main()` that runs it.

A recipe owns only what is specific to its system (model, data, loss, metrics); everything else
(loop, DDP, AMP, accumulation, compile, checkpoints, early stopping, logging, resume, export)
comes from the engine. `recipes/<name>/__main__.py` is one line: `main(recipe)`.

The engine never imports a recipe package: tools that need one (the Optuna search, `load_model`)
call `find_recipe(ref)`, where ref is a name registered in the `trainlib.recipes` entry-point group
or a module path, so a recipe package outside this repository works wherever a built-in one does.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import dist
from .preemption import Preempted
from .rundir import disk_error
from .cli import ENGINE_ALIASES, LAUNCHER_FLAGS, launcher_hint, parse_cli, switched  # noqa: F401 (hpo imports some)
from .stages import Stage, freeze_except, run_stages
from .stages import select as select_stages
from .config import (Config, ConfigError, DataConfig, DataError, UserError, apply_dict, help_text, read_yaml,
                     set_value, to_dict, validate)


@dataclass
class Recipe:
    name: str
    model_config: type                      # dataclass of the `model` section (seed's own key names)
    data_config: type                       # dataclass of the `data` section (subclass of DataConfig)
    build_model: Callable[[Any], Any]       # (cfg: Config) -> nn.Module
    build_datasets: Callable[[Any], dict]   # (cfg) -> {"train": ds, "val": ds, "test": ds (optional)}
    loss: Optional[Callable[[Any, Any], Any]] = None      # (outputs, batch) -> Tensor | {"loss": t, "weight": n, ...parts}
    build_loss: Optional[Callable[[Any], Callable]] = None    # (cfg) -> loss, when it depends on cfg (wins over `loss`)
    metrics: Callable[[Any], list] = lambda cfg: []          # (cfg) -> [Metric, ...]
    forward: Optional[Callable[[Any, Any], Any]] = None      # (model, batch) -> outputs
    predict: Optional[Callable[[Any, Any], Any]] = None      # (model, batch) -> what the metrics see at evaluation (all
    #                                        views, sampling, generation); val/loss stays the training forward's
    loss_from_predict: bool = False                          # val/loss from predict's outputs: one forward, not two
    collate: Optional[Callable[[Any], Callable]] = None      # (cfg) -> collate_fn
    make_synthetic: Optional[Callable[..., Any]] = None      # (root, cfg) -> writes a dataset in the real format
    defaults: dict[str, Any] = field(default_factory=dict)   # engine-section defaults of the seed, e.g. {"optim.lr": 1e-4}
    demo: dict[str, Any] = field(default_factory=dict)       # applied only to the synthetic demo (no data.root)
    aliases: dict[str, str] = field(default_factory=dict)    # seed flag names -> config keys, e.g. {"lr": "optim.lr"},
    #                                        or a switch -> key=value: {"mixed_precision": "trainer.precision=16-mixed"}
    param_groups: Optional[Callable[[Any, Any], list]] = None  # (model, cfg) -> torch param groups
    blocks: Optional[Callable[[Any], list]] = None           # (model) -> its repeated blocks (submodules or dotted
    #                                        names, e.g. the transformer layers): the FSDP units (trainlib/fsdp.py)
    stages: list[Stage] = field(default_factory=list)        # named stages (trainlib/stages.py); stage=NAME|all
    callbacks: Optional[Callable[[Any], list]] = None        # (cfg) -> [Callback, ...]
    build_optimizer: Optional[Callable[[Any, Any], Any]] = None  # (params, cfg) -> torch optimizer; wins over optim.name
    build_scheduler: Optional[Callable[..., Any]] = None     # (optimizer, total_steps, cfg) -> torch LR scheduler,
    #                                        stepped once per optimizer step; wins over optim.scheduler
    description: str = ""
    search_space: Optional[Callable[[Any], dict]] = None     # (optuna trial) -> {config key: value}; launch/hyperopt.py
    prediction_writer: Optional[Callable[[Any, str], Any]] = None  # (cfg, split) -> evaluation.PredictionWriter:
    #                                        prediction files at the final test; build_datasets' splits other than
    #                                        train/val/test (no labels, e.g. a challenge set) are predicted into it
    inference_overrides: dict[str, Any] = field(default_factory=dict)  # keys load_model sets before build_model,
    #                                        e.g. {"model.pretrained": ""}: the saved weights replace start-from weights
    image_logger: Optional[Callable[[Any], Any]] = None      # (cfg) -> images.ImageCollector | None: images
    #                                        logged at every validation (PNG files, TensorBoard, wandb)
    config_file: Optional[Callable[[dict, str], dict]] = None  # (a config file's mapping, its path) -> the mapping
    #                                        in trainlib's sections: reads the seed project's own config-file shape

    def __post_init__(self) -> None:
        if self.loss is None and self.build_loss is None:
            raise ConfigError(f"recipe {self.name!r}: give loss(outputs, batch) or build_loss(cfg); got neither")


# ------------------------------------------------------------------------------------------------
# Registry: a recipe by registered name or by module path

ENTRY_POINT_GROUP = "trainlib.recipes"

REGISTER_HINT = ("register one in your package's setup.cfg ([options.entry_points] trainlib.recipes = "
                 "NAME = mypkg.myrecipe:recipe, then pip install it) or pass its module path "
                 "(mypkg.myrecipe, whose `recipe` is a trainlib Recipe, or mypkg.mod:attr)")

# recipes found by module path -> that path, so a run of one stores what finds it again
_found_by_path: dict[int, tuple[Recipe, str]] = {}


def _registered() -> dict[str, list[Any]]:
    """name -> the entry points of that name in the `trainlib.recipes` group (more than one only when
    two installed packages claim the name with different targets)."""
    from importlib.metadata import entry_points

    out: dict[str, list[Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if all(e.value != ep.value for e in out.get(ep.name, [])):
            out.setdefault(ep.name, []).append(ep)
    return out


def available_recipes() -> list[str]:
    """The registered recipe names (installed packages' `trainlib.recipes` entry points)."""
    return sorted(_registered())


def _import(module: str, ref: str, registered_as: str = "") -> Any:
    """The module, or None when it (or a package above it) does not exist; an import error raised
    inside an existing module is the recipe's own bug and goes up as is."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        if registered_as:
            raise ConfigError(f"recipe={ref}: registered as {registered_as}, but module {module} is not "
                              f"installed: reinstall the package that registers it") from None
        return None


def _unknown(ref: str) -> ConfigError:
    names = available_recipes()
    return ConfigError(f"unknown recipe {ref!r}: neither a registered name (registered: {', '.join(names) or 'none'}) "
                       f"nor an importable module path; to use your own, {REGISTER_HINT}")


def find_recipe(ref: str) -> Recipe:
    """The Recipe that `ref` names: a registered name (`pdan`) or a module path (`mypkg.myrecipe` with
    a `recipe` attribute, or `mypkg.mod:attr`). A name registered by an installed package wins."""
    ref = str(ref).strip()
    if not ref:
        raise ConfigError(f"no recipe given: name a registered one ({', '.join(available_recipes()) or 'none'}) "
                          f"or a module path")
    registered = _registered().get(ref)
    if registered:
        if len(registered) > 1:
            raise ConfigError(f"recipe={ref} is registered more than once ("
                              + ", ".join(ep.value for ep in registered) + "): pass the module path instead")
        ep = registered[0]
        module_name, _, attr = ep.value.partition(":")
        module_name, attr = module_name.strip(), attr.strip()
        obj = _import(module_name, ref, registered_as=ep.value)
        for part in attr.split(".") if attr else []:
            if not hasattr(obj, part):
                raise ConfigError(f"recipe={ref}: registered as {ep.value}, but module {module_name} has no "
                                  f"`{attr}`: fix the entry point of the package that registers it")
            obj = getattr(obj, part)
        where = f"entry point {ref} = {ep.value}"
    else:
        module_name, colon, attr = ref.partition(":")
        attr = attr if colon else "recipe"
        if not all(p.isidentifier() for p in module_name.split(".")) or not attr.isidentifier():
            raise _unknown(ref)
        module = _import(module_name, ref)
        if module is None:
            raise _unknown(ref)
        if not hasattr(module, attr):
            raise ConfigError(f"recipe={ref}: module {module_name} has no `{attr}`; expected "
                              f"`{attr} = Recipe(...)` in it" + ("" if colon else " (or name another attribute: "
                                                                  f"{module_name}:ATTR)"))
        obj, where = getattr(module, attr), f"{module_name}.{attr}"
    if not isinstance(obj, Recipe):
        raise ConfigError(f"recipe={ref}: {where} is {type(obj).__name__}, not a trainlib.recipe.Recipe")
    if not registered:
        _found_by_path.setdefault(id(obj), (obj, module_name if attr == "recipe" else f"{module_name}:{attr}"))
    return obj


def recipe_ref(recipe: Recipe) -> str:
    """What a run stores as its config's `recipe`: the string `find_recipe` turns back into this recipe,
    so `load_model` and the tools rebuild it. Its registered name when it is the registered one; else
    the module path it was found by or is importable from (no registration needed); else its name."""
    eps = _registered().get(recipe.name, [])
    if len(eps) == 1:
        try:
            if eps[0].load() is recipe:
                return recipe.name
        except Exception:  # noqa: BLE001  a broken registration of the same name: not this recipe
            pass
    found = _found_by_path.get(id(recipe))
    if found is not None and found[0] is recipe:
        return found[1]
    holders = [name for name, m in list(sys.modules.items())  # not __main__ / __mp_main__: no path finds them
               if not name.startswith("__") and isinstance(getattr(m, "__dict__", None), dict)
               and m.__dict__.get("recipe") is recipe]
    return min(holders, key=lambda n: (n.count("."), n)) if holders else recipe.name


def _module_of(ref: str) -> str:
    """The module to name in `python -m MODULE` for a recipe reference (help text, error hints)."""
    eps = _registered().get(ref, [])
    if len(eps) == 1:
        return eps[0].value.partition(":")[0].strip()
    return ref.partition(":")[0]


def _is_recipe(ref: str, recipe: Recipe, own_ref: str) -> bool:
    """Whether `ref` (a `recipe=` argument, a config file's `recipe:`) names `recipe`."""
    if ref in (recipe.name, own_ref):
        return True
    try:
        return find_recipe(ref) is recipe
    except (ConfigError, ImportError):
        return False


# ------------------------------------------------------------------------------------------------
# Command line


USAGE = """usage: python -m {module} [--config FILE.yaml] [section.key=value ...]
       torchrun --nproc_per_node=N -m {module} [--config FILE.yaml] [section.key=value ...]

{description}

Overrides follow the YAML file and win over it. Seed-style flags work too: `--max_epochs 50`,
`--lr 1e-4`, `--mode flow` (a key's last part is enough when it is unique).
{preset}
Keys (type, default, description):"""


def preset_help(recipe: Recipe) -> str:
    """What `preset=demo` changes, for --help (USAGE's `{preset}`)."""
    if not recipe.demo:
        return "Preset: this recipe has no demo settings (preset=demo is refused).\n"
    rows = "".join(f"    {k}={v}{'   (synthetic data only)' if k.startswith('model.') else ''}\n"
                   for k, v in recipe.demo.items())
    return ("Preset `demo` (preset=demo or --preset demo), on by default without data.root (the synthetic\n"
            "demo data); preset=demo applies it to your data too, preset=none turns it off. Keys you set\n"
            "yourself (file or command line) win. It sets:\n" + rows +
            "The help below shows the defaults without the preset (add preset=demo to see them with it).\n")


def build_config(recipe: Recipe, argv: list[str], stage: Stage | None = None) -> tuple[Config, bool, bool]:
    """-> (config, help wanted, synthetic demo). Order: code defaults < recipe defaults < the
    stage's overrides < demo settings (the recipe's, then the stage's; only without data.root) < YAML
    file < command line."""
    config_path, pairs, want_help = parse_cli(argv)
    ref = recipe_ref(recipe)
    for k, v in pairs:
        if k == "recipe" and not _is_recipe(v, recipe, ref):
            raise ConfigError(f"recipe={v}: this is recipe {recipe.name}; run python -m {_module_of(v)} instead")
    file_data: dict = {}
    if config_path:
        file_data = read_yaml(config_path)
        named = file_data.pop("recipe", None)
        if named and not _is_recipe(str(named), recipe, ref):
            raise ConfigError(f"config file {config_path} is for recipe {named}, but this is recipe {recipe.name}: "
                              f"run it with python -m {_module_of(str(named))} --config {config_path}, or pass "
                              f"a config file of recipe {recipe.name}")
    cfg, demo = make_config(recipe, file_data, config_path or "", [(k, v) for k, v in pairs if k != "recipe"],
                            want_help, stage)
    if cfg.stage and not recipe.stages:
        raise ConfigError(f"stage={cfg.stage}: recipe {recipe.name} has no stages")
    if recipe.stages:
        select_stages(recipe.stages, cfg.stage)  # a stage name that does not exist fails here
    return cfg, want_help, demo


def make_config(recipe: Recipe, file_data: dict, source: str, pairs: list[tuple[str, Any]],
                want_help: bool = False, stage: Stage | None = None) -> tuple[Config, bool]:
    """-> (config, synthetic demo) from a config file's mapping (already read, without its `recipe:`;
    `source` names the file in errors) and `key=value` pairs, in build_config's order. The Optuna
    search calls it too, with the file's `hpo:` section taken out."""
    aliases = {**ENGINE_ALIASES, **recipe.aliases}
    ref = recipe_ref(recipe)
    if recipe.config_file is not None and file_data:
        file_data = recipe.config_file(file_data, source)
    launcher = {k: v for k, v in pairs if k in LAUNCHER_FLAGS}
    if launcher:
        raise ConfigError(launcher_hint(launcher, pairs, _module_of(ref)))
    pairs = switched(pairs, aliases)
    aliases = {k: v for k, v in aliases.items() if "=" not in v}

    def fresh() -> Config:
        cfg = Config(model=recipe.model_config(), data=recipe.data_config(), recipe=ref)
        for k, v in {**recipe.defaults, **(stage.overrides if stage else {})}.items():
            set_value(cfg, k, v)
        return cfg

    def apply_user(cfg: Config) -> None:
        apply_dict(cfg, file_data, source)
        for k, v in pairs:
            set_value(cfg, k, v, aliases)

    probe = fresh()
    apply_user(probe)
    demo = not probe.data.root and not want_help
    # preset=demo: the recipe's demo settings under the user's keys, on any data; '' (auto): demo
    # without data.root; none: never. model.* keys describe the synthetic data (its classes), so real
    # data keeps its own.
    preset = probe.preset or ("demo" if demo else "none")
    if probe.preset == "demo" and not recipe.demo:
        raise ConfigError(f"preset=demo: recipe {recipe.name} has no demo settings")
    cfg = fresh()
    applied: list[str] = []
    if preset == "demo":
        scratch = fresh()
        user_keys = _leaf_keys(file_data, "") | {set_value(scratch, k, v, aliases) for k, v in pairs}
        for k, v in {**recipe.demo, **(stage.demo if stage else {})}.items():
            if k not in user_keys and (not probe.data.root or not k.startswith("model.")):
                set_value(cfg, k, v)
                applied.append(f"{k}={v}")
    apply_user(cfg)
    if not want_help:
        cfg.preset = preset  # the resolved preset, as config.yaml records it
        validate(cfg)  # every range, once, before a process group, a dataset or a run directory exists
        if applied and os.environ.get("RANK", "0") == "0":
            print(f"[trainlib] preset demo ({'auto: no data.root' if not probe.preset else 'preset=demo'}): "
                  f"{' '.join(applied)} (keys you set win; preset=none turns it off)", flush=True)
    return cfg, demo


def _leaf_keys(d: dict, prefix: str) -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        out |= _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


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


def build_trainer(recipe: Recipe, cfg: Config, demo: bool = False, *, callbacks: Sequence[Any] = (),
                  datasets_hook: Optional[Callable[[dict], dict]] = None, trains: list[str] | None = None) -> Any:
    """The Trainer a resolved config describes: process group, demo data, datasets, model. `callbacks`
    join the recipe's; `datasets_hook(splits) -> splits` may replace the splits (hyperopt: a train
    subset, train+val); `trains` (a stage's module prefixes) freezes every other parameter."""
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
    freeze_except(model, trains)
    return Trainer(
        model, recipe.build_loss(cfg) if recipe.build_loss else recipe.loss,
        datasets.get("train") if not cfg.trainer.test_only else None, datasets.get("val"), datasets.get("test"),
        predict_data={k: v for k, v in datasets.items() if k not in ("train", "val", "test") and v is not None},
        prediction_writer=(lambda split: recipe.prediction_writer(cfg, split)) if recipe.prediction_writer else None,
        image_logger=(lambda: recipe.image_logger(cfg)) if recipe.image_logger else None,
        config=cfg, metrics=lambda: recipe.metrics(cfg), forward_fn=recipe.forward, predict_fn=recipe.predict,
        loss_from_predict=recipe.loss_from_predict, collate_fn=recipe.collate(cfg) if recipe.collate else None,
        callbacks=[*(recipe.callbacks(cfg) if recipe.callbacks else ()), *callbacks],
        param_groups=recipe.param_groups(model, cfg) if recipe.param_groups else None, name=recipe.name,
        blocks=recipe.blocks,
        optimizer=(lambda params: recipe.build_optimizer(params, cfg)) if recipe.build_optimizer else None,
        scheduler=(lambda opt, total: recipe.build_scheduler(opt, total, cfg)) if recipe.build_scheduler else None)


def run(recipe: Recipe, cfg: Config, demo: bool = False, *, callbacks: Sequence[Any] = (),
        datasets_hook: Optional[Callable[[dict], dict]] = None) -> dict[str, float]:
    """Build the Trainer (build_trainer) and train, or test with trainer.test_only."""
    trainer = build_trainer(recipe, cfg, demo, callbacks=callbacks, datasets_hook=datasets_hook)
    result = trainer.test(cfg.trainer.ckpt_path) if cfg.trainer.test_only else trainer.fit()
    if dist.rank() == 0:
        from .run_summary import one_line  # the end-of-run summary (summary.json), in one line

        label = "test" if cfg.trainer.test_only else "final"
        shown = "" if cfg.trainer.test_only else one_line(getattr(trainer, "summary", None))
        shown = shown or "  ".join(f"{k}={v:.4f}" for k, v in result.items())
        print(f"[trainlib] {label}: {shown}  (run directory: {trainer.run_dir})", flush=True)
    return result


def guarded(body: Callable[[], Any]) -> int:
    """Run `body` with trainlib's exit policy and return the process exit code.

    bad input (UserError)      one line `error: ...`, exit 2, nothing written is touched; under torchrun
                               every rank ends so: the message goes to the other ranks (the rendezvous
                               store) and to torchrun's error file (its summary shows it, not a hint)
    full / read-only disk      one line `error: cannot write <file>: ...`, exit 2 (shared the same way)
    SIGTERM / SIGINT           last.ckpt saved by the trainer, exit 143 / 130 (Preempted)
    any other exception        under torchrun: `[rank r] failed: ...` then the traceback (exit 1), so
                               torchrun's summary and the log both name the failing rank; a rank whose
                               collective broke because a peer died says so in one line (exit 1)
    """
    def say(text: str) -> None:
        env = dist.env_from_torchrun()  # (also before the process group exists: a config error)
        prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
        print(prefix + text, file=sys.stderr, flush=True)

    try:
        body()
        dist.barrier()  # leave together: a gloo peer torn down while the other still talks aborts the process
        return 0
    except UserError as e:
        say(f"error: {e}")
        _share_user_error(str(e))
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # a write the trainer does not guard itself (a log file, history.json): still one line
        say(f"error: {disk_error(e, e.filename or 'a file')}")
        _share_user_error(str(disk_error(e, e.filename or 'a file')))
        return 2
    except Preempted as e:
        say(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as e:
        if dist.world_size() > 1:
            told = _peer_user_error() if _peer_failure(e) else ""
            if told:  # another rank stopped on bad input: the same one line and exit code here
                say(f"error: {told}")
                _record_for_torchrun(told)
                return 2
            if _peer_failure(e):
                say("stopped: a collective failed, most likely because another rank died (its error is reported "
                    f"above or by torchrun): {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                return 1
            say(f"failed: {type(e).__name__}: {e}")
        raise
    finally:
        dist.shutdown()


USER_ERROR_KEY = "trainlib/user_error"


def _record_for_torchrun(text: str) -> None:
    """torchrun's error file (TORCHELASTIC_ERROR_FILE): its failure summary then shows this line as the
    root cause instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as fh:
                json.dump({"message": {"message": f"error: {text}", "extraInfo": {  # torchrun's own format
                    "py_callstack": f"error: {text}", "timestamp": str(int(time.time()))}}}, fh)
        except OSError:
            pass


def _share_user_error(text: str) -> None:
    """What ended this rank, for torchrun and for the other ranks: their collective breaks when this
    process leaves, and they end with the same line and exit code 2 (_peer_user_error)."""
    _record_for_torchrun(text)
    if dist.world_size() > 1:
        try:
            import torch.distributed as torch_dist

            torch_dist.distributed_c10d._get_default_store().set(USER_ERROR_KEY, f"{text} (rank {dist.rank()})")
        except Exception:  # noqa: BLE001  no store (process group not up yet): the peers see a broken collective
            pass


def _peer_user_error(wait_s: float = 2.0) -> str:
    """The bad-input message another rank left in the rendezvous store ('' if none)."""
    import torch.distributed as torch_dist

    try:
        store = torch_dist.distributed_c10d._get_default_store()
        deadline = time.monotonic() + wait_s  # the peer sets it before it exits; allow for the race
        while True:
            if store.check([USER_ERROR_KEY]):
                return store.get(USER_ERROR_KEY).decode()
            if time.monotonic() > deadline:
                return ""
            time.sleep(0.05)
    except Exception:  # noqa: BLE001  the store went with the failed rank (torchrun's agent store outlives it)
        return ""


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
    """Entry point of `python -m recipes.<name>` and of a user's recipe package (see `guarded` for the
    exit codes). The run's config stores `recipe_ref(recipe)`, which `find_recipe` resolves again."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        cfg, want_help, demo = build_config(recipe, argv)
        if want_help:
            print(USAGE.format(module=_module_of(cfg.recipe), description=recipe.description,
                               preset=preset_help(recipe)) + help_text(cfg))
            return
        if recipe.stages and not cfg.trainer.test_only:
            run_stages(recipe, argv, cfg, build_config, build_trainer)
        else:
            run(recipe, cfg, demo)

    return guarded(body)
