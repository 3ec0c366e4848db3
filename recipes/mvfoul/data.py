"""SoccerNet-MVFoul clips for training and evaluation (annotations.py reads the split, video.py decodes).

A sample is one action: {"clips": uint8 [V, 3, T, H, W], "view_mask": bool [V], "action",
"offence", "scored_offence" (annotations.py), "index" (its position in the split)}. Training
draws `data.num_views` (2, as VARS) distinct random views of the action, so an epoch sees different
camera pairs; evaluation takes every view (2 to 4), and `collate` pads a batch to its most views
with an all-false `view_mask` tail the pooling ignores (model.py). Frames are decoded in the
DataLoader workers and stay uint8 until the device: normalisation and, with
data.gpu_augmentation=true, augmentation run there on the whole batch (the model's forward).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from trainlib import dist
from trainlib.config import ConfigError, DataConfig, opt

from .annotations import ACTION_CLASSES, OFFENCE_SEVERITY_CLASSES, SPLIT_FOLDERS, Action, read_split
from .augment import augment_clips, severity_scale
from .video import frame_indices, read_clip_cached


@dataclass
class MVFoulData(DataConfig):
    batch_size: int = opt(2, "actions per batch per process (VARS: 2)", ge=1)
    start_frame: int = opt(63, "first frame of the window read from each 125-frame clip (the foul is around frame 75)",
                           ge=0, le=124)
    end_frame: int = opt(87, "end of the window (exclusive); a clip must have at least this many frames", ge=1, le=125)
    fps: float = opt(17.0, "frames per second kept from the 25 fps window (VARS's subsampling)", gt=0, le=25)
    frames_per_clip: int = opt(0, "frames per clip, evenly spaced over the window (0: what start_frame, end_frame "
                                  "and fps give, as VARS)", ge=0, le=125)
    img_height: int = opt(112, "frame height after resizing", ge=8, le=1080)
    img_width: int = opt(200, "frame width after resizing (112x200 keeps the broadcast's 16:9)", ge=8, le=1920)
    num_views: int = opt(2, "distinct random views per action in training (evaluation uses every view)", ge=1, le=4)
    cache_dir: str = opt("", "folder for decoded, resized uint8 clips (.npy), so later epochs skip decoding; empty: off")
    augmentation: bool = opt(True, "augment training clips (flip, affine, colour jitter; VARS's data_aug=Yes)")
    augmentation_strength: Literal["mild", "moderate", "aggressive"] = opt(
        "moderate", "augmentation magnitude (augment.py: moderate is VARS's transforms)")
    severity_aware_augmentation: bool = opt(False, "augment clips of rare offence-severity classes more strongly "
                                                   "(augment.severity_scale from the train class counts)")
    gpu_augmentation: bool = opt(False, "augment on the training device, batched over whole clips; false: in the "
                                        "DataLoader workers (on a CPU run both run on the CPU)")


def check_window(data: MVFoulData) -> None:
    if data.end_frame <= data.start_frame:
        raise ConfigError(f"data.end_frame={data.end_frame} must be greater than data.start_frame={data.start_frame}")
    if not frame_indices(data.start_frame, data.end_frame, data.fps, data.frames_per_clip):
        raise ConfigError(f"data.start_frame={data.start_frame}, data.end_frame={data.end_frame}, data.fps={data.fps} "
                          "keep no frame: widen the window or raise data.fps")


@functools.lru_cache(maxsize=8)
def _read(root: str, split: str) -> tuple[tuple[Action, ...], int]:
    kept, dropped = read_split(root, split)
    return tuple(kept), dropped


def _split(root: str, split: str) -> tuple[Action, ...]:
    return _read(root, split)[0]


def class_counts(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(action counts [8], offence-severity counts [4]) of the kept Train actions: the weighted loss's
    inverse frequencies and severity-aware augmentation's scale."""
    actions = _split(root, "train")
    action = torch.bincount(torch.tensor([a.action for a in actions]), minlength=len(ACTION_CLASSES)).double()
    offence = torch.bincount(torch.tensor([a.offence for a in actions]), minlength=len(OFFENCE_SEVERITY_CLASSES)).double()
    return action, offence


