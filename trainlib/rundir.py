"""The run directory: which checkpoint continues a run, whether a folder already holds one, who
owns it now (a lock file), and clear errors when the disk refuses a write.

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

from . import checkpoint, dist
from .config import ConfigError, UserError
from .ema import with_ema
from .loggers import log

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


RUN_FILES = ("metrics.jsonl", "history.json", "train.log", "model.safetensors", "tb")


def clear_run_files(run_dir: Path) -> None:
    """What a run wrote (trainer.overwrite=true): its logs, exported weights and checkpoints."""
    for name in RUN_FILES:
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def find_resume(resume: str, out_dir: str, run_name: str, recipe: str) -> tuple[list[Path], Path | None]:
    """-> (the checkpoints trainer.resume names, newest first: the first that loads is used; the run
    directory to continue in, or None for the usual out_dir/run_name). `resume` is a file; a run
    directory (its checkpoints, continued in place); or 'auto': the checkpoints of
    out_dir/run_name, or of the run of this recipe whose newest checkpoint was written last ([] when
    there is none)."""
    if not resume:
        return [], None
    if resume == "auto":
        if run_name:
            return checkpoints_newest_first(Path(out_dir) / run_name), None
        runs = [(found, run) for run in Path(out_dir).glob(f"{recipe}_*") if (found := checkpoints_newest_first(run))]
        if not runs:
            return [], None
        found, run = max(runs, key=lambda fr: fr[0][0].stat().st_mtime)
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
    return [path], None


def open_run_dir(run_dir: Path, config_yaml: str, *, is_main: bool, resuming: bool, overwrite: bool,
                 resume_auto: bool, note: Callable[[str], None]) -> RunLock | None:
    """Every rank: create (or continue in) `run_dir` and take its lock (rank 0). A folder that
    already holds a run is continued only by a resume; a fresh start there needs overwrite (or is
    an elastic restart of this same job before its first checkpoint). On a problem every rank
    raises the same error and a folder this call created is removed again. -> rank 0's lock."""
    problem: tuple[str, str] | None = None
    lock = None
    if is_main:
        created = not run_dir.exists()
        try:
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
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise (ConfigError if problem[0] == "config" else RunDirError)(problem[1])
    return lock


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
