"""Synthetic panoramas in QuIC-360's layout, with captions a model can only get right by looking.

Each panorama (equirectangular, 2:1) has a sky (day: blue, dusk: orange) over a ground (grass or
road) and two objects of different shapes (house: wide box, tower: tall box, ball: disc) and colours,
at random yaws; about one object in five straddles the 0/360 seam, so only the wrap-around of the
views sees it whole. Three rows per panorama, one per query, the caption determined by the content:

    objects  ->  "a red house and a blue tower"          (objects in the order of their shape names)
    colours  ->  "the house is red and the tower is blue"
    scene    ->  "a dusk sky over a grey road"

    <root>/train.csv, valid.csv, test.csv          url,query,annotation
    <root>/<split>/images/pano_<n>.jpg
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {"red": (210, 40, 40), "blue": (40, 70, 220), "yellow": (235, 215, 40), "white": (245, 245, 245)}
SHAPES = ("ball", "house", "tower")
SKIES = {"day": (120, 180, 240), "dusk": (240, 150, 70)}
GROUNDS = {"green grass": (60, 150, 60), "grey road": (110, 110, 110)}
COUNTS = {"train": 160, "val": 24, "test": 24}
CSV_NAMES = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}


def _draw(img: np.ndarray, shape: str, colour: tuple, x0: int, rng: np.random.Generator) -> None:
    """An object whose left edge is at column x0 (wrapping around the seam), standing on the horizon."""
    h, w = img.shape[:2]
    horizon = h // 2
    if shape == "house":
        bw, bh = w // 8, h // 6
    elif shape == "tower":
        bw, bh = w // 20 + 1, h // 3
    else:
        bw, bh = w // 12, w // 12
    cols = (x0 + np.arange(bw)) % w
    top = horizon - bh
    if shape == "ball":
        yy, xx = np.mgrid[0:bh, 0:bw]
        inside = (yy - bh / 2 + 0.5) ** 2 + (xx - bw / 2 + 0.5) ** 2 <= (bw / 2) ** 2
        for j, c in enumerate(cols):
            rows = top + np.nonzero(inside[:, j])[0]
            img[rows, c] = colour
    else:
        img[top:horizon, cols] = colour


def panorama(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, dict[str, str]]:
    """One panorama and its three captions by query."""
    sky, ground = rng.choice(list(SKIES)), rng.choice(list(GROUNDS))
    img = np.empty((h, w, 3), np.float32)
    img[: h // 2], img[h // 2:] = SKIES[sky], GROUNDS[ground]
    img += np.linspace(-12, 12, h, dtype=np.float32)[:, None, None]            # a little shading
    shapes = sorted(rng.choice(SHAPES, size=2, replace=False).tolist())
    colours = rng.choice(list(COLOURS), size=2, replace=False).tolist()
    first = int(rng.integers(0, w))
    if rng.random() < 0.2:                                                      # across the seam
        first = w - w // 24
    second = (first + w // 4 + int(rng.integers(0, w // 2))) % w               # at least 90 degrees apart
    for shape, colour, x0 in zip(shapes, colours, (first, second)):
        _draw(img, shape, COLOURS[colour], x0, rng)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    caps = {"objects": f"a {colours[0]} {shapes[0]} and a {colours[1]} {shapes[1]}",
            "colours": f"the {shapes[0]} is {colours[0]} and the {shapes[1]} is {colours[1]}",
            "scene": f"a {sky} sky over {ground}"}
    return np.clip(img, 0, 255).astype(np.uint8), caps


def make_synthetic(root: Path, cfg: Any) -> None:
    """Writes the three splits (160 / 24 / 24 panoramas, 3 rows each) at data.erp_height x erp_width."""
    from PIL import Image

    root = Path(root)
    h, w = cfg.data.erp_height, cfg.data.erp_width
    rng = np.random.default_rng(0)                 # fixed: the cache folder is keyed by data and model keys only
    for split, n in COUNTS.items():
        folder = root / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            img, caps = panorama(rng, h, w)
            name = f"pano_{i:04d}.jpg"
            Image.fromarray(img).save(folder / name, quality=95)
            rows += [(f"{split}/images/{name}", q, c) for q, c in caps.items()]
        with (root / CSV_NAMES[split]).open("w", newline="", encoding="utf-8") as f:
            wr = csv.writer(f)
            wr.writerow(["url", "query", "annotation"])
            wr.writerows(rows)
