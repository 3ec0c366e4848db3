"""Charades-format per-video I3D features for PDAN.

Layout (what pytorch-i3d's extract_features.py and PDAN's data/charades.json give):

    <root>/<video_id>.npy     float array [T, 1, 1, C] (or [T, C]); C = 1024 for I3D rgb/flow
    <root>/charades.json      {video_id: {"subset": "training"|"testing", "duration": seconds,
                                          "actions": [[class, start_s, end_s], ...]}}

Frame labels follow PDAN: fps = T / duration and frame f is positive for class c when
start < f / fps < end (strict). The 25-point variant follows the official Charades_v1_localize
evaluation: t_j = (j / 25) * duration (j = 0..24), class active when start <= t_j <= end, scored at
feature index floor(j * T / 25). t_j is computed in that order, in float64, as the official code does:
j * duration / 25 rounds differently when t_j lands on an action boundary (10 of the 46,575 points of
the Charades test set change label).

Videos whose "subset" is "training" or "testing" are used. Another subset value (e.g. a split PDAN
does not use) is skipped with one summary warning; an entry with no "subset" key, or an action that
ends before it starts, is a DataError.

Every file is checked up front (array headers only), so bad input fails once, with a message
naming the file or key and what was expected.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from trainlib.config import ConfigError, DataConfig, DataError, opt
from trainlib.data import load_json

SUBSETS = {"train": "training", "val": "testing", "test": "testing"}
NUM_LOC_POINTS = 25
_MAX_LISTED = 5
AUTO_BUCKET_MIN = 64  # trainer.cuda_graphs with no data.length_buckets: pad to 64, 128, 256, ... frames


@dataclass
class PDANData(DataConfig):
    batch_size: int = opt(8, "batch size per process", ge=1)
    annotations: str = opt("", "charades.json path; empty: <root>/charades.json")
    mode: Literal["rgb", "flow", "skeleton"] = opt("rgb", "feature type (sets the input size when model.input_channels=-1)")
    skip_missing: bool = opt(False, "skip videos whose .npy is missing (as the original loader does) instead of failing")
    length_buckets: list[int] = opt([], "pad each batch's time axis up to the smallest of these frame counts that fits its "
                                        "longest video (static shapes for trainer.cuda_graphs / trainer.compile: one graph "
                                        "per bucket); a longer batch is padded to a multiple of the largest; empty: powers "
                                        "of two from 64 when trainer.cuda_graphs=true, else the batch's longest video", ge=1)


def resolved_input_channels(cfg: Any) -> int:
    """model.input_channels, with -1 meaning 256 for skeleton features and 1024 (I3D) otherwise."""
    c = int(cfg.model.input_channels)
    if c == -1:
        return 256 if cfg.data.mode == "skeleton" else 1024
    if c < 1:
        raise ConfigError(f"config key 'model.input_channels': expected -1 (auto) or a positive size, got {c}")
    return c


# --------------------------------------------------------------------------------------------
# Label rules

def frame_labels(num_frames: int, duration: float, actions: list, num_classes: int) -> np.ndarray:
    """PDAN rule: [T, K] float32, 1 where start < f / fps < end with fps = T / duration."""
    labels = np.zeros((num_frames, num_classes), np.float32)
    fps = num_frames / duration
    times = np.arange(num_frames) / fps
    for c, start, end in actions:
        labels[(times > start) & (times < end), int(c)] = 1.0
    return labels


def loc25_points(num_frames: int, duration: float, actions: list,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Charades_v1_localize rule: (feature index [25] int64, labels [25, K] float32)."""
    j = np.arange(NUM_LOC_POINTS)
    index = (j * num_frames) // NUM_LOC_POINTS
    times = (j / NUM_LOC_POINTS) * float(duration)  # the official order; j * duration / 25 rounds differently
    labels = np.zeros((NUM_LOC_POINTS, num_classes), np.float32)
    for c, start, end in actions:
        labels[(times >= start) & (times <= end), int(c)] = 1.0
    return index.astype(np.int64), labels


# --------------------------------------------------------------------------------------------
# Checks

def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, reading only its header."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"feature file {path} is not a readable .npy array ({e})") from None
    return tuple(int(s) for s in shape), dtype


