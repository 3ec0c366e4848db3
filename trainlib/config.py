"""Typed configuration: a tree of dataclasses, YAML files and `section.key=value` overrides.

Why dataclasses: defaults live in code next to their type and help text, so `--help`, type
checking and "did you mean" suggestions come for free, and a run is reproducible from the
resolved tree that is written to the run directory and stored in every checkpoint.

    cfg = Config(model=PDANModel(), data=CharadesData())
    apply_overrides(cfg, ["trainer.max_epochs=5", "optim.lr=3e-4"])
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

import yaml


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint): reported as one clear line, no traceback.

    Raised in a DataLoader worker (a clip that does not decode), torch re-raises it in the main
    process as the same class with the worker's whole traceback as the message; the message is
    cut back to what the dataset said."""

    def __init__(self, *args: Any) -> None:
        text = args[0] if len(args) == 1 and isinstance(args[0], str) else ""
        name = f"{type(self).__name__}: "
        if text.startswith("Caught ") and "\nOriginal Traceback" in text and name in text:
            args = (text[text.rfind(name) + len(name):].strip(),)
        super().__init__(*args)


class ConfigError(UserError, ValueError):
    """A bad key or value; the message names it and says what was expected."""


class DataError(UserError, ValueError):
    """A dataset that cannot be read as expected; the message names the file and what was expected."""


# Spellings users of Lightning and the seed projects type, mapped to ours.
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "trainer.precision": {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "16-true": "16-mixed"},
    "log.progress": {"False": "off", "True": "auto"},  # YAML reads `off` (and no, false) as a boolean
}


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric key (or of every number in a list key), written next to the
    key with `opt(..., ge=0)`: checked once when the config is built (`validate`), shown by `--help`,
    and used to check Optuna search spaces. `length` fixes a list's length; `check(value)` returns
    an error text for rules a range cannot say (it sees the whole value)."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | None = None
    check: Any = None

    def describe(self) -> str:
        low = f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}" if self.gt is not None else ""
        high = f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}" if self.lt is not None else ""
        if low and high:
            lo_b = "[" if self.ge is not None else "("
            hi_b = "]" if self.le is not None else ")"
            lo_v = self.ge if self.ge is not None else self.gt
            hi_v = self.le if self.le is not None else self.lt
            return f"in {lo_b}{_num(lo_v)}, {_num(hi_v)}{hi_b}"
        return low or high

    def text(self) -> str:
        """Everything a user may set, for --help: the range, the list length and the check's rule."""
        parts = [self.describe(), f"{self.length} values" if self.length is not None else "",
                 getattr(self.check, "expected", "")]
        return ", ".join(p for p in parts if p)

    def number_ok(self, x: float) -> bool:
        return not ((self.ge is not None and not x >= self.ge) or (self.gt is not None and not x > self.gt)
                    or (self.le is not None and not x <= self.le) or (self.lt is not None and not x < self.lt))

    def violation(self, value: Any) -> str:
        """'' when `value` is allowed, else what was expected."""
        if self.check is not None:
            text = self.check(value)
            if text:
                return text
        if isinstance(value, (list, tuple)):
            if self.length is not None and len(value) != self.length:
                return f"a list of {self.length} values"
            items = value
        else:
            items = [value]
        rng = self.describe()
        for x in items:
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                if not math.isfinite(x) or not self.number_ok(x):  # NaN and inf fail every range
                    return (f"values {rng}" if isinstance(value, (list, tuple)) else f"a value {rng}") if rng else ""
        return ""


