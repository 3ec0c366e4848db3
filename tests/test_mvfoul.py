"""The mvfoul recipe end to end: it learns the synthetic clips far above chance, its predictions
files score with SoccerNet's official evaluator exactly as the recipe reports, the seed's flags
map onto the config, and bad input ends with one line naming the file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainlib.config import ConfigError
from trainlib.recipe import build_config, main
from recipes.mvfoul import recipe, write_synthetic

SMALL = dict(train=64, valid=32, test=32, chall=8, height=32, width=32)
FAST = ["model.backbone_name=tiny3d", "data.img_height=32", "data.img_width=32", "data.frames_per_clip=8",
        "log.loggers=jsonl", "log.progress=off"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvfoul") / "data"
    write_synthetic(str(root), seed=1, **SMALL)
    return root


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_learns_synthetic_clips_and_predictions_score_as_reported(small_root, tmp_path):
    """Test leaderboard far above chance (12.5% and 25% balanced accuracy give 18.75%), and
    predictions_test.json through SoccerNet's official evaluate() gives exactly the reported numbers."""
    args = [f"data.root={small_root}", "preset=demo", f"trainer.out_dir={tmp_path}", "trainer.run_name=small",
            "model.backbone_name=tiny3d", "log.loggers=jsonl", "log.progress=off", "trainer.max_epochs=10"]
    assert main(recipe, args) == 0
    run = tmp_path / "small"
    test = summary(run)["test"]
    assert test["test/leaderboard_value"] > 50, test
    preds = json.loads((run / "predictions_challenge.json").read_text())
    chall = json.loads((small_root / "Chall" / "annotations.json").read_text())["Actions"]
    assert set(preds["Actions"]) == set(chall) and preds["Set"] == "chall"
    evaluate = pytest.importorskip("SoccerNet.Evaluation.MV_FoulRecognition").evaluate
    official = evaluate(str(small_root / "Test" / "annotations.json"), str(run / "predictions_test.json"))
    for key, value in official.items():
        assert test[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    # test_only on the last checkpoint (the final weights) writes the same predictions file, in <run>/test_<time>/
    assert main(recipe, [f"data.root={small_root}", "model.backbone_name=tiny3d", "preset=demo", "log.progress=off",
                         "trainer.test_only=true", f"trainer.ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]) == 0
    (again,) = run.glob("test_*/predictions_test.json")
    assert json.loads(again.read_text()) == json.loads((run / "predictions_test.json").read_text())


def test_seed_flags_map_onto_the_config(tmp_path):
    cfg, _, _ = build_config(recipe, [
        "--dataset_root", str(tmp_path), "--epochs", "5", "--batch_size", "4", "--lr", "2e-4",
        "--backbone_name", "r3d_18", "--mixed_precision", "--save_dir", str(tmp_path / "ck"),
        "--accumulate_grad_batches", "4", "--frames_per_clip", "8", "--img_height", "112", "--img_width", "200",
        "--freezing_strategy", "advanced", "--adaptive_patience", "3", "--gradient_momentum", "0.8",
        "--loss_function", "focal", "--use_class_balanced_sampler", "--progressive_class_balancing",
        "--gpu_augmentation", "--severity_aware_augmentation", "--augmentation_strength", "aggressive",
        "--optimizer", "adamw", "--scheduler", "cosine", "--weight_decay", "0.01", "--gradient_clip_norm", "1.0",
        "--sync_batchnorm", "--ddp_timeout", "3600", "--limit_train_batches", "0.1", "--max_time", "02:00:00:00",
        "--start_frame", "50", "--end_frame", "100", "--fps", "25", "--pooling_type", "attention",
        "--test_run", "--test_batches", "3", "--resume", str(tmp_path / "x.ckpt")])
    assert (cfg.data.root, cfg.trainer.max_epochs, cfg.data.batch_size, cfg.optim.lr) == (str(tmp_path), 5, 4, 2e-4)
    assert (cfg.model.backbone_name, cfg.trainer.precision, cfg.trainer.out_dir) == ("r3d_18", "16-mixed",
                                                                                  str(tmp_path / "ck"))
    assert (cfg.trainer.accumulate_grad_batches, cfg.data.frames_per_clip, cfg.data.img_height,
            cfg.data.img_width) == (4, 8, 112, 200)
    assert (cfg.model.freezing_strategy, cfg.model.adaptive_patience, cfg.model.gradient_momentum,
            cfg.model.loss_function) == ("advanced", 3, 0.8, "focal")
    assert cfg.data.use_class_balanced_sampler and cfg.data.progressive_class_balancing
    assert cfg.data.gpu_augmentation and cfg.data.severity_aware_augmentation
    assert cfg.data.augmentation_strength == "aggressive"
    assert (cfg.optim.name, cfg.optim.scheduler, cfg.optim.weight_decay, cfg.trainer.grad_clip) == (
        "adamw", "cosine", 0.01, 1.0)
    assert cfg.trainer.sync_batchnorm and cfg.trainer.ddp_timeout == 3600
    assert (cfg.trainer.limit_train_batches, cfg.trainer.max_time) == (0.1, "02:00:00:00")
    assert (cfg.data.start_frame, cfg.data.end_frame, cfg.data.fps, cfg.model.pooling_type) == (50, 100, 25, "attention")
    assert cfg.trainer.fast_dev_run == 3 and cfg.trainer.resume == str(tmp_path / "x.ckpt")
    # the switch alone is one batch; the multi-node flags print the torchrun command
    cfg, _, _ = build_config(recipe, ["--dataset_root", str(tmp_path), "--test_run"])
    assert cfg.trainer.fast_dev_run in (1, True)
    with pytest.raises(ConfigError, match=r"torchrun --nnodes=2 --nproc_per_node=4 .* -m recipes.mvfoul"):
        build_config(recipe, ["--num_nodes", "2", "--devices_per_node", "4"])


def corrupt(root: Path, tmp_path: Path, what: str) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    clip = bad / "Train" / "action_0" / "clip_0.mp4"
    if what == "truncated":
        clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])
    elif what == "text":
        clip.write_text("not a video\n")
    elif what == "missing_split":
        shutil.rmtree(bad / "Valid")
    elif what == "one_clip":
        for extra in sorted((bad / "Train" / "action_0").glob("clip_*.mp4"))[1:]:
            extra.unlink()
    elif what == "unknown_class":
        path = bad / "Test" / "annotations.json"
        doc = json.loads(path.read_text())
        doc["Actions"]["3"]["Action class"] = "Slide tackle"
        path.write_text(json.dumps(doc))
    return bad


@pytest.mark.parametrize("what, message", [
    ("truncated", "Train/action_0/clip_0.mp4"),
    ("text", "Train/action_0/clip_0.mp4"),
    ("missing_split", "Valid: no such folder"),
    ("one_clip", "action_0: 1 clip(s)"),
    ("unknown_class", "Test/annotations.json action 3: \"Action class\": 'Slide tackle'"),
])
def test_bad_input_is_one_line_naming_the_file(small_root, tmp_path, capsys, what, message):
    bad = corrupt(small_root, tmp_path, what)
    rc = main(recipe, [f"data.root={bad}", f"trainer.out_dir={tmp_path / 'runs'}", "trainer.max_epochs=1",
                       "data.num_workers=1", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_clip_shorter_than_end_frame(small_root, tmp_path, capsys):
    rc = main(recipe, [f"data.root={small_root}", f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1",
                       "data.start_frame=100", "data.end_frame=125", "trainer.fast_dev_run=true", *FAST])
    assert rc == 0  # 125-frame clips hold frames 100..124
    short = tmp_path / "short"
    write_synthetic(str(short), seed=2, frames=90, **{k: v for k, v in SMALL.items()})
    rc = main(recipe, [f"data.root={short}", f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1",
                       "data.end_frame=100", "data.start_frame=60", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "short/Train/action_" in err and "has 90 frames" in err and "needs 96" in err, err
    assert len(err.strip().splitlines()) == 1


def test_weights_for_another_backbone_are_named(small_root, tmp_path, capsys):
    from torchvision.models.video import r3d_18

    path = tmp_path / "r3d.pth"
    torch.save(r3d_18().state_dict(), path)
    rc = main(recipe, [f"model.weights={path}", "model.backbone_name=r2plus1d_18", f"trainer.out_dir={tmp_path}",
                       f"data.root={small_root}",
                       "trainer.fast_dev_run=true", "data.img_height=32", "data.img_width=32"])
    err = capsys.readouterr().err
    assert rc == 2 and f"model.weights={path} holds r3d_18 weights" in err, err


def foreign_clip(path: Path, codec: str, frames: int, seed: int) -> None:
    """A clip as another tool writes it: 398x224 (the dataset's default 16:9 size), `codec` (MPEG-4
    Part 2, or H.264 with its default B-frames), a moving gradient rather than our synthetic discs."""
    import av
    import numpy as np
    from fractions import Fraction

    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:224, 0:398]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width, stream.pix_fmt = 224, 398, "yuv420p"
        for k in range(frames):
            rgb = np.stack([(x + 3 * k + seed) % 256, (y + k) % 256, np.full_like(x, 40 * seed % 256)], -1)
            frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_reads_a_layout_it_did_not_write(tmp_path):
    """SoccerNet's layout and annotation fields as the real download has them (Windows UrlLocal, every
    label field, replay speeds), clips from other encoders and longer than 125 frames, a Chall folder
    with no annotations.json: it trains, tests and predicts every action."""
    root = tmp_path / "mvfouls"
    labels = [("Tackling", "Offence", "1.0"), ("Standing tackling", "Offence", "3.0"), ("High leg", "Offence", "5.0"),
              ("Holding", "No offence", ""), ("Pushing", "No Offence", ""), ("Elbowing", "Offence", "1.0"),
              ("Challenge", "Offence", "3.0"), ("Dive", "", ""), ("Dont know", "Offence", "1.0")]
    for folder, n in (("Train", 4), ("Valid", 3), ("Test", 9), ("Chall", 3)):
        actions = {}
        for i in range(n):
            action, offence, severity = labels[i % len(labels)]
            views = {1: 4, 2: 3}.get(i, 2)
            for j in range(views):
                foreign_clip(root / folder / f"action_{i}" / f"clip_{j}.mp4", ("mpeg4", "libx264")[j % 2], 127, i + j)
            actions[str(i)] = {
                "UrlLocal": "england_epl\\2014-2015\\2015-02-21 - 18-00 Crystal Palace 1 - 2 Arsenal",
                "Offence": offence, "Contact": "With contact", "Bodypart": "Under body", "Upper body part": "",
                "Action class": action, "Severity": severity, "Multiple fouls": "No", "Try to play": "Yes",
                "Touch ball": "No", "Handball": "No handball", "Handball offence": "",
                "Clips": [{"Url": f"Dataset/{folder}/action_{i}/clip_{j}", "Camera type": "Main camera center",
                           "Timestamp": 224572 + j, "Replay speed": 1.0 + 0.8 * j} for j in range(views)]}
        if folder != "Chall":
            (root / folder / "annotations.json").write_text(json.dumps(
                {"Set": folder.lower(), "Number of actions": n, "Actions": actions}, indent=4))
    rc = main(recipe, [f"data.root={root}", f"trainer.out_dir={tmp_path}", "trainer.run_name=foreign",
                       "trainer.max_epochs=1", "data.batch_size=4", "data.num_workers=1",
                       f"data.cache_dir={tmp_path / 'cache'}", *FAST])
    assert rc == 0
    run = tmp_path / "foreign"
    test = summary(run)["test"]
    assert 0 <= test["test/leaderboard_value"] <= 100
    predicted = json.loads((run / "predictions_test.json").read_text())["Actions"]
    assert sorted(predicted, key=int) == [str(i) for i in range(8)]   # "Dont know" dropped, as the evaluator does
    assert sorted(json.loads((run / "predictions_challenge.json").read_text())["Actions"]) == ["0", "1", "2"]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) > 0
