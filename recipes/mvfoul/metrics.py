"""The SoccerNet-MVFoul metrics and predictions file, computed as the official evaluator does.

`FoulMetrics` gives, in % as `SoccerNet.Evaluation.MV_FoulRecognition.evaluate` prints them:

    balanced_accuracy_action             mean over the 8 action classes of (correct / ground truth)
    balanced_accuracy_offence_severity   the same over the 4 offence-severity classes
    leaderboard_value                    their mean: the challenge's ranking value
    accuracy_action, accuracy_offence_severity   plain accuracies

"Correct" is the evaluator's rule (annotations.py: `Action.scored_offence`), so a predictions file
scored by the official `evaluate()` gives exactly these numbers (tests/test_mvfoul.py runs it when
the `soccernet` package is installed). One deviation: a class with no ground-truth action in the
split makes the official balanced accuracy NaN (0/0 in its mean); here the mean is over the classes
present, so a small validation split still gives a number to monitor.

`Predictions` writes `predictions_<split>.json` ({"Set", "Actions": {id: {"Action class",
"Offence", "Severity"}}}, VARS's strings) into the run directory at the final test and for the
unlabelled challenge split.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from trainlib import dist
from trainlib.config import DataError
from trainlib.metrics import Metric

from .annotations import ACTION_CLASSES, OFFENCE_SEVERITY_CLASSES, PREDICTED_STRINGS, SPLIT_FOLDERS, Action

NUM_ACTION, NUM_OFFENCE = len(ACTION_CLASSES), len(OFFENCE_SEVERITY_CLASSES)


def _per_class(target: torch.Tensor, hit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ground-truth count [k], correct count [k]) of a batch; targets < 0 (unlabelled) count nowhere."""
    valid = target >= 0
    onehot = F.one_hot(target.clamp(min=0), k).double() * valid.unsqueeze(1)
    return onehot.sum(0), (onehot * hit.unsqueeze(1)).sum(0)


def balanced(gt: torch.Tensor, correct: torch.Tensor) -> float:
    present = gt > 0
    return float((correct[present] / gt[present]).mean()) * 100 if bool(present.any()) else math.nan


class FoulMetrics(Metric):
    """Per-class ground-truth and correct counts of both tasks (sums: no host sync in update)."""

    def __init__(self) -> None:
        super().__init__()
        for name, k in (("action_gt", NUM_ACTION), ("action_hit", NUM_ACTION),
                        ("offence_gt", NUM_OFFENCE), ("offence_hit", NUM_OFFENCE)):
            self.add_state(name, "sum", shape=(k,))

    def update(self, outputs: dict, batch: dict) -> None:
        action_pred, offence_pred = outputs["action"].argmax(1), outputs["offence"].argmax(1)
        counts = {}
        counts["action_gt"], counts["action_hit"] = _per_class(batch["action"], action_pred == batch["action"], NUM_ACTION)
        # the evaluator's rule: the prediction must be the one it accepts (not always the class itself)
        counts["offence_gt"], counts["offence_hit"] = _per_class(batch["offence"],
                                                                 offence_pred == batch["scored_offence"], NUM_OFFENCE)
        for name, c in counts.items():
            setattr(self, name, getattr(self, name).to(c.device) + c)

    def compute_from(self, s: dict[str, torch.Tensor]) -> dict[str, float]:
        ba_action = balanced(s["action_gt"], s["action_hit"])
        ba_offence = balanced(s["offence_gt"], s["offence_hit"])
        n_action, n_offence = float(s["action_gt"].sum()), float(s["offence_gt"].sum())
        return {
            "leaderboard_value": 0.5 * (ba_action + ba_offence),
            "balanced_accuracy_action": ba_action,
            "balanced_accuracy_offence_severity": ba_offence,
            "accuracy_action": float(s["action_hit"].sum()) / n_action * 100 if n_action else math.nan,
            "accuracy_offence_severity": float(s["offence_hit"].sum()) / n_offence * 100 if n_offence else math.nan,
        }


def prediction_entry(action: int, offence: int) -> dict[str, str]:
    """One action's entry in a SoccerNet predictions file (the strings VARS writes)."""
    offence_text, severity = PREDICTED_STRINGS[offence]
    return {"Action class": ACTION_CLASSES[action], "Offence": offence_text, "Severity": severity}


def write_predictions(path: Path, split: str, predicted: dict[str, tuple[int, int]]) -> None:
    """{action id: (action class, offence-severity class)} -> the official predictions JSON, atomically."""
    doc = {"Set": SPLIT_FOLDERS.get(split, split).lower(),
           "Actions": {key: prediction_entry(a, o) for key, (a, o) in sorted(predicted.items(), key=_order)}}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _order(item: tuple[str, Any]) -> tuple[int, str]:
    key = item[0]
    return (int(key), key) if key.isdigit() else (1 << 62, key)


class Predictions:
    """A trainlib PredictionWriter: each rank keeps (dataset index, action, offence-severity) of its
    batches; write() gathers them (a collective) and rank 0 writes predictions_<split>.json."""

    def __init__(self, actions: Sequence[Action]) -> None:
        self.actions = actions
        self.rows: list[torch.Tensor] = []

    def update(self, outputs: dict, batch: dict) -> None:
        self.rows.append(torch.stack([batch["index"], outputs["action"].argmax(1), outputs["offence"].argmax(1)], 1))

    def write(self, run_dir: Path, split: str) -> None:
        local = torch.cat(self.rows).cpu().tolist() if self.rows else []  # (host sync: once, at the end)
        rows = [row for part in dist.all_gather_object(local) for row in part]
        error, path = "", Path(run_dir) / f"predictions_{split}.json"
        if dist.rank() == 0:
            predicted = {self.actions[i].key: (a, o) for i, a, o in rows}
            try:
                write_predictions(path, split, predicted)
            except OSError as e:
                error = f"cannot write {path}: {e.strerror or e}"
            if len(predicted) < len(self.actions):
                print(f"[mvfoul] {path.name} holds {len(predicted)} of the {len(self.actions)} actions "
                      "(a limited run: trainer.fast_dev_run or trainer.limit_val_batches)", flush=True)
        error = dist.broadcast_object(error)  # every rank stops with the same message, none waits
        if error:
            raise DataError(error)