def _num(x: float) -> str:
    """2**32 - 1 as 4294967295, not 4.29497e+09; 1e-8 as 1e-08."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def rule(expected: str, ok: Callable[[Any], bool]) -> Callable[[Any], str]:
    """A `check` for opt(..., check=...): '' when ok(value), else `expected` (what --help shows too)."""
    def check(value: Any) -> str:
        try:
            return "" if ok(value) else expected
        except (TypeError, ValueError, ConfigError):
            return expected
    check.expected = expected  # type: ignore[attr-defined]
    return check


LOGGERS = ("console", "jsonl", "csv", "tensorboard", "wandb")  # loggers.py builds them
_COUNT_OR_ALL = rule("a count >= 0, or -1 for all", lambda v: v >= -1)


def _duration_ok(text: str) -> bool:
    seconds = parse_duration(text)
    return len(str(text).split(":")) <= 4 and seconds >= 0 and seconds == seconds


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, length: int | None = None, check: Any = None) -> Any:
    """A dataclass field with a one-line description (shown by `--help`) and, for numbers, its
    allowed range (`ge`/`gt`/`le`/`lt`; see `Bounds`)."""
    meta: dict[str, Any] = {"help": help}
    if any(b is not None for b in (ge, gt, le, lt, length, check)):
        meta["bounds"] = Bounds(ge, gt, le, lt, length, check)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def bounds_of(f: dataclasses.Field) -> Bounds | None:
    return f.metadata.get("bounds")


def validate(cfg: Any) -> None:
    """Every key against its declared bounds, once, when the config is built (before a process
    group, a dataset or a model exists). ConfigError naming the key, the value and the range."""
    for key, (owner, f, tp) in leaves(cfg).items():
        value = getattr(owner, f.name)
        _coerce(value, tp, key, value)  # the type or choice (a notebook's dataclasses skip set_value)
        _check(key, owner, f)
    trainer, optim = getattr(cfg, "trainer", None), getattr(cfg, "optim", None)
    if isinstance(trainer, TrainerConfig) and isinstance(optim, OptimConfig):
        problem = combination_problem(trainer, optim)
        if problem:
            raise ConfigError(problem)
    tune = getattr(cfg, "tune", None)
    if isinstance(tune, TuneConfig) and tune.lr_find_min >= tune.lr_find_max:
        raise ConfigError(f"tune.lr_find_min={tune.lr_find_min:g} must be below tune.lr_find_max={tune.lr_find_max:g}")


def compile_mode(t: "TrainerConfig") -> str:
    """trainer.compile as a torch.compile mode ('' = off, true = 'default')."""
    return "default" if t.compile is True else (t.compile or "")


def combination_problem(t: "TrainerConfig", o: "OptimConfig") -> str:
    """Rules that tie keys together (each key alone is in range): '' or what is wrong."""
    mode = compile_mode(t)
    if t.cuda_graphs and mode in ("reduce-overhead", "max-autotune"):
        return (f"trainer.compile={mode} already replays CUDA graphs of the compiled regions; with "
                "trainer.cuda_graphs=true use trainer.compile=true or max-autotune-no-cudagraphs (the whole step "
                "is captured)")
    if (o.scheduler in ("cosine", "linear", "onecycle") or o.warmup_ratio) and t.max_epochs == 0 and t.max_steps <= 0:
        return (f"optim.scheduler={o.scheduler}{' with optim.warmup_ratio' if o.warmup_ratio else ''} needs a known run length: trainer.max_epochs or trainer.max_steps "
                "must be > 0")
    if t.oom_recovery and t.cuda_graphs:
        return ("trainer.oom_recovery=true needs eager steps (a captured graph cannot be cut into smaller "
                "micro-batches): turn off trainer.cuda_graphs")
    if t.gradient_checkpointing and t.cuda_graphs:
        return ("trainer.gradient_checkpointing=true cannot be captured with trainer.cuda_graphs=true (the "
                "recomputation saves and restores the CUDA RNG state, which a capture does not allow): use one of them")
    if t.oom_recovery and t.sync_batchnorm:
        return ("trainer.oom_recovery=true cannot run with trainer.sync_batchnorm=true: SyncBatchNorm's forward and "
                "backward are collectives, so a rank out of memory before one leaves the others waiting in it")
    if t.oom_recovery and t.strategy == "fsdp":
        return ("trainer.oom_recovery=true cannot run with trainer.strategy=fsdp: FSDP gathers parameters inside the "
                "forward and backward, so a rank that runs out of memory there leaves the others waiting in a "
                "collective; use strategy=ddp, or a smaller data.batch_size")
    if t.test_only and not t.ckpt_path:
        return "trainer.test_only=true needs trainer.ckpt_path=<checkpoint to evaluate>"
    if not t.test_only and t.limit_train_batches == 0:
        return ("trainer.limit_train_batches=0 leaves no training batch in an epoch; to only evaluate use "
                "trainer.test_only=true with trainer.ckpt_path")
    return ""


def check_key(cfg: Any, key: str, source: str = "") -> None:
    """One key's current value against its bounds (hyperopt checks each sampled value this way)."""
    owner, f, _tp = leaves(cfg)[key]
    _check(key, owner, f, source)


