"""SegFormer recipe: Hugging Face parity, pretrained loading, data formats and errors, loss, mIoU,
and learning on the synthetic dataset through the engine."""
from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from recipes.segformer import (MeanIoU, SegFormer, SegFormerConfig, SegFormerData, build_datasets, build_model,
                               from_pretrained, hf_to_ours, load_pretrained, loss, ours_to_hf, recipe, search_space,
                               to_hf_state_dict, write_synthetic)
from recipes.segformer.data import label_lut
from trainlib.checkpoint import CheckpointError
from trainlib.config import Config, ConfigError, DataError, set_value
from trainlib.recipe import main

TINY = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
            decoder_hidden_size=16)
TINY_ARGS = ["model.hidden_sizes=[8,16,24,32]", "model.depths=[1,1,1,1]", "model.num_attention_heads=[1,1,1,1]",
             "model.decoder_hidden_size=16"]


def make_cfg(root="", *, num_labels=3, image_size=32, reduce_labels=False, **data):
    model = SegFormerConfig(num_labels=num_labels, **TINY)
    return types.SimpleNamespace(model=model, data=SegFormerData(root=str(root), image_size=image_size,
                                                                 reduce_labels=reduce_labels, **data))


# ------------------------------------------------------------------------------------------------
# Model and Hugging Face parity

