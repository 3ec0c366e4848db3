"""Class-balanced distributed sampling (issue #12): data.use_class_balanced_sampler and
data.progressive_class_balancing over a dataset's class_labels().

- the balanced draw makes every class equally frequent on a 90/9/1 % label set; the progressive
  one is natural at epoch 0 and uniform at the last epoch, and follows the mixing rule between;
- one global draw per epoch: the same sequence for world 1, 2 and 3 (up to padding), disjoint
  positions per rank, a new draw each epoch, skip(n) continuing exactly where an uninterrupted
  epoch was;
- the Trainer (one process) sees the balanced frequencies; bad input is one clear ConfigError;
- PDAN's and SegFormer's datasets give one int label per sample.
"""
from __future__ import annotations

import collections
import math
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Subset

from tests.toy import ToyData, make_trainer
from trainlib.balanced import ClassBalancedSampler, mixing
from trainlib.config import ConfigError
from trainlib.data import SeededBatchSampler, ShardSampler, class_labels

LABELS = [0] * 900 + [1] * 90 + [2] * 10          # 90 / 9 / 1 %
NATURAL = {0: 0.9, 1: 0.09, 2: 0.01}


def frequencies(labels, indices):
    counts = collections.Counter(labels[i] for i in indices)
    return {c: counts[c] / len(indices) for c in sorted(set(labels))}


def epoch_draws(sampler, epochs):
    out = []
    for e in epochs:
        sampler.set_epoch(e)
        out += list(sampler)
    return out


def interleave(shares):
    """The global sequence the ranks' shares were cut from (rank r holds positions r, r + world, ...)."""
    world = len(shares)
    out = [None] * sum(map(len, shares))
    for r, share in enumerate(shares):
        out[r::world] = share
    return out


# ------------------------------------------------------------------------------------------------
# The rule

def test_balanced_draw_makes_every_class_equally_frequent():
    s = ClassBalancedSampler(LABELS, seed=3)
    assert len(s) == len(LABELS)
    drawn = epoch_draws(s, range(4))                               # 4000 draws
    for c, f in frequencies(LABELS, drawn).items():
        assert abs(f - 1 / 3) < 0.04, (c, f)                       # natural would be 0.9 / 0.09 / 0.01
    assert set(range(990, 1000)) <= set(drawn)                     # every sample of the rare class comes up
    plain = ShardSampler(len(LABELS), seed=3)                      # the plain shuffle keeps the imbalance
    assert frequencies(LABELS, list(plain))[0] == 0.9


def test_progressive_moves_from_natural_to_uniform():
    epochs = 6
    s = ClassBalancedSampler(LABELS, seed=1, progressive=True, epochs=epochs)
    nat = {c: f for c, f in frequencies(LABELS, epoch_draws(s, [0])).items()}
    for c in NATURAL:
        assert abs(nat[c] - NATURAL[c]) < 0.03, nat
    last = frequencies(LABELS, epoch_draws(s, [epochs - 1]))
    assert all(abs(f - 1 / 3) < 0.06 for f in last.values()), last
    # the rule between: p_c(e) = (1 - a) natural_c + a / C, a = e / (epochs - 1)
    a = 2 / (epochs - 1)
    assert s.probabilities(2) == pytest.approx({c: (1 - a) * NATURAL[c] + a / 3 for c in NATURAL})
    mid = frequencies(LABELS, epoch_draws(s, [2]))
    assert abs(mid[0] - ((1 - a) * 0.9 + a / 3)) < 0.05, mid
    assert mixing(0, 1, True) == 1.0 and mixing(9, 5, True) == 1.0 and mixing(0, 5, False) == 1.0
    assert ClassBalancedSampler(LABELS, progressive=True, epochs=1).probabilities(0) == pytest.approx(
        {0: 1 / 3, 1: 1 / 3, 2: 1 / 3})


# ------------------------------------------------------------------------------------------------
# Distributed: one global draw per epoch

