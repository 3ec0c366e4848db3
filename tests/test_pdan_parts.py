"""PDAN recipe parts: model, DAL, data loading and label rules, collate, loss, FrameMAP, synthetic data."""
from __future__ import annotations

import json
import os
import pickle
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipes.pdan import (build_datasets, build_loss, collate, DAL, DataError, FrameMAP, loc25_points, loss_all_stages, loss_last_stage, padded_length, PDAN, recipe, resolved_input_channels, write_synthetic)
from recipes.pdan.data import check_subsets, PDANData
from recipes.pdan.metrics import average_precision
from recipes.pdan.model import PDANConfig
from trainlib.config import Config, ConfigError, UserError, set_value


def make_cfg(root, *, num_classes=3, input_channels=8, mode="rgb", annotations="", loss_all=False,
             length_buckets=(), cuda_graphs=False):
    model = PDANConfig(num_classes=num_classes, input_channels=input_channels, loss_all_stages=loss_all)
    data = PDANData(root=str(root), annotations=annotations, mode=mode, length_buckets=list(length_buckets))
    return types.SimpleNamespace(model=model, data=data, trainer=types.SimpleNamespace(seed=0, cuda_graphs=cuda_graphs))


def write_dataset(root, videos, *, dim=8, layout="4d", seed=0):
    """videos: {vid: (T, subset, duration, actions)}; writes npy files + charades.json."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    db = {}
    arrays = {}
    for vid, (t, subset, duration, actions) in videos.items():
        a = rng.standard_normal((t, dim)).astype(np.float32)
        arrays[vid] = a
        np.save(os.path.join(root, f"{vid}.npy"), a.reshape(t, 1, 1, dim) if layout == "4d" else a)
        db[vid] = {"subset": subset, "duration": duration, "actions": actions}
    with open(os.path.join(root, "charades.json"), "w") as fh:
        json.dump(db, fh)
    return arrays


SMALL = {
    "v_train": (10, "training", 5.0, [[0, 1.0, 2.5], [2, 0.0, 5.0], [1, 3.2, 3.9]]),
    "v_train2": (7, "training", 3.5, [[1, 0.5, 2.0]]),
    "v_test": (12, "testing", 4.0, [[2, 1.0, 3.0]]),
}


# --------------------------------------------------------------------------------------------
# Model

@pytest.mark.parametrize("stages", [1, 2])
def test_model_output_shape(stages):
    torch.manual_seed(0)
    model = PDAN(num_stages=stages, num_layers=3, num_channels=16, input_channels=12, num_classes=5, dropout=0.5)
    out = model(torch.randn(2, 12, 20), torch.ones(2, 20))
    assert out.shape == (stages, 2, 5, 20)
    assert len(model.stage1.layers) == 3
    assert [blk.attention.dilation for blk in model.stage1.layers] == [1, 2, 4]
    if stages == 2:
        assert model.stages[0].conv_1x1.in_channels == 5
        model.eval()
        x, mask = torch.randn(2, 12, 20), torch.ones(2, 20)
        mask[0, 15:] = 0
        with torch.no_grad():
            out = model(x, mask)
            m = mask[:, None]
            torch.testing.assert_close(out[0], model.stage1(x, m))
            torch.testing.assert_close(out[1], model.stages[0](out[0] * m, m))  # raw logits, no sigmoid


def test_padding_is_exactly_zero_and_ignored():
    torch.manual_seed(0)
    model = PDAN(num_stages=2, num_layers=5, num_channels=16, input_channels=12, num_classes=5).eval()
    x = torch.randn(2, 12, 20)
    mask = torch.ones(2, 20)
    mask[1, 13:] = 0
    block_outputs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: block_outputs.append(o.detach().clone()))
             for stage in [model.stage1, *model.stages] for blk in stage.layers]
    with torch.no_grad():
        out = model(x, mask)
        assert len(block_outputs) == 10
        for h in block_outputs:
            assert torch.equal(h[1, :, 13:], torch.zeros_like(h[1, :, 13:]))
        assert torch.equal(out[:, 1, :, 13:], torch.zeros(2, 5, 7))
        assert out[:, 1, :, :13].abs().min() > 0

        x2 = x.clone()
        x2[1, :, 13:] = 100 * torch.randn(12, 7)
        out2 = model(x2, mask)
        assert torch.equal(out2[:, :, :, :13], out[:, :, :, :13])
        assert torch.equal(out2[:, 0], out[:, 0])

        alone = model(x[1:, :, :13], torch.ones(1, 13))  # no padding at all
        torch.testing.assert_close(alone[:, 0], out[:, 1, :, :13], atol=1e-5, rtol=1e-5)


def slow_dal(layer: DAL, x: torch.Tensor) -> torch.Tensor:
    """The original PDAN formulation: pad, project, unfold a 2d+1 window, keep taps 0, d, 2d."""
    d = layer.dilation
    b, c, t = x.shape
    padded = F.pad(x, (d, d))
    q = layer.query_conv(x)
    k = layer.key_conv(padded).unfold(2, 2 * d + 1, 1)[..., [0, d, 2 * d]]   # [B, C, T, 3]
    v = layer.value_conv(padded).unfold(2, 2 * d + 1, 1)[..., [0, d, 2 * d]]
    v = v + layer.rel_t
    out = torch.zeros(b, c, t)
    for bi in range(b):
        for ti in range(t):
            w = torch.softmax(q[bi, :, ti, None] * k[bi, :, ti], dim=-1)     # [C, 3]
            out[bi, :, ti] = (w * v[bi, :, ti]).sum(-1)
    return out


@pytest.mark.parametrize("dilation", [1, 2, 4, 16])
def test_dal_matches_unfold_reference(dilation):
    torch.manual_seed(dilation)
    layer = DAL(6, dilation)
    x = torch.randn(2, 6, 11)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), slow_dal(layer, x), atol=1e-5, rtol=1e-5)
    assert layer.rel_t.shape == (6, 1, 3)
    assert layer.query_conv.bias is None and layer.key_conv.bias is None and layer.value_conv.bias is None


def test_dal_init():
    torch.manual_seed(0)
    layer = DAL(256, 1)
    # kaiming_normal fan_out, relu gain: std = sqrt(2 / 256)
    std = layer.key_conv.weight.std().item()
    assert abs(std - (2 / 256) ** 0.5) < 0.005
    assert abs(layer.rel_t.std().item() - 1.0) < 0.2


def original_stage(stage, x, m):
    """SSPDAN.forward of the original PDAN.py, written out: its input 1x1 conv output is NOT masked."""
    h = stage.conv_1x1(x)
    for blk in stage.layers:
        a = F.relu(slow_dal(blk.attention, h))
        a = blk.dropout(blk.conv_1x1(a))
        h = (h + a) * m
    return stage.conv_out(h) * m


def original_forward(model, x, mask):
    """PDAN.forward of the original: later stages take the previous stage's masked raw logits."""
    m = mask[:, None]
    out = original_stage(model.stage1, x, m)
    outputs = [out]
    for stage in model.stages:
        out = original_stage(stage, out * m, m)
        outputs.append(out)
    return torch.stack(outputs)


