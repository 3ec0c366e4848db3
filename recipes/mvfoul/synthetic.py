"""A small synthetic SoccerNet-MVFoul, in the real layout, for demos and tests:

    <root>/{Train,Valid,Test,Chall}/annotations.json
    <root>/<Split>/action_<i>/clip_<j>.mp4     H.264 yuv420p, 25 fps, 125 frames, 2 to 4 clips per action

Each clip shows a bright disc over a dim, textured, noisy background (its tint drawn per action).
The action class is the disc's motion, centred on frame ~75 so the default window (frames 63..87)
sees it: a direction among up, down, sideways, diagonally down, at a slow or a fast speed. The
left/right sign is drawn per clip, because training flips clips left-right at random (augment.py):
a class that meant "left" would be flipped into "right" half the time. The offence-severity class
is the disc's hue and radius (red small ... yellow large; training's colour jitter leaves hue).
One random view per action shows the disc opaque over light noise; the other views blend it at low
opacity into heavier noise, so pooling over views pays off.

Train, Valid and Test cycle through all 32 (action, offence-severity) pairs (any 8 consecutive
actions cover every class of both tasks), shuffled, plus one action per kind the official filter
drops (DROPPED). Chall's annotations.json keeps the keys with empty labels: SoccerNet ships no
labels for the challenge set (and, per its maintainers, no annotations.json at all).
"""
from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np

from .annotations import ACTION_CLASSES, SPLIT_FOLDERS
from .video import require_av

# 335 actions (with the 15 dropped ones), ~1000 clips, ~50 MB: written in ~27 s on 2 CPU cores
DEMO = {"train": 160, "valid": 64, "test": 64, "chall": 32, "frames": 125, "height": 64, "width": 64}

# (dx, dy, speed): dx is mirrored at random per clip; speed in frame widths per second.
MOTIONS = ((0.0, -1.0, 0.2), (0.0, 1.0, 0.2), (1.0, 0.0, 0.2), (0.7071, 0.7071, 0.2),
           (0.0, -1.0, 0.5), (0.0, 1.0, 0.5), (1.0, 0.0, 0.5), (0.7071, 0.7071, 0.5))
# offence-severity class -> (Offence, Severity) strings, disc colour and radius (fraction of the frame side)
OFFENCES = (("No offence", ""), ("Offence", "1.0"), ("Offence", "3.0"), ("Offence", "5.0"))
COLOURS = ((235, 45, 45), (45, 215, 45), (50, 110, 255), (245, 225, 40))
RADII = (0.11, 0.14, 0.17, 0.20)
# (Action class, Offence, Severity) of actions the official filter drops, one each per labelled split
DROPPED = (("Dont know", "Offence", "1.0"), ("", "Offence", "3.0"), ("Pushing", "Between", ""),
           ("Holding", "Offence", "2.0"), ("Elbowing", "Offence", "4.0"))
CAMERAS = ("Close-up player or field referee", "Main behind the goal", "Main camera left", "Main camera right",
           "Close-up behind the goal", "Spider camera")
SOURCE_FPS = 25
BT601 = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255
TIME_BASE = Fraction(1, SOURCE_FPS)
TRAVEL = 0.3            # the disc stops this far (fraction of the side) from the centre, so it stays in view
STRONG, WEAK = (1.0, 4), (0.4, 10)   # (disc opacity, per-frame noise amplitude) of the clear view and the others