@pytest.mark.parametrize("progressive", [False, True])
def test_the_global_order_is_the_same_for_any_world_size(progressive):
    n = 1001                                                       # odd: world 2 pads one sample
    labels = LABELS + [1]
    for epoch in (0, 3):
        def shares(world, drop_last=False):
            out = []
            for r in range(world):
                s = ClassBalancedSampler(labels, r, world, seed=7, drop_last=drop_last, progressive=progressive,
                                         epochs=5)
                s.set_epoch(epoch)
                out.append(list(s))
            return out

        one = shares(1)[0]
        assert len(one) == n
        for world in (2, 3):
            parts = shares(world)
            assert len({len(p) for p in parts}) == 1 and len(parts[0]) == math.ceil(n / world)  # equal steps
            glob = interleave(parts)
            assert glob[:n] == one                                 # the same sequence ...
            assert glob[n:] == one[: len(glob) - n]                # ... padded by wrapping around
            cut = interleave(shares(world, drop_last=True))
            assert cut == one[: (n // world) * world]


def test_rank_shares_are_disjoint_positions_of_one_draw():
    world, n = 4, 500
    labels = LABELS[::2]
    samplers = [ClassBalancedSampler(labels, r, world, seed=2) for r in range(world)]
    shares = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [n // world] * world
    glob = samplers[0].draw(0)
    for r, share in enumerate(shares):
        assert share == glob[r::world]                             # positions r, r + world, ...: a partition
    assert sorted(i for share in shares for i in share) == sorted(glob)
    assert shares[0] != shares[1]


def test_a_new_draw_every_epoch_and_the_same_draw_again():
    s = ClassBalancedSampler(LABELS, 0, 2, seed=5)
    draws = [epoch_draws(s, [e]) for e in (0, 1, 2)]
    assert draws[0] != draws[1] != draws[2] != draws[0]
    assert epoch_draws(ClassBalancedSampler(LABELS, 0, 2, seed=5), [1]) == draws[1]  # a function of (seed, epoch)
    assert epoch_draws(ClassBalancedSampler(LABELS, 0, 2, seed=6), [1]) != draws[1]


def test_skip_continues_exactly_where_an_uninterrupted_epoch_was():
    labels = LABELS[:990:3] + [2] * 5
    full = ClassBalancedSampler(labels, 1, 2, seed=4, progressive=True, epochs=4)
    full.set_epoch(2)
    whole = list(full)
    resumed = ClassBalancedSampler(labels, 1, 2, seed=4, progressive=True, epochs=4)
    resumed.set_epoch(2)
    resumed.skip(7)
    assert list(resumed) == whole[7:] and len(resumed) == len(whole) - 7
    resumed.set_epoch(3)                                           # a new epoch starts from its beginning
    assert len(resumed) == len(whole)
    # the batches the loader builds: same indices and same per-batch seeds as the uninterrupted epoch
    bs = 4
    full.set_epoch(2)
    batches = [(list(b), b.key) for b in SeededBatchSampler(full, bs, drop_last=False)]
    resumed.set_epoch(2)
    resumed.skip(3 * bs)
    assert [(list(b), b.key) for b in SeededBatchSampler(resumed, bs, drop_last=False)] == batches[3:]


# ------------------------------------------------------------------------------------------------
# class_labels() through Subset / ConcatDataset, and the Trainer

class LabelledToy(ToyData):
    """ToyData with 80 % class 0, 15 % class 1, 5 % class 2 (or `labels`); `tensor`: given as a tensor."""

    def __init__(self, n=96, labels=None, tensor=False, **kw):
        super().__init__(n, **kw)
        self.labels = labels if labels is not None else [0 if i % 20 < 16 else 1 if i % 20 < 19 else 2 for i in range(n)]
        self.tensor = tensor

    def class_labels(self):
        return torch.tensor(self.labels) if self.tensor else self.labels


def test_class_labels_helper_through_subset_and_concat():
    ds = LabelledToy(20, tensor=True)
    assert class_labels(ds) == ds.labels and all(type(v) is int for v in class_labels(ds))
    assert class_labels(Subset(ds, [19, 0, 16])) == [2, 0, 1]
    assert class_labels(ConcatDataset([ds, Subset(ds, [18])])) == ds.labels + [1]
    assert class_labels(ToyData(4)) is None and class_labels(ConcatDataset([ds, ToyData(4)])) is None


def test_trainer_sees_the_balanced_frequencies(tmp_path):
    data = LabelledToy(96)
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=bal", "trainer.max_epochs=4",
                      "data.use_class_balanced_sampler=true", "trainer.save_top_k=0", "trainer.save_last=false"],
                     data)
    assert isinstance(t.train_sampler, ClassBalancedSampler)
    per_epoch = []

    from trainlib.callbacks import Callback

    class Record(Callback):
        def on_train_epoch_end(self, trainer):
            per_epoch.append(list(data.seen))
            data.seen.clear()

    t.callbacks.append(Record())
    t.fit()
    assert len(per_epoch) == 4 and all(len(e) == 96 for e in per_epoch)   # an epoch keeps its length
    assert per_epoch[0] != per_epoch[1]
    seen = [i for e in per_epoch for i in e]
    for c, f in frequencies(data.labels, seen).items():
        assert abs(f - 1 / 3) < 0.1, (c, f)                        # natural: 0.83 / 0.125 / 0.04
    log = (tmp_path / "bal" / "train.log").read_text()
    assert "data.use_class_balanced_sampler: 3 classes, natural counts {0: 80, 1: 12, 2: 4}" in log


def test_both_flags_progressive_wins_and_is_noted(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=3", "data.use_class_balanced_sampler=true",
                      "data.progressive_class_balancing=true"], LabelledToy(40))
    s = t.train_sampler
    assert s.progressive and s.epochs == 3 and s.probabilities(0) == pytest.approx({0: 0.8, 1: 0.15, 2: 0.05})
    assert any("progressive rule wins" in n and "3 classes" in n for n in t.setup_notes)