def test_mask_input_key_reaches_the_model(tmp_path):
    assert PDANConfig().mask_input is True
    cfg = make_cfg(tmp_path, num_classes=4, input_channels=16)
    cfg.model.num_stages = 2
    assert [s.mask_input for s in (recipe.build_model(cfg).stage1, *recipe.build_model(cfg).stages)] == [True, True]
    cfg.model.mask_input = False
    model = recipe.build_model(cfg)
    assert [s.mask_input for s in (model.stage1, *model.stages)] == [False, False]
    full = Config(model=PDANConfig(), data=PDANData(), recipe="pdan")
    set_value(full, "model.mask_input", "false")
    assert full.model.mask_input is False


def test_mask_input_false_is_the_original_forward():
    """model.mask_input=false: the same forward as the original PDAN.py, padded batch included."""
    torch.manual_seed(0)
    model = PDAN(num_stages=2, num_layers=3, num_channels=8, input_channels=6, num_classes=3,
                 mask_input=False).eval()
    x = torch.randn(2, 6, 30)
    mask = torch.ones(2, 30)
    mask[0, 21:] = 0
    with torch.no_grad():
        want = original_forward(model, x, mask)
        torch.testing.assert_close(model(x, mask), want, atol=1e-5, rtol=1e-5)
        # the default (masked input) is a different function on this padded batch
        model.stage1.mask_input = model.stages[0].mask_input = True
        assert (model(x, mask) - want).abs().max() > 1e-2


def test_mask_input_makes_outputs_independent_of_padding():
    """A 40-frame video alone vs padded to 60 next to a longer one. Masked input (default): the
    same outputs. Unmasked (the original): the input conv's bias on padded frame 40 is read by the
    dilation-1 tap of frame 39, then by the taps of 37 (d=2), then of 33 and 35 (d=4): exactly those
    frames change, which is why the default masks."""
    x = torch.randn(2, 8, 60, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 60)
    mask[0, 40:] = 0
    for mask_input in (True, False):
        torch.manual_seed(0)
        model = PDAN(num_stages=1, num_layers=3, num_channels=16, input_channels=8, num_classes=4,
                     mask_input=mask_input).eval()
        with torch.no_grad():
            batched = model(x, mask)[:, 0, :, :40]
            alone = model(x[:1, :, :40], torch.ones(1, 40))[:, 0]
        diff = (batched - alone).abs().amax(dim=(0, 1))       # per frame
        if mask_input:
            torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
        else:
            assert torch.nonzero(diff > 1e-3).flatten().tolist() == [33, 35, 37, 39]
            assert diff.min() < 1e-6                          # the other frames do not move


# --------------------------------------------------------------------------------------------
# Data

def test_4d_and_2d_files_give_identical_items(tmp_path):
    a4 = write_dataset(tmp_path / "a", SMALL, layout="4d", seed=3)
    a2 = write_dataset(tmp_path / "b", SMALL, layout="2d", seed=3)
    ds4 = build_datasets(make_cfg(tmp_path / "a"))
    ds2 = build_datasets(make_cfg(tmp_path / "b"))
    assert len(ds4["train"]) == 2 and len(ds4["val"]) == 1 and len(ds4["test"]) == 1
    for split in ("train", "test"):
        for i in range(len(ds4[split])):
            x, y = ds4[split][i], ds2[split][i]
            assert x["video_id"] == y["video_id"]
            for key in ("features", "labels", "loc25_index", "loc25_labels"):
                assert torch.equal(x[key], y[key]), key
            assert x["features"].dtype == torch.float32
            assert torch.equal(x["features"], torch.from_numpy(a4[x["video_id"]]))
    assert np.array_equal(a4["v_train"], a2["v_train"])


