"""What a checkpoint of a training run holds, and putting it back.

A checkpoint holds everything a resume needs to continue bit for bit: the model (plain keys, whole
under FSDP too), optimizer, LR schedule, GradScaler, where the loop was (epoch, step, micro-batch
of the epoch), the running sums of an unfinished epoch and every rank's RNG states (gathered), the
non-finite step counts, the callbacks' states, the resolved config and the library version.
`trainer` is the Trainer (duck-typed: this module does not import it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import checkpoint, dist, rundir
from .config import to_dict
from .ema import with_ema
from .loggers import log
from .version import __version__


def capture(trainer: Any, epoch_done: bool) -> dict:
    """Everything a resume needs. RNG states and running sums of every rank are gathered (a collective)."""
    t, st = trainer, trainer.state
    return {
        "format": checkpoint.FORMAT, "version": __version__,
        **t.wrapped.checkpoint_model(),  # "model", and the frozen keys left out (trainer.save_frozen=false)
        "optimizer": t.wrapped.optimizer_state(t.optimizer),
        "ema": t.ema.state_dict() if t.ema else None,  # the averaged weights (ema.py), whole
        "schedule": t.schedule.state_dict(), "scaler": t.scaler.state_dict(),
        "epoch": st.epoch, "global_step": st.global_step, "batch_in_epoch": st.batch_in_epoch,
        "epoch_done": epoch_done, "rows_logged": t.rows_logged, "skips": t.nonfinite.state_dict(),
        # each rank's sums of the unfinished epoch (pending items as they are: summing changes rounding)
        "accumulators": dist.all_gather_object(None if epoch_done else t.stats.state_dict()),
        "sampler_seed": t.tc.seed, "world_size": t.env.world_size,
        "micro_splits": t.step.splits,  # trainer.oom_recovery: loader batches cut into this many micro-batches
        "rng": dist.all_gather_object(dist.rng_state()),
        "callbacks": {cb.key: cb.state_dict() for cb in t.callbacks if cb.key},
        "config": to_dict(t.cfg),
    }


def save(trainer: Any, path: str | os.PathLike, epoch_done: bool) -> bool:
    """Every rank calls this; rank 0 writes atomically. Never writes NaN/inf weights: False (on
    every rank) when it did not write. A failed write (full disk) ends every rank with one line;
    the previous file stays."""
    if not trainer.wrapped.weights_finite():
        kept = ("the previous file is kept" if Path(path).is_file() else
                "no earlier file to keep: the weights diverged before it was first written; lower optim.lr")
        log.error(f"not writing {path}: the model has non-finite weights ({kept})")
        return False
    state = capture(trainer, epoch_done)
    error = ""
    if trainer.is_main:
        try:
            checkpoint.atomic_save(state, path)
        except OSError as e:
            kept = " (the previous file is kept)" if Path(path).is_file() else ""
            error = str(rundir.disk_error(e, f"checkpoint {path}{kept}"))
    error = dist.broadcast_object(error)  # checkpoint time only
    if error:
        raise rundir.RunDirError(error)
    return True


def restore(trainer: Any, path: str | os.PathLike, weights_only: bool = False) -> None:
    """The weights, or with weights_only=False everything `capture` saved. Touches no file."""
    t, st, env = trainer, trainer.state, trainer.env
    if str(path).endswith(".safetensors"):  # exported weights (a previous stage's final ones): a start only
        if not weights_only:
            raise checkpoint.CheckpointError(f"trainer.resume={path}: a weights file cannot resume a run (no "
                                             "optimizer or loop state); use it as trainer.ckpt_path")
        t.wrapped.load_state_dict(checkpoint.read_safetensors(path)[0], str(path))
        if t.ema:
            t.ema.reset()
        return
    saved = checkpoint.load(path)
    left_out = saved.get("frozen_left_out", [])  # keep the model's values: as built (+ trainer.ckpt_path)
    if weights_only:  # a start or an evaluation: the weights validation chose, i.e. the averaged ones
        t.wrapped.load_state_dict(with_ema(saved["model"], saved), str(path), left_out)
        if t.ema:
            t.ema.reset()
        return
    keep_found_batch(t, saved.get("config", {}), path)
    if left_out and t.tc.ckpt_path:  # the run started from these weights: its frozen ones come from there
        restore(trainer, t.tc.ckpt_path, weights_only=True)
    t.wrapped.load_state_dict(saved["model"], str(path), left_out)
    if t.ema and saved.get("ema"):
        t.ema.load_state_dict(saved["ema"], str(path))
    elif t.ema:  # a file without an average (EMA turned on mid-run) starts one from its weights
        t.ema.reset()
    t.wrapped.load_optimizer_state(t.optimizer, saved["optimizer"])
    t.schedule.load_state_dict(saved["schedule"])
    t.scaler.load_state_dict(saved["scaler"])
    for cb in t.callbacks:
        if cb.key and cb.key in saved["callbacks"]:
            cb.load_state_dict(saved["callbacks"][cb.key])
    st.global_step, t.rows_logged = saved["global_step"], saved["rows_logged"]
    st.epoch, st.batch_in_epoch = saved["epoch"], saved["batch_in_epoch"]
    if saved["epoch_done"]:
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
    elif len(saved["accumulators"]) == env.world_size and saved["accumulators"][env.rank] is not None:
        t.stats.load_state_dict(saved["accumulators"][env.rank])
    t.nonfinite.load_state_dict(saved.get("skips", {}))
    t.step.set_splits(saved.get("micro_splits", 1))
    if len(saved["rng"]) == env.world_size:
        dist.set_rng_state(saved["rng"][env.rank])
    else:
        log.warning(f"{path} was written by {len(saved['rng'])} process(es), this run has {env.world_size}: "
                    "random streams restart from the seed (results will differ from an uninterrupted run)")


def keep_found_batch(trainer: Any, saved_config: dict, path: Any) -> None:
    """tune.auto_scale_batch_size chose data.batch_size (and the accumulation) when the run began:
    a resume takes them from the checkpoint's config (the finder does not run again), so the
    epoch's position and the global batch mean what they meant."""
    t = trainer
    lr = saved_config.get("optim", {}).get("lr")
    if t.cfg.tune.auto_lr_find and lr is not None:  # the schedule's state holds it; the config says it too
        t.cfg.optim.lr = lr
    if not t.cfg.tune.auto_scale_batch_size:
        return
    batch = saved_config.get("data", {}).get("batch_size")
    accumulate = saved_config.get("trainer", {}).get("accumulate_grad_batches")
    if batch is None or (batch, accumulate) == (t.cfg.data.batch_size, t.tc.accumulate_grad_batches):
        return
    t.cfg.data.batch_size, t.tc.accumulate_grad_batches = batch, accumulate or t.tc.accumulate_grad_batches
    t._build_data()
    t._note(f"tune.auto_scale_batch_size: data.batch_size={batch}, trainer.accumulate_grad_batches="
            f"{t.tc.accumulate_grad_batches} as chosen when the run began ({path})")