def feature_shape(path: str) -> tuple[int, int]:
    """(T, C) of a feature file shaped [T, 1, 1, C] or [T, C]; DataError otherwise."""
    shape, dtype = _npy_header(path)
    if dtype.kind not in "fiu":
        raise DataError(f"feature file {path}: expected a float array, got dtype {dtype}")
    if len(shape) == 4 and shape[1] == 1 and shape[2] == 1:
        t, c = shape[0], shape[3]
    elif len(shape) == 2:
        t, c = shape
    else:
        raise DataError(f"feature file {path}: expected shape [T, 1, 1, C] (pytorch-i3d) or [T, C], "
                        f"got {list(shape)} (rank {len(shape)})")
    if t < 1:
        raise DataError(f"feature file {path}: has no frames (shape {list(shape)})")
    return t, c


def load_annotations(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found: {path} (set data.annotations=<charades.json> "
                        f"or put charades.json in data.root)")
    db = load_json(path, "annotation file")
    if not isinstance(db, dict):
        raise DataError(f"annotation file {path}: expected a mapping {{video_id: {{subset, duration, actions}}}}, "
                        f"got {type(db).__name__}")
    return db


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_entry(vid: str, entry: Any, num_classes: int, ann_path: str) -> None:
    where = f"{ann_path}: video '{vid}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping with keys subset, duration, actions")
    for key in ("duration", "actions"):
        if key not in entry:
            raise DataError(f"{where}: missing key '{key}'")
    if not _is_number(entry["duration"]) or entry["duration"] <= 0:
        raise DataError(f"{where} key 'duration': expected a positive number of seconds, got {entry['duration']!r}")
    if not isinstance(entry["actions"], list):
        raise DataError(f"{where} key 'actions': expected a list of [class, start_s, end_s]")
    for i, act in enumerate(entry["actions"]):
        key = f"{where} key 'actions'[{i}]"
        if not (isinstance(act, (list, tuple)) and len(act) == 3 and all(_is_number(a) for a in act)):
            raise DataError(f"{key}: expected [class, start_s, end_s], got {act!r}")
        c = act[0]
        if c != int(c) or c < 0:
            raise DataError(f"{key}: class index must be a non-negative integer, got {c!r}")
        if c >= num_classes:
            raise DataError(f"{key}: class index {int(c)} >= model.num_classes={num_classes} "
                            f"(set model.num_classes to at least {int(c) + 1})")
        if act[2] < act[1]:
            raise DataError(f"{key} = {list(act)!r}: ends at {act[2]!r} s before it starts at {act[1]!r} s "
                            f"(expected [class, start_s, end_s] with start_s <= end_s)")


def check_subsets(db: dict, ann_path: str) -> dict[str, int]:
    """Every entry must be a mapping with a string "subset"; returns {subset: count} of the
    entries whose subset is neither "training" nor "testing" (not used by PDAN, skipped).

    A missing "subset" used to drop the video silently; it is an error naming the file and video."""
    used = set(SUBSETS.values())
    unused: dict[str, int] = {}
    for vid, entry in db.items():
        where = f"{ann_path}: video '{vid}'"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping with keys subset, duration, actions, "
                            f"got {type(entry).__name__}")
        if "subset" not in entry:
            raise DataError(f"{where}: missing key 'subset' (expected \"training\" or \"testing\")")
        sub = entry["subset"]
        if not isinstance(sub, str):
            raise DataError(f"{where} key 'subset': expected \"training\" or \"testing\", got {sub!r}")
        if sub not in used:
            unused[sub] = unused.get(sub, 0) + 1
    return unused


def warn_unused_subsets(unused: dict[str, int], ann_path: str) -> None:
    """One warning line for all the videos skipped because of their subset."""
    if not unused:
        return
    counts = sorted(unused.items(), key=lambda kv: (-kv[1], kv[0]))
    listed = ", ".join(f"{n} '{sub}'" for sub, n in counts[:_MAX_LISTED])
    more = f" and {len(counts) - _MAX_LISTED} more subsets" if len(counts) > _MAX_LISTED else ""
    warnings.warn(f"{ann_path}: skipping {sum(unused.values())} videos whose subset is neither 'training' "
                  f"nor 'testing' (not used by PDAN): {listed}{more}")


# --------------------------------------------------------------------------------------------
# Dataset