def item_of(ds, vid):
    return next(ds[i] for i in range(len(ds)) if ds[i]["video_id"] == vid)


def test_pdan_frame_label_rule(tmp_path):
    write_dataset(tmp_path, SMALL)
    item = item_of(build_datasets(make_cfg(tmp_path))["train"], "v_train")
    # T=10, duration 5 s -> fps 2, frame f at f/2 s; strict start < t < end.
    expected = np.zeros((10, 3), np.float32)
    expected[[3, 4], 0] = 1        # (1.0, 2.5): 1.5, 2.0 (1.0 and 2.5 excluded)
    expected[7, 1] = 1             # (3.2, 3.9): 3.5
    expected[1:10, 2] = 1          # (0.0, 5.0): frame 0 (t=0) excluded
    assert item["labels"].dtype == torch.float32
    np.testing.assert_array_equal(item["labels"].numpy(), expected)

    item2 = item_of(build_datasets(make_cfg(tmp_path))["train"], "v_train2")
    # T=7, duration 3.5 -> fps 2; (0.5, 2.0): 1.0, 1.5 -> frames 2, 3
    assert item2["labels"][:, 1].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert item2["labels"][:, [0, 2]].sum() == 0


def test_loc25_rule(tmp_path):
    write_dataset(tmp_path, SMALL)
    item = item_of(build_datasets(make_cfg(tmp_path))["train"], "v_train")
    assert item["loc25_index"].dtype == torch.long
    assert item["loc25_index"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8, 8, 8, 9, 9]
    # t_j = j * 5 / 25 = 0.2 j, inclusive start <= t_j <= end
    expected = np.zeros((25, 3), np.float32)
    expected[5:13, 0] = 1          # [1.0, 2.5]: j = 5 (t = 1.0, included) .. 12
    expected[16:20, 1] = 1         # [3.2, 3.9]: j = 16 (t = 3.2, included) .. 19
    expected[:, 2] = 1             # [0.0, 5.0]: every point, j = 0 included
    np.testing.assert_array_equal(item["loc25_labels"].numpy(), expected)


def test_loc25_time_uses_the_official_order_of_operations():
    """Charades_v1_localize computes t_j = (j / 25) * duration. For duration 32.95, j = 15 that is
    exactly 19.77, while j * duration / 25 rounds to 19.770000000000003: an action ending at 19.77
    covers point 15 only in the official order."""
    duration, j, end = 32.95, 15, 19.77
    assert (j / 25) * duration == end and j * duration / 25 > end      # the two orders disagree here
    index, labels = loc25_points(99, duration, [[0, 10.0, end]], 1)
    assert labels[j, 0] == 1.0
    # t_j = 1.318 j: 10.0 <= t_j <= 19.77 for j = 8 .. 15
    assert np.flatnonzero(labels[:, 0]).tolist() == list(range(8, 16))
    assert index.tolist() == [(i * 99) // 25 for i in range(25)]


def test_collate_pads_and_masks(tmp_path):
    write_dataset(tmp_path, SMALL)
    ds = build_datasets(make_cfg(tmp_path))["train"]
    items = [item_of(ds, "v_train2"), item_of(ds, "v_train")]   # T = 7, 10
    batch = collate(items)
    assert set(batch) == {"features", "mask", "labels", "loc25_index", "loc25_labels", "video_id"}
    assert batch["features"].shape == (2, 8, 10)
    assert batch["mask"].shape == (2, 10) and batch["mask"].dtype == torch.float32
    assert batch["labels"].shape == (2, 10, 3)
    assert batch["loc25_index"].shape == (2, 25) and batch["loc25_labels"].shape == (2, 25, 3)
    assert batch["video_id"] == ["v_train2", "v_train"]
    assert batch["mask"].tolist() == [[1] * 7 + [0] * 3, [1] * 10]
    assert torch.equal(batch["features"][0, :, :7], items[0]["features"].T)
    assert torch.equal(batch["features"][0, :, 7:], torch.zeros(8, 3))
    assert torch.equal(batch["features"][1], items[1]["features"].T)
    assert torch.equal(batch["labels"][0, :7], items[0]["labels"])
    assert batch["labels"][0, 7:].sum() == 0
    assert torch.equal(batch["loc25_labels"][1], items[1]["loc25_labels"])


def test_input_channels_auto(tmp_path):
    assert resolved_input_channels(make_cfg(tmp_path, input_channels=-1)) == 1024
    assert resolved_input_channels(make_cfg(tmp_path, input_channels=-1, mode="flow")) == 1024
    assert resolved_input_channels(make_cfg(tmp_path, input_channels=-1, mode="skeleton")) == 256
    assert resolved_input_channels(make_cfg(tmp_path, input_channels=300)) == 300
    assert PDANData().batch_size == 8


def expect_error(cfg, *fragments):
    with pytest.raises(DataError) as info:
        build_datasets(cfg)
    assert isinstance(info.value, UserError)               # reported by main() as one line, exit 2
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))
    return str(info.value)


def test_error_missing_root(tmp_path):
    expect_error(make_cfg(tmp_path / "nope"), "data.root", str(tmp_path / "nope"))
    expect_error(make_cfg(""), "data.root is empty")


