"""Where metrics go: console (progress bar or plain lines, + train.log), metrics.jsonl, metrics.csv,
TensorBoard, wandb.

Every logger receives the same rows: {"step", "epoch", "split", <metric>: float, ...}. Rows only
exist on logging steps and after evaluations, so logging never adds a host sync of its own.
Only rank 0 logs. TensorBoard and wandb are imported only when asked for. Progress (log.progress):
resolve_progress and ConsoleLogger.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes
from .config import LOGGERS, ConfigError, LogConfig

log = logging.getLogger("trainlib")

# Row fields measured with the wall clock: the only ones that differ between a resumed run and an
# uninterrupted one.
TIMING_KEYS = frozenset({"steps_per_s", "samples_per_s", "step_ms", "data_wait", "peak_mem_gb", "mfu"})


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def hms(seconds: float) -> str:
    """0:01:05 (hours:minutes:seconds)."""
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


_CONSOLE_OFF = {"trainlib_console": False}  # `extra=` of a record for train.log only (under a live bar)


class _TqdmHandler(logging.Handler):
    """Console lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "trainlib_console", True):
            return
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


def in_notebook() -> bool:
    """A Jupyter kernel (not a plain IPython terminal)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:  # noqa: BLE001 - IPython missing or broken: not a notebook we can draw in
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _isatty() -> bool:
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def resolve_progress(progress: str = "auto", progress_bar: bool = True) -> str:
    """log.progress as used: 'bar', 'lines' or 'off'. log.progress_bar=false (the old switch) means
    off whatever log.progress says; TRAINLIB_BAR=1 (the old environment variable) turns auto into bar;
    auto is a bar when stdout is a terminal or in a notebook, plain lines otherwise."""
    if not progress_bar:
        return "off"
    if progress == "auto" and os.environ.get("TRAINLIB_BAR") == "1":
        return "bar"
    if progress == "auto":
        return "bar" if _isatty() or in_notebook() else "lines"
    if progress not in ("bar", "lines", "off"):
        raise ConfigError(f"log.progress={progress!r}: expected auto, bar, lines or off")
    return progress


class Logger:
    def start(self, run_dir: Path, config: dict) -> None: ...
    def log(self, row: dict) -> None: ...
    def close(self) -> None: ...


class LoggedNow(list):
    """A list of notes that logs each one as it is appended (once train.log exists)."""

    def append(self, text: str) -> None:
        log.info(text)


class ConsoleLogger(Logger):
    """Progress on rank 0 and one line per evaluation.

    mode 'bar': a tqdm bar per epoch (tqdm.auto's widget in a notebook) with `epoch x/N`, the last
    known loss and lr (from the previous epoch until this epoch's first logging step), it/s and ETA;
    train.log gets the plain lines. mode 'lines': on every logging step one plain line, to the console
    and train.log:  epoch 2/10  step 130  batch 30/50  loss 0.4123  lr 3.0e-04  12.3 it/s  ETA 0:00:02
    (x/N counts epochs from 1; `batch` is the loader batch in the epoch, `it` one loader batch, ETA the
    rest of the epoch). mode 'off': neither. Accepts the old boolean (True: auto, False: off)."""

    def __init__(self, progress: str | bool = "auto") -> None:
        if isinstance(progress, bool):
            progress = "auto" if progress else "off"
        self.mode = resolve_progress(progress)
        self.progress_bar = self.mode == "bar"
        self.bar: Any = None
        self.epoch, self.total, self.epochs = 0, 0, 0
        self.done = self.jumped = 0  # batches of this epoch; of those, skipped by a resume (not timed)
        self.t0 = time.monotonic()
        self.last: dict[str, float] = {}  # last known loss and lr: shown from the start of every epoch

    def epoch_start(self, epoch: int, total: int, epochs: int = 0) -> None:
        self.epoch_end()
        self.epoch, self.total, self.epochs = epoch, total, epochs
        self.done = self.jumped = 0
        self.t0 = time.monotonic()
        if self.mode == "bar":
            if in_notebook():
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            # postfix: the previous epoch's loss and lr, from the first draw until this epoch's first logging step
            self.bar = tqdm(total=total, desc=self._epoch_text(epoch), leave=False, dynamic_ncols=True,
                            file=sys.stdout, disable=False, postfix=self._postfix() or None)

    def _epoch_text(self, epoch: int) -> str:
        return f"epoch {epoch + 1}/{self.epochs}" if self.epochs > 0 else f"epoch {epoch + 1}"

    def advance(self, n: int = 1) -> None:
        """One loader batch; n != 1: the batches a resumed epoch skips (a jump, not timed)."""
        self.done += n
        if n != 1:
            self.jumped += n
        if self.bar is None:
            return
        if n == 1:
            self.bar.update(1)
        elif n > 1:  # as if the bar had started there: its rate and ETA count only batches trained now
            self.bar.n = self.bar.last_print_n = self.bar.initial = self.done
            self.bar.refresh()

    def epoch_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _postfix(self) -> dict[str, str]:
        out = {}
        if "loss" in self.last:
            out["loss"] = _fmt(self.last["loss"])
        if "lr" in self.last:
            out["lr"] = f"{self.last['lr']:.1e}"
        return out

    def rate(self) -> float:
        """Loader batches per second in this epoch so far (0.0 before any)."""
        elapsed = time.monotonic() - self.t0
        return (self.done - self.jumped) / elapsed if elapsed > 0 and self.done > self.jumped else 0.0

    def line(self, row: dict) -> str:
        parts = [self._epoch_text(int(row.get("epoch", self.epoch))), f"step {row['step']}"]
        if self.total:
            parts.append(f"batch {self.done}/{self.total}")
        loss = row.get("loss", self.last.get("loss"))
        parts.append(f"loss {_fmt(loss)}" if loss is not None else "loss -")
        if row.get("skipped_steps"):
            parts.append(f"skipped {row['skipped_steps']}")
        if "lr" in self.last:
            parts.append(f"lr {self.last['lr']:.1e}")
        rate = self.rate()
        if rate > 0:
            parts.append(f"{rate:.1f} it/s")
            if self.total:
                parts.append(f"ETA {hms((self.total - self.done) / rate)}")
        return "  ".join(parts)

    def log(self, row: dict) -> None:
        metrics = {k: v for k, v in row.items() if k not in ("step", "epoch", "split")}
        if row["split"] == "train":
            self.last.update({k: float(row[k]) for k in ("loss", "lr") if isinstance(row.get(k), (int, float))})
            if self.mode == "off":
                return
            if self.bar is not None:
                self.bar.set_postfix(self._postfix(), refresh=False)
                log.info(self.line(row), extra=_CONSOLE_OFF)  # the bar shows it; train.log gets the line
            else:
                log.info(self.line(row))
            return
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        where = f"{self._epoch_text(int(row['epoch']))} " if row["split"] == "val" else ""
        log.info(f"[{row['split']}] {where}step {row['step']}: {text}")

    def close(self) -> None:
        self.epoch_end()


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] when there is none; a torn last line is left out)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class JsonlLogger(Logger):
    """metrics.jsonl: one JSON object per row, flushed per line (a crash loses at most one row)."""

    def start(self, run_dir: Path, config: dict) -> None:
        self.fh = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, row: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self.fh.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self.fh.close()


class CsvLogger(Logger):
    """metrics.csv: the rows of metrics.jsonl as a table, flushed per line. Columns: step, epoch,
    split, then every metric in the order it first appeared (train, val and test rows in one file; a
    cell is empty where a row has no such metric). A row that brings a new column rewrites the file
    with the wider header (atomically: a reader sees the old file or the new one). At start the file
    is regenerated from metrics.jsonl, which a resume has already cut back to the checkpoint's rows,
    so after a resume it holds exactly what an uninterrupted run's holds. Floats are written with
    Python's repr: reading a cell back gives the logged value exactly."""

    FIRST = ("step", "epoch", "split")

    def start(self, run_dir: Path, config: dict) -> None:
        self.path = run_dir / "metrics.csv"
        rows = read_rows(run_dir / "metrics.jsonl")
        self.columns: list[str] = []
        self._widen(rows)
        if rows:
            self._rewrite([[self._cell(r.get(c)) for c in self.columns] for r in rows])
        else:
            self.path.unlink(missing_ok=True)  # a previous run's table (trainer.overwrite=true)
        self.fh = open(self.path, "a", buffering=1, newline="")
        self.writer = csv.writer(self.fh, lineterminator="\n")

    def _widen(self, rows: list[dict]) -> bool:
        before = len(self.columns)
        for row in rows:
            for k in (*self.FIRST, *row):
                if k not in self.columns:
                    self.columns.append(k)
        return len(self.columns) > before

    @staticmethod
    def _cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return repr(v)  # shortest text that reads back as the same float; nan, inf as such
        return str(v)

    def _rewrite(self, cells: list[list[str]]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        w.writerows(cells)
        atomic_write_bytes(self.path, buf.getvalue().encode())

    def log(self, row: dict) -> None:
        old = list(self.columns)
        if self._widen([row]) and old:  # a new column: the rows so far, under the wider header
            self.fh.close()
            with open(self.path, newline="") as f:
                kept = list(csv.reader(f))[1:]
            self._rewrite([cells + [""] * (len(self.columns) - len(old)) for cells in kept])
            self.fh = open(self.path, "a", buffering=1, newline="")
            self.writer = csv.writer(self.fh, lineterminator="\n")
        elif not old:  # the first row: the header first
            self.writer.writerow(self.columns)
        self.writer.writerow([self._cell(row.get(c)) for c in self.columns])

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

    def log_images(self, images: dict, step: int) -> None:
        """uint8 [H, W] or [H, W, 3] arrays by tag (images.py)."""
        for tag, img in images.items():
            self.writer.add_image(tag, img, step, dataformats="HW" if img.ndim == 2 else "HWC")

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

    def log_images(self, images: dict, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(img) for tag, img in images.items()}, step=step)

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
            out.append(ConsoleLogger(resolve_progress(cfg.progress, cfg.progress_bar)))
        elif n == "jsonl":
            out.append(JsonlLogger())
        elif n == "csv":
            out.append(CsvLogger())
        elif n == "tensorboard":
            out.append(TensorBoardLogger())
        else:
            out.append(WandbLogger(cfg, run_name))
    return out
