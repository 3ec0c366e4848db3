"""recipes/mvfoul video.py and synthetic.py: VARS's frame choice, decoding, file errors, the decode
cache, and the synthetic writer's layout, labels and clips."""
from __future__ import annotations

import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from recipes.mvfoul import video
from recipes.mvfoul.synthetic import make_synthetic
from recipes.mvfoul.video import cache_file, frame_indices, read_clip, read_clip_cached
from trainlib.config import DataError

STEP = 5   # frame k of a numbered clip is grey level STEP * k


def write_numbered_clip(path, frames: int, height: int = 32, width: int = 48) -> str:
    """Frame k is uniformly grey STEP * k; lossless H.264 with B-frames (libx264's default preset),
    so frames are decoded out of order and reordered by the decoder, as in real clips."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25, options={"qp": "0"})
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), STEP * k, np.uint8), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="module")
def numbered_clip(tmp_path_factory) -> str:
    return write_numbered_clip(tmp_path_factory.mktemp("clip") / "clip_0.mp4", frames=40)


def grey_levels(clip: torch.Tensor) -> list[int]:
    return [round(v) for v in clip.float().mean(dim=(0, 2, 3)).tolist()]


def test_frame_indices_match_vars():
    # VARS, start 63, end 87, fps 17: factor = 24 / (24 / 25 * 17) = 1.4706; j % factor < 1 keeps
    # j = 0 2 3 5 6 8 9 11 12 14 15 17 18 20 21 23 of the 24-frame slice (16 frames, as VARS's main.py)
    assert frame_indices(63, 87, 17) == [63, 65, 66, 68, 69, 71, 72, 74, 75, 77, 78, 80, 81, 83, 84, 86]
    assert frame_indices(63, 87, 25) == list(range(63, 87))
    assert frame_indices(0, 125, 5) == list(range(0, 125, 5))     # factor exactly 5.0
    assert frame_indices(63, 87, 17, frames_per_clip=8) == [63, 66, 69, 72, 75, 78, 81, 84]
    assert frame_indices(10, 12, 25, frames_per_clip=4) == [10, 10, 11, 11]
    for bad in ((5, 5, 17), (-1, 10, 17), (0, 10, 0), (0, 10, 26)):
        with pytest.raises(ValueError):
            frame_indices(*bad)


def test_read_clip_picks_and_resizes_the_right_frames(numbered_clip):
    indices = [0, 3, 4, 17, 39]
    clip = read_clip(numbered_clip, indices, (32, 48))
    assert clip.shape == (3, 5, 32, 48) and clip.dtype == torch.uint8
    assert all(abs(level - STEP * k) <= 2 for level, k in zip(grey_levels(clip), indices)), grey_levels(clip)
    small = read_clip(numbered_clip, [2, 2, 9], (16, 20))
    assert small.shape == (3, 3, 16, 20)
    assert all(abs(level - STEP * k) <= 2 for level, k in zip(grey_levels(small), [2, 2, 9])), grey_levels(small)


def test_read_clip_errors_name_the_file(tmp_path, numbered_clip):
    data = open(numbered_clip, "rb").read()
    truncated, text = tmp_path / "clip_1.mp4", tmp_path / "clip_2.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    text.write_text("not a video\n")
    for path, expected in ((tmp_path / "clip_9.mp4", "missing"), (truncated, "not a readable video"),
                           (text, "not a readable video")):
        with pytest.raises(DataError, match=expected) as error:
            read_clip(path, [0, 1], (8, 8))
        assert str(path) in str(error.value)
    with pytest.raises(DataError, match=r"clip_0\.mp4 has 40 frames; .* needs 41"):
        read_clip(numbered_clip, [10, 40], (8, 8))


def test_cache_reuses_and_repairs(tmp_path, numbered_clip, monkeypatch):
    cache = str(tmp_path / "cache")
    indices, size = [1, 5, 6], (16, 24)
    first = read_clip_cached(numbered_clip, indices, size, cache)
    stored = cache_file(cache, numbered_clip, indices, size)
    assert os.listdir(cache) == [os.path.basename(stored)]   # one file, no temporary left behind
    assert torch.equal(first, read_clip(numbered_clip, indices, size))

    def no_decoding(*args):
        raise AssertionError("decoded although the clip is cached")
    with monkeypatch.context() as patch:
        patch.setattr(video, "read_clip", no_decoding)
        assert torch.equal(read_clip_cached(numbered_clip, indices, size, cache), first)

    for damage in (b"", b"garbage", open(stored, "rb").read()[:100]):
        with open(stored, "wb") as handle:
            handle.write(damage)
        assert torch.equal(read_clip_cached(numbered_clip, indices, size, cache), first)
        assert np.array_equal(np.load(stored), first.numpy())    # written again
    np.save(stored, np.zeros((3, 2, 16, 24), np.uint8))           # a readable array of the wrong shape
    assert torch.equal(read_clip_cached(numbered_clip, indices, size, cache), first)
    assert cache_file(cache, numbered_clip, [1, 5], size) != stored
    assert torch.equal(read_clip_cached(numbered_clip, indices, size, ""), first)   # no cache_dir: no cache


def official_filter_keeps(entry: dict) -> bool:
    """The official filter, restated from its rules (annotations.py implements it for the recipe)."""
    action, offence, severity = entry["Action class"], entry["Offence"], entry["Severity"]
    if action in ("", "Dont know"):
        return False
    if offence in ("", "Between") and action != "Dive":
        return False
    return not (severity in ("", "2.0", "4.0") and action != "Dive" and offence != "No offence")


ENTRY_KEYS = ["UrlLocal", "Offence", "Contact", "Bodypart", "Upper body part", "Action class", "Severity",
              "Multiple fouls", "Try to play", "Touch ball", "Handball", "Handball offence", "Clips"]
ACTIONS = {"Tackling", "Standing tackling", "High leg", "Holding", "Pushing", "Elbowing", "Challenge", "Dive"}
OFFENCE_SEVERITY = {("No offence", ""), ("Offence", "1.0"), ("Offence", "3.0"), ("Offence", "5.0")}


def test_synthetic_layout_labels_and_clips(tmp_path):
    root = tmp_path / "mvfoul"
    summary = make_synthetic(str(root), train=8, valid=9, test=8, chall=2, height=16, width=16)
    for split, kept in (("Train", 8), ("Valid", 9), ("Test", 8), ("Chall", 2)):
        data = json.loads((root / split / "annotations.json").read_text())
        actions = data["Actions"]
        assert data["Set"] == {"Valid": "valid", "Chall": "challenge"}.get(split, split.lower())
        assert data["Number of actions"] == len(actions) and list(actions) == [str(i) for i in range(len(actions))]
        assert sorted(os.listdir(root / split)) == sorted(["annotations.json"] + [f"action_{i}" for i in actions])
        for i, entry in actions.items():
            assert list(entry) == ENTRY_KEYS and 2 <= len(entry["Clips"]) <= 4
            assert [c["Url"] for c in entry["Clips"]] == [f"Dataset/{split}/action_{i}/clip_{j}"
                                                         for j in range(len(entry["Clips"]))]
            assert all(list(c) == ["Url", "Camera type", "Timestamp", "Replay speed"] for c in entry["Clips"])
            clips = [f"clip_{j}.mp4" for j in range(len(entry["Clips"]))]
            assert sorted(os.listdir(root / split / f"action_{i}")) == clips
        kept_entries = [e for e in actions.values() if official_filter_keeps(e)]
        dropped = [e for e in actions.values() if not official_filter_keeps(e)]
        assert summary[split] == {"actions": len(actions), "kept": kept, "dropped": len(actions) - kept,
                                  "clips": sum(len(e["Clips"]) for e in actions.values())}
        if split == "Chall":   # unlabelled: every action is predicted
            assert all(e["Action class"] == e["Offence"] == e["Severity"] == "" for e in actions.values())
            continue
        assert len(kept_entries) == kept
        assert {e["Action class"] for e in kept_entries} == ACTIONS
        assert {(e["Offence"], e["Severity"]) for e in kept_entries} == OFFENCE_SEVERITY
        kinds = {(e["Action class"] if e["Action class"] in ("", "Dont know") else "some",
                  e["Offence"], e["Severity"]) for e in dropped}
        assert {k[0] for k in kinds} >= {"", "Dont know"}
        assert {k[1:] for k in kinds} >= {("Between", ""), ("Offence", "2.0"), ("Offence", "4.0")}
        with av.open(str(root / split / "action_0" / "clip_0.mp4")) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.format.name, stream.average_rate) == ("h264", "yuv420p", 25)
            assert sum(1 for _ in container.decode(stream)) == 125
    with pytest.raises(FileExistsError):
        make_synthetic(str(root), train=8, valid=8, test=8, chall=1)


def test_synthetic_is_balanced_and_deterministic(tmp_path):
    for run in ("a", "b"):
        make_synthetic(str(tmp_path / run), train=32, valid=8, test=8, chall=1, frames=2, height=16, width=16)
    for name in ("Train/annotations.json", "Chall/annotations.json", "Valid/action_3/clip_1.mp4"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    actions = json.loads((tmp_path / "a" / "Train" / "annotations.json").read_text())["Actions"].values()
    pairs = [(e["Action class"], e["Offence"], e["Severity"]) for e in actions if official_filter_keeps(e)]
    assert len(pairs) == len(set(pairs)) == 32     # every (action, offence-severity) pair once
