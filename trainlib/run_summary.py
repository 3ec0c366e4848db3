"""The end of a run in one place: what a person wants to know when training stops, printed as a
short block on rank 0 (console and train.log) and written as <run>/summary.json.

    run summary: runs/toy_20250101_120000 (summary.json)
      stopped: early stopping: val/loss did not improve for 2 validations (best 0.0123) after 6 of 10
               epochs, step 72, in 0:00:04        (one line when printed)
      best val/loss = 0.0123 (min) at epoch 4/10, step 48
      final (last epoch, 6/10): train/loss=0.0150  val/loss=0.0130
      test (final weights): test/loss=0.0140
      model.safetensors holds best.ckpt's weights (epoch 4/10, step 48)
      files: model.safetensors  checkpoints/best.ckpt  checkpoints/last.ckpt
      throughput: 1234 samples/s (training windows, all ranks)

summary.json (every key always present; null where it does not apply):
    run_dir, recipe, stop_reason ("finished" when the run reached its length, else why it stopped),
    stopped_by (max_epochs | max_steps | early_stopping | max_time | non_finite | callback | fast_dev_run),
    epochs_done, max_epochs, global_step, wall_s, monitor, mode,
    best {metric, value, epoch, step}            the best monitored value over history.json's epochs
    final {metric: value}, final_epoch           the last validated epoch's values (+ its train/loss)
    test {metric: value}                         the test split, evaluated with the final weights
    weights {file, source: best|final, ema, epoch, step, text}   what model.safetensors holds
    files {best_ckpt, last_ckpt, model}          paths that exist, else null
    train_samples_per_s, train_time_s            from metrics.jsonl's training rows (resume included)
Epochs in summary.json count from 0 (as in metrics.jsonl, history.json and checkpoint names); the
printed `epoch x/N` counts from 1.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from . import dist
from .callbacks import History, ModelCheckpoint
from .checkpoint import atomic_write_bytes
from .loggers import hms, log, read_rows


def _finite(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _num(v: float) -> str:
    return f"{v:.5g}"


def best_of(rows: list[dict], monitor: str, mode: str) -> dict | None:
    """{metric, value, epoch, step} of the best finite `monitor` value in history rows (the first on a tie)."""
    best = None
    for r in rows:
        v = r.get(monitor)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if best is None or (v < best["value"] if mode == "min" else v > best["value"]):
            best = {"metric": monitor, "value": float(v), "epoch": r.get("epoch"), "step": r.get("step")}
    return best


def throughput(rows: list[dict]) -> tuple[float | None, float | None]:
    """(samples/s, seconds) over the training windows of metrics.jsonl rows: every window's samples
    over every window's time (a window's steps come from the step numbers of consecutive rows)."""
    samples = seconds = 0.0
    prev = 0
    for r in rows:
        if r.get("split") != "train":
            continue
        step, sps, smp = r.get("step", 0), r.get("steps_per_s"), r.get("samples_per_s")
        steps, prev = step - prev, step
        if steps <= 0 or not isinstance(sps, (int, float)) or not isinstance(smp, (int, float)) or not sps > 0:
            continue
        t = steps / sps
        seconds += t
        samples += smp * t
    return (samples / seconds, seconds) if seconds > 0 else (None, None)


def stopped_by(trainer: Any) -> str:
    st, tc = trainer.state, trainer.tc
    reason = st.stop_reason or ""
    if st.halted:
        return "non_finite"
    if reason.startswith("early stopping"):
        return "early_stopping"
    if "trainer.max_time" in reason:
        return "max_time"
    if reason:
        return "callback"
    if getattr(trainer, "fast_dev_run", 0):
        return "fast_dev_run"
    if 0 < tc.max_steps <= st.global_step:
        return "max_steps"
    return "max_epochs"


def _ckpt_place(name: str) -> tuple[int | None, int | None]:
    m = re.match(r"epoch=(\d+)-step=(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _weights(trainer: Any, run_dir: Path, best: dict | None) -> dict | None:
    """What model.safetensors holds, from its metadata (rundir.export writes `weights`: best|final)."""
    path = run_dir / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        source = (fh.metadata() or {}).get("weights", "")
    ema = trainer.ema is not None
    out = {"file": str(path), "source": source or None, "ema": ema, "epoch": None, "step": None, "text": ""}
    if source == "best":
        mc = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
        if mc is not None and mc.top_k:
            out["epoch"], out["step"] = _ckpt_place(mc.top_k[0][1])
        elif best is not None:
            out["epoch"], out["step"] = best["epoch"], best["step"]
        where = f" (epoch {_epoch_text(out['epoch'], trainer)}, step {out['step']})" if out["epoch"] is not None else ""
        out["text"] = f"best.ckpt's weights{where}" + (", the EMA average" if ema else "")
    elif source == "final":
        out["step"] = trainer.state.global_step
        out["text"] = ("the EMA average of the weights" if ema else "the final weights") + \
            f" (step {out['step']}; no best.ckpt)"
    else:
        out["text"] = "weights of unknown origin (not written by this trainlib)"
    return out


def _epoch_text(epoch: int | None, trainer: Any) -> str:
    n = 1 if getattr(trainer, "fast_dev_run", 0) else trainer.tc.max_epochs
    return "?" if epoch is None else f"{epoch + 1}/{n}" if n > 0 else str(epoch + 1)


def build(trainer: Any, result: dict[str, float], wall_s: float) -> dict[str, Any]:
    """The summary (rank 0: it reads the run directory's files)."""
    st, tc = trainer.state, trainer.tc
    run_dir = Path(st.run_dir)
    history = next((cb.rows for cb in trainer.callbacks if isinstance(cb, History)), [])
    best = best_of(history, tc.monitor, tc.mode)
    if best is None:  # no History callback: ModelCheckpoint's best file
        mc = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
        if mc is not None and mc.top_k:
            epoch, step = _ckpt_place(mc.top_k[0][1])
            best = {"metric": tc.monitor, "value": float(mc.top_k[0][0]), "epoch": epoch, "step": step}
    last = history[-1] if history else {}
    final = _finite({k: v for k, v in result.items() if not k.startswith("test/")})
    if "train/loss" in last and "train/loss" not in final:
        final = {**_finite({"train/loss": last["train/loss"]}), **final}
    samples_per_s, train_s = throughput(read_rows(run_dir / "metrics.jsonl"))
    files = {"best_ckpt": run_dir / "checkpoints" / "best.ckpt", "last_ckpt": run_dir / "checkpoints" / "last.ckpt",
             "model": run_dir / "model.safetensors"}
    return {
        "run_dir": str(run_dir), "recipe": getattr(trainer, "name", ""),
        "stop_reason": st.stop_reason or "finished", "stopped_by": stopped_by(trainer),
        "epochs_done": st.epoch, "max_epochs": 1 if getattr(trainer, "fast_dev_run", 0) else tc.max_epochs,
        "global_step": st.global_step, "wall_s": round(wall_s, 3), "monitor": tc.monitor, "mode": tc.mode,
        "best": best, "final": final, "final_epoch": last.get("epoch"),
        "test": _finite({k: v for k, v in result.items() if k.startswith("test/")}),
        "weights": _weights(trainer, run_dir, best),
        "files": {k: (str(p) if p.is_file() else None) for k, p in files.items()},
        "train_samples_per_s": samples_per_s, "train_time_s": train_s,
    }


def lines(summary: dict, trainer: Any) -> list[str]:
    """The printed block."""
    s = summary
    kv = lambda d: "  ".join(f"{k}={_num(v)}" for k, v in d.items())  # noqa: E731
    stop = s["stop_reason"]
    if s["stopped_by"] in ("max_epochs", "max_steps"):
        stop = f"finished (trainer.{s['stopped_by']} reached)"
    elif s["stopped_by"] == "fast_dev_run":
        stop = "finished (trainer.fast_dev_run: a dry run, no checkpoints)"
    out = [f"run summary: {s['run_dir']} (summary.json)",
           f"  stopped: {stop} after {s['epochs_done']} of {s['max_epochs']} epochs, step {s['global_step']}, "
           f"in {hms(s['wall_s'])}"]
    b = s["best"]
    if b:
        out.append(f"  best {b['metric']} = {_num(b['value'])} ({s['mode']}) "
                   f"at epoch {_epoch_text(b['epoch'], trainer)}, step {b['step']}")
    elif s["monitor"]:
        out.append(f"  best {s['monitor']}: none (never validated with a finite value)")
    if s["final"]:
        where = f", {_epoch_text(s['final_epoch'], trainer)}" if s["final_epoch"] is not None else ""
        out.append(f"  final (last epoch{where}): {kv(s['final'])}")
    if s["test"]:
        out.append(f"  test (final weights{', EMA average' if trainer.ema is not None else ''}): {kv(s['test'])}")
    if s["weights"]:
        out.append(f"  model.safetensors holds {s['weights']['text']}")
    else:
        out.append("  model.safetensors: not written (trainer.export=false, fast_dev_run or non-finite weights)")
    kept = [str(Path(p).relative_to(s["run_dir"])) for p in
            (s["files"]["model"], s["files"]["best_ckpt"], s["files"]["last_ckpt"]) if p]
    if kept:
        out.append(f"  files: {'  '.join(kept)}")
    if s["train_samples_per_s"]:
        out.append(f"  throughput: {s['train_samples_per_s']:.4g} samples/s (training windows, all ranks)")
    return out


def one_line(summary: dict | None) -> str:
    """The `[trainlib] final:` line of recipe.run: the last epoch's values, labelled as such, then the
    best monitored value and what model.safetensors holds, then why the run stopped."""
    if not summary:
        return ""
    s = summary
    kv = lambda d: " ".join(f"{k}={v:.4f}" for k, v in d.items())  # noqa: E731
    parts = []
    val = {k: v for k, v in s["final"].items() if not k.startswith("train/")}
    if val:
        parts.append(f"{kv(val)} (last epoch)")
    if s["test"]:
        parts.append(f"{kv(s['test'])} (test, final weights)")
    b = s["best"]
    if b:
        where = [] if b["epoch"] is None else [f"epoch {b['epoch'] + 1}/{s['max_epochs']}"]
        if s["weights"] and s["weights"]["source"] == "best":
            where.append("in model.safetensors")
        parts.append(f"best {b['metric']}={b['value']:.4f}" + (f" ({', '.join(where)})" if where else ""))
    done = s["stopped_by"] in ("max_epochs", "max_steps", "fast_dev_run")
    parts.append("finished" if done else f"stopped: {s['stopped_by'].replace('_', ' ')}")
    return "  ".join(parts)


def finish(trainer: Any, result: dict[str, float], wall_s: float) -> dict[str, Any]:
    """Rank 0 builds the summary, writes <run>/summary.json and logs the block; every rank returns
    the same dict (one broadcast at the end of the run)."""
    summary: dict[str, Any] | None = None
    if trainer.is_main and trainer.state.run_dir is not None:
        try:
            summary = build(trainer, result, wall_s)
        except Exception as e:  # noqa: BLE001 - a summary never fails a finished run
            log.warning(f"no run summary: {type(e).__name__}: {e}")
            summary = {"run_dir": str(trainer.state.run_dir), "stop_reason": trainer.state.stop_reason or "finished",
                       "stopped_by": stopped_by(trainer), "wall_s": wall_s, "final": _finite(result),
                       "test": {}, "best": None, "weights": None, "max_epochs": trainer.tc.max_epochs}  # (one_line's keys)
    summary = dist.broadcast_object(summary)
    if trainer.is_main and summary is not None:
        atomic_write_bytes(Path(summary["run_dir"]) / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        if "files" in summary:  # (the full summary; the fallback above has no block to print)
            for text in lines(summary, trainer):
                log.info(text)
        if trainer.cfg.log.plots:  # <run>/plots/*.png when matplotlib is installed (never fails the run)
            from .plot import plot_run

            plot_run(summary["run_dir"])
    return summary or {}
