"""The run directory: where a run's files go, which checkpoint continues a run, whether a folder
already holds one, who owns it now (a lock file), and clear errors when the disk refuses a write.

Where (open_fit_dir, open_test_dir): trainer.run_name, or a new <out_dir>/<name>_<time> (-2, -3, ...
when that name is taken: two Trainers started in the same second both run); a second fit() of a
Trainer stays in its folder; resume=<file or folder> continues in the run it belongs to; resume=auto
without a run name picks the newest run of the recipe whose config matches (match_run), or refuses
naming the candidates; fast_dev_run and test() write into a sub-folder of the run they belong to
(fast_dev_run_<time>, test_<time>), else under <out_dir>/fast_dev_run/ and <out_dir>/test/.

A folder holds a run when it has logged rows, a checkpoint or exported weights; config.yaml and
train.log alone (a start that failed before training) do not count, so a plain rerun works.
Nothing here ever deletes a file of another run: starting over in an occupied folder is the
Trainer's decision and needs trainer.overwrite=true.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from . import checkpoint, dist
from .config import ConfigError, UserError, dump_yaml
from .ema import with_ema
from .loggers import LoggedNow, log, setup_text_log

LOCK_NAME = ".lock"


class RunDirError(UserError):
    """A run directory that cannot be used: in use by another process, or not writable."""


def disk_error(e: OSError, what: str) -> RunDirError:
    """One line for an OSError while writing `what`: the path, the reason and its errno name."""
    code = errno.errorcode.get(e.errno or 0, "")
    reason = f"{e.strerror or e}" + (f" ({code})" if code else "")
    hint = {errno.ENOSPC: "; free some space or set trainer.out_dir to another disk",
            errno.EDQUOT: "; free some space or set trainer.out_dir to another disk",
            errno.EROFS: "; set trainer.out_dir to a writable folder",
            errno.EACCES: "; set trainer.out_dir to a folder you can write",
            errno.EPERM: "; set trainer.out_dir to a folder you can write"}.get(e.errno or 0, "")
    return RunDirError(f"cannot write {what}: {reason}{hint}")


def _step_of(name: str) -> int | None:
    m = re.search(r"step=(\d+)", name)
    return int(m.group(1)) if m else None


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """The checkpoints that can continue the run in `run_dir`, newest first: last.ckpt (every
    periodic save writes it), then step=<N>.ckpt and top-k files by the step in their name (at one
    step the periodic save first: it also holds that epoch's end). best.ckpt is a link to a top-k
    file and not listed."""
    folder = Path(run_dir) / "checkpoints"
    found = [(step, p.name.startswith("step="), p) for p in folder.glob("*.ckpt")
             if not p.name.startswith(".") and (step := _step_of(p.name)) is not None and p.is_file()]
    last = folder / "last.ckpt"
    return ([last] if last.is_file() else []) + [p for *_, p in sorted(found, reverse=True)]


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints_newest_first(run_dir)
    return found[0] if found else None


def holds_run(run_dir: Path) -> bool:
    """Logged rows, a checkpoint or exported weights: a run a fresh start would destroy."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / "model.safetensors").exists()
            or any(not p.name.startswith(".") for p in (run_dir / "checkpoints").glob("*.ckpt")))


