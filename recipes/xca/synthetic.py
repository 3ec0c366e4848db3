"""A small synthetic angiography dataset in exactly the seed's layout, for demos and tests.

    <root>/{train,val,test}/image/NNNN.png    grayscale (mode L), size x size
    <root>/{train,val,test}/label/NNNN.png    mode L, 0 background / 255 vessel

Each image is a bright, unevenly lit field (a smooth random illumination plus noise) crossed by
2-3 dark branching vessel trees: smooth random walks whose width shrinks from about 4 px at the
root to 1-2 px at the twigs, as contrast-filled coronary arteries in X-ray angiography. The
illumination range is wider than the vessel contrast, so a single global threshold does not
separate vessels from background; a small CNN looking at a neighbourhood does.

Every image has its own generator seeded by (seed, split, index): deterministic per seed, and a
split's images do not change with the other splits' counts.
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO = {"n_train": 64, "n_val": 16, "n_test": 16, "size": 96}
DEMO_IMAGE_SIZE = 64          # training crop side for the demo (data.image_size)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def illumination(size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] smooth field in [0, 1]: a 4x4 random grid, bicubic upsampled."""
    coarse = Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float64)
    return (field - field.min()) / max(np.ptp(field), 1e-6)


def draw_tree(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    """One vessel tree from a random border point heading inwards; branches get narrower."""
    side = int(rng.integers(4))
    t = rng.uniform(0.2, 0.8) * size
    x, y = [(t, 0.0), (size - 1.0, t), (t, size - 1.0), (0.0, t)][side]
    heading = math.atan2(size / 2 - y, size / 2 - x) + rng.normal(0, 0.4)
    stack = [(x, y, heading, rng.uniform(3.0, 4.2), int(size * rng.uniform(0.7, 1.1)))]
    step = max(1.0, size / 64)
    while stack:
        x, y, a, width, length = stack.pop()
        points = [(x, y)]
        for _ in range(int(length / step)):
            a += rng.normal(0, 0.12)
            x, y = x + step * math.cos(a), y + step * math.sin(a)
            points.append((x, y))
            if not (-2 <= x <= size + 1 and -2 <= y <= size + 1):
                break
            if width > 1.6 and len(stack) < 12 and rng.random() < 0.05:
                turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
                stack.append((x, y, a + turn, width * 0.65, int(length * rng.uniform(0.4, 0.7))))
        draw.line(points, fill=255, width=max(1, round(width)), joint="curve")


def make_sample(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [size, size], label uint8 {0, 255} [size, size])."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(2, 4))):
        draw_tree(draw, size, rng)
    label = np.asarray(mask)
    vessel = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float64) / 255.0  # soft edges
    background = 105.0 + 125.0 * illumination(size, rng)      # 105..230: wider than a vessel's contrast
    depth = rng.uniform(0.32, 0.42)                             # vessels absorb 32-42 % of the light
    image = background * (1.0 - depth * vessel) + rng.normal(0, 7.0, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8), np.where(label > 0, 255, 0).astype(np.uint8)


def make_synthetic(root: str, *, n_train: int = DEMO["n_train"], n_val: int = DEMO["n_val"],
                   n_test: int = DEMO["n_test"], size: int = DEMO["size"], seed: int = 0) -> dict[str, int]:
    """Write the dataset under `root`; returns the number of pairs written per split."""
    if min(n_train, n_val) < 1 or n_test < 0 or not 32 <= size <= 1024:
        raise ValueError("make_synthetic needs n_train >= 1, n_val >= 1, n_test >= 0 and 32 <= size <= 1024")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if n == 0:
            continue
        for sub in ("image", "label"):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, SPLIT_IDS[split], i])  # own generator: global RNGs untouched
            image, label = make_sample(size, rng)
            Image.fromarray(image).save(os.path.join(root, split, "image", f"{i:04d}.png"))
            Image.fromarray(label).save(os.path.join(root, split, "label", f"{i:04d}.png"))
    return counts