def randomize(model):
    """Weights far from the 0.02-std init, BatchNorm statistics that matter: a wrong wiring shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def test_parity_with_transformers_semantic_segmentation(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: HF parity not checked")
    hf_cfg = transformers.SegformerConfig(**TINY, num_labels=5, image_size=64)
    torch.manual_seed(0)
    hf = randomize(transformers.SegformerForSemanticSegmentation(hf_cfg)).eval()
    hf.save_pretrained(tmp_path / "hub")
    hf.save_pretrained(tmp_path / "v5", save_original_format=False)  # transformers' in-memory key names
    ours = from_pretrained(str(tmp_path / "hub"), log=None)
    assert not ours.training and ours.load_report.head_loaded and not ours.load_report.discarded
    assert ours.arch["num_labels"] == 5 and ours.arch["hidden_sizes"] == TINY["hidden_sizes"]
    for shape in [(2, 3, 64, 64), (1, 3, 61, 75)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = hf(pixel_values=x).logits
            got = ours(x)
        assert got.shape == want.shape == (shape[0], 5, math.ceil(shape[2] / 4), math.ceil(shape[3] / 4))
        assert want.std() > 0.5  # logits of a real scale, so 1e-5 means something
        assert (got - want).abs().max().item() <= 1e-5
    v5 = from_pretrained(str(tmp_path / "v5"), log=None)
    for (k, a), b in zip(ours.state_dict().items(), v5.state_dict().values()):
        assert torch.equal(a, b), k
    # our weights under hub keys are exactly the hub checkpoint
    from safetensors.torch import load_file
    hub = load_file(str(tmp_path / "hub" / "model.safetensors"))
    mine = to_hf_state_dict(ours)
    assert set(mine) == set(hub)
    assert all(torch.equal(mine[k], hub[k]) for k in hub)


def test_encoder_only_transformers_checkpoint_loads(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: HF parity not checked")
    hf_cfg = transformers.SegformerConfig(**TINY, num_labels=1000)
    hf = randomize(transformers.SegformerForImageClassification(hf_cfg))
    hf.save_pretrained(tmp_path / "mit")
    cfg = Config(model=SegFormerConfig(num_labels=4, pretrained=str(tmp_path / "mit"), **TINY), data=SegFormerData())
    model = build_model(cfg)
    out = capsys.readouterr().out
    assert "[segformer] loaded" in out and "discarded 2 (classifier.bias, classifier.weight)" in out
    assert "decode head random: the checkpoint has none (SegformerForImageClassification)" in out
    from safetensors.torch import load_file
    hub = load_file(str(tmp_path / "mit" / "model.safetensors"))
    encoder = {hf_to_ours(k): v for k, v in hub.items() if k.startswith("segformer.")}
    own = model.state_dict()
    assert set(encoder) == {k for k in own if k.startswith("encoder.")}  # every encoder key mapped
    assert all(torch.equal(own[k], v) for k, v in encoder.items())
    assert own["decode_head.classifier.weight"].shape[0] == 4


def write_hf_folder(folder, model, **config):
    """A hub-format folder written from one of our models (no transformers needed)."""
    os.makedirs(folder, exist_ok=True)
    a = model.arch
    cfg = {"model_type": "segformer", "architectures": ["SegformerForSemanticSegmentation"], "hidden_act": "gelu",
           **{k: a[k] for k in ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides",
                                "mlp_ratios", "num_channels", "decoder_hidden_size")},
           "id2label": {str(i): f"c{i}" for i in range(a["num_labels"])}, **config}
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(model).items()}, os.path.join(folder, "model.safetensors"))


def test_key_mapping_round_trip_and_head_rules(tmp_path):
    torch.manual_seed(0)
    src = randomize(SegFormer(**TINY, num_labels=5))
    for k in src.state_dict():
        assert hf_to_ours(ours_to_hf(k)) == k
    assert ours_to_hf("encoder.block.0.1.attention.sr.weight") == "segformer.encoder.block.0.1.attention.self.sr.weight"
    assert ours_to_hf("encoder.block.3.0.attention.proj.bias") == "segformer.encoder.block.3.0.attention.output.dense.bias"
    assert ours_to_hf("encoder.block.2.0.mlp.dwconv.weight") == "segformer.encoder.block.2.0.mlp.dwconv.dwconv.weight"
    write_hf_folder(tmp_path / "full", src)
    same = from_pretrained(str(tmp_path / "full"), log=None)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), src.state_dict().values()))
    # another num_labels: encoder loaded, the whole head stays as initialised, and the report says why
    other = SegFormer(**TINY, num_labels=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    lines = []
    report = load_pretrained(other, str(tmp_path / "full"), log=lines.append)
    assert not report.head_loaded and len(lines) == 1
    assert "decode head random: the checkpoint's head has 5 labels and width 16" in lines[0]
    assert "model.num_labels=3" in lines[0]
    for k, v in other.state_dict().items():
        ref = src.state_dict()[k] if k.startswith("encoder.") else before[k]
        assert torch.equal(v, ref), k


def test_pretrained_errors_name_folder_and_difference(tmp_path):
    with pytest.raises(CheckpointError, match="pretrained folder not found: /nonexistent/mit"):
        from_pretrained("/nonexistent/mit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json: expected a Hugging Face model folder"):
        from_pretrained(str(tmp_path / "empty"))
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTForImageClassification"]}))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(vit))
    assert str(vit) in str(e.value) and "'vit'" in str(e.value) and "not SegFormer" in str(e.value)
    write_hf_folder(tmp_path / "tiny", SegFormer(**TINY, num_labels=5))
    with pytest.raises(ConfigError) as e:  # model.variant=b0 against a tiny checkpoint
        load_pretrained(SegFormer.from_config(SegFormerConfig(num_labels=5)), str(tmp_path / "tiny"))
    msg = str(e.value)
    assert str(tmp_path / "tiny") in msg and "hidden_sizes=[8, 16, 24, 32]" in msg and "(mit-b0)" in msg
    assert "(set model.hidden_sizes=[8,16,24,32] model.depths=[1,1,1,1] model.num_attention_heads=[1,1,1,1])" in msg
    (tmp_path / "tiny" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        from_pretrained(str(tmp_path / "tiny"))


def test_cli_pretrained_mismatch_is_one_line(tmp_path, capsys):
    write_hf_folder(tmp_path / "tiny", SegFormer(**TINY, num_labels=5))
    rc = main(recipe, [f"model.pretrained={tmp_path / 'tiny'}", f"trainer.out_dir={tmp_path}", "model.variant=b1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "does not fit this model" in err and "mit-b1" in err and "(set model.hidden_sizes=[8,16,24,32]" in err


# ------------------------------------------------------------------------------------------------
# Data

PALETTE = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40], [200, 40, 200]], np.uint8)


def write_pair(image_path, mask_path, mask, image=None):
    os.makedirs(os.path.dirname(image_path), exist_ok=True)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    if image is None:
        image = PALETTE[np.minimum(mask, len(PALETTE) - 1)]
    Image.fromarray(image).save(image_path, quality=95)
    Image.fromarray(mask).save(mask_path)


def blocks_mask(h, w, k, seed):
    """Label blocks of 8x8 pixels (values 0..k-1) with a 255 line."""
    rng = np.random.default_rng(seed)
    m = np.kron(rng.integers(0, k, (h // 8 + 1, w // 8 + 1)), np.ones((8, 8), np.int64))[:h, :w].astype(np.uint8)
    m[h // 2, :] = 255
    return m


def write_seed_layout(root, n_train=3, n_valid=2, k=3, size=(40, 48), id2label=True, test=0):
    base = root / "processed_dataset"
    meta = {"train": [], "valid": []}
    if test:
        meta["test"] = []
    for split, n in (("train", n_train), ("valid", n_valid), ("test", test)):
        for i in range(n):
            rel = (f"{split}/images/{i:04d}.jpg", f"{split}/masks/{i:04d}.png")
            seed = {"train": 0, "valid": 50, "test": 90}[split] + i
            write_pair(base / rel[0], base / rel[1], blocks_mask(size[0], size[1], k, seed))
            meta[split].append({"image": rel[0], "mask": rel[1]})
    (base / "metadata.json").write_text(json.dumps(meta))
    if id2label:
        (base / "id2label.json").write_text(json.dumps({str(i): f"class {i}" for i in range(k)}))
    return base


def test_seed_layout_items(tmp_path):
    write_seed_layout(tmp_path, test=2)
    ds = build_datasets(make_cfg(tmp_path))
    assert [len(ds[s]) for s in ("train", "val", "test")] == [3, 2, 2] and ds["test"] is not ds["val"]
    item = ds["val"][0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["labels"].shape == (32, 32) and item["labels"].dtype == torch.int64
    assert set(item["labels"].unique().tolist()) <= {0, 1, 2, 255}
    # ImageNet normalisation: a pure red pixel of class 0 after nearest resize
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    raw = torch.tensor(np.asarray(Image.open(ds["val"].pairs[0][0]).resize((32, 32), Image.BILINEAR)),
                       dtype=torch.float32).permute(2, 0, 1) / 255
    assert torch.allclose(item["pixel_values"], (raw - mean[:, None, None]) / std[:, None, None], atol=0.05)
    ds2 = build_datasets(make_cfg(tmp_path, image_size=40))
    assert ds2["train"][1]["labels"].shape == (40, 40)


def test_metadata_anywhere_with_list_entries_and_val_key(tmp_path):
    data = tmp_path / "elsewhere"
    for i in range(3):
        write_pair(data / f"img/{i}.png", data / f"lbl/{i}.png", blocks_mask(32, 32, 3, i))
    meta = {"train": [[f"img/{i}.png", f"lbl/{i}.png"] for i in range(2)],
            "val": [{"image_path": str(data / "img/2.png"), "label": "lbl/2.png"}]}
    (data / "my_meta.json").write_text(json.dumps(meta))
    ds = build_datasets(make_cfg("", metadata=str(data / "my_meta.json")))
    assert len(ds["train"]) == 2 and len(ds["val"]) == 1 and ds["test"] is ds["val"]
    assert ds["val"].pairs[0] == (str(data / "img/2.png"), str(data / "lbl/2.png"))


def test_plain_folders_pair_by_stem_and_split_by_fraction(tmp_path):
    for i in range(10):
        write_pair(tmp_path / "images" / f"scene_{i}.jpg", tmp_path / "masks" / f"scene_{i}.png",
                   blocks_mask(24, 24, 3, i))
    ds = build_datasets(make_cfg(tmp_path, val_fraction=0.3))
    train, val = ds["train"].pairs, ds["val"].pairs
    assert len(train) == 7 and len(val) == 3
    stems = sorted(os.path.basename(p[0])[:-4] for p in train + val)
    assert stems == sorted(f"scene_{i}" for i in range(10))
    assert all(os.path.basename(i)[:-4] == os.path.basename(m)[:-4] for i, m in train + val)
    assert build_datasets(make_cfg(tmp_path, val_fraction=0.3))["val"].pairs == val  # fixed split


def test_train_augmentation_keeps_image_and_mask_aligned_and_uses_global_rng(tmp_path):
    mask = blocks_mask(64, 80, 5, 3)
    mask[mask == 255] = 0
    write_pair(tmp_path / "images/a.png", tmp_path / "masks/a.png", mask)
    write_pair(tmp_path / "images/b.png", tmp_path / "masks/b.png", mask)
    ds = build_datasets(make_cfg(tmp_path, num_labels=5, image_size=48, color_jitter=[], val_fraction=0.5,
                                 min_scale=0.3))["train"]
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for seed in range(6):
        torch.manual_seed(seed)
        item = ds[0]
        rgb = ((item["pixel_values"] * std + mean) * 255).permute(1, 2, 0)
        dist, colour_class = ((rgb[..., None, :] - torch.tensor(PALETTE, dtype=torch.float32)) ** 2).sum(-1).min(-1)
        pure = dist < 20 ** 2  # pixels away from block edges (the image is resized bilinearly, the mask nearest)
        assert pure.float().mean() > 0.6
        assert (colour_class == item["labels"])[pure].float().mean() > 0.95  # a flipped mask agrees on ~25%
        torch.manual_seed(seed)
        again = ds[0]
        assert torch.equal(again["pixel_values"], item["pixel_values"]) and torch.equal(again["labels"], item["labels"])


def test_reduce_labels(tmp_path):
    lut = label_lut(True)
    assert lut[0] == 255 and lut[1] == 0 and lut[3] == 2 and lut[255] == 255
    mask = np.array([[0, 1, 2, 3], [255, 3, 1, 0]] * 8, np.uint8).repeat(8, 1)
    for split in ("train", "valid"):
        write_pair(tmp_path / f"{split}/i.png", tmp_path / f"{split}/m.png", mask)
    (tmp_path / "metadata.json").write_text(json.dumps({s: [{"image": f"{s}/i.png", "mask": f"{s}/m.png"}]
                                                        for s in ("train", "valid")}))
    # value 3 is a class with reduce_labels (1..3 -> 0..2) but outside 0..2 without it
    with pytest.raises(DataError, match="values 3 outside the label set"):
        build_datasets(make_cfg(tmp_path, num_labels=3, image_size=32))
    item = build_datasets(make_cfg(tmp_path, num_labels=3, image_size=32, reduce_labels=True))["val"][0]
    want = torch.from_numpy(lut[mask].astype(np.int64))
    want = F.interpolate(want[None, None].float(), size=(32, 32), mode="nearest")[0, 0].long()
    assert torch.equal(item["labels"], want)


@pytest.mark.parametrize("case, message", [
    ("no_metadata", "missing metadata.json: expected {root}/processed_dataset/metadata.json"),
    ("missing_file", "1 file(s) listed in metadata file {base}/metadata.json do not exist: {base}/valid/masks/0001.png"),
    ("size_mismatch", "image {base}/train/images/0001.jpg is 48x40 but its mask {base}/train/masks/0001.png is 30x20"),
    ("bad_values", "mask {base}/valid/masks/0000.png has values 7, 9 outside the label set: expected 0..2 "
                   "(model.num_labels=3) or 255 (ignored)"),
    ("empty_split", "split 'valid' is empty: metadata file {base}/metadata.json lists no image/mask pairs"),
    ("no_train_key", "metadata file {base}/metadata.json has no 'train' list (keys found: valid)"),
    ("id2label", "label file {base}/id2label.json lists 3 classes but model.num_labels=4: set model.num_labels=3"),
    ("rgb_mask", "mask {base}/train/masks/0000.png is a RGB image: expected a single-channel PNG"),
    ("no_layout", "data.root {root} holds neither processed_dataset/metadata.json"),
    ("no_mask", "1 image(s) in {root}/images have no mask: lonely.jpg (expected {root}/masks/lonely.png)"),
])
def test_bad_input_is_one_clear_data_error(tmp_path, case, message):
    root = tmp_path / "data"
    root.mkdir()
    base = root / "processed_dataset"
    k = 3
    if case not in ("no_layout", "no_mask"):
        write_seed_layout(root)
    if case == "no_metadata":
        (base / "metadata.json").unlink()
    elif case == "missing_file":
        (base / "valid/masks/0001.png").unlink()
    elif case == "size_mismatch":
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(base / "train/masks/0001.png")
    elif case == "bad_values":
        m = blocks_mask(40, 48, 3, 0)
        m[0, 0], m[5, 5] = 9, 7
        Image.fromarray(m).save(base / "valid/masks/0000.png")
    elif case == "empty_split":
        meta = json.loads((base / "metadata.json").read_text())
        (base / "metadata.json").write_text(json.dumps({**meta, "valid": []}))
    elif case == "no_train_key":
        meta = json.loads((base / "metadata.json").read_text())
        (base / "metadata.json").write_text(json.dumps({"valid": meta["valid"]}))
    elif case == "id2label":
        k = 4
    elif case == "rgb_mask":
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(base / "train/masks/0000.png")
    elif case == "no_mask":
        write_pair(root / "images/a.jpg", root / "masks/a.png", blocks_mask(16, 16, 3, 0))
        write_pair(root / "images/lonely.jpg", root / "other/lonely.png", blocks_mask(16, 16, 3, 0))
    with pytest.raises(DataError) as e:
        build_datasets(make_cfg(root, num_labels=k))
    assert message.format(root=root, base=base) in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    write_seed_layout(tmp_path / "d")
    (tmp_path / "d/processed_dataset/train/images/0002.jpg").unlink()
    rc = main(recipe, [f"data.root={tmp_path / 'd'}", f"trainer.out_dir={tmp_path}", "model.num_labels=3", *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: 1 file(s) listed in metadata file") and "0002.jpg" in err
    assert len(err.strip().splitlines()) == 1
    assert main(recipe, ["data.root=/nonexistent/sidewalk"]) == 2
    assert "error: data.root folder not found: /nonexistent/sidewalk" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Loss and metric

def test_loss_is_pixel_mean_over_valid_pixels_with_pixel_weight():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    labels = torch.randint(0, 4, (2, 20, 24), generator=g)
    labels[0, :3] = 255
    out = loss(logits, {"labels": labels})
    up = F.interpolate(logits, size=(20, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(out["loss"], F.cross_entropy(up, labels, ignore_index=255))
    assert out["weight"].item() == (labels != 255).sum().item() == 2 * 20 * 24 - 3 * 24
    empty = loss(logits, {"labels": torch.full_like(labels, 255)})
    assert empty["loss"].item() == 0.0 and empty["weight"].item() == 0


def numpy_miou(batches, k, ignore=255, skip=()):
    """Brute force: per class, pixel sets of prediction and label over the whole split."""
    inter, union, area = np.zeros(k), np.zeros(k), np.zeros(k)
    for logits, labels in batches:
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pred, lab = up.argmax(1).numpy(), labels.numpy()
        valid = lab != ignore
        for c in skip:
            valid &= lab != c
        for c in range(k):
            p, t = (pred == c) & valid, (lab == c) & valid
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
            area[c] += t.sum()
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return {"miou": np.nanmean(iou), "acc": inter.sum() / area.sum(), "iou": iou}


def random_batches(k, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        logits = torch.randn(2, k, 6, 7, generator=g)
        logits[:, k - 1] -= 100  # the last class is never predicted ...
        labels = torch.randint(0, k - 1, (2, 24, 28), generator=g)  # ... nor labelled: union 0 -> nan, excluded
        labels[:, ::5] = 255
        out.append((logits, labels))
    return out


@pytest.mark.parametrize("skip", [(), (0,)])
def test_mean_iou_matches_bruteforce(skip):
    k = 5
    batches = random_batches(k)
    metric = MeanIoU(k, ["a", "b c", "d", "e", "f"], ignore_labels=skip)
    for logits, labels in batches:
        metric.update(logits, {"labels": labels})
    got = metric.compute()
    want = numpy_miou(batches, k, skip=skip)
    assert abs(got["miou"] - want["miou"]) < 1e-12 and abs(got["acc"] - want["acc"]) < 1e-12
    assert math.isnan(got["iou_f"]) and math.isnan(want["iou"][4])
    for name, w in zip(["iou_a", "iou_b_c", "iou_d", "iou_e"], want["iou"][:4]):
        assert abs(got[name] - w) < 1e-12
    assert 0.1 < got["miou"] < 0.4  # random logits: about chance
    metric.reset()
    assert metric.intersect.shape == (k,) and metric.intersect.sum() == 0


def _metric_worker(rank, port, batches, k, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metric = MeanIoU(k)
    for logits, labels in (batches if rank == 0 else []):  # rank 1 scores nothing (small val split)
        metric.update(logits, {"labels": labels})
    out = metric.compute()
    if rank == 1:
        with open(result_file, "w") as fh:
            json.dump({key: (None if math.isnan(v) else v) for key, v in out.items()}, fh)
    dist.destroy_process_group()


def test_mean_iou_vector_states_reduce_across_ranks_even_when_one_rank_is_idle(tmp_path):
    import socket

    import torch.multiprocessing as mp

    k = 4
    batches = random_batches(k, n=2, seed=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_metric_worker, args=(port, batches, k, str(tmp_path / "r.json")), nprocs=2, join=True)
    got = json.loads((tmp_path / "r.json").read_text())
    want = numpy_miou(batches, k)
    assert abs(got["miou"] - want["miou"]) < 1e-12 and abs(got["acc"] - want["acc"]) < 1e-12


# ------------------------------------------------------------------------------------------------
# Recipe wiring, search space, learning

def test_recipe_wiring_and_help(capsys):
    assert recipe.name == "segformer" and recipe.defaults["trainer.monitor"] == "val/miou"
    assert main(recipe, ["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("model.variant", "model.num_labels", "model.pretrained", "model.drop_path_rate", "data.image_size",
                "data.reduce_labels", "data.val_fraction", "data.metadata", "optim.lr"):
        assert key in out
    for variant, (sizes, depths) in {"b0": ([32, 64, 160, 256], [2, 2, 2, 2]),
                                     "b5": ([64, 128, 320, 512], [3, 6, 40, 3])}.items():
        with torch.device("meta"):
            m = SegFormer.from_config(SegFormerConfig(variant=variant))
        assert [len(b) for b in m.encoder.block] == depths
        assert [e.proj.out_channels for e in m.encoder.patch_embeddings] == sizes
        rates = [blk.drop_path.p for stage in m.encoder.block for blk in stage]
        assert rates[0] == 0.0 and abs(rates[-1] - 0.1) < 1e-12 and rates == sorted(rates)
    with torch.device("meta"):
        assert sum(p.numel() for p in SegFormer.from_config(SegFormerConfig(num_labels=150)).parameters()) == 3_752_694


def test_search_space_returns_valid_config_values():
    optuna = pytest.importorskip("optuna")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        params = search_space(study.ask())
        assert set(params) == {"optim.lr", "data.batch_size", "optim.name", "optim.weight_decay", "optim.scheduler"}
        assert 1e-5 <= params["optim.lr"] <= 1e-3 and params["data.batch_size"] in (2, 4, 8)
        cfg = Config(model=SegFormerConfig(), data=SegFormerData())
        for key, value in params.items():
            set_value(cfg, key, value)


def test_synthetic_writer_gives_the_seed_layout(tmp_path):
    meta = write_synthetic(str(tmp_path), n_train=4, n_valid=6, num_labels=4, min_size=40, max_size=50)
    base = tmp_path / "processed_dataset"
    assert json.loads((base / "metadata.json").read_text()) == meta
    assert meta["train"][0] == {"image": "train/images/0000.jpg", "mask": "train/masks/0000.png"}
    assert json.loads((base / "id2label.json").read_text())["1"] == "flat-road"
    masks = [np.asarray(Image.open(base / e["mask"])) for e in meta["valid"]]
    values = set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist())
    assert {0, 1, 2, 3, 255} <= values <= {0, 1, 2, 3, 255}
    ds = build_datasets(make_cfg(tmp_path, num_labels=4))
    assert len(ds["train"]) == 4 and len(ds["val"]) == 6


def rows(run_dir, split):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == split]


def test_learns_the_synthetic_demo_in_process(tmp_path, capsys):
    import trainlib

    args = [f"trainer.out_dir={tmp_path}", "trainer.run_name=demo", "model.hidden_sizes=[16,32,64,128]",
            "model.num_attention_heads=[1,1,2,4]", "model.depths=[1,1,1,1]", "model.decoder_hidden_size=64",
            "data.batch_size=8", "optim.lr=2e-3", "trainer.max_epochs=6", "log.loggers=jsonl"]
    assert main(recipe, args) == 0
    assert "no data.root given: training on a synthetic segformer dataset" in capsys.readouterr().out
    val = rows(tmp_path / "demo", "val")
    assert len(val) == 6
    # chance (everything background) is about 0.12 mIoU on the demo data
    assert val[-1]["miou"] > 0.65 and val[-1]["miou"] > val[0]["miou"] + 0.3, [v["miou"] for v in val]
    assert val[-1]["acc"] > 0.85
    assert {"iou_background", "iou_flat-road", "iou_nature-vegetation"} <= set(val[-1])
    model = trainlib.load_model(tmp_path / "demo")
    best = torch.load(tmp_path / "demo" / "checkpoints" / "best.ckpt", weights_only=True)["model"]
    assert isinstance(model, SegFormer) and not model.training
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
