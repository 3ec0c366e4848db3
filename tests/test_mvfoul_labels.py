"""SoccerNet-MVFoul labels and scoring: the official filter and mapping on hand-written annotations,
and the recipe's metrics equal to SoccerNet's official evaluator on the same predictions file."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from trainlib.config import DataError
from recipes.mvfoul.annotations import ACTION_CLASSES, official_labels, read_split
from recipes.mvfoul.metrics import FoulMetrics, Predictions, write_predictions


def entry(action: str, offence: str, severity: str) -> dict:
    return {"Action class": action, "Offence": offence, "Severity": severity, "Clips": []}


@pytest.mark.parametrize("action, offence, severity, expected", [
    ("Tackling", "Offence", "1.0", (0, 1, 1)),
    ("Holding", "Offence", "3.0", (3, 2, 2)),
    ("Elbowing", "Offence", "5.0", (5, 3, 3)),
    ("Pushing", "No offence", "", (4, 0, 0)),
    ("Pushing", "No Offence", "", (4, 0, -1)),       # capital O: the evaluator never scores it correct
    ("Challenge", "No offence", "2.0", (6, 0, 0)),    # severity ignored for No offence
    ("Dive", "", "", (7, 1, -1)),                     # Dive kept; "" offence -> Offence, but never matched
    ("Dive", "Between", "4.0", (7, 1, -1)),
    ("Dive", "Offence", "3.0", (7, 2, 1)),            # class 2, but the evaluator wants "1.0" for a Dive
    ("Dive", "No offence", "", (7, 0, 0)),
    ("Dont know", "Offence", "1.0", None),
    ("", "Offence", "1.0", None),
    ("High leg", "Between", "1.0", None),
    ("High leg", "", "3.0", None),
    ("Standing tackling", "Offence", "2.0", None),
    ("Standing tackling", "Offence", "4.0", None),
    ("Standing tackling", "Offence", "", None),
])
def test_official_filter_and_mapping(action, offence, severity, expected):
    assert official_labels(entry(action, offence, severity), "x") == expected


def test_unknown_strings_are_named():
    with pytest.raises(DataError, match=r"annotations.json action 7: \"Action class\": 'Slide tackle'"):
        official_labels(entry("Slide tackle", "Offence", "1.0"), "annotations.json action 7")
    with pytest.raises(DataError, match=r"\"Severity\": '6.0'"):
        official_labels(entry("Tackling", "Offence", "6.0"), "a")
    with pytest.raises(DataError, match=r"no \"Offence\" key"):
        official_labels({"Action class": "Tackling", "Severity": "1.0"}, "a")


def write_split(root: Path, folder: str, actions: dict, clips: dict | None = None) -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "annotations.json").write_text(json.dumps({"Set": folder.lower(), "Actions": actions}))
    for key in actions:
        d = root / folder / f"action_{key}"
        d.mkdir(exist_ok=True)
        for j in range((clips or {}).get(key, 2)):
            (d / f"clip_{j}.mp4").write_bytes(b"")
    return root / folder / "annotations.json"


def test_reader_keeps_and_orders(tmp_path):
    write_split(tmp_path, "Train", {"10": entry("Tackling", "Offence", "1.0"), "2": entry("Dont know", "", ""),
                                    "3": entry("Dive", "", ""), "1": entry("Holding", "No offence", "")},
                clips={"10": 4})
    kept, dropped = read_split(tmp_path, "train")
    assert [a.key for a in kept] == ["1", "3", "10"] and dropped == 1
    assert [(a.action, a.offence) for a in kept] == [(3, 0), (7, 1), (0, 1)]
    assert [Path(c).name for c in kept[2].clips] == ["clip_0.mp4", "clip_1.mp4", "clip_2.mp4", "clip_3.mp4"]


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="Valid: no such folder"):
        read_split(tmp_path, "val")
    (tmp_path / "Test").mkdir()
    with pytest.raises(DataError, match=r"Test/annotations.json: missing"):
        read_split(tmp_path, "test")
    write_split(tmp_path, "Train", {"0": entry("Tackling", "Offence", "1.0")}, clips={"0": 1})
    with pytest.raises(DataError, match=r"action_0: 1 clip\(s\)"):
        read_split(tmp_path, "train")
    (tmp_path / "Train" / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="Train/annotations.json: not a readable JSON"):
        read_split(tmp_path, "train")


def official_evaluate():
    return pytest.importorskip("SoccerNet.Evaluation.MV_FoulRecognition",
                               reason="the official evaluator comes with the soccernet test extra").evaluate


def test_metrics_equal_the_official_evaluator(tmp_path):
    """Random predictions on an annotations file with every quirk: the recipe's numbers equal
    SoccerNet's evaluate() on the predictions file the recipe writes."""
    evaluate = official_evaluate()
    rng = random.Random(0)
    offences = [("Offence", "1.0"), ("Offence", "3.0"), ("Offence", "5.0"), ("No offence", ""), ("No Offence", ""),
                ("Between", "1.0"), ("", ""), ("Offence", "2.0"), ("Offence", "")]
    actions = {}
    for i in range(300):
        name = rng.choice(ACTION_CLASSES + ("Dont know",))
        offence, severity = rng.choice(offences)
        actions[str(i)] = entry(name, offence, severity)
    gt = write_split(tmp_path, "Test", actions)
    kept, _ = read_split(tmp_path, "test")
    metric, writer = FoulMetrics(), Predictions(kept)
    for start in range(0, len(kept), 7):
        part = kept[start:start + 7]
        outputs = {"action": torch.randn(len(part), 8), "offence": torch.randn(len(part), 4)}
        batch = {"action": torch.tensor([a.action for a in part]), "offence": torch.tensor([a.offence for a in part]),
                 "scored_offence": torch.tensor([a.scored_offence for a in part]),
                 "index": torch.arange(start, start + len(part))}
        metric.update(outputs, batch)
        writer.update(outputs, batch)
    ours = metric.compute()
    writer.write(tmp_path, "test")
    official = evaluate(str(gt), str(tmp_path / "predictions_test.json"))
    assert set(official) <= set(ours)
    for k, v in official.items():
        assert ours[k] == pytest.approx(v, abs=1e-9), k
    assert 5 < ours["leaderboard_value"] < 60  # random predictions: near chance, not 0 or 100


def test_predictions_file_format(tmp_path):
    write_predictions(tmp_path / "p.json", "challenge", {"2": (7, 0), "10": (0, 3)})
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc == {"Set": "chall", "Actions": {
        "2": {"Action class": "Dive", "Offence": "No offence", "Severity": ""},
        "10": {"Action class": "Tackling", "Offence": "Offence", "Severity": "5.0"}}}
    assert not list(tmp_path.glob(".*tmp*"))
