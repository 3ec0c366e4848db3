"""A small synthetic dataset in exactly the Charades/PDAN format, for demos and tests.

Writes <root>/<video_id>.npy shaped [T, 1, 1, D] float32 (as pytorch-i3d does) and
<root>/charades.json. Videos last T / ~3 seconds (I3D on 24 fps frames with stride 8 gives
~3 features per second), T in [t_min, t_max].

The signal needs temporal context: each action's class prototype is added only to the central
half of its labelled frames. The first and last quarter of every action look like background
(noise only), so a frame-wise classifier cannot label them; a model must look at neighbours a
few frames away (and at the width of the central window) to know they belong to the action.
Labels are derived from the written seconds with the same PDAN rule the loader applies.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .data import frame_labels

DEMO = {"n_train": 192, "n_test": 64, "num_classes": 10, "dim": 1024}


def make_synthetic(root: str, *, n_train: int = DEMO["n_train"], n_test: int = DEMO["n_test"],
                   num_classes: int = DEMO["num_classes"], dim: int = DEMO["dim"], seed: int = 0,
                   t_min: int = 32, t_max: int = 96, fps: float = 3.0, max_actions: int = 3,
                   amplitude: float = 6.0, noise: float = 1.0) -> dict:
    """Write the dataset under `root`; returns the annotation dict (also saved as charades.json)."""
    if n_test < num_classes:
        raise ValueError(f"n_test={n_test} must be >= num_classes={num_classes} so every class "
                         f"has positives in the testing split")
    if n_train < 1 or num_classes < 1 or dim < 1 or t_min < 16 or t_max < t_min:
        raise ValueError("make_synthetic needs n_train >= 1, num_classes >= 1, dim >= 1, 16 <= t_min <= t_max")
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    protos = rng.standard_normal((num_classes, dim))
    protos *= amplitude / np.linalg.norm(protos, axis=1, keepdims=True)

    # Every class opens at least one testing video: shuffled class order, cycled.
    test_first = np.concatenate([rng.permutation(num_classes)
                                 for _ in range(-(-n_test // num_classes))])[:n_test]
    db: dict = {}
    for i in range(n_train + n_test):
        is_test = i >= n_train
        vid = f"SYN{i:05d}"
        t = int(rng.integers(t_min, t_max + 1))
        duration = round(t / fps * float(rng.uniform(0.95, 1.05)), 2)
        vfps = t / duration
        n_act = int(rng.integers(1, min(max_actions, num_classes) + 1))
        classes = [int(c) for c in rng.permutation(num_classes)[:n_act]]
        if is_test:
            first = int(test_first[i - n_train])
            classes = [first] + [c for c in classes if c != first][: n_act - 1]
        actions = []
        for c in classes:
            length = int(rng.integers(8, min(24, t // 2) + 1))
            s = int(rng.integers(0, t - length + 1))
            e = s + length - 1
            # Frames s..e lie strictly inside (start, end) under the PDAN rule.
            start = round(max(0.0, (s - 0.5) / vfps), 2)
            end = round(min(duration, (e + 0.5) / vfps), 2)
            actions.append([c, start, end])
        labels = frame_labels(t, duration, actions, num_classes)
        feats = noise * rng.standard_normal((t, dim))
        for c, _, _ in actions:
            frames = np.flatnonzero(labels[:, c])
            if frames.size == 0:
                continue
            q = frames.size // 4
            feats[frames[q:frames.size - q]] += protos[c]  # central half only
        np.save(os.path.join(root, f"{vid}.npy"), feats.astype(np.float32).reshape(t, 1, 1, dim))
        db[vid] = {"subset": "testing" if is_test else "training", "duration": duration, "actions": actions}
    with open(os.path.join(root, "charades.json"), "w") as fh:
        json.dump(db, fh)
    return db