def make_synthetic(root: str, *, train: int = DEMO["train"], valid: int = DEMO["valid"], test: int = DEMO["test"],
                   chall: int = DEMO["chall"], frames: int = DEMO["frames"], height: int = DEMO["height"],
                   width: int = DEMO["width"], seed: int = 0) -> dict:
    """Write the dataset under `root` (its split folders must not exist yet: VARS counts action
    folders, so leftovers of a bigger run would corrupt it). train/valid/test/chall are the kept
    actions per split. Returns {split folder: {"actions", "kept", "dropped", "clips"}}."""
    if min(train, valid, test) < len(ACTION_CLASSES):
        raise ValueError(f"train, valid and test need >= {len(ACTION_CLASSES)} actions each, so every class is "
                         f"present; got {train}, {valid}, {test}")
    if chall < 1 or frames < 1 or height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError("make_synthetic needs chall >= 1, frames >= 1 and even height, width >= 16 (yuv420p)")
    for folder in SPLIT_FOLDERS.values():
        if os.path.exists(os.path.join(root, folder)):
            raise FileExistsError(f"{os.path.join(root, folder)} already exists: write the synthetic set to a "
                                  "new folder")
    rng = np.random.default_rng(seed)
    summary = {}
    for split, kept in (("train", train), ("val", valid), ("test", test), ("challenge", chall)):
        folder = os.path.join(root, SPLIT_FOLDERS[split])
        pairs = [(k % 8, (k % 4 + k // 8) % 4) for k in range(kept)]  # each 32: all pairs; the first 8: all classes
        labelled = split != "challenge"
        rows = [(ACTION_CLASSES[a], *OFFENCES[o], a, o) for a, o in pairs]
        if labelled:
            rows += [(*strings, int(rng.integers(len(MOTIONS))), int(rng.integers(len(OFFENCES))))
                     for strings in DROPPED]
        order = rng.permutation(len(rows))
        actions, clips = {}, 0
        for i, row in enumerate(rows[j] for j in order):
            action_class, offence, severity, motion, offence_class = row
            views = int(rng.integers(2, 5))
            strong_view = int(rng.integers(views))
            background = rng.uniform(45, 105) + rng.uniform(-15, 15, size=3)
            for j in range(views):
                video = render_clip(rng, frames, height, width, MOTIONS[motion], offence_class, background,
                                    STRONG if j == strong_view else WEAK)
                write_mp4(os.path.join(folder, f"action_{i}", f"clip_{j}.mp4"), video)
            clips += views
            if not labelled:
                action_class = offence = severity = ""
            actions[str(i)] = annotation(rng, SPLIT_FOLDERS[split], i, views, action_class, offence, severity)
        with open(os.path.join(folder, "annotations.json"), "w", encoding="utf-8") as handle:
            json.dump({"Set": {"val": "valid"}.get(split, split), "Number of actions": len(actions),
                       "Actions": actions}, handle, indent=4)
        summary[SPLIT_FOLDERS[split]] = {"actions": len(rows), "kept": kept, "dropped": len(rows) - kept,
                                         "clips": clips}
    return summary


def render_clip(rng: np.random.Generator, frames: int, height: int, width: int, motion: tuple[float, float, float],
                offence_class: int, background: np.ndarray, view: tuple[float, int]) -> np.ndarray:
    """One view as yuv420p frames, uint8 [frames, height * 3 // 2, width] (the Y plane, then U and V
    at half resolution: what av.VideoFrame.from_ndarray(format="yuv420p") takes). Drawn in YUV
    directly, a few whole-array operations per clip: 3x faster than RGB frames converted one by one."""
    opacity, noise = view
    side = min(height, width)
    dx, dy, speed = motion
    dx *= rng.choice((-1.0, 1.0))
    t = np.arange(frames, dtype=np.float32)
    middle = 75 * (frames - 1) / 124 + rng.integers(-3, 4)   # the foul's frame, as in the real clips
    travel = np.clip(speed * (t - middle) / SOURCE_FPS, -TRAVEL, TRAVEL) * side
    cx = width / 2 + rng.uniform(-0.08, 0.08) * side + dx * travel
    cy = height / 2 + rng.uniform(-0.08, 0.08) * side + dy * travel
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    phase, (fy, fx) = rng.uniform(0, 2 * np.pi, 2), rng.uniform(1.0, 3.0, 2) * 2 * np.pi
    texture = 12 * np.sin(fx * xs / width + phase[0]) * np.cos(fy * ys[:, None] / height + phase[1])
    still = background + texture[..., None] + rng.uniform(-8, 8, (height, width, 3))
    disc = still + opacity * (np.asarray(COLOURS[offence_class]) - still)
    inside = ((xs - cx[:, None, None]) ** 2 + (ys[:, None] - cy[:, None, None]) ** 2
              <= (RADII[offence_class] * side) ** 2)                                       # [T, H, W]
    planes = []
    for still_plane, disc_plane, step in zip(yuv420(still), yuv420(disc), (1, 2, 2)):
        planes.append(np.where(inside[:, ::step, ::step], disc_plane, still_plane).reshape(frames, -1))
    # grey noise on Y, uniform in +-noise: cheap to draw, and flat chroma keeps the mp4 small
    luma = planes[0] + rng.integers(-noise, noise + 1, planes[0].shape, dtype=np.int16)
    planes[0] = np.clip(luma, 0, 255)
    return np.concatenate(planes, axis=1).astype(np.uint8).reshape(frames, height * 3 // 2, width)


def yuv420(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[H, W, 3] RGB -> rounded BT.601 limited-range Y [H, W], U and V [H/2, W/2] (2x2 means): the
    conversion FFmpeg applies by default, so decoded RGB is close to the drawn colours."""
    yuv = rgb @ BT601.T + (16, 128, 128)
    height, width = rgb.shape[:2]
    chroma = yuv[..., 1:].reshape(height // 2, 2, width // 2, 2, 2).mean(axis=(1, 3))
    planes = (yuv[..., 0], *chroma.transpose(2, 0, 1))
    return tuple(np.rint(np.clip(plane, 0, 255)).astype(np.int16) for plane in planes)


def write_mp4(path: str, video: np.ndarray) -> None:
    """H.264 yuv420p at 25 fps, as the SoccerNet-MVFoul clips, from render_clip's frames."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    av = require_av()
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=SOURCE_FPS, options={"preset": "ultrafast", "crf": "28"})
        stream.height, stream.width = video.shape[1] * 2 // 3, video.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1   # byte-identical files for a seed
        for k, image in enumerate(video):
            frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
            frame.pts, frame.time_base = k, TIME_BASE
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def annotation(rng: np.random.Generator, split_folder: str, index: int, views: int, action_class: str,
               offence: str, severity: str) -> dict:
    """One action's entry, with every key of a real annotations.json (the side labels are fixed)."""
    labelled = bool(action_class or offence)
    timestamp = int(rng.integers(60_000, 2_700_000))
    clips = [{"Url": f"Dataset/{split_folder}/action_{index}/clip_{j}",
              "Camera type": "Main camera center" if j == 0 else CAMERAS[int(rng.integers(len(CAMERAS)))],
              "Timestamp": timestamp if j == 0 else timestamp + int(rng.integers(5_000, 40_000)),
              "Replay speed": 1.0 if j == 0 else round(float(rng.uniform(1.0, 4.5)), 1)} for j in range(views)]
    return {"UrlLocal": f"synthetic\\2016-2017\\game {index // 4}", "Offence": offence,
            "Contact": "With contact" if labelled else "", "Bodypart": "Upper body" if labelled else "",
            "Upper body part": "Use of arms" if labelled else "", "Action class": action_class,
            "Severity": severity, "Multiple fouls": "No" if labelled else "", "Try to play": "",
            "Touch ball": "", "Handball": "No handball" if labelled else "", "Handball offence": "", "Clips": clips}