def _check(key: str, owner: Any, f: dataclasses.Field, source: str = "") -> None:
    b, value = bounds_of(f), getattr(owner, f.name)
    problem = b.violation(value) if b is not None else ""
    if problem:
        raise ConfigError(f"{source}config key '{key}': expected {problem}, got {value!r}")


def parse_duration(text: str) -> float:
    """'DD:HH:MM:SS' (or fewer fields) or plain seconds -> seconds; '' -> inf."""
    if not text:
        return math.inf
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError:
        raise ConfigError(f"trainer.max_time: expected 'DD:HH:MM:SS' or seconds, got {text!r}") from None
    seconds = 0.0
    for p, unit in zip(reversed(parts), (1, 60, 3600, 86400)):
        seconds += p * unit
    return seconds


# --------------------------------------------------------------------------------------------
# Engine-owned sections. Recipes own `model` and `data` (their data config subclasses DataConfig).

LIMIT_RULE = rule("a count >= 0 (an int) or a fraction in [0, 1] (a float)",
                  lambda v: v >= 0 and (isinstance(v, int) or v <= 1.0))
Precision = Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]


@dataclass
class TrainerConfig:
    max_epochs: int = opt(10, "epochs to train (an epoch is one pass over the train split)", ge=0)
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: no limit)",
                         check=rule("-1 (no limit) or a count >= 1", lambda v: v == -1 or v >= 1))
    max_time: str = opt("", "stop after this wall time, 'DD:HH:MM:SS' or seconds (checked on logging steps and epoch ends)",
                        check=rule("'DD:HH:MM:SS' (or fewer fields) or seconds, >= 0 (empty: no limit)", _duration_ok))
    precision: Precision = opt("32-true", "numeric precision: 32-true, 16-mixed (GradScaler), bf16-mixed, bf16-true")
    strategy: Literal["ddp", "fsdp", "none"] = opt("ddp", "with world size > 1, ddp: DistributedDataParallel; fsdp: shard parameters, gradients and optimizer state (FSDP2); none: never wrap")
    fsdp_min_params: int = opt(1_000_000, "strategy=fsdp without a recipe plan (Recipe.blocks): a submodule holding at least this many parameters (not in a smaller unit) is sharded as its own unit", ge=1)
    accumulate_grad_batches: int = opt(1, "micro-batches per optimizer step (DDP sync only on the last one)", ge=1)
    grad_clip: float = opt(0.0, "clip the global gradient norm to this value (0: off)", ge=0)
    compile: Union[bool, CompileMode] = opt(False, "torch.compile the inner module: true (= default) or a mode; checkpoint keys stay plain")
    cuda_graphs: bool = opt(False, "capture the whole training step (forward, backward, clip, optimizer) in one CUDA graph per batch shape and replay it (GPU, bf16/fp32)")
    seed: int = opt(0, "global seed; rank r seeds its RNGs with seed + r", ge=0, le=2**32 - 1)
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms (slower, reproducible)")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, or cuda")
    ddp_timeout: float = opt(1800.0, "seconds a collective may wait before the process group errors out", gt=0)
    find_unused_parameters: bool = opt(False, "DDP find_unused_parameters (needed when some parameters get no gradient)")
    sync_batchnorm: bool = opt(False, "convert BatchNorm layers to SyncBatchNorm under DDP")
    check_val_every_n_epoch: int = opt(1, "validate every n epochs (0: never)", ge=0)
    limit_train_batches: Union[int, float] = opt(1.0, "train batches per epoch: an int is a count, a float a fraction",
                                                 check=LIMIT_RULE)
    limit_val_batches: Union[int, float] = opt(1.0, "validation batches: an int is a count, a float a fraction",
                                               check=LIMIT_RULE)
    fast_dev_run: Union[bool, int] = opt(False, "true or N: run N (1) train and val batches, one epoch, write no checkpoints", ge=0)
    test_only: bool = opt(False, "skip training: load trainer.ckpt_path and evaluate the test split")
    ckpt_path: str = opt("", "checkpoint to load weights from (test_only, or fine-tuning start)")
    resume: str = opt("", "a checkpoint file or run folder (continued in its run), or 'auto': the run_name's newest checkpoint, else the newest run of the recipe whose config matches")
    out_dir: str = opt("runs", "parent folder of run directories")
    run_name: str = opt("", "run directory name under out_dir (default: <recipe>_<date>_<time>, -2, -3, ... when taken)",
                        check=rule("a folder name (no '/', not '.' or '..')",
                                   lambda v: "/" not in v and "\\" not in v and v not in (".", "..")))
    overwrite: bool = opt(False, "allow a fresh run in a run directory that already holds a run")
    ckpt_every_n_steps: int = opt(0, "also save last.ckpt every n optimizer steps (0: only at epoch ends)", ge=0)
    save_top_k: int = opt(1, "keep the k best checkpoints by the monitored metric (0: none, -1: all)", check=_COUNT_OR_ALL)
    save_last: bool = opt(True, "keep checkpoints/last.ckpt up to date")
    save_frozen: bool = opt(True, "false: checkpoints leave out the parameters frozen (requires_grad=False) from the start, e.g. pretrained ones build_model loads; a resume takes them from the model as built; model.safetensors stays complete")
    keep_last_k: int = opt(0, "also keep the k most recent periodic saves (epoch ends, ckpt_every_n_steps) as checkpoints/step=<N>.ckpt (0: none, -1: all)", check=_COUNT_OR_ALL)
    monitor: str = opt("val/loss", "metric that decides best checkpoints, early stopping and plateau scheduling")
    mode: Literal["min", "max"] = opt("min", "whether the monitored metric should go down (min) or up (max)")
    early_stop_patience: int = opt(0, "stop after this many validations without improvement (0: off)", ge=0)
    early_stop_min_delta: float = opt(0.0, "smallest change of the monitored metric that counts as improvement", ge=0)
    nonfinite: Literal["stop", "skip"] = opt("stop", "a step whose loss or gradient is NaN/inf is never applied; stop: end the run (naming the step, keeping the last good checkpoint), skip: go on")
    max_skipped_steps: int = opt(10, "trainer.nonfinite=skip: stop after this many non-finite steps in a row (0: never)", ge=0)
    ema_decay: float = opt(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: off); validation, best checkpoints and model.safetensors use it", ge=0, lt=1)
    ema_warmup: bool = opt(False, "ema: decay min(ema_decay, (1 + n) / (10 + n)) after n updates, so early weights fade fast")
    export: bool = opt(True, "write model.safetensors (+ its config) to the run directory at the end of fit")
    oom_recovery: bool = opt(False, "a CUDA out-of-memory error in a step: free memory, halve the micro-batch, double the accumulation (same global batch and gradient) and retry; agreed on every rank (under DDP the gradient all-reduce then runs after the backward instead of overlapping it)")
    gradient_checkpointing: bool = opt(False, "recompute the recipe's blocks (Recipe.blocks) in the backward instead of keeping their activations (non-reentrant activation checkpointing): less memory, about one more forward of compute")
    track_grad_norm: float = opt(0.0, "log the global gradient norm of this type (e.g. 2, or inf) on logging steps, before clipping (0: off)",
                                 check=rule("0 (off), a norm type > 0, or inf", lambda v: v >= 0))
    memory_cleanup_interval: int = opt(0, "empty the CUDA caching allocator every n optimizer steps (0: never); returns cached memory to the driver at a cost in speed", ge=0)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = opt("adamw", "optimizer")
    lr: float = opt(1e-3, "peak learning rate (0 freezes every group; a group may set its own)", ge=0)
    weight_decay: float = opt(0.0, "weight decay (decoupled for adamw)", ge=0)
    betas: list[float] = opt([0.9, 0.999], "Adam betas", ge=0, lt=1, length=2)
    eps: float = opt(1e-8, "Adam epsilon", gt=0)
    momentum: float = opt(0.9, "SGD momentum", ge=0, le=1)
    nesterov: bool = opt(False, "SGD Nesterov momentum")
    scheduler: Literal["cosine", "linear", "plateau", "onecycle", "step", "none"] = opt("none", "learning-rate schedule, stepped once per optimizer step (linear: straight down to min_lr)")
    warmup_steps: int = opt(0, "linear warmup from 0 over this many optimizer steps", ge=0)
    warmup_ratio: float = opt(0.0, "warmup over this fraction of the run's optimizer steps, when warmup_steps is 0", ge=0, lt=1)
    min_lr: float = opt(0.0, "cosine, linear: final learning rate", ge=0)
    step_size: int = opt(10, "step: decay every this many epochs", ge=1)
    gamma: float = opt(0.1, "step: decay factor", gt=0, le=1)
    plateau_factor: float = opt(0.5, "plateau: multiply the lr by this when the monitored metric stalls", gt=0, lt=1)
    plateau_patience: int = opt(8, "plateau: validations without improvement before decaying", ge=0)
    onecycle_pct_start: float = opt(0.3, "onecycle: fraction of steps spent increasing the lr", gt=0, lt=1)
    onecycle_div_factor: float = opt(25.0, "onecycle: start lr = lr / div_factor", ge=1)
    onecycle_final_div_factor: float = opt(1e4, "onecycle: final lr = start lr / final_div_factor", ge=1)