class CharadesFeatures(torch.utils.data.Dataset):
    """One item per video of one subset; features are read from disk on access."""

    def __init__(self, root: str, annotations: str | dict, subset: str, num_classes: int,
                 input_channels: int, skip_missing: bool = False, ann_path: str | None = None) -> None:
        self.root = root
        self.subset = subset
        self.buckets: tuple[int, ...] = ()  # the collate's padding rule, for trim_batch (build_datasets sets it)
        self.pow2_from = 0
        self.num_classes = int(num_classes)
        self.input_channels = int(input_channels)
        if isinstance(annotations, str):
            ann_path = annotations
            db = load_annotations(annotations)
        else:
            db = annotations
            ann_path = ann_path or "<annotations>"
        self.ann_path = ann_path

        check_subsets(db, ann_path)  # every entry a mapping with a string subset
        vids = [v for v, e in db.items() if e["subset"] == subset]
        if not vids:
            found = sorted({e["subset"] for e in db.values()})
            raise DataError(f"split '{subset}' is empty: no video in {ann_path} has \"subset\": \"{subset}\" "
                            f"(subsets found: {', '.join(found) or 'none'})")
        for v in vids:
            _check_entry(v, db[v], self.num_classes, ann_path)

        missing = [v for v in vids if not os.path.isfile(self.path(v))]
        if missing and not skip_missing:
            listed = "; ".join(f"'{v}' (expected {self.path(v)})" for v in missing[:_MAX_LISTED])
            more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise DataError(f"{len(missing)} of {len(vids)} '{subset}' videos in {ann_path} have no feature file: "
                            f"{listed}{more} (set data.skip_missing=true to train without them)")
        if missing:
            warnings.warn(f"skipping {len(missing)} '{subset}' videos without a feature file in {root}")
            gone = set(missing)
            vids = [v for v in vids if v not in gone]
            if not vids:
                raise DataError(f"split '{subset}' is empty: none of its videos in {ann_path} has a feature file in {root}")

        self.video_ids: list[str] = []
        self.num_frames: list[int] = []
        self.durations: list[float] = []
        self.actions: list[list] = []
        for v in vids:
            t, c = feature_shape(self.path(v))
            if c != self.input_channels:
                raise DataError(f"feature file {self.path(v)} has dimension {c}, but model.input_channels="
                                f"{self.input_channels} (set model.input_channels={c}, or check data.mode)")
            self.video_ids.append(v)
            self.num_frames.append(t)
            self.durations.append(float(db[v]["duration"]))
            self.actions.append([[int(a[0]), float(a[1]), float(a[2])] for a in db[v]["actions"]])

    def trim_batch(self, batch: dict, rows: list[int]) -> dict:
        """data.device_resident: a batch gathered from the split padded to its longest video, cut
        back to the time length `collate` would give these rows (the same tensors, bit for bit)."""
        t = padded_length(max(self.num_frames[r] for r in rows), self.buckets, self.pow2_from)
        if t >= batch["features"].shape[-1]:
            return batch
        return {**batch, "features": batch["features"][..., :t], "mask": batch["mask"][:, :t],
                "labels": batch["labels"][:, :t]}

    def shape_keys(self) -> list[int]:
        """The time length each video is padded to by the collate's rule (data.group_by_shape:
        videos with one key batch to one shape)."""
        return [padded_length(t, self.buckets, self.pow2_from) for t in self.num_frames]

    def class_labels(self) -> list[int]:
        """One class per video, for data.use_class_balanced_sampler / progressive_class_balancing:
        the action class labelling the most frames under the PDAN frame rule (ties: the lowest class
        index); a video with no labelled frame gets num_classes, a "no action" class of its own."""
        out = []
        for t, dur, acts in zip(self.num_frames, self.durations, self.actions):
            frames = frame_labels(t, dur, acts, self.num_classes).sum(0)
            out.append(int(frames.argmax()) if frames.max(initial=0) > 0 else self.num_classes)
        return out

    def path(self, video_id: str) -> str:
        return os.path.join(self.root, f"{video_id}.npy")

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict:
        vid = self.video_ids[i]
        arr = np.load(self.path(vid))
        t = arr.shape[0]
        feats = np.ascontiguousarray(arr.reshape(t, arr.shape[-1]), dtype=np.float32)
        dur, acts = self.durations[i], self.actions[i]
        index, labels25 = loc25_points(t, dur, acts, self.num_classes)
        return {
            "features": torch.from_numpy(feats),
            "labels": torch.from_numpy(frame_labels(t, dur, acts, self.num_classes)),
            "loc25_index": torch.from_numpy(index),
            "loc25_labels": torch.from_numpy(labels25),
            "video_id": vid,
        }


