"""SoccerNet-MVFoul annotations: the official class lists, filter and mapping, and the split reader.

    <root>/{Train,Valid,Test,Chall}/annotations.json
    <root>/<Split>/action_<i>/clip_<j>.mp4        j = 0..3: clip_0 live camera, clip_1 replay, 2-3 optional

The filter and mapping are line for line those of SoccerNet's official evaluator
(`SoccerNet.Evaluation.MV_FoulRecognition.evaluate`), which VARS's training loader shares:

- drop an action whose "Action class" is "" or "Dont know";
- drop "Offence" "" or "Between" unless the action is a Dive;
- drop "Severity" "", "2.0" or "4.0" unless the action is a Dive or "No offence";
- then "" / "Between" offence counts as "Offence" and "" / 2.0 / 4.0 severity as "1.0":
  offence-severity class 0 No offence, 1 Offence + no card (1.0), 2 yellow (3.0), 3 red (5.0).

The evaluator then scores an offence-severity prediction by comparing the RAW ground-truth
"Offence" string with the predicted one, and the severity after two more rules (a Dive expects
"1.0", a No offence expects ""). So some actions can never be scored correct ("No Offence" spelt
with a capital O; a Dive whose offence is "" or "Between"), and a Dive with severity 3.0 (class 2)
is scored correct when "1.0" (class 1) is predicted. `Action.scored_offence` records, per action,
the prediction the evaluator accepts (-1: none), so metrics.py reproduces its numbers exactly.
The Chall split has no labels: every action is kept and predicted.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from trainlib.config import DataError

ACTION_CLASSES = ("Tackling", "Standing tackling", "High leg", "Holding", "Pushing", "Elbowing", "Challenge", "Dive")
OFFENCE_SEVERITY_CLASSES = ("No offence", "Offence + No card", "Offence + Yellow card", "Offence + Red card")
# what a prediction file says for each offence-severity class (VARS's writer; the evaluator compares these strings)
PREDICTED_STRINGS = (("No offence", ""), ("Offence", "1.0"), ("Offence", "3.0"), ("Offence", "5.0"))
SPLIT_FOLDERS = {"train": "Train", "val": "Valid", "test": "Test", "challenge": "Chall"}
LABELLED = ("train", "val", "test")

KNOWN_ACTIONS = set(ACTION_CLASSES) | {"Dont know", ""}
KNOWN_OFFENCES = {"Offence", "No offence", "No Offence", "Between", ""}
KNOWN_SEVERITIES = {"", "1.0", "2.0", "3.0", "4.0", "5.0"}
NO_OFFENCE = ("No offence", "No Offence")
_CLIP = re.compile(r"clip_(\d+)\.mp4$")


@dataclass(frozen=True)
class Action:
    key: str                    # its id in annotations.json ("0", "1", ...): the predictions file's key
    clips: tuple[str, ...]      # clip_<j>.mp4 paths, by j
    action: int = -1            # ACTION_CLASSES index (-1: unlabelled split)
    offence: int = -1           # OFFENCE_SEVERITY_CLASSES index (-1: unlabelled split)
    scored_offence: int = -1    # the offence-severity prediction the official evaluator counts as correct


def official_labels(entry: dict, where: str) -> tuple[int, int, int] | None:
    """(action, offence-severity, scored offence-severity) of one annotation, or None when the official
    filter drops it. Unknown strings are a DataError naming `where` (the evaluator would crash or
    silently skip them)."""
    action_class, offence, severity = (_field(entry, k, where) for k in ("Action class", "Offence", "Severity"))
    for value, known, key in ((action_class, KNOWN_ACTIONS, "Action class"), (offence, KNOWN_OFFENCES, "Offence"),
                              (severity, KNOWN_SEVERITIES, "Severity")):
        if value not in known:
            raise DataError(f"{where}: \"{key}\": {value!r} is not a SoccerNet-MVFoul value (expected one of "
                            f"{', '.join(repr(k) for k in sorted(known))})")
    if action_class in ("", "Dont know"):
        return None
    if offence in ("", "Between") and action_class != "Dive":
        return None
    if severity in ("", "2.0", "4.0") and action_class != "Dive" and offence not in NO_OFFENCE:
        return None
    if offence in ("", "Between"):
        offence = "Offence"
    if severity in ("", "2.0", "4.0"):
        severity = "1.0"
    if offence in NO_OFFENCE:
        offence = "No offence"
    target = 0 if offence == "No offence" else 1 + ("1.0", "3.0", "5.0").index(severity)
    expected_severity = "" if offence == "No offence" else ("1.0" if action_class == "Dive" else severity)
    raw = entry["Offence"]
    scored = next((i for i, pair in enumerate(PREDICTED_STRINGS) if pair == (raw, expected_severity)), -1)
    return ACTION_CLASSES.index(action_class), target, scored


def _field(entry: dict, key: str, where: str) -> str:
    if key not in entry:
        raise DataError(f"{where}: no \"{key}\" key (a SoccerNet-MVFoul action has \"Action class\", \"Offence\", "
                        f"\"Severity\" and \"Clips\")")
    value = entry[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{key}\" should be a string, got {value!r}")
    return value


def split_dir(root: str | Path, split: str) -> Path:
    folder = Path(root) / SPLIT_FOLDERS[split]
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; data.root={root} should hold the SoccerNet-MVFoul splits "
                        f"{', '.join(SPLIT_FOLDERS.values())} (each with annotations.json and action_<i>/clip_<j>.mp4)")
    return folder


def read_annotations(path: Path) -> dict:
    """The "Actions" mapping of an annotations.json, checked."""
    if not path.is_file():
        raise DataError(f"{path}: missing (each split folder holds its annotations.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from None
    actions = data.get("Actions") if isinstance(data, dict) else None
    if not isinstance(actions, dict):
        raise DataError(f"{path}: expected a JSON object with an \"Actions\" object ({{id: annotation}}), "
                        f"as SoccerNet-MVFoul's annotations.json")
    return actions


def read_split(root: str | Path, split: str) -> tuple[list[Action], int]:
    """The kept actions of a split (in id order) and how many the official filter dropped."""
    folder = split_dir(root, split)
    path = folder / "annotations.json"
    labelled = split in LABELLED
    kept: list[Action] = []
    dropped = 0
    if not labelled and not path.exists():  # SoccerNet ships the challenge clips without an annotations.json
        keys = [p.name[len("action_"):] for p in folder.iterdir() if p.is_dir() and p.name.startswith("action_")]
        if not keys:
            raise DataError(f"{folder}: no annotations.json and no action_<id> folders")
        return [Action(k, find_clips(folder / f"action_{k}")) for k in sorted(keys, key=_id_order)], 0
    actions = read_annotations(path)
    for key in sorted(actions, key=_id_order):
        entry, where = actions[key], f"{path} action {key}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        labels = official_labels(entry, where) if labelled else (-1, -1, -1)
        if labels is None:
            dropped += 1
            continue
        kept.append(Action(key, find_clips(folder / f"action_{key}"), *labels))
    if not kept:
        raise DataError(f"{path}: no action left after the official filter ({dropped} dropped): a "
                        f"{SPLIT_FOLDERS[split]} split needs labelled actions")
    return kept, dropped


def _id_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 62, key)


def find_clips(folder: Path) -> tuple[str, ...]:
    """clip_<j>.mp4 of an action folder, by j; at least 2 (training draws 2 distinct views)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: missing (annotations.json lists this action; its clips live in "
                        f"action_<id>/clip_<j>.mp4)")
    clips = sorted((int(m.group(1)), str(p)) for p in folder.iterdir() if (m := _CLIP.match(p.name)))
    if len(clips) < 2:
        raise DataError(f"{folder}: {len(clips)} clip(s) (clip_<j>.mp4); a SoccerNet-MVFoul action has at least 2 "
                        f"views, and training takes 2 distinct ones")
    return tuple(p for _, p in clips)