@dataclass
class TuneConfig:
    """Finders that run before training, on a fresh run (a resume keeps what they chose)."""
    auto_lr_find: bool = opt(False, "LR range test before training: an exponential lr sweep on the training data, then the suggested lr (steepest descent of the smoothed loss) replaces optim.lr; model, optimizer and RNG are put back as they were")
    lr_find_min: float = opt(1e-7, "auto_lr_find: first lr of the sweep", gt=0)
    lr_find_max: float = opt(1.0, "auto_lr_find: last lr of the sweep", gt=0)
    lr_find_steps: int = opt(100, "auto_lr_find: optimizer steps of the sweep (it stops early once the loss diverges)", ge=5, le=100_000)
    lr_find_smoothing: float = opt(0.05, "auto_lr_find: weight of each new loss in the exponential smoothing of the curve", gt=0, le=1)
    lr_find_diverge: float = opt(4.0, "auto_lr_find: stop the sweep once the smoothed loss exceeds this multiple of its best", gt=1)
    auto_scale_batch_size: Union[bool, Literal["power", "binsearch"]] = opt(False, "find the largest data.batch_size whose forward, backward and optimizer step fit in memory: power (true) doubles until it does not fit, binsearch then refines between the last two")
    batch_size_max: int = opt(4096, "auto_scale_batch_size: largest batch size tried (also capped by the train split)", ge=1)
    batch_size_trials: int = opt(3, "auto_scale_batch_size: training steps run at each candidate size", ge=1, le=100)
    global_batch: int = opt(0, "auto_scale_batch_size: keep this global batch (batch x processes x trainer.accumulate_grad_batches) by adjusting the accumulation to the batch found (0: keep the accumulation)", ge=0)


