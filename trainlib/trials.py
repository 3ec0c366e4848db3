"""One trial of a study, trained on every rank, and the process group the ranks share across trials.

Rank 0 has asked optuna for the trial and broadcast its params (trainlib/hpo.py); then every rank
calls `run_trial`: `trial_config` makes the trial's config (the params as overrides, the folder
<out_dir>/<study>/trial_<n>, no weights kept), `trial_datasets` its fixed-seed subset of the train
split, and `TrialMonitor` reports each validation to optuna and stops every rank at the same step
when rank 0's pruner says so. Each rank's status then goes through `StudyGroup.agree` and `combine`
makes one outcome of them, identical on every rank.

Why the rendezvous store and not a collective: a rank that fails mid-trial may leave its peers
inside a collective, and the group may be broken. The failing rank closes its group at once
(`StudyGroup.abandon`) so its peers get an error instead of hanging; the store still works, so
every rank learns what happened, takes the same path through the study, and joins a fresh group
(`StudyGroup.renew`) before the next trial.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import shutil
import sys
import traceback
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from . import dist
from .callbacks import Callback
from .metrics import improved
from .preemption import Preempted
from .recipe import _peer_failure, run
from .search_space import apply_params
from .study_setup import Setup, StudyError


class _StudyPreempted(Preempted):
    def __str__(self) -> str:
        return (f"{super().__str__().split(';')[0]} during a trial; run the same command again to continue the "
                f"study (with hpo.storage, e.g. sqlite:///study.db)")


# ------------------------------------------------------------------------------------------------
# The process group of the study


class StudyGroup:
    """One process group for the study, rebuilt after a failed trial.

    A trial that fails on one rank may leave its peers inside a collective waiting for it. The
    failing rank destroys its group at once (`abandon`): its peers' pending gloo collectives then
    fail with "Connection closed by peer" instead of hanging. Outcomes are exchanged through the
    rendezvous store (independent of the group), and after a failure every rank joins a fresh
    group (`renew`) under a new store prefix. With NCCL a peer blocked inside a GPU collective only
    notices after trainer.ddp_timeout (the NCCL watchdog then ends the process): on GPU, a failure
    on a single rank mid-step ends the study (resume it with hpo.storage).
    """

    def __init__(self, device: torch.device, timeout_s: float) -> None:
        self.env = dist.env_from_torchrun()
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store: Any = None
        self.generation = 0
        self.round = 0
        if self.env.world_size > 1:
            # DDP imports this module lazily; its functions capture the default group in their default
            # arguments (group=group.WORLD) at import time, which would keep every group we destroy
            # alive, sockets open, and a peer waiting on them would hang. Import it while none exists.
            import torch.distributed.nn.functional  # noqa: F401
            store, _, _ = next(torch_dist.rendezvous("env://", rank=self.env.rank, world_size=self.env.world_size,
                                                     timeout=self.timeout))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self.store = torch_dist.PrefixStore(f"trainlib/hpo/attempt_{attempt}", store)
            self._init()

    def _init(self) -> None:
        torch_dist.init_process_group(**dist.group_options(self.device, self.timeout.total_seconds()),
                                      store=torch_dist.PrefixStore(f"group_{self.generation}", self.store),
                                      rank=self.env.rank, world_size=self.env.world_size)

    def abandon(self) -> None:
        """This rank failed inside a trial: close the group so no peer waits for it. Gloo closes its
        connections only when the group object dies, so the caller must have dropped the trial's
        objects (trainer, DDP module, traceback) first."""
        if self.store is None or not torch_dist.is_initialized():
            return
        ref = weakref.ref(torch_dist.group.WORLD)
        torch_dist.destroy_process_group()
        gc.collect()
        if ref() is not None:
            print(f"[rank {self.env.rank}] [hpo] warning: the failed trial's process group is still referenced; "
                  f"ranks waiting for this one stop only after trainer.ddp_timeout", file=sys.stderr, flush=True)

    def agree(self, status: dict) -> list[dict]:
        """Every rank's status, on every rank (through the store, so it works with a broken group)."""
        if self.store is None:
            return [status]
        key = f"status_{self.round}"
        self.round += 1
        self.store.set(f"{key}/{self.env.rank}", json.dumps(status))
        keys = [f"{key}/{r}" for r in range(self.env.world_size)]
        self.store.wait(keys, self.timeout)
        return [json.loads(self.store.get(k)) for k in keys]

    def renew(self) -> None:
        if self.store is None:
            return
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        self.generation += 1
        self._init()


# ------------------------------------------------------------------------------------------------
# One trial