def restore_newest(trainer: Any, candidates: list) -> Any:
    """Resume from the newest of `candidates` that can be read (an unreadable one is named, and the
    next newest is tried); None when there is none."""
    for i, path in enumerate(candidates):
        try:
            trainer.load_checkpoint(path)
            return path
        except checkpoint.CheckpointError as e:
            if i + 1 == len(candidates):
                raise
            log.warning(f"{e}; resuming from the next newest checkpoint, {candidates[i + 1]}")
    return None


def keep_a_checkpoint(trainer: Any) -> None:
    """After a non-finite stop: the run's newest checkpoint (written before the problem) stays as
    it is; a run with none yet gets last.ckpt of its current weights, which only took finite steps."""
    st = trainer.state
    newest = dist.broadcast_object(rundir.newest_checkpoint(st.run_dir) if trainer.is_main else None)
    if newest is not None:
        log.info(f"the last good checkpoint is {newest}")
        return
    last = st.run_dir / "checkpoints" / "last.ckpt"
    if save(trainer, last, epoch_done=False):
        log.info(f"wrote {last} from the last finite weights (step {st.global_step})")


def final_weights(trainer: Any) -> dict:
    """The weights a run ends with, for export: the averaged ones with EMA on. Every rank calls it
    (a collective under FSDP); rank 0 gets the whole state."""
    final = trainer.wrapped.state_dict()
    averaged = trainer.ema.state_dict() if trainer.ema else None
    return with_ema(final, {"ema": averaged}) if trainer.is_main else final