@dataclass
class ProfilerConfig:
    enabled: bool = opt(False, "torch.profiler over a window of training steps: a trace in <run>/profiler/ (TensorBoard, Perfetto) and a table of the top operators at the end")
    wait: int = opt(1, "profiler: steps skipped before the window", ge=0)
    warmup: int = opt(1, "profiler: steps traced but discarded (warm caches) before the recorded ones", ge=0)
    active: int = opt(3, "profiler: steps recorded", ge=1, le=1000)
    record_shapes: bool = opt(False, "profiler: record input shapes of every operator (a larger trace)")
    profile_memory: bool = opt(False, "profiler: record tensor allocations and frees")
    row_limit: int = opt(15, "profiler: operators in the printed table", ge=1, le=1000)


@dataclass
class LogConfig:
    loggers: list[str] = opt(["console", "jsonl"], "any of console, jsonl, csv, tensorboard, wandb (jsonl is always on; csv: metrics.csv)",
                             check=rule(f"any of {', '.join(LOGGERS)} (or both: tensorboard and wandb)",
                                        lambda v: all(n in (*LOGGERS, "both") for n in v)))
    every_n_steps: int = opt(10, "log training metrics every n optimizer steps (the only host syncs in the loop)", ge=1)
    progress: Literal["auto", "bar", "lines", "off"] = opt("auto", "progress on rank 0 (console logger): bar: a tqdm bar per epoch (epoch x/N, loss, lr, it/s, ETA); lines: one plain line per logging step with the same fields (tee, nohup, CI); auto: bar in a terminal or notebook, lines otherwise (the environment variable TRAINLIB_BAR=1 makes auto mean bar); off: neither. train.log gets the lines unless off")
    progress_bar: bool = opt(True, "old switch, kept as an alias: false means log.progress=off (whatever log.progress says)")
    wandb_project: str = opt("trainlib", "wandb project")
    wandb_entity: str = opt("", "wandb entity (team or user)")
    wandb_mode: Literal["offline", "online", "disabled"] = opt("offline", "wandb mode; offline unless you opt in")
    wandb_group: str = opt("", "wandb group (hyper-parameter studies group their trials)")
    plots: bool = opt(True, "at the end of fit, write <run>/plots/*.png (loss, validation metrics, lr against step) when matplotlib is installed")
    log_gpu_memory: bool = opt(False, "add allocated, reserved and peak CUDA memory (GB) of this process to every training log row")


