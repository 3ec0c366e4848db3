"""PDAN through the engine: learns on synthetic data, on data it did not write, under torchrun,
and fails cleanly on bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest

from recipes.pdan import recipe
from tests.conftest import ROOT, torchrun
from trainlib.recipe import main

# The demo dataset with a smaller, faster model (the full demo is checked by hand: see docs/recipes/pdan.md)
SMALL = ["model.num_channels=128", "model.dropout=0.2", "trainer.max_epochs=8", "optim.lr=2e-3", "log.loggers=jsonl"]


def rows(run_dir, split):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == split]


def test_learns_synthetic_demo_in_process(tmp_path, capsys):
    assert main(recipe, [f"trainer.out_dir={tmp_path}", "trainer.run_name=demo", "data.batch_size=16", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "no data.root given: training on a synthetic pdan dataset" in out
    val = rows(tmp_path / "demo", "val")
    assert len(val) == 8
    # chance frame-mAP is the class prevalence (~0.1 on the demo data)
    assert val[-1]["map"] > 0.85 and val[-1]["map_loc25"] > 0.8, val[-1]
    assert val[0]["map"] < val[-1]["map"]
    for f in ("config.yaml", "metrics.jsonl", "train.log", "history.json", "model.safetensors",
              "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (tmp_path / "demo" / f).is_file(), f


def write_foreign_charades(root, rng, n_train=96, n_test=32, dim=32, k=4):
    """A Charades-format dataset written here, not by the recipe: [T, C] arrays, other ids,
    class evidence as a smooth bump over the whole action, extra json fields."""
    root.mkdir(parents=True)
    protos = rng.normal(size=(k, dim)) * 2.0
    db = {}
    for i in range(n_train + n_test):
        vid = f"{'ABCD'[i % 4]}{i:04d}X"
        t = int(rng.integers(40, 80))
        duration = t / 3.0 + rng.uniform(-0.5, 0.5)
        fps = t / duration
        x = rng.normal(size=(t, dim)).astype(np.float32)
        actions = []
        classes = [i % k] + ([int(rng.integers(k))] if rng.random() < 0.5 else [])
        for c in dict.fromkeys(classes):
            s = float(rng.uniform(0, duration * 0.6))
            e = s + float(rng.uniform(4, duration * 0.4))
            actions.append([int(c), round(s, 2), round(e, 2)])
            frames = np.arange(t) / fps
            inside = (frames > s) & (frames < e)
            x[inside] += protos[c]
        np.save(root / f"{vid}.npy", x)
        db[vid] = {"subset": "training" if i < n_train else "testing", "duration": round(duration, 2),
                   "actions": actions, "scene": "kitchen", "quality": 5}
    (root / "annotations.json").write_text(json.dumps(db))


def test_trains_on_charades_data_it_did_not_write(tmp_path):
    data = tmp_path / "feats"
    write_foreign_charades(data, np.random.default_rng(7))
    args = [f"data.root={data}", f"data.annotations={data / 'annotations.json'}", "model.input_channels=32",
            "model.num_classes=4", f"trainer.out_dir={tmp_path}", "trainer.run_name=foreign",
            "model.num_channels=32", "model.num_layers=3", "data.batch_size=16", "trainer.max_epochs=10",
            "optim.lr=3e-3", "log.loggers=jsonl"]
    assert main(recipe, args) == 0
    assert rows(tmp_path / "foreign", "val")[-1]["map"] > 0.8


def test_two_process_training_and_gathered_evaluation_equals_one_process(tmp_path):
    r = torchrun(2, ["-m", "recipes.pdan", f"trainer.out_dir={tmp_path}", "trainer.run_name=ddp", "data.batch_size=8",
                     *SMALL])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[trainlib] final: val/loss=" in r.stdout
    val = rows(tmp_path / "ddp", "val")
    assert val[-1]["map"] > 0.85
    best = max(v["map"] for v in val)
    # scores of both ranks' shards are gathered: one process scoring best.ckpt gets the same mAP
    ckpt = tmp_path / "ddp" / "checkpoints" / "best.ckpt"
    assert main(recipe, [f"trainer.out_dir={tmp_path}", "trainer.run_name=eval", "trainer.test_only=true",
                         f"trainer.ckpt_path={ckpt}", *SMALL]) == 0
    test = rows(tmp_path / "eval", "test")
    assert test and abs(test[0]["map"] - best) < 1e-6, (test, best)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "recipes.pdan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["trainer.max_epoch=3"], "error: unknown config key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"),
    (["model.num_layers=five"], "error: config key 'model.num_layers': expected int, got 'five'"),
    (["data.root=/nonexistent/feats"], "error: data.root folder not found: /nonexistent/feats"),
    (["trainer.test_only=true"], "trainer.test_only=true needs trainer.ckpt_path"),
    (["--gpus", "2"], "--gpus picks the number of processes, which the launcher owns"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    r = run_cli(f"trainer.out_dir={tmp_path}", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_feature_dim_mismatch_names_file_and_key(tmp_path):
    data = tmp_path / "feats"
    write_foreign_charades(data, np.random.default_rng(0), n_train=4, n_test=4)
    r = run_cli(f"data.root={data}", f"data.annotations={data / 'annotations.json'}", f"trainer.out_dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ".npy" in r.stderr and "model.input_channels" in r.stderr and "32" in r.stderr and "1024" in r.stderr


def test_help_lists_every_key():
    r = run_cli("--help")
    assert r.returncode == 0
    for key in ("trainer.max_epochs", "model.num_stages", "model.num_layers", "model.num_channels",
                "model.input_channels", "model.num_classes", "data.root", "data.annotations", "data.mode",
                "optim.scheduler", "log.loggers"):
        assert key in r.stdout


def test_load_model_rebuilds_the_trained_recipe_model_for_inference(tmp_path):
    import torch

    import trainlib
    from recipes.pdan import collate

    assert main(recipe, [f"trainer.out_dir={tmp_path}", "trainer.run_name=m", "data.batch_size=16",
                         "model.num_stages=2", *SMALL, "trainer.max_epochs=1"]) == 0
    run = tmp_path / "m"
    from_dir = trainlib.load_model(run)
    from_ckpt = trainlib.load_model(run / "checkpoints" / "best.ckpt")
    assert not from_dir.training and len(from_dir.stages) == 1  # num_stages=2 rebuilt from the saved config
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["model"]
    for k, v in from_dir.state_dict().items():
        assert torch.equal(v, best[k]) and torch.equal(v, from_ckpt.state_dict()[k])
    g = torch.Generator().manual_seed(0)
    item = {"features": torch.randn(20, 1024, generator=g), "labels": torch.zeros(20, 10),
            "loc25_index": torch.zeros(25, dtype=torch.long), "loc25_labels": torch.zeros(25, 10), "video_id": "x"}
    batch = collate([item])
    with torch.no_grad():
        assert torch.equal(from_dir(batch["features"], batch["mask"]), from_ckpt(batch["features"], batch["mask"]))


def test_load_model_of_a_notebook_run_fills_the_given_module(tmp_path):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import trainlib

    x = torch.randn(16, 3)
    t = trainlib.Trainer(nn.Linear(3, 1), lambda o, b: ((o - b[1]) ** 2).mean(), TensorDataset(x, x[:, :1]),
                         config=trainlib.TrainerConfig(max_epochs=1, out_dir=str(tmp_path), run_name="plain"))
    t.fit()
    restored = trainlib.load_model(tmp_path / "plain", model=nn.Linear(3, 1))
    assert torch.equal(restored.weight, t.model.weight) and not restored.training
    with pytest.raises(trainlib.ConfigError, match="names no recipe; pass the module to fill"):
        trainlib.load_model(tmp_path / "plain")


@pytest.mark.parametrize("buckets", ["[]", "[16,32,64]"])
def test_device_resident_trains_exactly_like_the_loader(tmp_path, buckets):
    """The split collated once (padded to its longest video) and each gathered batch trimmed back
    to its bucket: the same weights as reading the files batch by batch."""
    import torch
    from safetensors.torch import load_file

    common = [f"trainer.out_dir={tmp_path}", "data.batch_size=16", "model.num_channels=32", "model.num_layers=3",
              "trainer.max_epochs=2", "log.loggers=jsonl", f"data.length_buckets={buckets}", "model.dropout=0"]
    assert main(recipe, common + ["trainer.run_name=files"]) == 0
    assert main(recipe, common + ["trainer.run_name=resident", "data.device_resident=true"]) == 0
    a = load_file(tmp_path / "files" / "model.safetensors")
    b = load_file(tmp_path / "resident" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert rows(tmp_path / "files", "val") == rows(tmp_path / "resident", "val")
