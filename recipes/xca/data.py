"""XCA (X-ray coronary angiography) vessel segmentation data, as the seed's MONAI pipeline.

Layout (each split folder may be moved with data.train_dir / val_dir / test_dir):

    <root>/{train,val,test}/image/<name>.png    grayscale X-ray (RGB/RGBA/LA: the first channel is used)
    <root>/{train,val,test}/label/<name>.png    binary vessel mask, 0 and one foreground value (0/255 or 0/1)

Image and label are paired by identical file name. Without a test folder the test split is val.

Per item (as the seed's ScaleIntensityd): image min-max scaled to [-1, 1], label to {0, 1}.
Training, in the seed's order: flips of each axis (p 0.5 each), a quarter turn k in {1, 2, 3}
(p 0.5), a rotation by an angle from data.rotate_degrees (p 0.25, bilinear, border padding, image
and label alike, so rotated label edges are fractional as in the seed), a gamma contrast change of
the image (p 0.25), then the crop: with num_samples_per_image > 1, RandCropByPosNegLabeld's rule
(a centre on a vessel pixel with probability pos_fraction, else on a background pixel, then shifted
so the crop fits), else a uniform random crop; the image is clamped to [-1, 1] at the end.
The seed builds n = num_samples_per_image crops and returns crop index % n of image index // n:
the n crops are independent draws, so we draw only that one (same distribution, 1/n the work).

Evaluation items are whole images; whole images of different sizes cannot share a batch
(`collate` says so, naming the files): val_batch_size defaults to 1, as the seed.

Random draws use the global torch RNG only, which trainlib seeds per batch (exact on resume).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from trainlib.config import ConfigError, DataConfig, DataError, opt, rule
from trainlib.data import image_file_size, open_image

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MAX_LISTED = 5
_ordered = rule("two values [low, high] with low <= high", lambda v: len(v) == 2 and v[0] <= v[1])


@dataclass
class XCAData(DataConfig):
    name: str = opt("xca", "dataset name, kept in the run's config (the seed's data.name: xca, octa500_3m, rossa, ...)")
    batch_size: int = opt(6, "training batch size per process (the seed's flow.yaml: train_bs 6)", ge=1)
    val_batch_size: int = opt(1, "validation/test batch size (whole images: >1 needs equal sizes; the seed: 1)", ge=0)
    image_size: int = opt(320, "side of the square training crop (the seed: 320 of 512x512 images)", ge=8, le=8192)
    num_samples_per_image: int = opt(4, "training crops per image per epoch; >1 also switches to pos/neg-centred "
                                        "crops (the seed's flow.yaml: 4)", ge=1, le=1024)
    pos_fraction: float = opt(0.5, "with num_samples_per_image > 1: chance a crop is centred on a vessel pixel "
                                   "(RandCropByPosNegLabeld pos=1, neg=1)", ge=0, le=1)
    train_dir: str = opt("", "training split folder holding image/ and label/ ('' = <root>/train)")
    val_dir: str = opt("", "validation split folder ('' = <root>/val)")
    test_dir: str = opt("", "test split folder ('' = <root>/test, else the validation split when that is absent)")
    augmentation: bool = opt(True, "random flips, quarter turns, rotation and contrast on training crops")
    rotate_prob: float = opt(0.25, "chance of the small rotation (training)", ge=0, le=1)
    rotate_degrees: list[float] = opt([7.5, 7.5], "rotation angle range in degrees; the seed's range_x=(pi/24, "
                                                  "pi/24) is always +7.5 ([-7.5, 7.5] for +-)",
                                      ge=-180, le=180, check=_ordered)
    contrast_prob: float = opt(0.25, "chance of the gamma contrast change of the image (training)", ge=0, le=1)
    contrast_gamma: list[float] = opt([0.9, 1.1], "gamma range of the contrast change", gt=0, le=10, check=_ordered)
    check_labels: bool = opt(True, "read every label before training to check it is binary (false: sizes only)")


# ------------------------------------------------------------------------------------------------
# Files

def _listing(items: list[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def read_gray(path: str, what: str) -> np.ndarray:
    """[H, W] raw values; multi-channel files give their first channel, as the seed's rgb_to_gray."""
    with open_image(path, what) as im:
        arr = np.asarray(im.convert("RGB") if im.mode == "P" else im)
    return arr[..., 0] if arr.ndim == 3 else arr


def check_label(path: str, arr: np.ndarray) -> None:
    """0 and one foreground value (or a single value): anything else is not a vessel mask."""
    values = np.unique(arr)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:10].tolist()) + (" ..." if len(values) > 10 else "")
        raise DataError(f"label {path} is not binary: found values {shown} ({len(values)} distinct); "
                        f"expected 0 and one foreground value (0/255 or 0/1)")