class TrialMonitor(Callback):
    """Tracks the trial's best metric; reports every validation to optuna (rank 0) and stops all
    ranks together when rank 0's pruner says so. Notes non-finite training losses."""

    def __init__(self, trial: Any, metric: str, direction: str, prune: bool) -> None:
        self.trial, self.metric, self.direction, self.prune = trial, metric, direction, prune
        self.trainer: Any = None
        self.best: float | None = None
        self.best_epoch = -1
        self.last: float | None = None
        self.validations = 0
        self.pruned_epoch: int | None = None
        self.nonfinite_loss = False

    def on_fit_start(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_log(self, trainer: Any, row: dict) -> None:
        if row.get("skipped_steps") or not math.isfinite(row.get("loss", 0.0)):
            self.nonfinite_loss = True

    def on_fit_end(self, trainer: Any) -> None:
        # trainer.nonfinite=stop ends the run with this reason (decided from reduced values: same on every rank)
        if trainer.halted:
            self.nonfinite_loss = True

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        if self.metric not in metrics:
            raise StudyError(f"hpo.metric={self.metric!r} is not a validation metric; "
                             f"available: {', '.join(sorted(metrics))}")
        value = float(metrics[self.metric])
        self.validations += 1
        self.last = value
        if math.isfinite(value) and improved(value, self.best, "max" if self.direction == "maximize" else "min"):
            self.best, self.best_epoch = value, trainer.epoch
        prune = False
        if self.trial is not None and math.isfinite(value):  # rank 0
            self.trial.report(value, step=trainer.epoch)
            prune = self.prune and self.trial.should_prune()
        if self.prune:
            prune = dist.broadcast_object(prune)  # rank 0 decides; every rank stops after this validation
        if prune:
            self.pruned_epoch = trainer.epoch
            trainer.request_stop(f"pruned by hpo.pruner at epoch {trainer.epoch} ({self.metric}={value:.6g})")

    def outcome(self, nonfinite_policy: str) -> dict:
        if self.pruned_epoch is not None:
            return {"state": "pruned", "value": self.last, "epoch": self.pruned_epoch}
        if self.nonfinite_loss and nonfinite_policy == "stop":
            return {"state": "fail", "reason": "non-finite training loss (value nan; trainer.nonfinite=stop)"}
        if self.best is None:
            what = "never finite" if self.validations else "never computed (no validation ran)"
            return {"state": "fail", "reason": f"{self.metric} was {what}"}
        return {"state": "complete", "value": self.best, "epoch": self.best_epoch}


def trial_datasets(fraction: float, seed: int, splits: dict) -> dict:
    """Trials: a fixed-seed subset of the train split (the same on every rank and every trial)."""
    if splits.get("val") is None:
        raise StudyError("hyperopt scores trials on the val split, and the recipe's build_datasets returned none")
    if fraction < 1.0:
        train = splits["train"]
        n = len(train)
        k = max(1, round(n * fraction))
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(n, generator=g)[:k].tolist())
        splits = {**splits, "train": torch.utils.data.Subset(train, idx)}
    return splits


def wandb_group(cfg: Any, study_name: str) -> None:
    """wandb runs of one study (its trials and final training) share a group, unless log.wandb_group names one."""
    if "wandb" in cfg.log.loggers and not cfg.log.wandb_group:
        cfg.log.wandb_group = study_name


def trial_config(s: Setup, number: int, params: dict) -> Any:
    cfg = apply_params(s.cfg, params, s.aliases, f"trial {number}")
    t = cfg.trainer
    t.out_dir, t.run_name = str(s.study_dir), f"trial_{number}"
    t.resume, t.overwrite = "", True     # the study owns its trial folders
    t.save_top_k, t.save_last, t.ckpt_every_n_steps, t.export = 0, False, 0, False  # trials keep no weights
    wandb_group(cfg, s.study_name)
    return cfg


def run_trial(s: Setup, group: StudyGroup, number: int, params: dict, trial: Any) -> dict:
    """Every rank: train one trial; -> this rank's status {state, value | reason, step}."""
    monitor = TrialMonitor(trial, s.metric, s.direction, s.hpo.pruner != "none")
    status: dict[str, Any] = {"rank": group.env.rank}
    failure: tuple[str, bool, str] | None = None
    try:
        cfg = trial_config(s, number, params)
        run(s.recipe, cfg, s.demo, callbacks=[monitor],
            datasets_hook=partial(trial_datasets, s.hpo.train_fraction, s.hpo.seed))
        status.update(monitor.outcome(cfg.trainer.nonfinite))
    except StudyError:
        raise
    except Preempted as e:
        raise _StudyPreempted(e.signum, e.checkpoint) from None
    except Exception as e:  # noqa: BLE001 - any error fails this trial only
        text = str(e).strip()
        failure = (f"{type(e).__name__}: {text.splitlines()[0][:500] if text else ''}",
                   group.env.world_size > 1 and _peer_failure(e), traceback.format_exc())
    # the exception (and with it the trial's frames) is gone here; drop the trainer too
    status["step"] = monitor.trainer.global_step if monitor.trainer is not None else None
    monitor.trainer = None
    if failure is not None:
        reason, peer, trace = failure
        prefix = f"[rank {group.env.rank}] " if group.env.world_size > 1 else ""
        if peer:
            print(f"{prefix}[hpo] trial {number}: a collective failed because another rank failed ({reason[:200]})",
                  file=sys.stderr, flush=True)
        else:
            print(f"{prefix}[hpo] trial {number} failed: {reason}\n{trace}", file=sys.stderr, flush=True)
        group.abandon()
        status.update(state="fail", reason=reason, peer=peer)
    return status


def combine(statuses: list[dict]) -> dict:
    """The trial's outcome from every rank's status (identical on every rank)."""
    steps = [st.get("step") for st in statuses]
    fails = [st for st in statuses if st["state"] == "fail"]
    if fails:
        own = [st for st in fails if not st.get("peer")] or fails
        ranks = ", ".join(str(st["rank"]) for st in own)
        reason = own[0]["reason"] + (f" (rank {ranks})" if len(statuses) > 1 else "")
        return {"state": "fail", "reason": reason, "rank_steps": steps}
    states = {st["state"] for st in statuses}
    if len(states) > 1 or len(set(steps)) > 1:
        return {"state": "fail", "reason": f"ranks disagree: states {[st['state'] for st in statuses]}, "
                                           f"steps {steps}", "rank_steps": steps}
    return {**statuses[0], "rank_steps": steps}


def cleanup_trial(run_dir: Path) -> None:
    """Temporary weights go; config.yaml, metrics.jsonl, train.log and history.json stay."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "model.safetensors").unlink(missing_ok=True)