def test_error_missing_annotations(tmp_path):
    os.makedirs(tmp_path / "r")
    expect_error(make_cfg(tmp_path / "r"), "annotation file not found", str(tmp_path / "r" / "charades.json"))
    write_dataset(tmp_path / "r2", SMALL)
    expect_error(make_cfg(tmp_path / "r2", annotations=str(tmp_path / "other.json")),
                 "annotation file not found", str(tmp_path / "other.json"))


def test_error_missing_npy(tmp_path):
    write_dataset(tmp_path, SMALL)
    os.remove(tmp_path / "v_train.npy")
    os.remove(tmp_path / "v_train2.npy")
    expect_error(make_cfg(tmp_path), "2 of 2 'training' videos", "'v_train'", "'v_train2'",
                 str(tmp_path / "v_train.npy"))
    cfg = make_cfg(tmp_path)
    cfg.data.skip_missing = True
    with pytest.warns(UserWarning):
        expect_error(cfg, "split 'training' is empty")


def test_error_feature_dim(tmp_path):
    write_dataset(tmp_path, SMALL, dim=8)
    msg = expect_error(make_cfg(tmp_path, input_channels=1024), "has dimension 8", "model.input_channels=1024")
    assert ".npy" in msg and str(tmp_path) in msg
    expect_error(make_cfg(tmp_path, input_channels=-1, mode="skeleton"), "model.input_channels=256")


def test_error_class_index(tmp_path):
    write_dataset(tmp_path, SMALL)
    expect_error(make_cfg(tmp_path, num_classes=2), "video 'v_train'", "'actions'[1]",
                 "class index 2 >= model.num_classes=2")


def test_error_empty_split(tmp_path):
    videos = {k: v for k, v in SMALL.items() if v[1] == "training"}
    write_dataset(tmp_path, videos)
    expect_error(make_cfg(tmp_path), "split 'testing' is empty", "charades.json", "subsets found: training")


def test_error_wrong_rank(tmp_path):
    write_dataset(tmp_path, SMALL)
    np.save(tmp_path / "v_test.npy", np.zeros((12, 2, 8), np.float32))
    expect_error(make_cfg(tmp_path), str(tmp_path / "v_test.npy"), "[12, 2, 8]", "rank 3")


def test_error_bad_entry(tmp_path):
    videos = dict(SMALL)
    videos["v_bad"] = (5, "testing", -1.0, [])
    write_dataset(tmp_path, videos)
    expect_error(make_cfg(tmp_path), "video 'v_bad'", "'duration'")


def test_error_missing_subset(tmp_path):
    """An entry without "subset" used to be dropped without a word."""
    write_dataset(tmp_path, SMALL)
    ann = tmp_path / "charades.json"
    db = json.loads(ann.read_text())
    del db["v_train2"]["subset"]
    ann.write_text(json.dumps(db))
    msg = expect_error(make_cfg(tmp_path))
    assert msg == f"{ann}: video 'v_train2': missing key 'subset' (expected \"training\" or \"testing\")"
    db["v_train2"]["subset"] = None
    ann.write_text(json.dumps(db))
    msg = expect_error(make_cfg(tmp_path))
    assert msg == f"{ann}: video 'v_train2' key 'subset': expected \"training\" or \"testing\", got None"
    db["v_train2"] = [7, "training"]
    ann.write_text(json.dumps(db))
    msg = expect_error(make_cfg(tmp_path))
    assert msg == f"{ann}: video 'v_train2': expected a mapping with keys subset, duration, actions, got list"


def test_error_action_ends_before_start(tmp_path):
    videos = dict(SMALL)
    videos["v_train"] = (10, "training", 5.0, [[0, 1.0, 2.5], [1, 3.9, 3.2]])
    write_dataset(tmp_path, videos)
    msg = expect_error(make_cfg(tmp_path))
    assert msg == (f"{tmp_path / 'charades.json'}: video 'v_train' key 'actions'[1] = [1, 3.9, 3.2]: ends at 3.2 s "
                   f"before it starts at 3.9 s (expected [class, start_s, end_s] with start_s <= end_s)")
    videos["v_train"] = (10, "training", 5.0, [[0, 2.5, 2.5]])   # zero length is allowed
    write_dataset(tmp_path, videos)
    assert len(build_datasets(make_cfg(tmp_path))["train"]) == 2


def test_unused_subsets_are_skipped_with_one_warning(tmp_path):
    """Subsets other than training/testing are legitimately unused: one summary line, no error
    (their entries need no feature file and are not checked)."""
    write_dataset(tmp_path, SMALL)
    ann = tmp_path / "charades.json"
    db = json.loads(ann.read_text())
    db["v_val1"] = {"subset": "validation", "duration": 3.0, "actions": []}
    db["v_val2"] = {"subset": "validation", "duration": -1, "actions": "not checked"}
    db["v_x"] = {"subset": "ignored"}
    ann.write_text(json.dumps(db))
    with pytest.warns(UserWarning) as record:
        ds = build_datasets(make_cfg(tmp_path))
    assert [str(w.message) for w in record] == [
        f"{ann}: skipping 3 videos whose subset is neither 'training' nor 'testing' (not used by PDAN): "
        f"2 'validation', 1 'ignored'"]
    assert sorted(ds["train"].video_ids) == ["v_train", "v_train2"] and ds["test"].video_ids == ["v_test"]
    assert check_subsets(json.loads(ann.read_text()), str(ann)) == {"validation": 2, "ignored": 1}


