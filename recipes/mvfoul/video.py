"""SoccerNet-MVFoul clip decoding: VARS's frame subsampling, PyAV decode + resize, an optional .npy cache.

A clip is a 25 fps, 125-frame mp4 (the foul around frame 75). `frame_indices` picks the frames VARS
feeds its model, `read_clip` decodes only up to the last of them and returns uint8 [3, T, H, W],
and `read_clip_cached` stores that result so later epochs skip decoding.

Why PyAV, resizing in swscale: torchvision 0.29 no longer has `read_video` (VARS's decoder), and
torchcodec needs system FFmpeg libraries that neither this machine nor CI has; PyAV ships its own
FFmpeg. Converting each kept frame to RGB at the output size in one swscale call (bilinear, which
swscale widens to average when it shrinks, so no aliasing) measured as fast as or faster than RGB
at full size + `F.interpolate(antialias=True)` (the same on 64x64 clips, 5-20% faster from 224x398)
and never holds full-size frames; pixels differ from torch's by < 1 grey level on average. One
swscale context serves the whole clip: frame.to_ndarray(format=...) builds one per frame, 6x
slower. FFmpeg's frame threading ("AUTO") did not help on 2 cores, and DataLoader workers already
decode clips in parallel, so PyAV's default is kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence

import numpy as np
import torch

from trainlib.config import ConfigError, DataError


def require_av():
    """PyAV, imported when a clip is first read or written: the recipe's optional extra."""
    try:
        import av
    except ImportError:
        raise ConfigError("recipes.mvfoul reads and writes H.264 clips with PyAV, which is not installed: "
                          "pip install -e '.[video]' (or pip install av)") from None
    return av

SOURCE_FPS = 25      # SoccerNet-MVFoul clips (VARS's dataset.py hard-codes 25)
CACHE_VERSION = 1    # bump when read_clip's output changes, so old cache files are not reused


def frame_indices(start_frame: int, end_frame: int, fps: float, frames_per_clip: int = 0) -> list[int]:
    """Frame numbers kept from the window [start_frame, end_frame) of a 25 fps clip.

    frames_per_clip == 0: exactly VARS (sn-mvfoul "VARS model/dataset.py" at 502fb44, line 48
    `self.factor = (end - start) / (((end - start) / 25) * fps)` and line 95 `if j%self.factor<1:`
    over j in range(len(video[start:end]))), same float expression, so the same frames.
    frames_per_clip > 0: that many frames evenly spaced over the window, the first at start_frame
    (frames repeat when the window is shorter than frames_per_clip)."""
    if not 0 <= start_frame < end_frame:
        raise ValueError(f"need 0 <= start_frame < end_frame, got start_frame={start_frame}, end_frame={end_frame}")
    if not 0 < fps <= SOURCE_FPS:
        raise ValueError(f"fps={fps} must be in (0, {SOURCE_FPS}]: frames are subsampled from {SOURCE_FPS} fps clips")
    length = end_frame - start_frame
    if frames_per_clip > 0:
        return [start_frame + i * length // frames_per_clip for i in range(frames_per_clip)]
    factor = (end_frame - start_frame) / (((end_frame - start_frame) / SOURCE_FPS) * fps)
    return [start_frame + j for j in range(length) if j % factor < 1]


def read_clip(path: str | os.PathLike, indices: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """Frames `indices` (numbered from 0 in display order) of the video at `path`, each resized to
    size=(H, W): uint8 [3, T, H, W]. Decoding stops after the last needed frame. Any problem with the
    file is a DataError naming it, never a raw FFmpeg traceback."""
    path = os.fspath(path)
    if not indices:
        raise ValueError("read_clip needs at least one frame index")
    if min(indices) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(indices)}")
    if not os.path.isfile(path):  # also keeps FIFOs and devices out: opening one could block forever
        raise DataError(f"{path}: missing or not a file (expected a SoccerNet-MVFoul clip, an mp4 file)")
    height, width = (int(n) for n in size)
    wanted, last = set(indices), max(indices)
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    av = require_av()
    from av.video.reformatter import VideoReformatter

    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                raise DataError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            to_rgb = VideoReformatter()
            for frame in container.decode(stream):
                if decoded in wanted:
                    frames[decoded] = to_rgb.reformat(frame, format="rgb24", width=width, height=height,
                                                      interpolation="BILINEAR").to_ndarray()
                decoded += 1
                if decoded > last:
                    break
    except (av.error.FFmpegError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise DataError(f"{path}: not a readable video: {reason} (truncated, or not an mp4?)") from None
    if decoded <= last:
        raise DataError(f"{path} has {decoded} frames; the frame window (data.start_frame, data.end_frame, "
                        f"data.fps, data.frames_per_clip) needs {last + 1}")
    return torch.from_numpy(np.stack([frames[i] for i in indices])).permute(3, 0, 1, 2).contiguous()


def cache_file(cache_dir: str, path: str | os.PathLike, indices: Sequence[int], size: tuple[int, int]) -> str:
    """Where read_clip_cached keeps this clip: keyed by the file's absolute path, size and mtime (a
    replaced video is decoded again), the frames, the output size and PyAV's version (its FFmpeg
    does the resizing)."""
    path = os.path.abspath(os.fspath(path))
    stat = os.stat(path)
    key = json.dumps([CACHE_VERSION, require_av().__version__, path, stat.st_size, stat.st_mtime_ns,
                      [int(i) for i in indices], [int(n) for n in size]])
    return os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest() + ".npy")


def read_clip_cached(path: str | os.PathLike, indices: Sequence[int], size: tuple[int, int],
                     cache_dir: str = "") -> torch.Tensor:
    """read_clip, through a folder of .npy files when cache_dir is set. Files are written to a
    unique temporary name and renamed into place, so DataLoader workers and ranks sharing the folder
    never read half a file; an unreadable or wrong-shaped cache file is decoded and written again."""
    if not cache_dir or not os.path.isfile(path):  # (read_clip's error names a missing file)
        return read_clip(path, indices, size)
    target = cache_file(cache_dir, path, indices, size)
    expected = (3, len(indices), *size)
    try:
        array = np.load(target, allow_pickle=False)
        if array.dtype == np.uint8 and array.shape == expected:
            return torch.from_numpy(array)
    except (OSError, ValueError, EOFError):  # missing, truncated or not an .npy: decode again
        pass
    clip = read_clip(path, indices, size)
    temporary = f"{target}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(temporary, "wb") as handle:
            np.save(handle, clip.numpy(), allow_pickle=False)
        os.replace(temporary, target)
    except OSError as e:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise DataError(f"data.cache_dir={cache_dir}: cannot write {target} ({e})") from None
    return clip