@dataclass
class DataConfig:
    """Keys every recipe's data section has; recipes subclass it and add their own."""
    root: str = opt("", "dataset folder (empty: generate a synthetic dataset in the real format and train on it)")
    batch_size: int = opt(8, "batch size per process", ge=1)
    val_batch_size: int = opt(0, "validation/test batch size per process (0: same as batch_size)", ge=0)
    num_workers: int = opt(0, "DataLoader worker processes per rank", ge=0)
    pin_memory: bool = opt(True, "pin host memory for faster copies to the GPU (ignored on CPU)")
    drop_last: bool = opt(False, "drop the last incomplete training batch")
    device_resident: bool = opt(False, "read every split once into device memory and gather batches there (datasets that fit; augmentation is frozen)")
    group_by_shape: Union[bool, Literal["auto"]] = opt("auto", "draw every rank's batches of one optimizer step from samples of one shape (the dataset's shape_keys(), e.g. PDAN's padded length), so CUDA graphs replay under DDP; auto: on with trainer.cuda_graphs")
    use_class_balanced_sampler: bool = opt(False, "draw training samples so every class (the dataset's class_labels()) is equally frequent: with replacement, one global draw per epoch shared out across ranks")
    progressive_class_balancing: bool = opt(False, "move the class frequencies of the drawn training samples from natural (first epoch) to balanced (last epoch) over the run")


