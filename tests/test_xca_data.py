"""XCA data: pairing and its errors, scaling, pos/neg crops, augmentation alignment, eval items,
and the synthetic angiography writer."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.xca.data import (VesselDataset, XCAData, adjust_contrast, build_datasets, collate, crop_origin,
                              draw_center, read_pairs, split_dir)
from recipes.xca.synthetic import make_synthetic
from trainlib.config import Config, ConfigError, DataError, validate


def write(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode).save(path)


def make_split(root, names=("a.png", "b.png"), size=(16, 16), label=None, image=None):
    """A split folder whose labels are `label` (default: a 0/255 square) and images `image` (default: noise)."""
    rng = np.random.default_rng(0)
    for name in names:
        lab = np.zeros(size, np.uint8) if label is None else label
        if label is None:
            lab[4:8, 4:8] = 255
        write(os.path.join(root, "label", name), lab)
        write(os.path.join(root, "image", name), rng.integers(0, 256, size) if image is None else image)
    return str(root)


def plus_label(n=65):
    """A one-pixel plus through the centre: unchanged by flips and quarter turns of an odd square."""
    lab = np.zeros((n, n), np.uint8)
    lab[n // 2, :] = lab[:, n // 2] = 255
    return lab


# ------------------------------------------------------------------------------------------------
# Pairs and their errors

def test_pairs_matched_by_name_sorted(tmp_path):
    split = make_split(tmp_path / "train", names=("b.png", "a.png"))
    pairs = read_pairs(split)
    assert [(os.path.basename(i), os.path.basename(l)) for i, l in pairs] == [("a.png", "a.png"), ("b.png", "b.png")]
    assert all(os.path.dirname(i).endswith("image") and os.path.dirname(l).endswith("label") for i, l in pairs)


def test_image_without_label_lists_five_and_count(tmp_path):
    split = make_split(tmp_path / "s", names=("ok.png",))
    for i in range(7):
        write(os.path.join(split, "image", f"lonely{i}.png"), np.zeros((16, 16)))
    with pytest.raises(DataError, match=r"7 image\(s\) .* have no label .*lonely0.png.*lonely4.png and 2 more"):
        read_pairs(split)


def test_label_without_image(tmp_path):
    split = make_split(tmp_path / "s", names=("ok.png",))
    write(os.path.join(split, "label", "orphan.png"), np.zeros((16, 16)))
    with pytest.raises(DataError, match=r"1 label\(s\) .* have no image .*orphan.png"):
        read_pairs(split)


def test_size_mismatch_names_both_files(tmp_path):
    split = make_split(tmp_path / "s", names=("x.png",))
    write(os.path.join(split, "label", "x.png"), np.zeros((16, 20)))
    with pytest.raises(DataError, match=r"image .*x.png is 16x16 but its label .*x.png is 20x16"):
        read_pairs(split)


@pytest.mark.parametrize("values, found", [((0, 128, 255), "0, 128, 255"), ((3, 255), "3, 255")])
def test_label_not_binary_says_what_was_found(tmp_path, values, found):
    lab = np.zeros((16, 16), np.uint8) + values[0]
    for k, v in enumerate(values[1:]):
        lab[k, :] = v
    split = make_split(tmp_path / "s", names=("m.png",), label=lab)
    with pytest.raises(DataError, match=rf"label .*m.png is not binary: found values {found}"):
        read_pairs(split)
    assert len(read_pairs(split, check_labels=False)) == 1


@pytest.mark.parametrize("values", [(0, 255), (0, 1), (0,), (255,)])
def test_binary_labels_accepted(tmp_path, values):
    lab = np.full((16, 16), values[-1], np.uint8)
    lab[:8] = values[0]
    assert len(read_pairs(make_split(tmp_path / "s", names=("m.png",), label=lab))) == 1


def test_unreadable_png(tmp_path):
    split = make_split(tmp_path / "s", names=("bad.png",))
    with open(os.path.join(split, "image", "bad.png"), "wb") as fh:
        fh.write(b"not a png at all")
    with pytest.raises(DataError, match=r"image .*bad.png cannot be read"):
        read_pairs(split)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match=r"split folder not found: .*nowhere"):
        read_pairs(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "e" / "image")
    with pytest.raises(DataError, match=r"split folder .*e has no label/ folder"):
        read_pairs(str(tmp_path / "e"))
    os.makedirs(tmp_path / "e" / "label")
    with pytest.raises(DataError, match=r"split folder .*e is empty: no images"):
        read_pairs(str(tmp_path / "e"))
    os.makedirs(tmp_path / "f" / "label")
    with pytest.raises(DataError, match=r"split folder .*f has no image/ folder"):
        read_pairs(str(tmp_path / "f"))


def test_split_dirs_overrides_and_test_falls_back_to_val(tmp_path):
    d = XCAData(root=str(tmp_path), val_dir="/elsewhere/v")
    assert split_dir(d, "train") == os.path.join(str(tmp_path), "train")
    assert split_dir(d, "val") == "/elsewhere/v" and split_dir(d, "test") == "/elsewhere/v"
    os.makedirs(tmp_path / "test")
    assert split_dir(d, "test") == os.path.join(str(tmp_path), "test")
    with pytest.raises(DataError, match="data.root is empty"):
        split_dir(XCAData(), "train")


def test_config_bounds():
    validate(Config(data=XCAData()))
    with pytest.raises(ConfigError, match="rotate_degrees"):
        validate(Config(data=XCAData(rotate_degrees=[10.0, 5.0])))
    with pytest.raises(ConfigError, match="num_samples_per_image"):
        validate(Config(data=XCAData(num_samples_per_image=0)))


# ------------------------------------------------------------------------------------------------
# Items

def test_scaling_exact_and_label_binarised(tmp_path):
    image = np.array([[10, 20], [30, 50]], np.uint8)
    for name, lab in (("a.png", [[0, 255], [255, 0]]), ("b.png", [[0, 1], [1, 0]])):
        write(os.path.join(tmp_path, "image", name), image)
        write(os.path.join(tmp_path, "label", name), lab)
    ds = VesselDataset(read_pairs(str(tmp_path)), train=False)
    for k in range(2):
        item = ds[k]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 2, 2)
        assert torch.equal(item["image"][0], torch.tensor([[-1.0, -0.5], [0.0, 1.0]]))
        assert torch.equal(item["label"][0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        assert item["index"] == k and item["name"] == ("a.png", "b.png")[k]


def test_rgb_image_uses_first_channel(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = np.arange(16).reshape(4, 4)
    rgb[..., 1] = 255 - rgb[..., 0]
    write(os.path.join(tmp_path, "image", "c.png"), rgb, "RGB")
    write(os.path.join(tmp_path, "label", "c.png"), np.zeros((4, 4)))
    item = VesselDataset(read_pairs(str(tmp_path)), train=False)[0]
    assert item["image"][0, 0, 0] == -1.0 and item["image"][0, 3, 3] == 1.0  # red rises, green falls


def test_training_crops_half_centred_on_vessels(tmp_path):
    split = make_split(tmp_path, names=("p.png",), size=(65, 65), label=plus_label())
    pairs = read_pairs(split)
    data = XCAData(rotate_prob=0.0)  # flips and quarter turns keep the plus where it is
    torch.manual_seed(0)
    ds = VesselDataset(pairs, True, 17, 4, True, data)
    on = [ds[i % 4]["label"][0, 8, 8].item() for i in range(400)]
    assert all(ds[0]["image"].shape == (1, 17, 17) for _ in range(3))
    assert 0.42 < np.mean(on) < 0.58, np.mean(on)
    uniform = VesselDataset(pairs, True, 17, 1, True, data)  # n == 1: the seed's uniform random crop
    assert np.mean([uniform[0]["label"][0, 8, 8].item() for _ in range(400)]) < 0.2


def test_center_rule_and_shift_to_fit():
    label = torch.zeros(5, 10)
    label[2, 7] = 1.0
    torch.manual_seed(0)
    assert {draw_center(label, 1.0) for _ in range(20)} == {(2, 7)}
    assert all(label[draw_center(label, 0.0)] == 0 for _ in range(20))
    assert draw_center(torch.zeros(5, 10), 1.0) is not None  # no vessel: background centres, as MONAI
    assert crop_origin((5, 5), 4, (10, 12)) == (3, 3)  # centre at size // 2 inside the crop
    assert crop_origin((0, 11), 4, (10, 12)) == (0, 8) and crop_origin((9, 0), 5, (10, 12)) == (5, 0)


def test_index_modulo_n_picks_crops_of_one_image(tmp_path):
    split = make_split(tmp_path, names=("a.png", "b.png", "c.png"), size=(24, 24))
    ds = VesselDataset(read_pairs(split), True, 8, 5, False)
    assert len(ds) == 15
    assert [ds[i]["name"] for i in (0, 4, 5, 9, 14)] == ["a.png", "a.png", "b.png", "b.png", "c.png"]
    assert [ds[i]["index"] for i in (0, 4, 5, 14)] == [0, 0, 1, 2]
    assert len(VesselDataset(read_pairs(split), False, 8, 5, True)) == 3  # eval: one whole image per pair


def test_crop_randomness_comes_from_the_global_rng(tmp_path):
    ds = VesselDataset(read_pairs(make_split(tmp_path, size=(40, 40))), True, 16, 2, True)
    torch.manual_seed(3)
    first = [ds[i]["image"] for i in range(4)]
    torch.manual_seed(3)
    assert all(torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))


@pytest.mark.parametrize("rotate_prob", [0.0, 1.0])
def test_augmentation_keeps_image_and_label_aligned(tmp_path, rotate_prob):
    rng = np.random.default_rng(1)
    lab = np.zeros((40, 48), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, 36), rng.integers(0, 44)
        lab[y:y + rng.integers(2, 8), x:x + rng.integers(1, 5)] = 255
    split = make_split(tmp_path, names=("q.png",), size=lab.shape, label=lab, image=lab)  # image = label*2-1
    data = XCAData(rotate_prob=rotate_prob, rotate_degrees=[-7.5, 7.5], contrast_prob=0.0)
    ds = VesselDataset(read_pairs(split), True, 24, 3, True, data)
    torch.manual_seed(0)
    fractional = False
    for i in range(30):
        item = ds[i % 3]
        assert item["image"].shape == item["label"].shape == (1, 24, 24)
        assert torch.allclose(item["image"], item["label"] * 2 - 1, atol=1e-5)
        fractional |= bool(((item["label"] > 0.01) & (item["label"] < 0.99)).any())
    assert fractional == (rotate_prob > 0)  # bilinear rotation softens label edges, as the seed's


def test_contrast_keeps_range_and_training_images_stay_in_range(tmp_path):
    x = torch.linspace(-1, 1, 101).reshape(1, 1, 101)
    for gamma in (0.9, 1.1):
        y = adjust_contrast(x, gamma)
        assert abs(y.min() + 1) < 1e-6 and abs(y.max() - 1) < 1e-5 and (y.diff() > 0).all()
    assert adjust_contrast(x, 1.1)[0, 0, 50] < 0 < adjust_contrast(x, 0.9)[0, 0, 50]
    ds = VesselDataset(read_pairs(make_split(tmp_path, size=(32, 32))), True, 16, 2, True,
                       XCAData(rotate_prob=1.0, contrast_prob=1.0))
    torch.manual_seed(0)
    assert all(ds[i % len(ds)]["image"].abs().max() <= 1.0 for i in range(8))


def test_eval_items_are_whole_images_and_mixed_sizes_do_not_batch(tmp_path):
    make_split(tmp_path / "val", names=("a.png",), size=(20, 24))
    make_split(tmp_path / "val", names=("b.png",), size=(24, 20))
    make_split(tmp_path / "train", names=("t.png",), size=(32, 32))
    ds = build_datasets(XCAData(root=str(tmp_path), image_size=16, num_samples_per_image=2))
    assert ds["test"].pairs == ds["val"].pairs and len(ds["train"]) == 2
    items = [ds["val"][0], ds["val"][1]]
    assert items[0]["image"].shape == (1, 20, 24) and items[1]["label"].shape == (1, 24, 20)
    assert ds["val"].shape_keys() == [(20, 24), (24, 20)]
    with pytest.raises(DataError, match=r"a.png \(20x24\) and b.png \(24x20\) cannot share a batch"):
        collate(items)
    batch = collate([items[0], items[0]])
    assert batch["image"].shape == (2, 1, 20, 24) and batch["name"] == ["a.png", "a.png"]


def test_training_image_smaller_than_crop(tmp_path):
    pairs = read_pairs(make_split(tmp_path, names=("tiny.png",), size=(12, 30)))
    with pytest.raises(DataError, match=r"smaller than data.image_size=16: tiny.png \(12x30\)"):
        VesselDataset(pairs, True, 16, 1, True)
    assert VesselDataset(pairs, False, 16, 1, True)[0]["image"].shape == (1, 12, 30)


# ------------------------------------------------------------------------------------------------
# Synthetic writer

def test_synthetic_layout_binary_dark_vessels_deterministic(tmp_path):
    counts = make_synthetic(str(tmp_path / "a"), n_train=3, n_val=2, n_test=1, size=64, seed=5)
    assert counts == {"train": 3, "val": 2, "test": 1}
    ds = build_datasets(XCAData(root=str(tmp_path / "a"), image_size=32))  # the real reader accepts it
    assert [len(ds[s].pairs) for s in ("train", "val", "test")] == [3, 2, 1]
    for image_path, label_path in ds["train"].pairs + ds["val"].pairs + ds["test"].pairs:
        image, label = Image.open(image_path), Image.open(label_path)
        assert image.mode == label.mode == "L" and image.size == label.size == (64, 64)
        im, lab = np.asarray(image).astype(float), np.asarray(label)
        assert set(np.unique(lab).tolist()) == {0, 255} and 0.02 < (lab > 0).mean() < 0.5
        assert im[lab > 0].mean() < im[lab == 0].mean() - 20  # vessels darker than the background
    make_synthetic(str(tmp_path / "b"), n_train=3, n_val=2, n_test=1, size=64, seed=5)
    make_synthetic(str(tmp_path / "c"), n_train=3, n_val=2, n_test=1, size=64, seed=6)
    rel = os.path.join("train", "image", "0001.png")
    same = np.asarray(Image.open(tmp_path / "a" / rel)), np.asarray(Image.open(tmp_path / "b" / rel))
    assert np.array_equal(*same)
    assert not np.array_equal(same[0], np.asarray(Image.open(tmp_path / "c" / rel)))
