"""Image / mask pairs for SegFormer: the seed's `processed_dataset/metadata.json` layout, or plain
`images/` + `masks/` folders.

Seed layout (SideFormer):

    <root>/processed_dataset/metadata.json
    <root>/processed_dataset/id2label.json          optional: {"0": "unlabeled", "1": "flat-road", ...}
    <root>/processed_dataset/train/images/*.jpg     train/masks/*.png
    <root>/processed_dataset/valid/images/*.jpg     valid/masks/*.png

    metadata.json = {"train": [{"image": "train/images/0001.jpg", "mask": "train/masks/0001.png"}, ...],
                     "valid": [...],
                     "test":  [...]}                  optional; without it the test split is "valid"

Paths are relative to the folder holding metadata.json (absolute paths work too). A split may also be
named "val" or "validation"; an entry may be a two-item list [image, mask] or use the keys
image_path / mask_path / label. `data.metadata=<file>` points at a metadata.json anywhere.

Plain folders: <root>/images/<stem>.{jpg,jpeg,png,...} + <root>/masks/<stem>.png, paired by file stem
and split into train / valid by `data.val_fraction` (a fixed shuffle, the same on every run and rank).

Masks are single-channel PNGs of class indices (PIL mode L or P); 255 is ignored by the loss and
the metric. With `data.reduce_labels=true` (as Hugging Face's image processors): 0 -> 255 (ignored)
and every other value v -> v - 1. Every pair is checked before training (files exist, image and
mask sizes agree, mask values lie in the label set), so bad input ends the run with one message
naming the file.

Random draws of the augmentation use the global torch RNG only (torchvision.transforms.v2), which
the engine seeds per batch, so a resumed run draws exactly what the uninterrupted one drew.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainlib.data import image_file_size, load_json, open_image
from trainlib.config import ConfigError, DataConfig, DataError, opt, rule

IGNORE_INDEX = 255
MEAN = (0.485, 0.456, 0.406)      # ImageNet, as SegformerImageProcessor
STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_NAMES = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
IMAGE_KEYS = ("image", "image_path", "img")
MASK_KEYS = ("mask", "mask_path", "label", "label_path")
MASK_MODES = ("L", "P", "I", "I;16", "1")
SPLIT_SEED = 1                      # the blog's shuffle seed for the plain-folder split
_MAX_LISTED = 5


@dataclass
class SegFormerData(DataConfig):
    batch_size: int = opt(2, "batch size per process (the blog: 2)", ge=1)
    metadata: str = opt("", "metadata.json path; empty: <root>/processed_dataset/metadata.json, "
                            "<root>/metadata.json, else plain <root>/images + <root>/masks folders")
    image_size: int = opt(512, "training crops and validation images are image_size x image_size", ge=32)
    val_fraction: float = opt(0.2, "plain images/ + masks/ folders: fraction held out for validation (fixed shuffle)", gt=0, lt=1)
    reduce_labels: bool = opt(False, "mask value 0 -> 255 (ignored), others v -> v - 1 (as HF reduce_labels)")
    min_scale: float = opt(0.5, "random resize-and-crop: smallest crop, as a fraction of the image area", gt=0, le=1)
    hflip: float = opt(0.5, "probability of a horizontal flip (training)", ge=0, le=1)
    color_jitter: list[float] = opt([0.25, 0.25, 0.25, 0.1], "brightness, contrast, saturation, hue jitter "
                                                               "on the training image (empty: off)", ge=0,
                                   check=rule("empty or 4 values (brightness, contrast, saturation, hue), hue <= 0.5",
                                              lambda v: not v or (len(v) == 4 and v[3] <= 0.5)))
    eval_ignore_labels: list[int] = opt([], "classes whose pixels the metric skips, besides 255 (the blog's "
                                            "evaluation skips 0 'unlabeled': [0])", ge=0, le=255)
    check_masks: bool = opt(True, "read every mask before training to check its values (false: only sizes)")


# ------------------------------------------------------------------------------------------------
# Label mapping

def label_lut(reduce_labels: bool) -> np.ndarray:
    """uint8 lookup table: raw mask value -> training label (255 = ignore)."""
    lut = np.arange(256, dtype=np.uint8)
    if reduce_labels:
        lut[0] = IGNORE_INDEX
        lut[1:255] -= 1
    return lut


def allowed_values(num_labels: int, reduce_labels: bool) -> np.ndarray:
    """bool [256]: which raw mask values are valid."""
    ok = np.zeros(256, dtype=bool)
    ok[: num_labels + (1 if reduce_labels else 0)] = True
    ok[IGNORE_INDEX] = True
    return ok


def describe_label_set(num_labels: int, reduce_labels: bool) -> str:
    if reduce_labels:
        return (f"0..{num_labels} with data.reduce_labels=true (0 and 255 ignored, 1..{num_labels} are the "
                f"model.num_labels={num_labels} classes)")
    return f"0..{num_labels - 1} (model.num_labels={num_labels}) or 255 (ignored)"


# ------------------------------------------------------------------------------------------------
# Reading files

def read_image(path: str) -> Image.Image:
    with open_image(path, "image") as im:
        return im.convert("RGB")


def read_mask(path: str) -> np.ndarray:
    """[H, W] uint8 class indices of a single-channel mask file."""
    with open_image(path, "mask") as im:
        if im.mode not in MASK_MODES:
            raise DataError(f"mask {path} is a {im.mode} image: expected a single-channel PNG of class "
                            f"indices (mode L or P)")
        arr = np.asarray(im)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"mask {path} has values up to {int(arr.max())}: expected class indices 0..254 "
                            f"and 255 (ignore) in an 8-bit PNG")
        arr = arr.astype(np.uint8)
    return arr


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


def check_pairs(pairs: list[tuple[str, str]], num_labels: int, reduce_labels: bool, where: str,
                read_values: bool = True) -> None:
    """Every file exists, image and mask sizes agree, mask values are in the label set."""
    missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} file(s) listed in {where} do not exist: {_listing(missing)}")
    ok = allowed_values(num_labels, reduce_labels)
    for image, mask in pairs:
        isize, msize = image_file_size(image, "image"), image_file_size(mask, "mask")
        if isize != msize:
            raise DataError(f"image {image} is {isize[0]}x{isize[1]} but its mask {mask} is {msize[0]}x{msize[1]} "
                            f"(width x height): they must be the same size")
        if read_values:
            counts = np.bincount(read_mask(mask).ravel(), minlength=256)
            bad = np.flatnonzero((counts > 0) & ~ok)
            if bad.size:
                shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
                raise DataError(f"mask {mask} has values {shown} outside the label set: expected "
                                f"{describe_label_set(num_labels, reduce_labels)}")


# ------------------------------------------------------------------------------------------------
# Layouts

def _entry_pair(entry: Any, base: str, where: str) -> tuple[str, str]:
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
        image, mask = entry
    elif isinstance(entry, dict):
        image = next((entry[k] for k in IMAGE_KEYS if k in entry), None)
        mask = next((entry[k] for k in MASK_KEYS if k in entry), None)
        if not isinstance(image, str) or not isinstance(mask, str):
            raise DataError(f"{where}: expected {{\"image\": <path>, \"mask\": <path>}}, got {json.dumps(entry)[:200]}")
    else:
        raise DataError(f"{where}: expected {{\"image\": <path>, \"mask\": <path>}}, got {json.dumps(entry)[:200]}")
    return os.path.join(base, image), os.path.join(base, mask)


def read_metadata(path: str) -> dict[str, list[tuple[str, str]]]:
    """{"train": pairs, "val": pairs, "test": pairs (when listed)} from a metadata.json."""
    if not os.path.isfile(path):
        raise DataError(f"metadata file not found: {path}")
    db = load_json(path, "metadata file")
    if not isinstance(db, dict):
        raise DataError(f"metadata file {path}: expected a mapping {{\"train\": [...], \"valid\": [...]}}, "
                        f"got {type(db).__name__}")
    base = os.path.dirname(os.path.abspath(path))
    splits: dict[str, list[tuple[str, str]]] = {}
    for split, names in SPLIT_NAMES.items():
        key = next((n for n in names if n in db), None)
        if key is None:
            if split == "test":
                continue
            raise DataError(f"metadata file {path} has no '{names[0]}' list (keys found: "
                            f"{', '.join(map(str, db)) or 'none'})")
        entries = db[key]
        if not isinstance(entries, list):
            raise DataError(f"metadata file {path} key '{key}': expected a list of {{\"image\", \"mask\"}} entries, "
                            f"got {type(entries).__name__}")
        if not entries:
            raise DataError(f"split '{key}' is empty: metadata file {path} lists no image/mask pairs under '{key}'")
        splits[split] = [_entry_pair(e, base, f"metadata file {path} key '{key}'[{i}]") for i, e in enumerate(entries)]
    return splits


def plain_folder_pairs(root: str, val_fraction: float) -> dict[str, list[tuple[str, str]]]:
    """<root>/images + <root>/masks paired by stem, split by a fixed shuffle."""
    img_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    images = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(img_dir)) if f.lower().endswith(IMAGE_EXTS)}
    masks = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(mask_dir)) if f.lower().endswith(".png")}
    if not images:
        raise DataError(f"split 'train' is empty: no images ({', '.join(IMAGE_EXTS)}) in {img_dir}")
    no_mask = [f"{images[s]} (expected {os.path.join(mask_dir, s + '.png')})" for s in images if s not in masks]
    if no_mask:
        raise DataError(f"{len(no_mask)} image(s) in {img_dir} have no mask: {_listing(no_mask)}")
    no_image = [masks[s] for s in masks if s not in images]
    if no_image:
        raise DataError(f"{len(no_image)} mask(s) in {mask_dir} have no image of the same stem: {_listing(no_image)}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction': expected a fraction between 0 and 1, got {val_fraction}")
    stems = sorted(images)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(stems))  # own generator: never the global RNG
    n_val = max(1, int(round(len(stems) * val_fraction)))
    if len(stems) - n_val < 1:
        raise DataError(f"split 'train' is empty: {len(stems)} pair(s) in {root} leave none for training "
                        f"with data.val_fraction={val_fraction}")
    pairs = [(os.path.join(img_dir, images[stems[i]]), os.path.join(mask_dir, masks[stems[i]])) for i in order]
    return {"train": pairs[n_val:], "val": pairs[:n_val]}


def locate(cfg: Any) -> tuple[str, str]:
    """-> (layout, path): ("metadata", metadata.json) or ("folders", root)."""
    root = cfg.data.root
    if cfg.data.metadata:
        return "metadata", cfg.data.metadata
    if not root:
        raise DataError("data.root is empty: set data.root=<dataset folder> (see docs/recipes/segformer.md)")
    if not os.path.isdir(root):
        raise DataError(f"data.root folder not found: {root}")
    for cand in (os.path.join(root, "processed_dataset", "metadata.json"), os.path.join(root, "metadata.json")):
        if os.path.isfile(cand):
            return "metadata", cand
    if os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "masks")):
        return "folders", root
    if os.path.isdir(os.path.join(root, "processed_dataset")):
        raise DataError(f"missing metadata.json: expected {os.path.join(root, 'processed_dataset', 'metadata.json')} "
                        f"listing the train and valid image/mask pairs (or set data.metadata=<file>)")
    raise DataError(f"data.root {root} holds neither processed_dataset/metadata.json (the seed's layout) nor "
                    f"images/ + masks/ folders")


def find_id2label(cfg: Any) -> str | None:
    layout, path = locate(cfg)
    folders = [os.path.dirname(os.path.abspath(path))] if layout == "metadata" else []
    if cfg.data.root:
        folders.append(cfg.data.root)
    for folder in folders:
        cand = os.path.join(folder, "id2label.json")
        if os.path.isfile(cand):
            return cand
    return None


def class_names(cfg: Any) -> list[str] | None:
    """Names from id2label.json (checked against model.num_labels), or None without one."""
    path = find_id2label(cfg)
    if path is None:
        return None
    table = load_json(path, "label file")
    k = int(cfg.model.num_labels)
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise DataError(f"label file {path}: expected {{\"0\": \"name\", \"1\": \"name\", ...}}")
    try:
        by_id = {int(i): name for i, name in table.items()}
    except ValueError:
        raise DataError(f"label file {path}: keys must be class indices \"0\", \"1\", ...") from None
    ids = sorted(by_id)
    if len(by_id) != len(table) or ids != list(range(len(ids))):
        raise DataError(f"label file {path}: keys must be the class indices 0..{len(ids) - 1} without gaps")
    if len(ids) != k:
        raise DataError(f"label file {path} lists {len(ids)} classes but model.num_labels={k}: "
                        f"set model.num_labels={len(ids)}")
    return [by_id[i] for i in range(k)]


# ------------------------------------------------------------------------------------------------
# Dataset

def train_transform(cfg: Any) -> v2.Compose:
    d = cfg.data
    if not 0.0 < d.min_scale <= 1.0:
        raise ConfigError(f"config key 'data.min_scale': expected a fraction in (0, 1], got {d.min_scale}")
    steps: list = [v2.RandomResizedCrop((d.image_size, d.image_size), scale=(d.min_scale, 1.0), antialias=True)]
    if d.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(d.hflip))
    if d.color_jitter and any(d.color_jitter):
        if len(d.color_jitter) != 4:
            raise ConfigError(f"config key 'data.color_jitter': expected 4 values (brightness, contrast, saturation, "
                              f"hue), got {d.color_jitter}")
        steps.append(v2.ColorJitter(*d.color_jitter))  # images only: masks pass through untouched
    return v2.Compose(steps)


def eval_transform(cfg: Any) -> v2.Compose:
    return v2.Compose([v2.Resize((cfg.data.image_size, cfg.data.image_size), antialias=True)])  # masks: nearest


class SegmentationPairs(torch.utils.data.Dataset):
    """Items {"pixel_values": float [3, S, S] (ImageNet-normalised), "labels": int64 [S, S] (255 = ignore)}."""

    def __init__(self, pairs: list[tuple[str, str]], transform: v2.Compose, num_labels: int,
                 reduce_labels: bool = False) -> None:
        self.pairs = list(pairs)
        self.transform = transform
        self.num_labels, self.reduce_labels = int(num_labels), bool(reduce_labels)
        self.lut = label_lut(reduce_labels)
        self.allowed = allowed_values(self.num_labels, self.reduce_labels)
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)
        self._class_labels: list[int] | None = None  # class_labels(), computed on first use

    def __len__(self) -> int:
        return len(self.pairs)

    def class_labels(self) -> list[int]:
        """One class per image, for data.use_class_balanced_sampler / progressive_class_balancing:
        the most frequent non-ignored class of its full (uncropped) training label mask (ties: the
        lowest index); a mask with every pixel ignored gets num_labels, a class of its own. Every
        mask is read once, on the first call (not at construction), and the answer is cached."""
        if self._class_labels is None:
            out = []
            for _, mask_path in self.pairs:
                counts = np.bincount(self.lut[read_mask(mask_path)].ravel(), minlength=256)[:IGNORE_INDEX]
                out.append(int(counts.argmax()) if counts.any() else self.num_labels)
            self._class_labels = out
        return list(self._class_labels)

    def __getitem__(self, i: int) -> dict:
        image_path, mask_path = self.pairs[i]
        rgb = np.asarray(read_image(image_path))
        raw = read_mask(mask_path)
        if not self.allowed[raw].all():  # cheap next to decoding; check_masks=false skips the up-front scan
            bad = np.unique(raw[~self.allowed[raw]])
            raise DataError(f"mask {mask_path} has values {', '.join(map(str, bad[:10].tolist()))} outside the label "
                            f"set: expected {describe_label_set(self.num_labels, self.reduce_labels)}")
        labels = self.lut[raw]
        image = tv_tensors.Image(torch.from_numpy(rgb.copy()).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(labels))
        image, mask = self.transform(image, mask)
        pixels = (image.as_subclass(torch.Tensor).float() / 255.0 - self.mean) / self.std
        return {"pixel_values": pixels, "labels": mask.as_subclass(torch.Tensor).long()}


def split_pairs(cfg: Any) -> tuple[dict[str, list[tuple[str, str]]], str]:
    layout, path = locate(cfg)
    if layout == "metadata":
        return read_metadata(path), f"metadata file {path}"
    return plain_folder_pairs(path, cfg.data.val_fraction), f"folder {path}"


def build_datasets(cfg: Any) -> dict:
    """{"train", "val", "test"}; test is the metadata's "test" list when present, else the val split."""
    if cfg.data.image_size < 32:
        raise ConfigError(f"config key 'data.image_size': expected at least 32 pixels, got {cfg.data.image_size}")
    splits, where = split_pairs(cfg)
    class_names(cfg)  # validates id2label.json against model.num_labels when there is one
    for pairs in splits.values():
        check_pairs(pairs, int(cfg.model.num_labels), cfg.data.reduce_labels, where, cfg.data.check_masks)
    k, reduce = int(cfg.model.num_labels), cfg.data.reduce_labels
    train = SegmentationPairs(splits["train"], train_transform(cfg), k, reduce)
    val = SegmentationPairs(splits["val"], eval_transform(cfg), k, reduce)
    test = SegmentationPairs(splits["test"], eval_transform(cfg), k, reduce) if "test" in splits else val
    return {"train": train, "val": val, "test": test}
