"""A small synthetic segmentation dataset in exactly the seed's layout, for demos and tests.

    <root>/processed_dataset/metadata.json   {"train": [{"image": ..., "mask": ...}], "valid": [...]}
    <root>/processed_dataset/id2label.json   {"0": "background", "1": "flat-road", ...}
    <root>/processed_dataset/{train,valid}/images/NNNN.jpg     RGB, JPEG quality 90
    <root>/processed_dataset/{train,valid}/masks/NNNN.png      mode L class indices, 255 = ignore

Every image (sides between min_size and max_size, not square) is a smooth two-colour background
(class 0) with 2-5 overlapping rectangles, ellipses and polygons. Class c >= 1 has its own colour and
texture (horizontal, vertical or diagonal stripes, checks, dots, speckle) with per-shape jitter of
the colour, the period and the phase, so a pixel's class is learnable from colour and texture (the
model has to look at a neighbourhood to see the texture). A one-pixel outline around each shape and
an occasional blob of clutter are labelled 255 (ignored), as annotation boundaries and "void"
regions are in real sidewalk masks.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

DEMO = {"n_train": 256, "n_valid": 64, "num_labels": 6, "min_size": 64, "max_size": 96}
NAMES = ["background", "flat-road", "flat-sidewalk", "human-person", "vehicle-car", "nature-vegetation",
         "construction-building", "object-pole"]
# Well separated base colours (RGB) for classes 1, 2, ...; cycled when there are more classes.
PALETTE = np.array([[200, 60, 60], [60, 170, 70], [70, 90, 210], [220, 200, 60], [170, 70, 200],
                    [60, 200, 200], [240, 140, 40], [120, 120, 120]], dtype=np.float64)
TEXTURES = ["hstripes", "checks", "vstripes", "dots", "diagonal", "speckle"]


def class_name(c: int) -> str:
    return NAMES[c] if c < len(NAMES) else f"class-{c}"


def texture(kind: str, h: int, w: int, period: int, phase: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w] pattern in [-1, 1]."""
    y, x = np.mgrid[0:h, 0:w]
    half = max(1, period // 2)
    if kind == "hstripes":
        t = ((y + phase) // half) % 2
    elif kind == "vstripes":
        t = ((x + phase) // half) % 2
    elif kind == "diagonal":
        t = ((x + y + phase) // half) % 2
    elif kind == "checks":
        t = (((x + phase) // half) + ((y + phase) // half)) % 2
    elif kind == "dots":
        t = (((x + phase) % period) < half) & (((y + phase) % period) < half)
    else:  # speckle
        t = rng.random((h, w)) < 0.5
    return t.astype(np.float64) * 2.0 - 1.0


def shape_mask(h: int, w: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """(filled region, one-pixel outline) of a random rectangle, ellipse or polygon, as mode-L images."""
    side = min(h, w)
    sw, sh = (int(rng.uniform(0.3, 0.65) * side) for _ in range(2))
    x0, y0 = int(rng.integers(-sw // 4, w - 3 * sw // 4)), int(rng.integers(-sh // 4, h - 3 * sh // 4))
    box = [x0, y0, x0 + sw, y0 + sh]
    fill, line = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
    kind = rng.integers(3)
    for img, outline_only in ((fill, False), (line, True)):
        d = ImageDraw.Draw(img)
        kw = {"outline": 255, "width": 1} if outline_only else {"fill": 255}
        if kind == 0:
            d.rectangle(box, **kw)
        elif kind == 1:
            d.ellipse(box, **kw)
    if kind == 2:
        n = int(rng.integers(3, 7))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        cx, cy = x0 + sw / 2, y0 + sh / 2
        pts = [(cx + sw / 2 * np.cos(a) * rng.uniform(0.6, 1.0), cy + sh / 2 * np.sin(a) * rng.uniform(0.6, 1.0))
               for a in ang]
        ImageDraw.Draw(fill).polygon(pts, fill=255)
        ImageDraw.Draw(line).polygon(pts, outline=255)
    return fill, line


def make_sample(h: int, w: int, num_labels: int, rng: np.random.Generator,
                first_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [h, w, 3], mask uint8 [h, w])."""
    # Background: a smooth blend of two dull colours plus mild noise.
    c0, c1 = rng.uniform(70, 150, 3), rng.uniform(70, 150, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    image = c0 * (1 - t) + c1 * t + np.zeros((h, w, 3))
    image += rng.normal(0, 6, (h, w, 3))
    mask = np.zeros((h, w), np.uint8)
    n_shapes = int(rng.integers(2, 6))
    for s in range(n_shapes):
        c = first_class if (s == 0 and first_class is not None) else int(rng.integers(1, num_labels))
        fill, line = shape_mask(h, w, rng)
        region = np.asarray(fill) > 0
        base = PALETTE[(c - 1) % len(PALETTE)] + rng.uniform(-20, 20, 3)
        pattern = texture(TEXTURES[(c - 1) % len(TEXTURES)], h, w, int(rng.integers(4, 8)), int(rng.integers(8)), rng)
        amplitude = rng.uniform(30, 45)
        shaded = base[None, None, :] + amplitude * pattern[..., None] + rng.normal(0, 5, (h, w, 3))
        image[region] = shaded[region]
        mask[region] = c
        mask[np.asarray(line) > 0] = 255
    if rng.random() < 0.3:  # clutter nobody labelled
        fill, _ = shape_mask(h, w, rng)
        region = np.asarray(fill) > 0
        region &= rng.random((h, w)) < 0.9
        image[region] = rng.uniform(0, 255, (int(region.sum()), 3))
        mask[region] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_synthetic(root: str, *, n_train: int = DEMO["n_train"], n_valid: int = DEMO["n_valid"],
                   num_labels: int = DEMO["num_labels"], min_size: int = DEMO["min_size"],
                   max_size: int = DEMO["max_size"], seed: int = 0) -> dict:
    """Write the dataset under `root`; returns the metadata dict (also saved as metadata.json)."""
    if num_labels < 2 or n_train < 1 or n_valid < 1 or min_size < 16 or max_size < min_size:
        raise ValueError("make_synthetic needs num_labels >= 2, n_train >= 1, n_valid >= 1, 16 <= min_size <= max_size")
    rng = np.random.default_rng(seed)  # own generator: the global RNGs are left alone
    base = os.path.join(root, "processed_dataset")
    meta: dict = {"train": [], "valid": []}
    for split, n in (("train", n_train), ("valid", n_valid)):
        for sub in ("images", "masks"):
            os.makedirs(os.path.join(base, split, sub), exist_ok=True)
        for i in range(n):
            h, w = int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))
            first = 1 + i % (num_labels - 1)  # every class in every split
            image, mask = make_sample(h, w, num_labels, rng, first_class=first)
            rel_img, rel_mask = f"{split}/images/{i:04d}.jpg", f"{split}/masks/{i:04d}.png"
            Image.fromarray(image).save(os.path.join(base, rel_img), quality=90)
            Image.fromarray(mask).save(os.path.join(base, rel_mask))
            meta[split].append({"image": rel_img, "mask": rel_mask})
    with open(os.path.join(base, "metadata.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    with open(os.path.join(base, "id2label.json"), "w") as fh:
        json.dump({str(c): class_name(c) for c in range(num_labels)}, fh, indent=1)
    return meta