def test_no_warning_when_every_subset_is_used(tmp_path):
    import warnings
    write_dataset(tmp_path, SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_datasets(make_cfg(tmp_path))


# --------------------------------------------------------------------------------------------
# Length buckets (static shapes for trainer.cuda_graphs / trainer.compile)

def fake_items(lengths, dim=8, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, t in enumerate(lengths):
        labels = (torch.rand(t, num_classes, generator=g) < 0.3).float()
        labels[i % t, i % num_classes] = 1.0        # every class has a positive frame somewhere
        items.append({"features": torch.randn(t, dim, generator=g), "labels": labels,
                      "loc25_index": (torch.arange(25) * t) // 25,
                      "loc25_labels": (torch.rand(25, num_classes, generator=g) < 0.4).float(),
                      "video_id": f"v{i}"})
    return items


def test_bucket_choice(tmp_path):
    buckets = (64, 128, 256)
    assert [padded_length(t, buckets) for t in (1, 10, 64, 65, 128, 129, 256, 257, 300, 512, 513)] == \
        [64, 64, 64, 128, 128, 256, 256, 512, 512, 512, 768]        # past 256: multiples of 256
    # through the recipe's collate factory, unsorted input is sorted
    fn = recipe.collate(make_cfg(tmp_path, length_buckets=[256, 64, 128]))
    assert [fn(fake_items([t]))["mask"].shape[1] for t in (10, 64, 65, 300)] == [64, 64, 128, 512]
    batch = fn(fake_items([10, 65, 3]))                              # the longest video picks the bucket
    assert batch["features"].shape == (3, 8, 128) and batch["labels"].shape == (3, 128, 3)
    assert batch["mask"].sum(1).tolist() == [10, 65, 3]
    assert batch["features"][:, :, 65:].abs().sum() == 0 and batch["labels"][:, 65:].sum() == 0
    # the collate must reach DataLoader workers: picklable, and the same after a round trip
    again = pickle.loads(pickle.dumps(fn))
    for key in ("features", "mask", "labels", "loc25_index", "loc25_labels"):
        assert torch.equal(again(fake_items([10, 65, 3]))[key], batch[key])


def test_no_buckets_pads_to_batch_max_unless_cuda_graphs(tmp_path):
    plain = recipe.collate(make_cfg(tmp_path))
    assert plain is collate
    assert plain(fake_items([7, 10]))["mask"].shape == (2, 10)
    auto = recipe.collate(make_cfg(tmp_path, cuda_graphs=True))          # powers of two from 64
    assert [auto(fake_items([t]))["mask"].shape[1] for t in (1, 10, 64, 65, 300, 513, 1000)] == \
        [64, 64, 64, 128, 512, 1024, 1024]
    assert pickle.loads(pickle.dumps(auto))(fake_items([70]))["mask"].shape == (1, 128)
    explicit = recipe.collate(make_cfg(tmp_path, cuda_graphs=True, length_buckets=[100]))   # explicit wins
    assert [explicit(fake_items([t]))["mask"].shape[1] for t in (10, 150)] == [100, 200]


@pytest.mark.parametrize("value, bad", [([64, 0], "0"), ([-8], "-8"), ([64, 128, 64], "64"), ([True], "True"),
                                        ([64.5], "64.5")])
def test_length_buckets_config_error(tmp_path, value, bad):
    cfg = make_cfg(tmp_path, length_buckets=value)
    with pytest.raises(ConfigError, match="data.length_buckets") as e:
        recipe.collate(cfg)
    assert bad in str(e.value)
    with pytest.raises(ConfigError, match="data.length_buckets"):   # before any file is read
        build_datasets(cfg)


def test_length_buckets_from_the_command_line():
    cfg = Config(model=PDANConfig(), data=PDANData(), recipe="pdan")
    set_value(cfg, "data.length_buckets", "128,64")
    assert cfg.data.length_buckets == [128, 64]
    assert recipe.collate(cfg)(fake_items([70]))["mask"].shape == (1, 128)
    set_value(cfg, "data.length_buckets", "[32, 96]")
    assert recipe.collate(cfg)(fake_items([70]))["mask"].shape == (1, 96)
    with pytest.raises(ConfigError, match="data.length_buckets.*abc"):
        set_value(cfg, "data.length_buckets", "64,abc")


def test_bucket_padding_changes_nothing(tmp_path):
    """The same videos padded to the batch's longest (37) and to a bucket (64 / 128): the logits of
    valid frames, the loss (value and weight) and every FrameMAP value are the same."""
    torch.manual_seed(0)
    k = 4
    model = PDAN(num_stages=2, num_layers=6, num_channels=16, input_channels=8, num_classes=k).eval()
    # dilations up to 32 > 37 - 23: taps of every video reach into the padding
    items = fake_items([23, 37, 5], num_classes=k, seed=1)
    tight = collate(items)
    assert tight["mask"].shape == (3, 37)
    results = []
    for buckets in ((), (64,), (16, 128)):
        batch = collate(items, buckets=buckets) if buckets else tight
        with torch.no_grad():
            out = model(batch["features"], batch["mask"])
        metric = FrameMAP()
        metric.update(out, batch)
        results.append((batch["mask"].shape[1], out, loss_last_stage(out, batch), loss_all_stages(out, batch),
                        metric.compute()))
    (t0, out0, last0, all0, map0) = results[0]
    assert [r[0] for r in results] == [37, 64, 128]
    for t, out, last, both, maps in results[1:]:
        torch.testing.assert_close(out[..., :37], out0, rtol=1e-5, atol=1e-6)   # valid frames (+ shared padding)
        assert torch.equal(out[..., 37:], torch.zeros_like(out[..., 37:]))     # the extra padding is exactly 0
        for got, want in ((last, last0), (both, all0)):
            assert torch.equal(got["weight"], want["weight"]) and got["weight"].item() == 65
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-7)
        assert maps.keys() == map0.keys()
        for name in maps:
            assert maps[name] == pytest.approx(map0[name], abs=1e-9), name
    for name, v in map0.items():
        assert 0 < v <= 1, name


# --------------------------------------------------------------------------------------------
# Loss

def test_loss_masks_padding_and_selects_stages(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 6)                 # [S, B, K, T]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    labels = (torch.rand(2, 6, 3) > 0.5).float() * mask[..., None]
    batch = {"mask": mask, "labels": labels}

    def manual(stage):
        total = 0.0
        for b in range(2):
            for t in range(int(mask[b].sum())):
                for k in range(3):
                    z, y = logits[stage, b, k, t].item(), labels[b, t, k].item()
                    total += -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
        return total / 10

    out = loss_last_stage(logits, batch)
    assert out["weight"].item() == 10
    assert abs(out["loss"].item() - manual(1)) < 1e-5
    assert build_loss(make_cfg(tmp_path)) is loss_last_stage
    both = loss_all_stages(logits, batch)
    assert abs(both["loss"].item() - (manual(0) + manual(1))) < 1e-5
    assert build_loss(make_cfg(tmp_path, loss_all=True)) is loss_all_stages
    changed = logits.clone()
    changed[:, 0, :, 4:] = 50.0                      # padded frames do not count
    assert torch.equal(loss_last_stage(changed, batch)["loss"], out["loss"])


def test_recipe_wiring(tmp_path):
    assert recipe.name == "pdan"
    assert recipe.defaults["trainer.monitor"] == "val/map"
    cfg = make_cfg(tmp_path, num_classes=4, input_channels=16)
    cfg.model.num_layers, cfg.model.num_channels, cfg.model.num_stages = 2, 8, 2
    model = recipe.build_model(cfg)
    batch = collate([{"features": torch.randn(5, 16), "labels": torch.zeros(5, 4),
                      "loc25_index": torch.zeros(25, dtype=torch.long), "loc25_labels": torch.zeros(25, 4),
                      "video_id": "a"}])
    out = recipe.forward(model, batch)
    assert out.shape == (2, 1, 4, 5)
    assert set(recipe.loss(out, batch)) == {"loss", "weight"}


# --------------------------------------------------------------------------------------------
# FrameMAP

def brute_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(np.int64)
    if hits.sum() == 0:
        return float("nan")
    precisions = [hits[: i + 1].sum() / (i + 1) for i in range(len(hits)) if hits[i]]
    return float(np.mean(precisions))


def test_average_precision_hand_value():
    ap = average_precision(torch.tensor([[0.9], [0.8], [0.7], [0.6]]), torch.tensor([[1], [0], [1], [0]]))
    assert abs(ap.item() - (1 + 2 / 3) / 2) < 1e-12


def random_batches(seed, num_classes=6):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ([9, 14, 5], [11, 3]):
        b, t = len(lengths), max(lengths)
        mask = torch.zeros(b, t)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        labels = (torch.rand(b, t, num_classes, generator=g) < 0.3).float() * mask[..., None]
        labels[..., 4] = 0                           # class 4 never positive
        logits = torch.randn(2, b, num_classes, t, generator=g)
        logits[-1] += 2.0 * labels.transpose(1, 2)   # informative but imperfect scores
        logits[-1] += 100.0 * (1 - mask[:, None, :])  # padded frames must not count
        idx = torch.stack([(torch.arange(25) * n) // 25 for n in lengths])
        lab25 = (torch.rand(b, 25, num_classes, generator=g) < 0.4).float()
        lab25[..., 4] = 0
        batches.append((logits, {"mask": mask, "labels": labels, "loc25_index": idx, "loc25_labels": lab25}))
    return batches


def test_frame_map_matches_bruteforce():
    batches = random_batches(0)
    metric = FrameMAP()
    for logits, batch in batches:
        metric.update(logits, batch)
    result = metric.compute()

    scores, labels, s25, l25 = [], [], [], []
    for logits, batch in batches:
        p = torch.sigmoid(logits[-1]).numpy()        # [B, K, T]
        for b in range(p.shape[0]):
            n = int(batch["mask"][b].sum())
            scores.append(p[b, :, :n].T)
            labels.append(batch["labels"][b, :n].numpy())
            s25.append(p[b][:, batch["loc25_index"][b].numpy()].T)
            l25.append(batch["loc25_labels"][b].numpy())
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    s25, l25 = np.concatenate(s25), np.concatenate(l25)
    assert scores.shape == (42, 6) and s25.shape == (125, 6)
    aps = [brute_ap(scores[:, k], labels[:, k]) for k in range(6)]
    aps25 = [brute_ap(s25[:, k], l25[:, k]) for k in range(6)]
    assert np.isnan(aps[4]) and np.isnan(aps25[4])
    expected = np.mean([a for a in aps if not np.isnan(a)])
    assert result["map"] == pytest.approx(expected, abs=1e-9)
    assert result["map_nonzero"] == pytest.approx(expected, abs=1e-9)   # all APs > 0 here
    assert result["map_loc25"] == pytest.approx(np.mean([a for a in aps25 if not np.isnan(a)]), abs=1e-9)
    assert 0.3 < result["map"] < 0.99
    # the first (non-last) stage is ignored: changing it changes nothing
    metric2 = FrameMAP()
    for logits, batch in batches:
        other = logits.clone()
        other[0] = -other[0]
        metric2.update(other, batch)
    assert metric2.compute() == result


def test_frame_map_classes_without_positives_and_empty():
    metric = FrameMAP()
    mask = torch.ones(1, 4)
    labels = torch.tensor([[[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]]], dtype=torch.float32)
    # class 0: perfect (AP 1); class 1: no positive frame (left out); class 2: its positive ranks last
    logits = torch.tensor([[[[3.0, 2.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0]]]])
    index = (torch.arange(25) * 4) // 25             # frame 0 x7, frame 1 x6, frame 2 x6, frame 3 x6
    lab25 = torch.zeros(1, 25, 3)
    lab25[0, :7, 0] = 1                              # the 7 points on frame 0 (top score of class 0)
    lab25[0, 19, 2] = 1                              # one point on frame 3 (lowest score of class 2)
    metric.update(logits, {"mask": mask, "labels": labels, "loc25_index": index[None],
                           "loc25_labels": lab25})
    r = metric.compute()
    assert r["map"] == pytest.approx((1.0 + 1 / 4) / 2)
    assert r["map_nonzero"] == pytest.approx((1.0 + 1 / 4) / 2)
    # class 2 at 25 points: its positive (j=19) is the first of 6 tied lowest scores -> rank 20
    assert r["map_loc25"] == pytest.approx((1.0 + 1 / 20) / 2)

    empty = FrameMAP().compute()
    assert set(empty) == {"map", "map_nonzero", "map_loc25"} and all(np.isnan(v) for v in empty.values())
    zero = FrameMAP()
    zero.update(torch.zeros(1, 0, 3, 0), {"mask": torch.zeros(0, 0), "labels": torch.zeros(0, 0, 3),
                                        "loc25_index": torch.zeros(0, 25, dtype=torch.long),
                                        "loc25_labels": torch.zeros(0, 25, 3)})
    assert all(np.isnan(v) for v in zero.compute().values())
    no_pos = FrameMAP()
    no_pos.update(logits, {"mask": mask, "labels": torch.zeros(1, 4, 3), "loc25_index": index[None],
                           "loc25_labels": torch.zeros(1, 25, 3)})
    assert all(np.isnan(v) for v in no_pos.compute().values())


def test_average_precision_vectorized_matches_bruteforce_with_chunks(monkeypatch):
    import recipes.pdan.metrics as metrics_module
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(300, 7, generator=g).round(decimals=1)   # many ties
    labels = (torch.rand(300, 7, generator=g) < 0.2).to(torch.uint8)
    labels[:, 3] = 0
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 600)  # 2 classes per chunk
    ap = average_precision(scores, labels)
    for k in range(7):
        want = brute_ap(scores[:, k].numpy(), labels[:, k].numpy())
        if np.isnan(want):
            assert np.isnan(ap[k].item())
        else:
            assert ap[k].item() == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Synthetic data

def test_synthetic_writer_passes_loader(tmp_path):
    db = write_synthetic(str(tmp_path), n_train=6, n_test=5, num_classes=4, dim=32, seed=1)
    assert len(db) == 11
    for vid, entry in db.items():
        arr = np.load(tmp_path / f"{vid}.npy")
        assert arr.dtype == np.float32 and arr.ndim == 4 and arr.shape[1:] == (1, 1, 32)
        assert 32 <= arr.shape[0] <= 96
        assert abs(entry["duration"] - arr.shape[0] / 3) < 0.06 * arr.shape[0] / 3 + 0.01
    ds = build_datasets(make_cfg(tmp_path, num_classes=4, input_channels=32))
    assert len(ds["train"]) == 6 and len(ds["test"]) == 5
    positives = sum(ds["test"][i]["labels"].sum(0) for i in range(5))
    assert (positives > 0).all()
    # the prototype sits only in the central half of each labelled run: edges look like background
    checked = 0
    for i in range(6):
        item = ds["train"][i]
        lab = item["labels"].numpy()
        x = item["features"].numpy().astype(np.float64)
        for c in np.flatnonzero(lab.sum(0)):
            frames = np.flatnonzero(lab[:, c])
            q = frames.size // 4
            center, edge = frames[q:frames.size - q], np.concatenate([frames[:q], frames[frames.size - q:]])
            edge = edge[lab[edge].sum(1) == 1]             # edge frames with no other action
            background = np.flatnonzero(lab.sum(1) == 0)
            if edge.size < 2 or background.size < 2:
                continue
            u = x[center].mean(0)
            u /= np.linalg.norm(u)
            assert (x[center] @ u).mean() > 5.0          # amplitude 6 along the prototype
            assert abs((x[edge] @ u).mean()) < 2.0       # nothing there
            assert abs((x[background] @ u).mean()) < 1.5
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_synthetic_entries_are_valid(tmp_path, seed):
    """The writer emits only entries the loader accepts: a used subset, 0 <= start < end <= duration."""
    db = write_synthetic(str(tmp_path), n_train=20, n_test=12, num_classes=6, dim=4, seed=seed,
                         t_min=16, t_max=40, max_actions=4)
    assert check_subsets(db, "synthetic") == {}
    for vid, entry in db.items():
        assert entry["subset"] in ("training", "testing"), vid
        for c, start, end in entry["actions"]:
            assert 0 <= c < 6 and 0.0 <= start < end <= entry["duration"], (vid, c, start, end)


def test_synthetic_every_class_in_testing(tmp_path):
    db = write_synthetic(str(tmp_path), n_train=3, n_test=12, num_classes=12, dim=4, max_actions=1, seed=2)
    assert sorted(e["actions"][0][0] for e in db.values() if e["subset"] == "testing") == list(range(12))
    with pytest.raises(ValueError, match="n_test"):
        write_synthetic(str(tmp_path / "x"), n_train=3, n_test=5, num_classes=6, dim=4)


def test_recipe_make_synthetic_demo_size(tmp_path):
    cfg = make_cfg(tmp_path, num_classes=3, input_channels=-1, mode="skeleton")
    db = recipe.make_synthetic(str(tmp_path), cfg)
    first = next(iter(db))
    assert np.load(tmp_path / f"{first}.npy").shape[-1] == 256
    assert {e["subset"] for e in db.values()} == {"training", "testing"}


def test_model_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = PDAN(num_stages=2, num_layers=3, num_channels=16, input_channels=12, num_classes=5)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    mask = torch.ones(2, 20)
    mask[1, 13:] = 0
    x = torch.randn(2, 12, 20)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, mask), model(x, mask))
        assert compiled(torch.randn(3, 12, 31), torch.ones(3, 31)).shape == (2, 3, 5, 31)