class RunLock:
    """`<run_dir>/.lock`: an exclusive flock held for the whole run, plus the owner's host, pid, start
    time and torchrun job id written in the file for messages. The kernel drops the flock when the
    process dies (SIGKILL included), so a dead owner's file is simply taken over, with one line
    saying whose it was; two runs started at the same instant cannot both get it. A lock file
    written on another host is refused (its flock may not be visible from here over a network
    file system)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S"), "job": os.environ.get("TORCHELASTIC_RUN_ID", "")}
        self.fd: int | None = None
        self.previous: dict[str, Any] = {}  # the dead owner whose lock was taken over

    def _read(self, fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # unreadable or half-written by a process that died: nobody we can name

    def acquire(self) -> str:
        """Take the lock or raise RunDirError naming its owner. Returns a note when a dead owner's
        lock was taken over ('' otherwise)."""
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise disk_error(e, f"the lock file {self.path}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read(fd)
                os.close(fd)
                raise RunDirError(f"run directory {self.path.parent} is in use by process {owner.get('pid', '?')} on "
                                  f"{owner.get('host', 'this host')} (started {owner.get('since', '?')}); wait for it "
                                  "to end or pick another trainer.run_name") from None
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    raise FileNotFoundError  # released and removed between our open and our flock: again
            except FileNotFoundError:
                os.close(fd)
                continue
            owner = self._read(fd)
            if owner.get("host") and owner["host"] != self.me["host"]:
                os.close(fd)
                raise RunDirError(f"run directory {self.path.parent} is in use by process {owner.get('pid', '?')} on "
                                  f"host {owner['host']} (started {owner.get('since', '?')}); if that run is gone, "
                                  f"delete {self.path}")
            self.fd, self.previous = fd, owner
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.me).encode(), 0)
            except OSError as e:
                self.release()
                raise disk_error(e, f"the lock file {self.path}") from None
            if not owner:
                return ""
            return (f"took over the lock of process {owner.get('pid', '?')} on {owner.get('host', '?')} "
                    f"(started {owner.get('since', '?')}), which is no longer running")
        raise RunDirError(f"could not take the lock {self.path}: other processes keep taking and releasing it")

    def same_job_restart(self) -> bool:
        """The folder's previous owner was an earlier attempt of this same torchrun job (an elastic
        restart): what it wrote belongs to this run."""
        job = self.me["job"]
        return bool(job) and self.previous.get("job") == job and os.environ.get("TORCHELASTIC_RESTART_COUNT",
                                                                                "0") != "0"

    def release(self) -> None:
        """Remove the file, then drop the flock (a run waiting for the folder re-checks the inode)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


RUN_FILES = ("metrics.jsonl", "metrics.csv", "history.json", "train.log", "model.safetensors", "summary.json", "tb",
             "plots", "lr_find.csv", "lr_find.png", "profiler")


def clear_run_files(run_dir: Path) -> None:
    """What a run wrote (trainer.overwrite=true): its logs, exported weights and checkpoints."""
    for name in RUN_FILES:
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


# Keys a resume may change, and that trainer.resume=auto's search (and hyperopt's final training) ignores
# when it compares a run's config.yaml with the current config: how long to train, where the files go,
# what the run runs on, how often it saves, what it logs. A key ending in "." is a whole section.
RESUME_MAY_DIFFER = (
    "trainer.resume", "trainer.run_name", "trainer.out_dir", "trainer.overwrite", "trainer.test_only",
    "trainer.fast_dev_run", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time",
    "trainer.early_stop_patience", "trainer.device", "trainer.ddp_timeout", "trainer.ckpt_every_n_steps",
    "trainer.keep_last_k", "trainer.save_last", "trainer.export", "data.num_workers", "data.pin_memory",
    "log.", "profiler.")
LENGTH_KEYS = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.early_stop_patience")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_config(run_dir: Path) -> dict:
    """A run's config.yaml as a dict ({} when missing or unreadable)."""
    try:
        data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def config_differences(saved: dict, current: Any, ignore: tuple[str, ...] = RESUME_MAY_DIFFER) -> list[str]:
    """'key: saved -> current' for every key of a run's saved config that the current config (a Config
    or its dict) sets otherwise, except `ignore`, keys only one side has (another library version), and
    what a finder chose when the saved run had it on (tune.auto_lr_find: optim.lr; auto_scale_batch_size:
    data.batch_size and trainer.accumulate_grad_batches, kept by a resume)."""
    a = _flat(saved)
    b = _flat(current if isinstance(current, dict) else yaml.safe_load(dump_yaml(current)))
    skip = {k for k in ignore if not k.endswith(".")}
    sections = tuple(k for k in ignore if k.endswith("."))
    if a.get("tune.auto_lr_find"):
        skip.add("optim.lr")
    if a.get("tune.auto_scale_batch_size"):
        skip |= {"data.batch_size", "trainer.accumulate_grad_batches"}
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a
            if k in b and k not in skip and not k.startswith(sections) and a[k] != b[k]]


def differences_text(diffs: list[str]) -> str:
    return ", ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")


