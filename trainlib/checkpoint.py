"""Checkpoint files: atomic writes, safe loading with clear errors, safetensors export.

A checkpoint is one `torch.save` dict written to a temp file in the same folder, flushed,
fsynced and `os.replace`d over the target, then the folder is fsynced: a crash at any moment
leaves either the old or the new file, never a torn one. Loading uses `weights_only=True`, so a
checkpoint cannot run code; everything in it is tensors and plain Python data.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .config import UserError

FORMAT = "trainlib-checkpoint-v1"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a write or fsync error names no file: name the one that was being written
        if e.filename is None or str(e.filename) == str(tmp):
            e.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | os.PathLike) -> dict:
    """Load a trainlib checkpoint on the CPU, or raise CheckpointError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes, an empty file ...
        first = (str(e).splitlines() or [""])[0][:200]
        what = "is empty (0 bytes)" if path.stat().st_size == 0 else "is truncated, corrupt or not a torch checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path}: the file {what} ({type(e).__name__}"
                              + (f": {first})" if first else ")")) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a trainlib checkpoint (no '{FORMAT}' marker); "
                              f"to start from plain weights, load them into the model yourself")
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     load: Callable[[dict[str, torch.Tensor]], None] | None = None, left_out: Any = ()) -> None:
    """Strict load that explains a mismatch: which keys are missing, unexpected, or of another
    shape. `load` replaces model.load_state_dict once the keys fit (FSDP shards the tensors).
    `left_out`: keys the file says it left out on purpose (frozen parameters, trainer.save_frozen=false):
    they may be missing and keep the model's own values; any other missing key is an error."""
    own = model.state_dict()
    excused = set(left_out)
    missing = [k for k in own if k not in state and k not in excused]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{title} ({len(items)}): {', '.join(items[:8])}{more}")
        raise CheckpointError(f"{source} does not fit this model (was it saved with another model config?): "
                              + "; ".join(parts))
    kept = [k for k in own if k not in state]
    if kept and load is None:  # FSDP's loader keeps the model's own shards for absent keys itself
        state = {**state, **{k: own[k] for k in kept}}
    (load or model.load_state_dict)(state)


def export_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Weights only, loadable with `safetensors.torch.load_file` and no trainlib."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weights, metadata) of an exported model.safetensors, or CheckpointError naming the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # an empty, truncated or foreign file
        raise CheckpointError(f"cannot read {path}: not a complete safetensors file "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
