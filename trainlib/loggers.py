"""Where metrics go: console (+ tqdm bar and train.log), metrics.jsonl, TensorBoard, wandb.

Every logger receives the same rows: {"step", "epoch", "split", <metric>: float, ...}. Rows only
exist on logging steps and after evaluations, so logging never adds a host sync of its own.
Only rank 0 logs. TensorBoard and wandb are imported only when asked for.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from .config import LOGGERS, ConfigError, LogConfig

log = logging.getLogger("trainlib")

# Row fields measured with the wall clock: the only ones that differ between a resumed run and an
# uninterrupted one.
TIMING_KEYS = frozenset({"steps_per_s", "samples_per_s", "step_ms", "data_wait", "peak_mem_gb", "mfu"})


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


class _TqdmHandler(logging.Handler):
    """Console lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def setup_text_log(run_dir: Path | None, is_main: bool) -> None:
    """Rank 0: messages to stdout and run_dir/train.log. Other ranks: warnings and errors only."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if run_dir is not None and is_main:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)


class Logger:
    def start(self, run_dir: Path, config: dict) -> None: ...
    def log(self, row: dict) -> None: ...
    def close(self) -> None: ...


class LoggedNow(list):
    """A list of notes that logs each one as it is appended (once train.log exists)."""

    def append(self, text: str) -> None:
        log.info(text)


class ConsoleLogger(Logger):
    """A tqdm bar per epoch (loss, lr, it/s) and one line per evaluation."""

    def __init__(self, progress_bar: bool) -> None:
        self.progress_bar = progress_bar
        self.bar = None

    def epoch_start(self, epoch: int, total: int) -> None:
        if self.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, file=sys.stdout,
                            disable=not sys.stdout.isatty() and os.environ.get("TRAINLIB_BAR") != "1")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def epoch_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, row: dict) -> None:
        metrics = {k: v for k, v in row.items() if k not in ("step", "epoch", "split")}
        if row["split"] == "train":
            if self.bar is not None:
                self.bar.set_postfix({k: _fmt(v) for k, v in metrics.items()}, refresh=False)
            return
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        log.info(f"[{row['split']}] epoch {row['epoch']} step {row['step']}: {text}")

    def close(self) -> None:
        self.epoch_end()


class JsonlLogger(Logger):
    """metrics.jsonl: one JSON object per row, flushed per line (a crash loses at most one row)."""

    def start(self, run_dir: Path, config: dict) -> None:
        self.fh = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, row: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self.fh.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self.fh.close()


class TensorBoardLogger(Logger):
    def start(self, run_dir: Path, config: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.loggers includes 'tensorboard' but the tensorboard package is not installed: "
                              "pip install tensorboard (or pip install -e '.[tensorboard]')") from None
        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, row: dict) -> None:
        for k, v in row.items():
            if k not in ("step", "epoch", "split") and isinstance(v, (int, float)):
                self.writer.add_scalar(k if "/" in k else f"{row['split']}/{k}", v, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    def __init__(self, cfg: LogConfig, run_name: str) -> None:
        self.cfg, self.run_name = cfg, run_name

    def start(self, run_dir: Path, config: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("log.loggers includes 'wandb' but wandb is not installed: pip install wandb "
                              "(or drop it from log.loggers)") from None
        self.run = wandb.init(project=self.cfg.wandb_project, entity=self.cfg.wandb_entity or None,
                              group=self.cfg.wandb_group or None, name=self.run_name, dir=str(run_dir),
                              mode=self.cfg.wandb_mode, config=config, resume="allow")

    def log(self, row: dict) -> None:
        data = {(k if "/" in k else f"{row['split']}/{k}"): v for k, v in row.items() if k not in ("step", "split")}
        self.run.log(data, step=row["step"])

    def close(self) -> None:
        self.run.finish()


KNOWN = LOGGERS


def build_loggers(cfg: LogConfig, run_name: str) -> list[Logger]:
    names = list(dict.fromkeys([*cfg.loggers, "jsonl"]))
    if "both" in names:  # the seed's `--logger both` = tensorboard + wandb
        names = [n for n in names if n != "both"] + ["tensorboard", "wandb"]
    out: list[Logger] = []
    for n in names:
        if n not in KNOWN:
            raise ConfigError(f"log.loggers: unknown logger {n!r}; expected any of {', '.join(KNOWN)}")
        if n == "console":
            out.append(ConsoleLogger(cfg.progress_bar))
        elif n == "jsonl":
            out.append(JsonlLogger())
        elif n == "tensorboard":
            out.append(TensorBoardLogger())
        else:
            out.append(WandbLogger(cfg, run_name))
    return out