def match_run(cfg: Any, name: str) -> tuple[list[Path], Path | None, str, str]:
    """trainer.resume=auto without a run name (rank 0): among the folders of out_dir that hold a checkpoint
    and belong to this recipe (config.yaml names it; without a recipe: named <name>_*), the one whose newest
    checkpoint was written last among those whose config matches this one (config_differences is empty).
    -> (its checkpoints, newest first; the run; a line saying which; an error listing the candidates when
    none matches). ([], None, '', '') when there is no candidate: a fresh run."""
    out = Path(cfg.trainer.out_dir)
    current = yaml.safe_load(dump_yaml(cfg))
    runs = []
    for run in sorted(out.iterdir()) if out.is_dir() else ():
        found = checkpoints_newest_first(run) if run.is_dir() else []
        if not found:
            continue
        saved = read_config(run)
        if saved.get("recipe", "") != cfg.recipe or not (cfg.recipe or run.name.startswith(f"{name}_")):
            continue
        diffs = config_differences(saved, current) if saved else ["config.yaml missing or unreadable"]
        runs.append((found[0].stat().st_mtime, run, found, diffs))
    if not runs:
        return [], None, "", ""
    runs.sort(key=lambda r: r[0], reverse=True)
    what = f"recipe {cfg.recipe}" if cfg.recipe else f"{name}_*"
    for _, run, found, diffs in runs:
        if not diffs:
            others = f"; {len(runs) - 1} other run(s) of it there differ" if len(runs) > 1 else ""
            return found, run, (f"trainer.resume=auto: continuing {run}, the newest run of {what} in {out} whose "
                                f"config matches this one{others}"), ""
    listed = "; ".join(f"{run.name} ({differences_text(diffs)})" for _, run, _, diffs in runs[:5])
    return [], None, "", (
        f"trainer.resume=auto: no run of {what} in {out} has this config (keys a resume may change aside: "
        f"trainer.max_epochs, max_steps, max_time, log.*, ...); runs with a checkpoint, newest first, and how "
        f"they differ (theirs -> yours): {listed}{'; ...' if len(runs) > 5 else ''}. Continue one with "
        f"trainer.resume=<its folder>, or drop trainer.resume to start a new run")


def run_of(path: str | os.PathLike | None) -> Path | None:
    """The run folder a checkpoint or weights file belongs to (<run>/checkpoints/x.ckpt, <run>/model.safetensors;
    a run folder has config.yaml), else None."""
    if not path:
        return None
    p = Path(path).absolute()
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return run if (run / "config.yaml").is_file() else None


def find_resume(cfg: Any, name: str, note: Callable[[str], None]) -> tuple[list[Path], Path | None]:
    """-> (the checkpoints trainer.resume names, newest first: the first that loads is used; the run
    directory to continue in, or None for the usual out_dir/run_name). `resume` is a file (continued in
    the run it belongs to, unless trainer.run_name names another folder); a run directory (its
    checkpoints, continued in place); or 'auto': the checkpoints of out_dir/run_name, or without a run
    name the run match_run picks (rank 0 decides, every rank gets the same; [] when there is none)."""
    resume, out_dir, run_name = cfg.trainer.resume, cfg.trainer.out_dir, cfg.trainer.run_name
    if not resume:
        return [], None
    if resume == "auto":
        if run_name:
            return checkpoints_newest_first(Path(out_dir) / run_name), None
        found, run, said, error = dist.broadcast_object(match_run(cfg, name) if dist.rank() == 0 else None)
        if error:
            raise ConfigError(error)
        if said:
            note(said)
        return found, run
    path = Path(resume)
    if path.is_dir():
        run = path.parent if path.name == "checkpoints" else path
        found = checkpoints_newest_first(run)
        if not found:
            raise checkpoint.CheckpointError(f"trainer.resume={resume}: no checkpoint in {run / 'checkpoints'} "
                                             "(expected last.ckpt, step=<N>.ckpt or a top-k file)")
        return found, (None if run_name else run)
    if not path.is_file():
        raise checkpoint.CheckpointError(f"trainer.resume: checkpoint not found: {resume} (expected a .ckpt file, "
                                         "a run directory, or 'auto')")
    return [path], (None if run_name else run_of(path))


