"""recipes.xca end to end: each model learns the synthetic vessels (test Dice far above the all-vessel
guess), the written PNG masks score exactly the reported test metrics, validation images and
TensorBoard images, the seed's YAML shape, the effective-batch line, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from recipes.xca import VesselSegmenter, XCAModel, effective_batch, recipe, translate
from recipes.xca.metrics import VesselMetrics
from recipes.xca.synthetic import make_synthetic as write_synthetic
from trainlib.config import ConfigError
from trainlib.recipe import build_config, run

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["data.image_size=32", "data.batch_size=8", "data.num_samples_per_image=4", "model.model_channels=16",
         "model.channel_mult=[1,2,2]", "model.num_blocks=1", "model.attn_resolutions=[]", "model.csnet_channels=8",
         "model.timesteps=4", "model.num_ensemble=1", "model.roi_size=64", "optim.lr=3e-3", "optim.scheduler=cosine",
         "trainer.max_epochs=5", "trainer.check_val_every_n_epoch=5", "log.progress=off", "log.plots=false"]


@pytest.fixture(scope="module")
def vessels(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("xca")
    write_synthetic(str(root), n_train=32, n_val=4, n_test=8, size=64, seed=3)
    return root


def _dice_of_pngs(pred_dir: Path, label_dir: Path) -> float:
    tp = fp = fn = 0
    for label_file in sorted(label_dir.iterdir()):
        pred = np.asarray(Image.open(pred_dir / label_file.name)) > 127
        gt = np.asarray(Image.open(label_file)) > 0
        assert pred.shape == gt.shape
        tp, fp, fn = tp + (pred & gt).sum(), fp + (pred & ~gt).sum(), fn + (~pred & gt).sum()
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("arch", ["dhariwal_concat_unet", "csnet", "medsegdiff"])
def test_each_model_learns_and_its_masks_score_the_reported_dice(arch, vessels, tmp_path):
    names = ["0000.png", "0002.png"]
    argv = [f"data.root={vessels}", f"model.arch_name={arch}", f"trainer.out_dir={tmp_path}", *SMALL,
            "model.log_image_enabled=true", f"model.log_image_names=[{','.join(names)}]"]
    if arch == "medsegdiff":
        argv += ["trainer.ema_decay=0.9", "trainer.ema_warmup=true"]
    cfg, _, demo = build_config(recipe, argv)
    assert not demo
    result = run(recipe, cfg)
    # the all-vessel guess scores 2p / (1 + p), p the vessel fraction (0.23 here: 0.38); all-background 0
    labels = np.stack([np.asarray(Image.open(f)) > 0 for f in sorted((vessels / "test" / "label").iterdir())])
    p = labels.mean()
    assert 2 * p / (1 + p) < 0.4
    assert result["test/dice"] > (0.6 if arch == "medsegdiff" else 0.75), result
    run_dir = next(tmp_path.glob("xca_*"))
    masks = run_dir / "predictions" / "test"
    assert sorted(f.name for f in masks.iterdir()) == sorted(f.name for f in (vessels / "test" / "image").iterdir())
    assert _dice_of_pngs(masks, vessels / "test" / "label") == pytest.approx(result["test/dice"], abs=1e-9)
    shown = sorted((run_dir / "images" / "val").glob("step_*/*.png"))
    assert [f.name for f in shown] == names, shown
    panels = 3 + (4 if arch == "dhariwal_concat_unet" else 0)  # image | label | probability (| 4 states)
    assert np.asarray(Image.open(shown[0])).shape == (64, 64 * panels + 2 * (panels - 1))


def test_validation_images_reach_tensorboard(vessels, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _ = build_config(recipe, [f"data.root={vessels}", "model.arch_name=csnet", f"trainer.out_dir={tmp_path}",
                                      *SMALL, "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
                                      "trainer.limit_train_batches=2", "model.log_image_enabled=true",
                                      "log.loggers=[console,jsonl,tensorboard]"])
    run(recipe, cfg)
    acc = EventAccumulator(str(next(tmp_path.glob("xca_*")) / "tb"), size_guidance={"images": 0}).Reload()
    assert acc.Tags()["images"] == ["val_images/0000.png"]  # no names: the first validation image
    (event,) = acc.Images("val_images/0000.png")
    assert (event.width, event.height) == (64 * 3 + 4, 64)


def test_sliding_window_predict_equals_whole_image_for_csnet():
    """CS-Net in eval mode is not translation-equivariant at the borders, so a single window that covers
    the image must give exactly the whole-image softmax; a gaussian blend of several must stay a probability."""
    torch.manual_seed(0)
    m = XCAModel(arch_name="csnet", csnet_channels=4, roi_size=64)
    model = VesselSegmenter(m, 32).eval()
    image = torch.rand(2, 1, 64, 64) * 2 - 1
    whole = model.net(image).softmax(1)[:, 1:2]
    assert torch.allclose(model.predict(image)["prob"], whole, atol=1e-6)
    model.roi = 32
    blended = model.predict(image)["prob"]
    assert blended.shape == (2, 1, 64, 64) and 0 <= blended.min() and blended.max() <= 1


def test_roi_must_fit_the_network():
    with pytest.raises(ConfigError, match=r"model.roi_size=100: csnet needs sides divisible by 16"):
        VesselSegmenter(XCAModel(arch_name="csnet", roi_size=100), 64)
    with pytest.raises(ConfigError, match=r"data.image_size=36: dhariwal_concat_unet needs sides divisible by 8"):
        VesselSegmenter(XCAModel(), 36)


# ---- the seed's YAML shape --------------------------------------------------------------------------

def test_seed_yaml_keys_map_onto_trainlib_keys(tmp_path, capsys):
    seed = {"model": {"arch_name": "dhariwal_concat_unet", "image_size": 320, "learning_rate": 0.0002,
                      "weight_decay": 1e-5, "log_image_enabled": True, "log_image_names": ["00036.png"],
                      "patch_plan": [[320, 8]], "dim": 32, "timesteps": 30, "num_ensemble": 5, "sigma": 0.25,
                      "num_classes": 2, "experiment_name": "flow_model", "data_name": "xca",
                      "loss": {"name": "flow_matching", "params": {"scheme": "l1_bce", "weights": {"l1": 1.0, "bce": 0.5}}}},
            "data": {"name": "xca", "train_dir": "data/xca_full/train", "val_dir": "data/xca_full/val",
                     "train_bs": 4, "num_samples_per_image": 4},
            "trainer": {"max_epochs": 500, "devices": 4, "strategy": "ddp_find_unused_parameters_true",
                        "precision": "16-mixed", "check_val_every_n_epoch": 50, "accumulate_grad_batches": 4,
                        "gradient_clip_val": 1.0, "accelerator": "gpu", "enable_progress_bar": False,
                        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"monitor": "val/dice", "mode": "max", "save_last": True}}],
                        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": "lightning_logs"}}}}
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(seed))
    cfg, _, demo = build_config(recipe, ["--config", str(path)])
    assert not demo and cfg.data.root == "data/xca_full"  # train_dir without root: real data, no demo
    got = {"model.arch_name": cfg.model.arch_name, "data.image_size": cfg.data.image_size, "optim.lr": cfg.optim.lr,
           "optim.weight_decay": cfg.optim.weight_decay, "model.log_image_names": cfg.model.log_image_names,
           "model.noise_copies": cfg.model.noise_copies, "model.model_channels": cfg.model.model_channels,
           "model.timesteps": cfg.model.timesteps, "model.num_ensemble": cfg.model.num_ensemble,
           "model.bce_weight": cfg.model.bce_weight, "data.name": cfg.data.name, "data.batch_size": cfg.data.batch_size,
           "data.train_dir": cfg.data.train_dir, "data.num_samples_per_image": cfg.data.num_samples_per_image,
           "trainer.max_epochs": cfg.trainer.max_epochs, "trainer.strategy": cfg.trainer.strategy,
           "trainer.find_unused_parameters": cfg.trainer.find_unused_parameters,
           "trainer.precision": cfg.trainer.precision, "trainer.check_val_every_n_epoch": cfg.trainer.check_val_every_n_epoch,
           "trainer.accumulate_grad_batches": cfg.trainer.accumulate_grad_batches, "trainer.grad_clip": cfg.trainer.grad_clip,
           "trainer.monitor": cfg.trainer.monitor, "trainer.mode": cfg.trainer.mode, "log.progress": cfg.log.progress,
           "log.loggers": cfg.log.loggers, "model.log_image_enabled": cfg.model.log_image_enabled}
    assert got == {"model.arch_name": "dhariwal_concat_unet", "data.image_size": 320, "optim.lr": 0.0002,
                   "optim.weight_decay": 1e-5, "model.log_image_names": ["00036.png"], "model.noise_copies": 8,
                   "model.model_channels": 32, "model.timesteps": 30, "model.num_ensemble": 5, "model.bce_weight": 0.5,
                   "data.name": "xca", "data.batch_size": 4, "data.train_dir": "data/xca_full/train",
                   "data.num_samples_per_image": 4, "trainer.max_epochs": 500, "trainer.strategy": "ddp",
                   "trainer.find_unused_parameters": True, "trainer.precision": "16-mixed",
                   "trainer.check_val_every_n_epoch": 50, "trainer.accumulate_grad_batches": 4, "trainer.grad_clip": 1.0,
                   "trainer.monitor": "val/dice", "trainer.mode": "max", "log.progress": "lines",
                   "log.loggers": ["console", "jsonl", "tensorboard"], "model.log_image_enabled": True}
    assert "says trainer.devices=4 but 1 process(es) run" in capsys.readouterr().out
    # the seed guide's formula next to ours: 4 x 4 x 4 GPUs x 4 = 256; crops per step 4 x 4 x 4 = 64
    line = effective_batch(cfg, 4)
    assert "4 crops x 4 process(es) x 4 accumulated = 64 crops per optimizer step x 8 noise draws" in line
    assert "= 256" in line


@pytest.mark.parametrize("section,key,value,message", [
    ("model", "learnig_rate", 1e-3, "unknown key model.learnig_rate; did you mean model.learning_rate?"),
    ("data", "train_bss", 4, "unknown key data.train_bss; did you mean data.train_bs?"),
    ("trainer", "max_epoch", 4, "unknown key trainer.max_epoch; did you mean trainer.max_epochs?"),
    ("trainer", "strategy", "deepspeed", "trainer.strategy='deepspeed': expected one of auto, ddp"),
    ("model", "patch_plan", [[256, 8]], "model.patch_plan=[[256, 8]]: only one [size, count] entry"),
    ("model", "num_classes", 3, "model.num_classes=3: only 2 is supported"),
    ("trainer", "devices", "all", "trainer.devices='all': expected -1 (every GPU) or a count >= 1"),
])
def test_misspelled_or_unsupported_seed_keys_name_file_and_key(section, key, value, message, tmp_path):
    path = tmp_path / "bad.yaml"
    body = {"image_size": 320} if section == "model" else {}
    path.write_text(yaml.safe_dump({section: {**body, key: value}}))
    with pytest.raises(ConfigError) as e:
        build_config(recipe, ["--config", str(path)])
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_unknown_arch_name_lists_the_three():
    with pytest.raises(ConfigError, match="expected one of dhariwal_concat_unet, csnet, medsegdiff, got 'unet'"):
        build_config(recipe, ["model.arch_name=unet"])


def test_every_shipped_config_loads_with_the_seed_values():
    expect = {"configs/flow/xca/flow.yaml": ("dhariwal_concat_unet", 2e-4, 6, 8, "16-mixed", 0.0),
              "configs/supervised/xca/csnet.yaml": ("csnet", 1e-3, 8, 1, "32-true", 0.0),
              "configs/diffusion/xca/medsegdiff.yaml": ("medsegdiff", 2e-4, 4, 2, "32-true", 0.9999)}
    for rel, (arch, lr, bs, accumulate, precision, ema) in expect.items():
        cfg, _, demo = build_config(recipe, ["--config", str(ROOT / rel)])
        assert (cfg.model.arch_name, cfg.optim.lr, cfg.data.batch_size, cfg.trainer.accumulate_grad_batches,
                cfg.trainer.precision, cfg.trainer.ema_decay, demo) == (arch, lr, bs, accumulate, precision, ema, False)
    for rel in ("flow/xca/flow_demo.yaml", "supervised/xca/csnet_demo.yaml", "diffusion/xca/medsegdiff_demo.yaml"):
        cfg, _, demo = build_config(recipe, ["--config", str(ROOT / "configs" / rel)])
        assert demo and cfg.data.image_size == 64 and cfg.model.roi_size == 96


def test_translate_leaves_trainlib_keys_alone():
    mine = {"model": {"arch_name": "csnet", "roi_size": 224}, "optim": {"lr": 0.1}, "trainer": {"max_epochs": 3}}
    assert translate(mine, "x.yaml") == mine
    assert translate({"model": {"learning_rate": 0.5}, "optim": {"weight_decay": 0.1}}, "x.yaml") == \
        {"optim": {"lr": 0.5, "weight_decay": 0.1}}


def test_metrics_take_the_predict_dict():
    m = VesselMetrics()
    label = torch.zeros(1, 1, 8, 8)
    label[..., 2:4, :] = 1
    m.update({"prob": label * 0.9, "trajectory": torch.zeros(1, 4, 8, 8)}, {"label": label})
    assert m.compute(torch.device("cpu"))["dice"] == 1.0


@pytest.mark.parametrize("arch", ["dhariwal_concat_unet", "medsegdiff"])
def test_sampled_prediction_depends_on_the_image_index_not_on_its_batch(arch):
    """Noise per image from a generator seeded by its index: an image scores the same alone or in a batch,
    on any rank (N processes score what one does), and at every validation."""
    torch.manual_seed(0)
    m = XCAModel(arch_name=arch, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                 timesteps=3, num_ensemble=2, roi_size=16, log_image_enabled=True, log_trajectory_steps=2)
    model = VesselSegmenter(m, 16).eval()
    for p in model.net.parameters():  # the zero-initialised output would make every sample equal
        p.data.normal_(0, 0.1)
    image, index = torch.rand(3, 1, 24, 24) * 2 - 1, torch.tensor([5, 9, 2])
    together = model.predict(image, index)
    alone = model.predict(image[1:2], index[1:2])
    assert torch.equal(together["prob"][1:2], alone["prob"])
    assert not torch.equal(together["prob"][0], model.predict(image[:1], torch.tensor([6]))["prob"][0])
    if arch == "dhariwal_concat_unet":
        assert together["trajectory"].shape == (3, 2, 24, 24)
        assert torch.equal(together["trajectory"][1:2], alone["trajectory"])
