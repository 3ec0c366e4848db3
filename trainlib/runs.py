"""Looking at run directories without touching them: `python -m trainlib runs [DIR]` (a table of
the runs under DIR) and `python -m trainlib compare RUN RUN ...` (their configs' differences and
best metrics side by side). Also what trainlib/plot.py reads a run with.

Everything here only reads: no file of a run directory is created, changed or locked for longer
than a non-blocking probe of its `.lock` (rundir.RunLock), which is how a running run is told from
one that died. What is read, in order of trust: summary.json (written at the end of a run), then
history.json (one row per epoch), then metrics.jsonl (every logged row); config.yaml names the
recipe, the monitored metric and its mode.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import UserError, read_yaml
from .rundir import LOCK_NAME

# folders inside a run directory that never hold runs of their own
_NOT_RUNS = {"checkpoints", "tb", "wandb", "plots", "profiler", "__pycache__"}
_RUN_FILES = ("config.yaml", "metrics.jsonl", "history.json", "summary.json")


class RunsError(UserError):
    """A path that is not a run directory, or a run directory with nothing to read."""


# ------------------------------------------------------------------------------------------------
# Reading one run

def _number(v: Any) -> float | None:
    """A finite float, or None (history.json stores non-finite values as strings)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (a file being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_config(run_dir: Path) -> dict:
    try:
        return read_yaml(str(run_dir / "config.yaml"))
    except UserError:
        return {}


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that does not parse (the half-written last line of a
    running run) is skipped."""
    rows = []
    try:
        with open(run_dir / "metrics.jsonl") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except OSError:
        return []
    return rows


def _last_row(path: Path) -> dict:
    """The last complete row of a JSONL file, reading only its end."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 65536))
            lines = fh.read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return {}


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in _RUN_FILES)


def lock_holder(run_dir: Path) -> dict | None:
    """The owner written in `<run>/.lock` while its flock is held (the run is alive), else None.
    A lock file of another host counts as held (RunLock refuses it too: its flock may not be
    visible from here). Read-only: the file is never created, and a free lock is released at once."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            owner = owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") and owner["host"] != socket.gethostname():
            return owner
        pid = owner.get("pid")
        if isinstance(pid, int) and pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None  # the owner died: the kernel dropped its flock
            except PermissionError:
                pass  # alive, another user's
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return owner or {"pid": "?"}
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass
class RunInfo:
    path: Path
    name: str
    recipe: str = ""
    status: str = "incomplete"        # running | finished | stopped | incomplete
    reason: str = ""                  # why it stopped, or who runs it
    monitor: str = ""
    mode: str = "min"
    best: float | None = None
    best_epoch: int | None = None     # counted from 0, as in the files (shown counted from 1)
    best_step: int | None = None
    best_row: dict = field(default_factory=dict)     # the metrics at the best epoch
    final: dict = field(default_factory=dict)
    epochs_done: int | None = None
    max_epochs: int | None = None
    wall_s: float | None = None
    wall_approx: bool = False         # summed from history.json (no summary.json yet)
    updated: float = 0.0              # the newest modification time of its files
    config: dict = field(default_factory=dict)

    @property
    def status_text(self) -> str:
        return f"{self.status} ({self.reason})" if self.reason else self.status


def _val_rows(rows: list[dict]) -> list[dict]:
    """metrics.jsonl's evaluation rows as history-style rows: {"epoch", "step", "val/loss", ...}."""
    out = []
    for r in rows:
        split = r.get("split")
        if split and split != "train":
            out.append({"epoch": r.get("epoch"), "step": r.get("step"),
                        **{f"{split}/{k}": v for k, v in r.items() if k not in ("step", "epoch", "split")}})
    return out