def read_pairs(split_dir: str, check_labels: bool = True) -> list[tuple[str, str]]:
    """(image, label) paths of `split_dir`, matched by file name and sorted; checks sizes and labels."""
    if not os.path.isdir(split_dir):
        raise DataError(f"split folder not found: {split_dir} (expected image/ and label/ folders in it)")
    dirs = {sub: os.path.join(split_dir, sub) for sub in ("image", "label")}
    for sub, path in dirs.items():
        if not os.path.isdir(path):
            raise DataError(f"split folder {split_dir} has no {sub}/ folder: expected {path}/<name>.png")
    names = {sub: sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
             for sub, path in dirs.items()}
    if not names["image"]:
        raise DataError(f"split folder {split_dir} is empty: no images ({', '.join(IMAGE_EXTS)}) in {dirs['image']}")
    labels, images = set(names["label"]), set(names["image"])
    for sub, mine, other in (("image", names["image"], labels), ("label", names["label"], images)):
        alone = [f for f in mine if f not in other]
        if alone:
            partner = "label" if sub == "image" else "image"
            raise DataError(f"{len(alone)} {sub}(s) in {dirs[sub]} have no {partner} of the same name in "
                            f"{dirs[partner]}: {_listing(alone)}")
    pairs = [(os.path.join(dirs["image"], f), os.path.join(dirs["label"], f)) for f in names["image"]]
    for image, label in pairs:
        isize, lsize = image_file_size(image, "image"), image_file_size(label, "label")
        if isize != lsize:
            raise DataError(f"image {image} is {isize[0]}x{isize[1]} but its label {label} is {lsize[0]}x{lsize[1]} "
                            f"(width x height): they must be the same size")
        if check_labels:
            check_label(label, read_gray(label, "label"))
    return pairs


def split_dir(data: XCAData, split: str) -> str:
    """The folder of `split`: its override, else <root>/<split> (test: val when <root>/test is absent)."""
    own = {"train": data.train_dir, "val": data.val_dir, "test": data.test_dir}[split]
    if own:
        return own
    if not data.root:
        raise DataError(f"data.root is empty and data.{split}_dir is not set: point data.root at a folder "
                        f"holding train/ and val/ (each with image/ and label/)")
    path = os.path.join(data.root, split)
    return split_dir(data, "val") if split == "test" and not os.path.isdir(path) else path


# ------------------------------------------------------------------------------------------------
# Tensors and augmentation

def scale_image(arr: np.ndarray) -> torch.Tensor:
    """[1, H, W] float in [-1, 1], per-image min-max (ScaleIntensityd minv=-1, maxv=1); constant -> -1."""
    x = torch.from_numpy(arr.astype(np.float32))
    lo, hi = x.min(), x.max()
    if lo == hi:
        return torch.full((1, *x.shape), -1.0)
    return ((x - lo) / (hi - lo) * 2.0 - 1.0).unsqueeze(0)