def make_unique(path: Path) -> Path:
    """Create the folder `path`, or `<path>-2`, `<path>-3`, ... when that name is taken: mkdir is atomic,
    so two processes (or two Trainers started in the same second) never get the same one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        p = path if i == 1 else path.with_name(f"{path.name}-{i}")
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise RunDirError(f"cannot make a run directory {path}: {path.name}-2 to -9999 are all taken")


def open_run_dir(run_dir: Path, config_yaml: str, *, is_main: bool, resuming: bool, overwrite: bool,
                 resume_auto: bool, note: Callable[[str], None], unique: bool = False) -> tuple[Path, RunLock | None]:
    """Every rank: create (or continue in) `run_dir` and take its lock (rank 0). A folder that
    already holds a run is continued only by a resume; a fresh start there needs overwrite (or is
    an elastic restart of this same job before its first checkpoint). `unique`: a name of our own
    choosing (a default run name, a test_<time> folder), suffixed -2, -3, ... when taken (make_unique).
    On a problem every rank raises the same error and a folder this call created is removed again.
    -> (the folder, the same on every rank; rank 0's lock)."""
    problem: tuple[str, str] | None = None
    lock = None
    if is_main:
        created = unique or not run_dir.exists()
        try:
            if unique:
                run_dir = make_unique(run_dir)
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
            taken = lock.acquire()
            if taken:
                note(taken)
            if not resuming and holds_run(run_dir):
                if lock.same_job_restart() and not checkpoints_newest_first(run_dir):
                    note("an earlier attempt of this job wrote this run directory and died before its first "
                         "checkpoint: starting over")
                    clear_run_files(run_dir)
                elif overwrite:
                    note(f"trainer.overwrite=true: removed the previous run's files in {run_dir}")
                    clear_run_files(run_dir)
                else:
                    ways = ("" if resume_auto else "continue it with trainer.resume=auto, ") + \
                        "start over with trainer.overwrite=true, or pick another trainer.run_name"
                    why = " but no checkpoint to resume" if resume_auto else ""
                    problem = ("config", f"run directory {run_dir} already holds a run{why}; {ways}")
            if problem is None:
                (run_dir / "checkpoints").mkdir(exist_ok=True)
                for stale in [*run_dir.glob(".*.tmp-*"), *(run_dir / "checkpoints").glob(".*.tmp-*")]:
                    stale.unlink(missing_ok=True)  # half-written files of a process that died mid-write
                checkpoint.atomic_write_bytes(run_dir / "config.yaml", config_yaml.encode())
        except RunDirError as e:
            problem = ("disk", str(e))
        except OSError as e:
            problem = ("disk", str(disk_error(e, f"the run directory {run_dir}")))
        if problem is not None:
            if created and lock is not None and lock.fd is not None:  # only what this call made, and only
                shutil.rmtree(run_dir, ignore_errors=True)         # while holding it (not a racing winner's)
            if lock is not None:
                lock.release()
    problem, run_dir = dist.broadcast_object((problem, run_dir))
    if problem is not None:
        raise (ConfigError if problem[0] == "config" else RunDirError)(problem[1])
    return run_dir, lock


# ------------------------------------------------------------------------------------------------
# Where a Trainer's fit() and test() write (`t` is the Trainer, duck-typed: this module does not import it)

def _stamp() -> str:
    return dist.broadcast_object(time.strftime("%Y%m%d_%H%M%S"))  # rank 0's clock


def _open(t: Any, run_dir: Path, *, unique: bool, resuming: bool) -> Path:
    tc = t.tc
    run_dir, t.lock = open_run_dir(run_dir, dump_yaml(t.cfg), is_main=t.is_main, resuming=resuming,
                                   overwrite=tc.overwrite, resume_auto=tc.resume == "auto", note=t._note, unique=unique)
    t.state.run_dir = run_dir
    setup_text_log(run_dir, t.is_main)
    for text in t.setup_notes:  # decisions made while building, before the text log existed
        log.info(text)
    t.setup_notes = LoggedNow()  # from here on, notes are logged as they come
    return run_dir


def open_fit_dir(t: Any, run_dir: Path | None, resume: Path | None) -> None:
    """fit(): the folder it trains in. A second fit() of the same Trainer: the folder of the first (its
    state is in memory). trainer.fast_dev_run: a dry run never writes into a run: trainer.run_name when
    that folder holds none, else <run>/fast_dev_run_<time> (the run it resumes, or trainer.run_name's),
    else <out_dir>/fast_dev_run/<name>_<time>. Else the run it resumes (`run_dir`), trainer.run_name,
    or a new <out_dir>/<name>_<time> (-2, -3, ... when two start in the same second)."""
    tc, out, again = t.tc, Path(t.tc.out_dir), getattr(t, "fitted_in", None)
    unique, resuming = False, False
    if again is not None:
        run_dir, resuming = again, True
        t._note(f"fit() again on the same Trainer: continuing in {again} at epoch {t.state.epoch}, step "
                f"{t.state.global_step}")
    elif t.fast_dev_run and run_dir is None and tc.run_name and \
            not dist.broadcast_object(t.is_main and holds_run(out / tc.run_name)):
        run_dir = out / tc.run_name  # a folder you named for it, holding no run
    elif t.fast_dev_run:
        base = run_dir or (out / tc.run_name if tc.run_name else None)
        run_dir, unique = (base / f"fast_dev_run_{_stamp()}" if base else out / "fast_dev_run" / f"{t.name}_{_stamp()}",
                           True)
    else:
        unique = run_dir is None and not tc.run_name
        run_dir = run_dir or out / (tc.run_name or f"{t.name}_{_stamp()}")
        resuming = resume is not None and Path(resume).resolve().parent.parent == run_dir.resolve()  # (not another's)
    t.fitted_in = _open(t, run_dir, unique=unique, resuming=resuming)


def open_test_dir(t: Any, weights: str | None) -> None:
    """test(): after a fit() of this Trainer, <its run>/test_<time>; with trainer.run_name, that folder
    (<it>/test_<time> when it holds a run: its files stay as they are); with weights from a run's
    folder, <that run>/test_<time>; else <out_dir>/test/<name>_<time>."""
    tc, out, fitted = t.tc, Path(t.tc.out_dir), getattr(t, "fitted_in", None)
    unique = True
    if fitted is not None:
        run_dir = fitted / f"test_{_stamp()}"
    elif tc.run_name:
        run_dir, unique = out / tc.run_name, False
        if dist.broadcast_object(t.is_main and holds_run(run_dir)):
            run_dir, unique = run_dir / f"test_{_stamp()}", True
    else:
        run = dist.broadcast_object(run_of(weights) if t.is_main else None)
        run_dir = run / f"test_{_stamp()}" if run is not None else out / "test" / f"{t.name}_{_stamp()}"
    _open(t, run_dir, unique=unique, resuming=False)


def fit_again(t: Any) -> bool:
    """A second fit() of a Trainer whose first one ended: True, and one line saying so, when there is
    nothing more to train (epochs or steps reached, or stopped); fit() then returns the first result
    and writes nothing but that line (to the train.log open last). Raise trainer.max_epochs
    (t.tc.max_epochs) first to train on in the same folder."""
    st, tc = t.state, t.tc
    if getattr(t, "fitted_in", None) is None or getattr(t, "fit_result", None) is None:
        return False
    max_epochs = 1 if t.fast_dev_run else tc.max_epochs
    why = (f"trainer.max_epochs={max_epochs} reached" if st.epoch >= max_epochs else
           f"trainer.max_steps={tc.max_steps} reached" if 0 < tc.max_steps <= st.global_step else
           f"stopped: {st.stop_reason}" if st.should_stop else "")
    if why:
        log.info(f"fit() again: {t.fitted_in} is trained to epoch {st.epoch}, step {st.global_step} ({why}): nothing "
                 f"more to train; raise trainer.max_epochs (or max_steps) to train on in the same folder")
    return bool(why)


def export(run_dir: Path, final: dict, metadata: dict[str, str]) -> str:
    """model.safetensors in `run_dir`: best.ckpt's weights when there is one, else `final`
    (refused when not finite). -> which weights ('best', 'final', or '' when nothing was written)."""
    best = run_dir / "checkpoints" / "best.ckpt"
    state, source = final, "final"
    if best.is_file():
        saved = checkpoint.load(best)
        state, source = with_ema(saved["model"], saved), "best"
        # frozen parameters it left out (trainer.save_frozen=false) never changed: the final ones
        state = {**state, **{k: final[k] for k in saved.get("frozen_left_out", ()) if k not in state}}
    elif not all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point()):
        log.error("not exporting model.safetensors: the final weights are not finite")
        return ""
    checkpoint.export_safetensors(state, run_dir / "model.safetensors", {**metadata, "weights": source})
    log.info(f"exported {source} weights to {run_dir / 'model.safetensors'}")
    return source


def truncate_lines(path: Path, n: int) -> None:
    """Keep the first n lines (rows logged after the checkpoint, by a run that then died, go)."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) != n:
        checkpoint.atomic_write_bytes(path, b"".join(lines[:n]))