@pytest.mark.parametrize("buckets, graphs", [((), False), ((16, 64), False), ((), True)])
def test_device_resident_batches_equal_collated_batches(tmp_path, buckets, graphs):
    """DeviceLoader (split padded to its longest video, batches trimmed by trim_batch) gives the
    tensors the recipe's collate gives the same rows, shapes included."""
    from trainlib.data import DeviceLoader, ShardSampler, build_loader

    write_synthetic(str(tmp_path), n_train=24, n_test=10, num_classes=3, dim=8, seed=1)
    cfg = make_cfg(tmp_path, length_buckets=buckets, cuda_graphs=graphs)
    train = build_datasets(cfg)["train"]
    fn = recipe.collate(cfg)
    s1, s2 = ShardSampler(len(train), seed=3), ShardSampler(len(train), seed=3)
    files = list(build_loader(train, batch_size=5, sampler=s1, collate_fn=fn, num_workers=0, pin_memory=False,
                              drop_last=False, seeded=True))
    resident = list(DeviceLoader(train, batch_size=5, sampler=s2, collate_fn=fn, device=torch.device("cpu"),
                                 drop_last=False))
    assert len(files) == len(resident) == 5
    stored = padded_length(max(train.num_frames), buckets, 64 if graphs else 0)  # the split's padding
    if not buckets and not graphs:  # each batch padded to its own longest: shorter than the split's
        assert any(b["features"].shape[-1] < stored for b in resident)
    for a, b in zip(files, resident):
        assert a["video_id"] == b["video_id"]
        for key in ("features", "mask", "labels", "loc25_index", "loc25_labels"):
            assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def test_shape_keys_are_the_collated_lengths_and_grouped_batches_share_one(tmp_path):
    """PDAN's shape_keys() is each video's padded length under the collate's rule; with the
    sampler grouping by it, every batch collates to its group's length on both ranks."""
    from trainlib.data import ShardSampler, build_loader

    write_synthetic(str(tmp_path), n_train=40, n_test=10, num_classes=3, dim=8, seed=1)
    cfg = make_cfg(tmp_path, length_buckets=[48, 96, 160])
    train = build_datasets(cfg)["train"]
    keys = train.shape_keys()
    assert keys == [padded_length(t, (48, 96, 160)) for t in train.num_frames] and len(set(keys)) > 1
    fn = recipe.collate(cfg)
    assert all(fn([train[i]])["mask"].shape[1] == keys[i] for i in range(len(train)))
    per_rank = []
    for rank in (0, 1):
        sampler = ShardSampler(len(train), rank, 2, seed=0, groups=keys, group_size=4 * 2)
        per_rank.append([(b["features"].shape[-1], [keys[train.video_ids.index(v)] for v in b["video_id"]])
                         for b in build_loader(train, batch_size=4, sampler=sampler, collate_fn=fn, num_workers=0,
                                               pin_memory=False, drop_last=False, seeded=True)])
    whole = sum(keys.count(k) // 8 for k in set(keys))  # steps drawn from one group
    for (t0, k0), (t1, k1) in list(zip(*per_rank))[:whole]:
        assert t0 == t1 and set(k0) == set(k1) == {t0}
