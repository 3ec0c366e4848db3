"""Evaluation over one split: the loss and every metric, reduced across ranks, so N processes
score exactly what one process scores.

A recipe whose evaluation differs from training (all views, a sampling loop, generation) gives a
`predict_fn(model, batch) -> outputs`; the metrics see its outputs. The loss stays the training
forward's by default: it is the quantity training minimises, so val/loss stays comparable with
train/loss and monitorable, which sampled masks or generated text cannot give (a flow-matching
loss needs the training-style noisy input, an LM loss teacher forcing). That costs a second
forward per batch, only when predict_fn is given; `loss_from_predict=True` skips it when predict's
outputs are what the loss function takes (a multi-view model scored on all views).
predict_fn runs on the plain module (`Wrapped.model`): a sampling loop or generation has
data-dependent control flow that a compiled graph would recompile or break on.

Prediction files (a SoccerNet predictions json, PNG masks, generated captions) come from a
recipe's `PredictionWriter`: at the final test (end of fit, test_only) it sees every batch's
predicted outputs next to the metrics, then `write(run_dir, split)` runs on every rank (it may
gather; rank 0 writes what is shared). Splits without labels (a challenge set: the Trainer's
`predict_data`) are only predicted: no loss, no metrics, the writer alone.

Under FSDP every forward is a collective (the layers' all-gathers), and an evaluation split is
not padded (each sample scored once), so ranks can hold different numbers of batches: a rank that
has run out repeats a batch, unscored, until every rank has run as many forwards (`batches`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as torch_dist
from torch.utils.data import default_collate

from .config import ConfigError
from .data import DevicePrefetcher, limit_batches, map_tensors, to_device
from .dist import DistEnv
from .metrics import MeanMetric, Metric
from .parallel import Wrapped
from .precision import Precision


class PredictionWriter(Protocol):
    """Saves a split's predictions as files: update() per batch on each rank (no host sync needed),
    then write() once on every rank."""

    def update(self, outputs: Any, batch: Any) -> None: ...
    def write(self, run_dir: Path, split: str) -> None: ...


def stand_in_batch(loader: Any) -> Any:
    """A batch for a rank whose shard of the split is empty: the split's first sample."""
    if hasattr(loader, "_gather"):  # DeviceLoader: already on the device
        return loader._gather(loader.data, torch.zeros(1, dtype=torch.long, device=loader.device), [0])
    if loader.batch_size is None:  # fetched a batch at a time (BatchFetch)
        return loader.collate_fn(loader.dataset[[0]])
    return (loader.collate_fn or default_collate)([loader.dataset[0]])


def rank0_buffers(model: torch.nn.Module, env: DistEnv) -> None:
    """Each rank's last training forward updated its own BatchNorm statistics; evaluation (and the
    checkpoint, the export) use rank 0's, so N processes score exactly what one process scores."""
    if env.distributed:
        for b in model.buffers():
            torch_dist.broadcast(b, 0)


def batches(loader: Any, n: int, device: torch.device, env: DistEnv, sharded: bool) -> Any:
    """(batch, scored) for the first `n` batches of `loader` on the device; under FSDP with several
    ranks, then (batch, False) repeats until this rank has run as many forwards as the rank with
    the most batches (else that rank's next all-gather would wait forever). The counts are agreed
    before the first forward: a forward's all-gathers must meet their peers' in the same order."""
    mine = min(n, len(loader))
    extra = 0
    if sharded and env.distributed:
        most = torch.tensor([mine], device=device)
        torch_dist.all_reduce(most, op=torch_dist.ReduceOp.MAX)
        extra = int(most.item()) - mine  # host sync (before the split, once)
    last = None
    for i, batch in enumerate(DevicePrefetcher(loader, device)):
        if i >= mine:
            break
        last = batch
        yield batch, True
    if extra and last is None:
        last = to_device(stand_in_batch(loader), device)
    for _ in range(extra):
        yield last, False


@torch.no_grad()
def evaluate(wrapped: Wrapped, loader: Any, n: int, forward_fn: Callable, unpack: Callable, metrics: list[Metric],
             precision: Precision, device: torch.device, env: DistEnv, split: str,
             predict_fn: Callable | None = None, loss_from_predict: bool = False,
             writer: PredictionWriter | None = None, run_dir: Path | None = None) -> dict[str, float]:
    """{"<split>/loss": ..., "<split>/<metric>": ...} over the first `n` batches of `loader` (every
    rank must call); `writer` sees what the metrics see and writes into `run_dir` at the end."""
    for m in metrics:
        m.reset()
    loss_mean = MeanMetric("loss")
    rank0_buffers(wrapped.model, env)
    model, marks = wrapped.compiled, wrapped.mark_compiled_steps
    was_training = model.training
    model.eval()  # wrapped.model too: the compiled module holds it
    for batch, scored in batches(loader, n, device, env, wrapped.sharded):
        batch = precision.cast_batch(to_device(batch, device))
        with precision.autocast():
            predicted = predict_fn(wrapped.model, batch) if predict_fn else None
            if predict_fn and loss_from_predict:
                outputs = predicted
            else:
                if marks:
                    torch.compiler.cudagraph_mark_step_begin()
                outputs = forward_fn(model, batch)
                if marks and not predict_fn:  # metrics may keep outputs; the next replay would overwrite them
                    outputs = map_tensors(outputs, torch.clone)
            if not scored:  # FSDP: a forward only to keep pace with the ranks that still have batches
                continue
            loss, weight, _ = unpack(outputs, batch)
        loss_mean.add(loss.float(), weight)
        for m in metrics:
            m.update(predicted if predict_fn else outputs, batch)
        if writer is not None:
            writer.update(predicted if predict_fn else outputs, batch)
    model.train(was_training)
    result = {f"{split}/{k}": v for k, v in loss_mean.compute(device).items()}
    for m in metrics:
        result.update({f"{split}/{k}": float(v) for k, v in m.compute(device).items()})
    if writer is not None and run_dir is not None:
        writer.write(run_dir, split)
    return result


@torch.no_grad()
def predict_unlabelled(t: Any) -> None:
    """Every split of the Trainer `t`'s predict_data (no labels: a challenge set) through predict_fn
    (else the training forward) into the recipe's prediction writer; every rank calls."""
    if t.prediction_writer is None:
        return
    w = t.wrapped
    for split in t.predict_splits:
        writer, loader = t.prediction_writer(split), t.loaders[split]
        n = limit_batches(len(loader), t.fast_dev_run or 1.0)  # a predictions file is whole: not limit_val_batches
        rank0_buffers(w.model, t.env)
        was_training = w.model.training
        w.model.eval()
        with t.ema.applied() if t.ema else contextlib.nullcontext():  # the averaged weights, when on
            for batch, scored in batches(loader, n, t.device, t.env, w.sharded):
                batch = t.precision.cast_batch(to_device(batch, t.device))
                with t.precision.autocast():
                    outputs = t.predict_fn(w.model, batch) if t.predict_fn else t.forward_fn(w.model, batch)
                if scored:
                    writer.update(outputs, batch)
        w.model.train(was_training)
        writer.write(t.state.run_dir, split)


def check_monitor(monitor: str, metrics: dict) -> None:
    """The monitored key must be one evaluation returns: a typo would otherwise never improve."""
    if monitor not in metrics:
        raise ConfigError(f"trainer.monitor={monitor!r} is not a validation metric; "
                          f"available: {', '.join(sorted(metrics))}")