@dataclass
class Config:
    """The whole run: engine sections plus the recipe's `model` and `data`."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    data: Any = field(default_factory=DataConfig)
    model: Any = None
    recipe: str = opt("", "the recipe this config belongs to (set by the recipe; YAML files may name it)")
    stage: str = opt("", "a recipe with stages: the stage to run, or all (the default) for every one in order")
    preset: str = opt("", "demo: the recipe's demo settings (its --help lists them) under yours, on any data; none: never; '' (auto): demo without data.root",
                      check=rule("'' (auto), demo or none", lambda v: v in ("", "demo", "none")))


# --------------------------------------------------------------------------------------------
# Walking the tree

def leaves(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field, Any]]:
    """Flat map 'section.key' -> (owner dataclass instance, field, resolved type hint)."""
    out: dict[str, tuple[Any, dataclasses.Field, Any]] = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(leaves(value, key + "."))
        elif value is None and hints[f.name] is Any:
            continue  # an absent section (e.g. no model config for a plain notebook run)
        else:
            out[key] = (cfg, f, hints[f.name])
    return out


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML/JSON/checkpoint friendly)."""
    return dataclasses.asdict(cfg)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{type_name(inner)}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, raw: Any) -> Any:
    """Check `value` (already YAML-parsed) against type `tp`; return it converted or raise."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {type_name(tp)}, got {raw!r}")
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if str(value) in [str(c) for c in choices]:
            return next(c for c in choices if str(c) == str(value))
        raise ConfigError(f"config key '{key}': expected one of {', '.join(map(str, choices))}, got {raw!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        for a in args:  # exact type match first (1 -> int, 1.0 -> float, true -> bool)
            if type(value) is a:
                return value
        for a in args:
            try:
                return _coerce(value, a, key, raw)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # a,b,c shorthand
            value = [yaml.safe_load(v) if inner is not str else v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, key, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads '3e-4' as a string
            return float(value) if isinstance(value, str) else _raise(bad)
        except ValueError:
            raise bad from None
    if tp is str:
        return raw if isinstance(raw, str) else str(value)
    if isinstance(value, tp):
        return value
    raise bad


def _raise(e: Exception) -> Any:
    raise e


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try the leaf name alone ("max_epoch" -> "trainer.max_epochs")
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[hit[0]]] if hit else []
    return f"; did you mean '{close[0]}'?" if close else ""


def resolve_key(cfg: Any, key: str, aliases: dict[str, str] | None = None) -> str:
    """Full 'section.key' for a full key, an alias, or a leaf name that is unique in the tree."""
    table = leaves(cfg)
    if key in table:
        return key
    if aliases and key in aliases:
        return aliases[key]
    if "." not in key:
        matches = [k for k in table if k.rsplit(".", 1)[-1] == key]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConfigError(f"config key '{key}' is ambiguous: say one of {', '.join(matches)}")
    raise ConfigError(f"unknown config key '{key}'{_suggest(key, list(table))}")


def set_value(cfg: Any, key: str, raw: Any, aliases: dict[str, str] | None = None) -> str:
    """Set one key from a raw value (a CLI string or an already-parsed YAML value)."""
    full = resolve_key(cfg, key, aliases)
    owner, f, tp = leaves(cfg)[full]
    if isinstance(raw, str):
        try:
            parsed = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            parsed = raw
    else:
        parsed = raw
    if full in VALUE_ALIASES and str(parsed) in VALUE_ALIASES[full]:
        parsed = raw = VALUE_ALIASES[full][str(parsed)]
    setattr(owner, f.name, _coerce(parsed, tp, full, raw))
    return full


def apply_overrides(cfg: Any, overrides: list[str], aliases: dict[str, str] | None = None) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        set_value(cfg, key.strip(), raw, aliases)


def apply_dict(cfg: Any, data: dict, source: str, prefix: str = "") -> None:
    """Apply a nested mapping (a YAML file's content) onto the tree."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            apply_dict(cfg, v, source, key + ".")
        else:
            try:
                set_value(cfg, key, v)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def read_yaml(path: str) -> dict:
    """A config file's mapping of sections, or one clear error naming the file."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; expected a YAML file")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read: permission denied") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_yaml(cfg: Any, path: str) -> None:
    """Apply a config file. One that names its recipe (`recipe: segformer`, as every run's config.yaml
    does) is refused by another recipe: its keys would be misread or rejected one at a time."""
    data = read_yaml(path)
    named, ours = data.pop("recipe", None), getattr(cfg, "recipe", "")
    if named and ours and str(named) not in (ours, f"recipes.{ours}"):
        raise ConfigError(f"config file {path} is for recipe {named}, but this is recipe {ours}: run it with "
                          f"python -m recipes.{named} --config {path}, or pass a config file of recipe {ours}")
    apply_dict(cfg, data, path)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text(cfg: Any) -> str:
    """Every key with its type, default (and allowed range, where it has one) and one-line description."""
    rows = []
    for key, (owner, f, tp) in leaves(cfg).items():
        b = bounds_of(f)
        shown = repr(getattr(owner, f.name)) + (f", range {b.text()}" if b is not None and b.text() else "")
        rows.append((key, type_name(tp), shown, f.metadata.get("help", "")))
    w0 = max(len(r[0]) for r in rows)
    w1 = min(max(len(r[1]) for r in rows), 28)
    lines, section = [], None
    for key, tname, default, desc in rows:
        sec = key.split(".", 1)[0]
        if sec != section:
            lines.append(f"\n[{sec}]")
            section = sec
        lines.append(f"  {key:<{w0}}  {tname:<{w1}}  default {default}\n  {'':<{w0}}  {desc}")
    return "\n".join(lines)
