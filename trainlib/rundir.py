"""The run directory: which checkpoint continues a run, whether a folder already holds one, who
owns it now (a lock file), and clear errors when the disk refuses a write.

A folder holds a run when it has logged rows, a checkpoint or exported weights; config.yaml and
train.log alone (a start that failed before training) do not count, so a plain rerun works.
Nothing here ever deletes a file of another run: starting over in an occupied folder is the
Trainer's decision and needs trainer.overwrite=true.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from .config import UserError

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


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint that continues the run in `run_dir`: last.ckpt when it exists (every periodic
    save writes it), else the newest step=<N>.ckpt or top-k file by the step in its name (at one
    step the periodic save wins: it also holds that epoch's history). best.ckpt is a link to a top-k
    file, never newer than it."""
    folder = Path(run_dir) / "checkpoints"
    last = folder / "last.ckpt"
    if last.is_file():
        return last
    found = [(step, p.name.startswith("step="), p) for p in folder.glob("*.ckpt")
             if not p.name.startswith(".") and (step := _step_of(p.name)) is not None and p.is_file()]
    return max(found)[2] if found else None


def holds_run(run_dir: Path) -> bool:
    """Logged rows, a checkpoint or exported weights: a run a fresh start would destroy."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / "model.safetensors").exists()
            or any(not p.name.startswith(".") for p in (run_dir / "checkpoints").glob("*.ckpt")))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """`<run_dir>/.lock` names the process that owns the run directory (host, pid, start time, and the
    torchrun job id). A second run into the same folder refuses while the owner is alive; the lock
    of a process that died (SIGKILL, a crash) is taken over with one line saying so."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S"), "job": os.environ.get("TORCHELASTIC_RUN_ID", "")}
        self.held = False
        self.previous: dict[str, Any] | None = None  # the dead owner whose lock was taken over

    def owner(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: nobody we can name

    def acquire(self) -> str:
        """Take the lock or raise RunDirError naming its owner. Returns a note when a stale lock
        was taken over ('' otherwise)."""
        body = json.dumps(self.me).encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            except OSError as e:
                raise disk_error(e, f"the lock file {self.path}") from None
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(body)
                self.held = True
                if self.previous is None:
                    return ""
                p = self.previous
                return (f"took over the lock of process {p.get('pid', '?')} on {p.get('host', '?')} "
                        f"(started {p.get('since', '?')}), which is no longer running")
            owner = self.owner()
            if owner is None:
                continue  # released between our two looks
            host, pid = owner.get("host"), owner.get("pid")
            if host == self.me["host"] and isinstance(pid, int) and _alive(pid) and pid != os.getpid():
                raise RunDirError(f"run directory {self.path.parent} is in use by process {pid} on this host "
                                  f"(started {owner.get('since', '?')}); wait for it to end or pick another "
                                  f"trainer.run_name")
            if host and host != self.me["host"]:
                raise RunDirError(f"run directory {self.path.parent} is in use by process {pid} on host {host} "
                                  f"(started {owner.get('since', '?')}); if that run is gone, delete {self.path}")
            self.previous = owner  # dead owner (or unreadable lock): take it over
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise disk_error(e, f"the lock file {self.path}") from None
        raise RunDirError(f"could not take the lock {self.path}: another process keeps taking it")

    def same_job_restart(self) -> bool:
        """The folder's previous owner was an earlier attempt of this same torchrun job (an elastic
        restart): what it wrote belongs to this run."""
        p = self.previous or {}
        job = self.me["job"]
        return bool(job) and p.get("job") == job and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self.owner()
        if owner and owner.get("pid") == self.me["pid"] and owner.get("host") == self.me["host"]:
            try:
                self.path.unlink()
            except OSError:
                pass