class MVFoulClips(Dataset):
    """The kept actions of one split (annotations.py), read as clips by video.py."""

    def __init__(self, root: str, split: str, data: MVFoulData, train: bool) -> None:
        self.root, self.split, self.train = root, split, train
        self.actions = _split(root, split)
        self.indices = frame_indices(data.start_frame, data.end_frame, data.fps, data.frames_per_clip)
        self.size = (data.img_height, data.img_width)
        self.cache_dir, self.num_views = data.cache_dir, data.num_views
        self.augment_here = train and data.augmentation and not data.gpu_augmentation
        self.strength = data.augmentation_strength
        self.offence_counts = class_counts(root)[1] if train and data.severity_aware_augmentation else None

    def __len__(self) -> int:
        return len(self.actions)

    def class_labels(self) -> list[int]:
        """The offence-severity class, for data.use_class_balanced_sampler: the rarer task (red cards
        are a few percent of the fouls), and the one the leaderboard's severity half rewards."""
        return [a.offence for a in self.actions]

    def __getitem__(self, i: int) -> dict:
        a = self.actions[i]
        views = list(range(len(a.clips)))
        if self.train:  # distinct random views; the loader seeds each batch, so a resumed run draws the same
            views = sorted(torch.randperm(len(views))[: self.num_views].tolist())
        clips = torch.stack([read_clip_cached(a.clips[v], self.indices, self.size, self.cache_dir) for v in views])
        if self.augment_here:
            scale = None
            if self.offence_counts is not None:
                scale = severity_scale(torch.full((len(views),), a.offence), self.offence_counts)
            clips = (augment_clips(clips.float().div(255), self.strength, None, scale) * 255).round().to(torch.uint8)
        return {"clips": clips, "view_mask": torch.ones(len(views), dtype=torch.bool),
                "action": torch.tensor(a.action), "offence": torch.tensor(a.offence),
                "scored_offence": torch.tensor(a.scored_offence), "index": torch.tensor(i)}


def collate(samples: list[dict]) -> dict:
    """Stack actions, padding each to the batch's most views (zeros, view_mask false)."""
    most = max(s["clips"].shape[0] for s in samples)
    clips = torch.zeros((len(samples), most, *samples[0]["clips"].shape[1:]), dtype=torch.uint8)
    mask = torch.zeros((len(samples), most), dtype=torch.bool)
    for j, s in enumerate(samples):
        v = s["clips"].shape[0]
        clips[j, :v], mask[j, :v] = s["clips"], True
    out = {"clips": clips, "view_mask": mask}
    for key in ("action", "offence", "scored_offence", "index"):
        out[key] = torch.stack([s[key] for s in samples])
    return out


def build_datasets(cfg: Any) -> dict[str, Any]:
    """train (Train), val (Valid), test (Test) and challenge (Chall, unlabelled: predicted only)."""
    data, root = cfg.data, str(cfg.data.root)
    check_window(data)
    out: dict[str, Any] = {"train": MVFoulClips(root, "train", data, train=True)}
    for split in ("val", "test"):
        out[split] = MVFoulClips(root, split, data, train=False)
    if (Path(root) / SPLIT_FOLDERS["challenge"]).is_dir():  # a separate download: predicted when present
        out["challenge"] = MVFoulClips(root, "challenge", data, train=False)
    if dist.rank() == 0:
        print("[mvfoul] actions kept by the official filter: " + ", ".join(
            f"{SPLIT_FOLDERS[s]} {len(ds)}" + (f" ({_read(root, s)[1]} dropped)" if _read(root, s)[1] else "")
            for s, ds in out.items()) + f"; {len(out['train'].indices)} frames per clip", flush=True)
    return out
