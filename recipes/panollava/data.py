"""QuIC-360 as PanoLLaVA reads it: `{train,valid,test}.csv` with columns url,query,annotation.

url is the panorama's path (absolute, or relative to the CSV's folder, data.root or the working
directory: the seed's CSVs hold `data/quic360/train/images/<id>.jpg`, relative to its repository);
query a short subject word; annotation the reference caption. Several rows per image.

Each item: the panorama resized to data.erp_height x data.erp_width (uint8 [3, H, W]; views are cut
on the device, recipes/panollava/views.py), the chat turn's input_ids and labels (text.py), the
prompt alone (for generation) and the reference caption's tokens (for the metrics), its row index.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from trainlib.config import DataConfig, DataError, opt
from trainlib.data import open_image

from .text import encode_example

SPLITS = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}
COLUMNS = ("url", "query", "annotation")


@dataclass
class PanoData(DataConfig):
    erp_height: int = opt(512, "panoramas are resized to this height (2:1 ERP: width = 2 x height by default)",
                          ge=8, le=8192)
    erp_width: int = opt(1024, "panorama width after resizing", ge=16, le=16384)
    max_caption_tokens: int = opt(128, "reference captions are cut to this many tokens (training and metrics)",
                                  ge=1, le=8192)
    train_csv: str = opt("train.csv", "training rows, relative to data.root")
    val_csv: str = opt("valid.csv", "validation rows, relative to data.root (the seed's valid.csv)")
    test_csv: str = opt("test.csv", "test rows, relative to data.root (empty: no test split)")


def read_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's rows (url, query, annotation), or one message naming the file and what is wrong."""
    if not path.is_file():
        raise DataError(f"{path}: no such CSV (expected columns {','.join(COLUMNS)})")
    with path.open(newline="", encoding="utf-8-sig") as f:   # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; its header is "
                             f"{','.join(reader.fieldnames or []) or '(empty)'}, expected {','.join(COLUMNS)}")
        rows = [{c: (r[c] or "").strip() for c in COLUMNS} for r in reader]
    if not rows:
        raise DataError(f"{path}: no rows")
    for i, r in enumerate(rows, start=2):
        if not r["url"]:
            raise DataError(f"{path}, line {i}: empty url")
    return rows


def resolve_image(url: str, csv_path: Path, root: Path, line: int) -> Path:
    p = Path(url)
    tried = [p] if p.is_absolute() else [csv_path.parent / p, root / p, Path.cwd() / p]
    for t in tried:
        if t.is_file():
            return t
    raise DataError(f"{csv_path}, line {line}: image {url} not found (looked at "
                            f"{', '.join(str(t) for t in dict.fromkeys(tried))})")


def load_panorama(path: Path, hw: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    with open_image(path, "panorama") as im:
        im = im.convert("RGB")
        if im.size != (hw[1], hw[0]):
            im = im.resize((hw[1], hw[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class PanoCaptions(Dataset):
    """One row per item; images are checked to exist when the split is opened (a typo fails at once)."""

    random_fetch = False   # no augmentation draws: no per-batch seeding needed

    def __init__(self, csv_path: Path, root: Path, tok: Any, d: PanoData, system: str, template: str) -> None:
        self.rows = read_rows(csv_path)
        self.images = [resolve_image(r["url"], csv_path, root, i) for i, r in enumerate(self.rows, start=2)]
        self.tok, self.d, self.system, self.template = tok, d, system, template

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        cap = self.tok.encode(r["annotation"])[: self.d.max_caption_tokens]
        answer = self.tok.decode(cap) if len(cap) == self.d.max_caption_tokens else r["annotation"]
        ids, labels = encode_example(self.tok, r["query"], answer, self.system, self.template)
        prompt, _ = encode_example(self.tok, r["query"], None, self.system, self.template)
        return {"image": load_panorama(self.images[i], (self.d.erp_height, self.d.erp_width)),
                "input_ids": ids, "labels": labels, "prompt_ids": prompt,
                "ref_ids": torch.tensor(cap, dtype=torch.long), "index": i}


def make_collate(pad_id: int, ref_width: int):
    """Right padding for training (pad id, mask 0, label -100), left padding for the prompts that
    generation continues, references padded with -1 to a fixed width (gathered across ranks)."""
    def collate(items: list[dict]) -> dict:
        b = len(items)
        n = max(len(x["input_ids"]) for x in items)
        p = max(len(x["prompt_ids"]) for x in items)
        out = {"image": torch.stack([x["image"] for x in items]),
               "input_ids": torch.full((b, n), pad_id), "attention_mask": torch.zeros(b, n, dtype=torch.long),
               "labels": torch.full((b, n), -100), "prompt_ids": torch.full((b, p), pad_id),
               "prompt_mask": torch.zeros(b, p, dtype=torch.long), "ref_ids": torch.full((b, ref_width), -1),
               "index": torch.tensor([x["index"] for x in items])}
        for i, x in enumerate(items):
            k, q, r = len(x["input_ids"]), len(x["prompt_ids"]), len(x["ref_ids"])
            out["input_ids"][i, :k], out["attention_mask"][i, :k], out["labels"][i, :k] = x["input_ids"], 1, x["labels"]
            out["prompt_ids"][i, p - q:], out["prompt_mask"][i, p - q:] = x["prompt_ids"], 1
            out["ref_ids"][i, :r] = x["ref_ids"]
        return out
    return collate


def split_paths(d: PanoData) -> dict[str, Path]:
    root = Path(d.root)
    return {s: root / name for s, name in (("train", d.train_csv), ("val", d.val_csv), ("test", d.test_csv)) if name}


def all_texts(d: PanoData) -> list[str]:
    """Every query and caption of the splits (the word vocabulary of a model without a pretrained LM)."""
    texts: list[str] = []
    for path in split_paths(d).values():
        for r in read_rows(path):
            texts += [r["query"], r["annotation"]]
    return texts