def length_buckets(cfg: Any) -> tuple[int, ...]:
    """data.length_buckets checked and sorted; ConfigError naming the key and the bad value."""
    raw = cfg.data.length_buckets
    key = "config key 'data.length_buckets'"
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{key}: expected a list of positive frame counts, got {raw!r}")
    for b in raw:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ConfigError(f"{key}: expected positive integer frame counts, got {b!r} in {list(raw)!r}")
    buckets = tuple(sorted(raw))
    for lo, hi in zip(buckets, buckets[1:]):
        if lo == hi:
            raise ConfigError(f"{key}: expected distinct frame counts, got {lo!r} twice in {list(raw)!r}")
    return buckets


def padded_length(t: int, buckets: Sequence[int] = (), pow2_from: int = 0) -> int:
    """Time length a batch whose longest video has `t` frames is padded to.

    buckets (sorted): the smallest bucket >= t, or the next multiple of the largest bucket when t
    exceeds it. Else pow2_from > 0: the smallest power of two >= max(t, pow2_from). Else t.
    """
    if buckets:
        for b in buckets:
            if b >= t:
                return b
        top = buckets[-1]
        return -(-t // top) * top
    if pow2_from > 0:
        return max(pow2_from, 1 << (max(t, 1) - 1).bit_length())
    return t


def collate(items: list[dict], buckets: Sequence[int] = (), pow2_from: int = 0) -> dict:
    """Pad to the longest video (or up to its bucket, see padded_length): features [B, C, T],
    mask [B, T], labels [B, T, K], loc25_*. Padded frames have mask 0, features 0, labels 0."""
    b = len(items)
    t_max = padded_length(max(it["features"].shape[0] for it in items), buckets, pow2_from)
    c = items[0]["features"].shape[1]
    k = items[0]["labels"].shape[1]
    features = torch.zeros(b, c, t_max)
    mask = torch.zeros(b, t_max)
    labels = torch.zeros(b, t_max, k)
    for i, it in enumerate(items):
        t = it["features"].shape[0]
        features[i, :, :t] = it["features"].T
        mask[i, :t] = 1.0
        labels[i, :t] = it["labels"]
    return {
        "features": features,
        "mask": mask,
        "labels": labels,
        "loc25_index": torch.stack([it["loc25_index"] for it in items]),
        "loc25_labels": torch.stack([it["loc25_labels"] for it in items]),
        "video_id": [it["video_id"] for it in items],
    }


def build_collate(cfg: Any) -> Callable[[list[dict]], dict]:
    """The collate for cfg: bound to data.length_buckets, or to powers of two from 64 when the
    list is empty and trainer.cuda_graphs is on, or plain `collate` (pad to the batch's longest).
    A functools.partial of a module-level function, so DataLoader workers can pickle it."""
    buckets, pow2_from = padding_rule(cfg)
    if buckets:
        return functools.partial(collate, buckets=buckets)
    if pow2_from:
        return functools.partial(collate, pow2_from=pow2_from)
    return collate


def padding_rule(cfg: Any) -> tuple[tuple[int, ...], int]:
    """(buckets, pow2_from) for padded_length: data.length_buckets, else powers of two from 64
    when trainer.cuda_graphs is on, else neither (pad to the batch's longest)."""
    buckets = length_buckets(cfg)
    graphs = getattr(getattr(cfg, "trainer", None), "cuda_graphs", False)
    return buckets, (AUTO_BUCKET_MIN if graphs and not buckets else 0)


def annotation_path(cfg: Any) -> str:
    return cfg.data.annotations or os.path.join(cfg.data.root, "charades.json")


def build_datasets(cfg: Any) -> dict:
    """{"train": training subset, "val" and "test": testing subset (PDAN validates on it)}."""
    length_buckets(cfg)  # a bad data.length_buckets fails before any file is read
    root = cfg.data.root
    if not root:
        raise DataError("data.root is empty: set data.root=<folder of <video_id>.npy files>")
    if not os.path.isdir(root):
        raise DataError(f"data.root folder not found: {root}")
    ann = annotation_path(cfg)
    db = load_annotations(ann)
    warn_unused_subsets(check_subsets(db, ann), ann)  # once for both splits
    kw = dict(num_classes=cfg.model.num_classes, input_channels=resolved_input_channels(cfg),
              skip_missing=cfg.data.skip_missing, ann_path=ann)
    train = CharadesFeatures(root, db, SUBSETS["train"], **kw)
    test = CharadesFeatures(root, db, SUBSETS["test"], **kw)
    for ds in (train, test):  # data.device_resident trims gathered batches by the collate's rule
        ds.buckets, ds.pow2_from = padding_rule(cfg)
    return {"train": train, "val": test, "test": test}