@pytest.mark.parametrize("flag, data, group, message", [
    ("use_class_balanced_sampler", ToyData(40), "auto",
     "data.use_class_balanced_sampler=true: the train dataset (ToyData) has no class_labels() method"),
    ("progressive_class_balancing", ToyData(40), "auto",
     "data.progressive_class_balancing=true: the train dataset (ToyData) has no class_labels() method"),
    ("use_class_balanced_sampler", LabelledToy(40, labels=[0] * 39), "auto",
     "data.use_class_balanced_sampler: LabelledToy.class_labels() gave 39 labels for 40 samples"),
    ("use_class_balanced_sampler", LabelledToy(40, labels=[0.0] * 40), "auto",
     "data.use_class_balanced_sampler: LabelledToy.class_labels() gave 0.0 (float) for sample 0: "
     "expected one int class label per sample"),
    ("use_class_balanced_sampler", LabelledToy(40, labels=[0] * 39 + ["cat"]), "auto",
     "gave 'cat' (str) for sample 39: expected one int class label per sample"),
    ("use_class_balanced_sampler", LabelledToy(40), "true",
     "data.use_class_balanced_sampler=true cannot be combined with data.group_by_shape=true"),
])
def test_bad_input_is_one_clear_config_error(tmp_path, flag, data, group, message):
    with pytest.raises(ConfigError) as err:
        make_trainer([f"trainer.out_dir={tmp_path}", f"data.{flag}=true", f"data.group_by_shape={group}"], data)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------
# Recipes' datasets

def test_pdan_datasets_give_one_label_per_video(tmp_path):
    from recipes.pdan import build_datasets, write_synthetic
    from recipes.pdan.data import CharadesFeatures, PDANData
    from recipes.pdan.model import PDANConfig

    write_synthetic(str(tmp_path / "syn"), n_train=6, n_test=3, num_classes=3, dim=8, t_min=16, t_max=20)
    cfg = types.SimpleNamespace(model=PDANConfig(num_classes=3, input_channels=8),
                                data=PDANData(root=str(tmp_path / "syn")), trainer=types.SimpleNamespace(cuda_graphs=False))
    train = build_datasets(cfg)["train"]
    labels = class_labels(train)
    assert len(labels) == len(train) == 6 and all(type(v) is int and 0 <= v <= 3 for v in labels)
    # the rule: the class labelling the most frames; no labelled frame -> num_classes ("no action")
    db = {"a": {"subset": "training", "duration": 5.0, "actions": [[0, 1.0, 2.5], [2, 0.0, 5.0], [1, 3.2, 3.9]]},
          "b": {"subset": "training", "duration": 5.0, "actions": []},
          "c": {"subset": "training", "duration": 5.0, "actions": [[1, 0.5, 2.0], [1, 1.5, 3.0], [0, 0.0, 1.9]]}}
    for vid in db:
        np.save(tmp_path / f"{vid}.npy", np.zeros((10, 8), np.float32))
    ds = CharadesFeatures(str(tmp_path), db, "training", num_classes=3, input_channels=8)
    assert ds.class_labels() == [2, 3, 1]     # c: class 1's two actions label 4 frames (2 each), class 0's one 3


def test_segformer_datasets_give_one_label_per_image(tmp_path):
    from recipes.segformer import SegFormerData, build_datasets, write_synthetic
    from recipes.segformer.data import SegmentationPairs, eval_transform

    write_synthetic(str(tmp_path / "syn"), n_train=4, n_valid=2, num_labels=3, min_size=32, max_size=36)
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(num_labels=3),
                                data=SegFormerData(root=str(tmp_path / "syn"), image_size=32))
    train = build_datasets(cfg)["train"]
    labels = class_labels(train)
    assert len(labels) == len(train) == 4 and all(type(v) is int and 0 <= v <= 3 for v in labels)
    # the rule: the most frequent non-ignored class (after reduce_labels); all ignored -> num_labels
    masks = {"two": np.full((8, 8), 255, np.uint8), "none": np.full((8, 8), 255, np.uint8),
             "one": np.ones((8, 8), np.uint8)}
    masks["two"][:3] = 2
    masks["two"][3:5] = 1
    pairs = []
    for name, m in masks.items():
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{name}.png")
        Image.fromarray(m).save(tmp_path / f"{name}_mask.png")
        pairs.append((str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}_mask.png")))
    t = eval_transform(types.SimpleNamespace(data=types.SimpleNamespace(image_size=32)))
    ds = SegmentationPairs(pairs, t, num_labels=3)
    assert ds.class_labels() == [2, 3, 1]
    os.remove(pairs[0][1])                                          # computed once, then cached
    assert ds.class_labels() == [2, 3, 1]
    assert SegmentationPairs(pairs[1:], t, num_labels=3, reduce_labels=True).class_labels() == [3, 0]