def _best_of(rows: list[dict], monitor: str, mode: str) -> dict | None:
    best = None
    for r in rows:
        v = _number(r.get(monitor))
        if v is not None and (best is None or (v < best[0] if mode == "min" else v > best[0])):
            best = (v, r)
    return best[1] if best else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def load_run(path: Path | str, name: str | None = None) -> RunInfo:
    """What a run directory says about its run (RunsError when `path` is not one)."""
    path = Path(path)
    if not path.is_dir():
        raise RunsError(f"{path}: no such run directory")
    if not is_run_dir(path):
        raise RunsError(f"{path} is not a run directory (none of {', '.join(_RUN_FILES)} in it)")
    cfg = read_config(path)
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    info = RunInfo(path=path, name=name or path.name, config=cfg, recipe=str(cfg.get("recipe") or ""),
                   monitor=str(trainer.get("monitor") or "val/loss"), mode=str(trainer.get("mode") or "min"),
                   max_epochs=_int(trainer.get("max_epochs")))
    if cfg.get("stage"):
        info.recipe += f" [{cfg['stage']}]"
    info.updated = max((p.stat().st_mtime for p in (path / f for f in (*_RUN_FILES, LOCK_NAME)) if p.exists()),
                       default=path.stat().st_mtime)
    summary = read_json(path / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    history = read_json(path / "history.json")
    history = [r for r in history if isinstance(r, dict)] if isinstance(history, list) else []
    last = _last_row(path / "metrics.jsonl")

    if isinstance(summary.get("monitor"), str) and summary["monitor"]:
        info.monitor = summary["monitor"]
    if summary.get("mode") in ("min", "max"):
        info.mode = summary["mode"]
    if _int(summary.get("max_epochs")) is not None:
        info.max_epochs = summary["max_epochs"]
    # best: summary.json's own record ({metric, value, epoch, step}) when it has one, else the best
    # epoch of history.json, else the best evaluation row of metrics.jsonl
    best = summary.get("best") if isinstance(summary.get("best"), dict) else {}
    value = _number(best.get("value"))
    if value is not None:
        info.monitor = str(best.get("metric") or best.get("monitor") or info.monitor)
        info.best, info.best_epoch, info.best_step = value, _int(best.get("epoch")), _int(best.get("step"))
        info.best_row = next((r for r in history if r.get("epoch") == info.best_epoch), {})
    else:
        row = _best_of(history, info.monitor, info.mode) or _best_of(_val_rows(read_metrics(path)), info.monitor,
                                                                      info.mode)
        if row:
            info.best, info.best_epoch, info.best_step = _number(row[info.monitor]), _int(row.get("epoch")), \
                _int(row.get("step"))
            info.best_row = row

    final = summary.get("final")
    if isinstance(final, dict) and final:
        test = summary.get("test") if isinstance(summary.get("test"), dict) else {}
        info.final = {k: v for k, v in {**final, **test}.items() if _number(v) is not None}
    elif history:
        info.final = {k: v for k, v in history[-1].items()
                      if "/" in k and _number(v) is not None and not k.startswith("train/")}

    if _int(summary.get("epochs_done")) is not None:
        info.epochs_done = summary["epochs_done"]
    elif history:
        info.epochs_done = max((_int(r.get("epoch")) or 0 for r in history), default=-1) + 1
    if _number(summary.get("wall_s")) is not None:
        info.wall_s = summary["wall_s"]
    elif history:
        info.wall_s = sum(_number(r.get("seconds")) or 0.0 for r in history)
        info.wall_approx = True

    owner = lock_holder(path)
    if owner is not None:
        info.status = "running"
        where = f" on {owner['host']}" if owner.get("host") and owner["host"] != socket.gethostname() else ""
        info.reason = f"pid {owner.get('pid', '?')}{where}"
    elif summary and not (_int(summary.get("global_step")) is not None and _int(last.get("step")) is not None
                          and last["step"] > summary["global_step"]):  # (not resumed since, without ending)
        reason = str(summary.get("stop_reason") or "finished")
        info.status, info.reason = ("finished", "") if reason == "finished" else ("stopped", reason)
    elif not summary and info.max_epochs and info.epochs_done is not None and info.epochs_done >= info.max_epochs:
        info.status = "finished"  # a run from before summary.json: every epoch is in history.json
    # else: incomplete (died, killed, or resumed and not finished since its summary.json)
    return info


# ------------------------------------------------------------------------------------------------
# Many runs

def labels(paths: list[Path]) -> list[str]:
    """Short distinct names for runs: the folder name, with as many parent folders as it takes to
    tell them apart (stages and study trials share folder names)."""
    paths = [Path(os.path.abspath(p)) for p in paths]
    for depth in range(1, 1 + max((len(p.parts) for p in paths), default=1)):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def find_runs(root: Path | str, depth: int = 3) -> list[RunInfo]:
    """The run directories under `root` (and `root` itself when it is one), newest first. Folders
    that hold runs (a multi-stage run's stages, a study's trials) are searched `depth` levels deep."""
    root = Path(root)
    if not root.is_dir():
        raise RunsError(f"{root}: no such directory (runs are written under trainer.out_dir, default runs/)")
    if is_run_dir(root):
        return [load_run(root)]
    found: list[RunInfo] = []

    def walk(folder: Path, level: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if child.name in _NOT_RUNS:
                continue
            if is_run_dir(child):
                found.append(load_run(child, name=str(child.relative_to(root))))
            if level < depth:  # a run directory may hold stage runs or trials of its own
                walk(child, level + 1)

    walk(root, 1)
    return sorted(found, key=lambda r: r.updated, reverse=True)


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "-" if v is None else str(v)


def fmt_duration(s: float | None, approx: bool = False) -> str:
    if s is None:
        return "-"
    s = float(s)
    text = f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s" if s < 3600 else \
        f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return ("~" if approx else "") + text


def _best_text(r: RunInfo) -> str:
    if r.best is None:
        return "-"
    at = f" (epoch {r.best_epoch + 1})" if r.best_epoch is not None else ""  # counted from 1, as printed
    return f"{r.monitor}={fmt_value(r.best)}{at}"


def _epochs_text(r: RunInfo) -> str:
    done = "-" if r.epochs_done is None else str(r.epochs_done)
    return f"{done}/{r.max_epochs}" if r.max_epochs and r.max_epochs > 0 else done


def _clip(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = [header, *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def runs_table(runs: list[RunInfo]) -> str:
    rows = [[r.name, r.recipe or "-", _clip(r.status_text), _best_text(r), _epochs_text(r),
             fmt_duration(r.wall_s, r.wall_approx), time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated))]
            for r in runs]
    return table(["name", "recipe", "status", "best", "epochs", "wall", "updated"], rows)


# ------------------------------------------------------------------------------------------------
# compare

def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists stay values."""
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


_ABSENT = object()
_SAME_BY_NAME = {"trainer.run_name"}  # the column headers name the runs already


def show(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return v if v else "''"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


@dataclass
class Comparison:
    runs: list[RunInfo]
    names: list[str]
    differences: dict[str, list[Any]]   # flattened key -> one value per run (only keys that differ)
    equal: int                          # how many keys are the same in every run
    metrics: list[tuple[str, list[str]]]  # (row label, one cell per run)


def compare(paths: list[Path | str]) -> Comparison:
    if len(paths) < 2:
        raise RunsError("compare needs at least two run directories")
    runs = []
    for p in paths:
        r = load_run(p)
        if not r.config:
            raise RunsError(f"{p}: no readable config.yaml to compare")
        runs.append(r)
    names = labels([r.path for r in runs])
    for r, n in zip(runs, names):
        r.name = n
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differences, equal = {}, 0
    for k in keys:
        values = [f.get(k, _ABSENT) for f in flat]
        if all(v == values[0] and type(v) is type(values[0]) for v in values[1:]):
            equal += 1
        elif k not in _SAME_BY_NAME:
            differences[k] = values
    return Comparison(runs, names, differences, equal, _metric_rows(runs))


def _metric_rows(runs: list[RunInfo]) -> list[tuple[str, list[str]]]:
    rows = [("status", [_clip(r.status_text, 40) for r in runs])]
    monitors = {(r.monitor, r.mode) for r in runs}
    if len(monitors) == 1:
        (monitor, mode), = monitors
        rows.append((f"best {monitor} ({mode})", [fmt_value(r.best) for r in runs]))
    else:
        rows.append(("best (monitor)", [f"{fmt_value(r.best)} ({r.monitor}, {r.mode})" for r in runs]))
    rows.append(("best at epoch / step", [f"{fmt_value(None if r.best_epoch is None else r.best_epoch + 1)} / "
                                          f"{fmt_value(r.best_step)}" for r in runs]))
    at_best = list(dict.fromkeys(k for r in runs for k in r.best_row
                                 if "/" in k and k != r.monitor and _number(r.best_row[k]) is not None))
    rows += [(f"{k} at best", [fmt_value(_number(r.best_row.get(k))) for r in runs]) for k in at_best]
    finals = list(dict.fromkeys(k for r in runs for k in r.final))
    rows += [(f"final {k}", [fmt_value(_number(r.final.get(k))) for r in runs]) for k in finals]
    rows.append(("epochs", [_epochs_text(r) for r in runs]))
    rows.append(("wall", [fmt_duration(r.wall_s, r.wall_approx) for r in runs]))
    return rows


def comparison_text(c: Comparison) -> str:
    if c.differences:
        lines = [f"config: {len(c.differences)} key(s) differ, {c.equal} equal",
                 table(["key", *c.names], [[k, *(show(v) for v in vs)] for k, vs in c.differences.items()])]
    else:
        lines = [f"config: the {len(c.runs)} configs are equal ({c.equal} keys)"]
    return "\n".join([*lines, "", "metrics:", table(["", *c.names], [[label, *cells] for label, cells in c.metrics])])


# ------------------------------------------------------------------------------------------------
# Command lines (dispatched by trainlib/__main__.py)

def _run_cli(body) -> int:
    try:
        body()
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def main_runs(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainlib runs",
                                description="A table of the run directories under DIR, newest first "
                                            "(read-only: nothing in them is changed).")
    p.add_argument("dir", nargs="?", default="runs", help="folder holding run directories (default: runs)")
    args = p.parse_args(argv)

    def body() -> None:
        runs = find_runs(args.dir)
        print(runs_table(runs) if runs else f"no run directories under {args.dir}")

    return _run_cli(body)


def main_compare(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainlib compare",
                                description="The config keys that differ between runs (flattened section.key) "
                                            "and their best metrics side by side (read-only).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (two or more)")
    args = p.parse_args(argv)
    return _run_cli(lambda: print(comparison_text(compare(args.runs))))