def binarise(arr: np.ndarray) -> torch.Tensor:
    """[1, H, W] float {0, 1}: every non-zero value is vessel (min-max of a 0/v mask, as the seed)."""
    return torch.from_numpy(arr > 0).float().unsqueeze(0)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """[C, H, W] turned about the centre, same size, bilinear, border padding (MONAI Rotate's defaults)."""
    _, h, w = x.shape
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float32)  # pixel-space rotation
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def adjust_contrast(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """MONAI AdjustContrast: ((x - min) / (range + eps)) ** gamma * range + min."""
    lo = x.min()
    span = x.max() - lo
    return ((x - lo) / (span + 1e-7)) ** gamma * span + lo


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def augment(image: torch.Tensor, label: torch.Tensor, d: XCAData) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's flips, quarter turn, rotation (image and label alike) and contrast (image only)."""
    both = torch.cat([image, label])
    for dim in (1, 2):
        if torch.rand(()) < 0.5:
            both = both.flip(dim)
    if torch.rand(()) < 0.5:
        both = torch.rot90(both, int(torch.randint(3, ())) + 1, dims=(1, 2))
    if torch.rand(()) < d.rotate_prob:
        both = rotate(both, _uniform(*d.rotate_degrees))
    image, label = both[:1], both[1:]
    if torch.rand(()) < d.contrast_prob:
        image = adjust_contrast(image, _uniform(*d.contrast_gamma))
    return image.contiguous(), label.contiguous()


def draw_center(label: torch.Tensor, pos_fraction: float) -> tuple[int, int]:
    """(row, col) of a vessel pixel with chance pos_fraction, else of a background pixel
    (all of one kind when the other is absent), as generate_pos_neg_label_crop_centers."""
    flat = label.reshape(-1) != 0
    fg, bg = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
    if not len(fg) or not len(bg):
        pos_fraction = 1.0 if len(fg) else 0.0
    pool = fg if torch.rand(()) < pos_fraction else bg
    idx = int(pool[torch.randint(len(pool), ())])
    w = label.shape[-1]
    return idx // w, idx % w


def crop_origin(center: tuple[int, int], size: int, shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of the `size` crop around `center`, shifted to fit (MONAI correct_crop_centers)."""
    return tuple(min(max(c - size // 2, 0), n - size) for c, n in zip(center, shape))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Dataset

class VesselDataset(torch.utils.data.Dataset):
    """Items {"image": [1, H, W] in [-1, 1], "label": [1, H, W] (float 0/1; rotated training crops have
    fractional edges), "index": the pair's index, "name": its file name}. Training: len = pairs x n and
    item i is a fresh image_size crop of pair i // n; evaluation: whole images, one per pair."""

    def __init__(self, pairs: list[tuple[str, str]], train: bool, image_size: int = 320,
                 num_samples_per_image: int = 1, augmentation: bool = True, data: XCAData | None = None) -> None:
        if image_size < 1 or num_samples_per_image < 1:
            raise ConfigError(f"VesselDataset: image_size ({image_size}) and num_samples_per_image "
                              f"({num_samples_per_image}) must be at least 1")
        self.pairs, self.train = list(pairs), bool(train)
        self.image_size, self.n = int(image_size), int(num_samples_per_image) if train else 1
        self.augmentation = bool(augmentation) and self.train
        self.data = data or XCAData()  # pos_fraction and the augmentation's probabilities and ranges
        self.names = [os.path.basename(image) for image, _ in self.pairs]
        self.sizes = [image_file_size(image, "image")[::-1] for image, _ in self.pairs]  # (H, W)
        self.random_fetch = self.train
        if self.train:
            small = [f"{name} ({h}x{w})" for name, (h, w) in zip(self.names, self.sizes) if min(h, w) < self.image_size]
            if small:
                raise DataError(f"{len(small)} training image(s) are smaller than data.image_size={self.image_size}: "
                                f"{_listing(small)} (folder {os.path.dirname(self.pairs[0][0])})")

    def __len__(self) -> int:
        return len(self.pairs) * self.n

    def shape_keys(self) -> list[tuple[int, int]]:
        """What each item collates to: the crop (training) or the whole image's (H, W)."""
        if self.train:
            return [(self.image_size, self.image_size)] * len(self)
        return list(self.sizes)

    def load(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair k scaled: image [-1, 1], label {0, 1}."""
        image_path, label_path = self.pairs[k]
        image, label = read_gray(image_path, "image"), read_gray(label_path, "label")
        if image.shape != label.shape:
            raise DataError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} is "
                            f"{label.shape[1]}x{label.shape[0]} (width x height): they must be the same size")
        return scale_image(image), binarise(label)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = i // self.n
        image, label = self.load(k)
        if self.train:
            if self.augmentation:
                image, label = augment(image, label, self.data)
            s = self.image_size
            h, w = label.shape[-2:]
            if self.n > 1:
                y0, x0 = crop_origin(draw_center(label[0], self.data.pos_fraction), s, (h, w))
            else:  # the seed's RandSpatialCropd: a uniform corner
                y0, x0 = int(torch.randint(h - s + 1, ())), int(torch.randint(w - s + 1, ()))
            image, label = image[:, y0:y0 + s, x0:x0 + s].clamp(-1.0, 1.0), label[:, y0:y0 + s, x0:x0 + s]
        return {"image": image.contiguous(), "label": label.contiguous(), "index": k, "name": self.names[k]}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """default_collate, with a DataError naming the files when whole images of different sizes meet."""
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) > 1:
        first = batch[0]
        odd = next(item for item in batch if item["image"].shape != first["image"].shape)
        raise DataError(f"images {first['name']} ({'x'.join(map(str, first['image'].shape[1:]))}) and {odd['name']} "
                        f"({'x'.join(map(str, odd['image'].shape[1:]))}) cannot share a batch: set "
                        f"data.val_batch_size=1 (whole images are scored at their own size)")
    return default_collate(batch)


def build_datasets(data: XCAData) -> dict[str, VesselDataset]:
    """{"train", "val", "test"} from the configured folders (test: val's pairs when there is no test folder)."""
    folders = {split: split_dir(data, split) for split in SPLITS}
    pairs = {split: read_pairs(folders[split], data.check_labels) for split in ("train", "val")}
    pairs["test"] = pairs["val"] if folders["test"] == folders["val"] else read_pairs(folders["test"], data.check_labels)
    return {split: VesselDataset(p, split == "train", data.image_size, data.num_samples_per_image,
                                 data.augmentation, data) for split, p in pairs.items()}
