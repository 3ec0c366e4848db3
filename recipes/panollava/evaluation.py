"""What PanoLLaVA's stages are judged by, reduced across ranks.

- vision stage: `ViewAgreement`: cosine similarity of the mean (centred) features of the overlapping strips
  of adjacent views (`adjacent`), and of a view's right strip with the left strip of the view
  opposite it (`distant`, no overlap). VICReg should lift the first above the second (`gap`).
- resampler / finetune: `CaptionScores`: greedy captions of the split against its references,
  BLEU-1..4, ROUGE-L, CIDEr (captions.py); every rank's token ids are gathered, each row counted once.
- test: `CaptionWriter` writes predictions_<split>.json: [{id, url, query, prediction, reference}].
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainlib import dist
from trainlib.checkpoint import atomic_write_bytes
from trainlib.metrics import Metric

from .captions import caption_scores
from .data import read_rows


class ViewAgreement(Metric):
    def __init__(self) -> None:
        super().__init__()
        for name in ("adjacent", "distant", "count"):
            self.add_state(name, "sum")

    def update(self, outputs: dict, batch: dict) -> None:
        self.adjacent += outputs["adjacent"].sum()
        self.distant += outputs["distant"].sum()
        self.count += outputs["adjacent"].numel()

    def compute_from(self, s: dict) -> dict[str, float]:
        n = max(float(s["count"]), 1.0)
        adjacent, distant = float(s["adjacent"]) / n, float(s["distant"]) / n
        return {"adjacent": adjacent, "distant": distant, "gap": adjacent - distant}


def _text(tok: Any, ids: torch.Tensor) -> str:
    return tok.decode([int(i) for i in ids if int(i) >= 0])


class CaptionScores(Metric):
    """Token ids of the captions and references -> text -> scores, on every rank the same."""

    def __init__(self, tok: Any) -> None:
        super().__init__()
        self.tok = tok
        for name in ("tokens", "refs", "index"):
            self.add_state(name, "cat")

    def update(self, outputs: dict, batch: dict) -> None:
        self.tokens.append(outputs["tokens"])
        self.refs.append(batch["ref_ids"])
        self.index.append(batch["index"])

    def compute_from(self, s: dict) -> dict[str, float]:
        seen: dict[int, int] = {}
        for row, i in enumerate(s["index"].tolist()):      # a sampler's padding repeats rows: once each
            seen.setdefault(int(i), row)
        rows = list(seen.values())
        preds = [_text(self.tok, s["tokens"][r]) for r in rows]
        refs = [[_text(self.tok, s["refs"][r])] for r in rows]
        return caption_scores(preds, refs)


class CaptionWriter:
    """prediction_writer: the split's greedy captions as JSON, rank 0 writes (atomically)."""

    def __init__(self, tok: Any, csv_path: Path) -> None:
        self.tok, self.csv_path = tok, csv_path
        self.items: list[tuple[int, list[int]]] = []

    def update(self, outputs: dict, batch: dict) -> None:
        for i, ids in zip(batch["index"].tolist(), outputs["tokens"].tolist()):
            self.items.append((int(i), ids))

    def write(self, run_dir: Path, split: str) -> None:
        gathered = dist.all_gather_object(self.items)
        if dist.rank() != 0:
            return
        rows = read_rows(self.csv_path)
        by_index = {i: ids for part in gathered for i, ids in part}
        out = [{"id": i, "url": rows[i]["url"], "query": rows[i]["query"],
                "prediction": self.tok.decode([t for t in ids if t >= 0]), "reference": rows[i]["annotation"]}
               for i, ids in sorted(by_index.items())]
        atomic_write_bytes(Path(run_dir) / f"predictions_{split}.json", json.dumps(out, indent=1).encode())
