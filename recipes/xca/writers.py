"""What the XCA recipe writes besides metrics: the test split's predicted masks as PNG files
(`<run>/predictions/test/<input file name>`, 0/255, the input's size) and the validation images
(image | label | probability | flow trajectory states) for TensorBoard and <run>/images/."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from trainlib.images import row, to_uint8


class MaskWriter:
    """PNG masks of one split. Each rank writes the images it scored (file names are unique), so
    nothing is gathered; the folder is made by whichever rank gets there first."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.masks: list[tuple[str, np.ndarray]] = []

    def update(self, outputs: dict, batch: dict) -> None:
        pred = (outputs["prob"][:, 0] > self.threshold).cpu().numpy()  # host copy: evaluation only
        for name, mask in zip(batch["name"], pred):
            self.masks.append((str(name), mask.astype(np.uint8) * 255))

    def write(self, run_dir: Path, split: str) -> None:
        from PIL import Image

        folder = Path(run_dir) / "predictions" / split
        folder.mkdir(parents=True, exist_ok=True)
        for name, mask in self.masks:
            stem, ext = os.path.splitext(name)
            out = folder / (name if ext.lower() == ".png" else f"{stem}.png")
            tmp = out.with_name(f".{out.name}.tmp")
            Image.fromarray(mask).save(tmp, format="PNG")
            os.replace(tmp, out)  # a reader never sees half a file


class ValidationImages:
    """The named validation images as one strip each: image | label | probability | x(t) states."""

    def __init__(self, names: list[str], rank: int = 0) -> None:
        self.names = set(names)
        self.first_only = not names and rank == 0  # no names given: the first image rank 0 sees
        self.found: dict[str, np.ndarray] = {}

    def update(self, outputs: dict, batch: dict) -> None:
        for i, name in enumerate(batch["name"]):
            wanted = name in self.names or (self.first_only and not self.found)
            if not wanted:
                continue
            panels = [to_uint8(batch["image"][i, 0], -1.0, 1.0), to_uint8(batch["label"][i, 0]),
                      to_uint8(outputs["prob"][i, 0])]
            traj = outputs.get("trajectory")
            panels += [to_uint8(s) for s in traj[i]] if traj is not None else []
            self.found[str(name)] = row(panels)

    def images(self) -> dict[str, Any]:
        return dict(self.found)
