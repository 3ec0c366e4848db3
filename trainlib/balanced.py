"""Class-balanced distributed sampling (`data.use_class_balanced_sampler`,
`data.progressive_class_balancing`) for a train dataset with `class_labels()`: one int per sample.

The rule. With C classes present and natural frequencies natural_c = count_c / n, epoch e draws
class c with probability

    p_c(e) = (1 - a) * natural_c + a * (1 / C)

    use_class_balanced_sampler:   a = 1 every epoch (every class equally frequent)
    progressive_class_balancing:  a = e / (max_epochs - 1), from natural at epoch 0 to balanced at
                                  the last epoch (a = 1 when max_epochs <= 1; a stays 1 after it)

and a sample of class c with probability p_c(e) / count_c (with replacement: the plain per-sample
weight 1 / count(class) when balanced). With both flags on, the progressive rule wins.

Distributed and resumable like data.ShardSampler, with the same attributes and methods (`seed`,
`rank`, `world`, `epoch`, `start`, `set_epoch`, `skip`, `indices`), so SeededBatchSampler,
DeviceLoader and the trainer use it unchanged. Each epoch is ONE global draw of n indices
(n = the dataset size) from a generator seeded by (seed, epoch) only, the same on every rank and
for any world size; it is padded by wrapping around (or cut, with drop_last) to a multiple of
the world size, exactly as ShardSampler pads its permutation, and rank r takes positions
r, r + world, ... So the ranks' shares are disjoint positions of one sequence, a new sequence is
drawn every epoch, and `skip(k)` after `set_epoch(e)` continues exactly after the first k samples
of this rank's share.

This module is a leaf (data.build_loaders imports it): the class mirrors ShardSampler's interface
instead of subclassing it, and its generator seed is data.batch_seed's hash on a stream of its
own (`_epoch_seed`).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .config import ConfigError

_NOTE_CLASSES = 30  # classes listed by name in the train.log note


def _epoch_seed(seed: int, epoch: int) -> int:
    """data.batch_seed(seed, -3, epoch, -3): the same 63-bit blake2b hash, on its own stream."""
    digest = hashlib.blake2b(f"{seed}/-3/{epoch}/-3".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def mixing(epoch: int, epochs: int, progressive: bool) -> float:
    """a in p_c = (1 - a) * natural_c + a / C: 1 when balanced; e / (epochs - 1) when progressive."""
    if not progressive or epochs <= 1:
        return 1.0
    return min(1.0, max(0.0, epoch / (epochs - 1)))


def checked_labels(labels: Sequence[Any] | None, dataset: Any, key: str) -> list[int]:
    """The train dataset's class_labels() as ints, or a ConfigError naming `key` and what was expected."""
    name = type(dataset).__name__
    if labels is None:
        raise ConfigError(f"{key}=true: the train dataset ({name}) has no class_labels() method giving one int "
                          f"class label per sample (a Subset or ConcatDataset of datasets that have one works too)")
    if len(labels) != len(dataset):
        raise ConfigError(f"{key}: {name}.class_labels() gave {len(labels)} labels for {len(dataset)} samples "
                          f"(expected one int class label per sample)")
    for i, v in enumerate(labels):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{key}: {name}.class_labels() gave {v!r} ({type(v).__name__}) for sample {i}: "
                              f"expected one int class label per sample")
    return [int(v) for v in labels]


class ClassBalancedSampler(Sampler[int]):
    """Rank `rank` of `world` takes every world-th index of one class-balanced draw per epoch
    (the module docstring has the rule); `epochs` is trainer.max_epochs (the progressive schedule)."""

    shuffle, pad, groups, group_size = True, True, None, 0  # ShardSampler's attributes, for its readers

    def __init__(self, labels: Sequence[int], rank: int = 0, world: int = 1, seed: int = 0,
                 drop_last: bool = False, progressive: bool = False, epochs: int = 1) -> None:
        self.n, self.rank, self.world, self.seed, self.drop_last = len(labels), rank, world, seed, drop_last
        self.progressive, self.epochs = progressive, epochs
        lab = torch.as_tensor(list(labels), dtype=torch.long)
        classes, inverse, counts = torch.unique(lab, sorted=True, return_inverse=True, return_counts=True)
        self.classes: list[int] = classes.tolist()
        self.counts = counts                                     # samples per class, in class order
        self.members = torch.argsort(inverse, stable=True)       # sample indices grouped by class
        self.offsets = torch.cumsum(counts, 0) - counts          # where each class's members start
        self.epoch = 0
        self.start = 0  # samples of this rank's share already consumed (resume)
        self._drawn: tuple[int, list[int]] | None = None        # (epoch, its global draw)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def skip(self, n_samples: int) -> None:
        """Start the current epoch after the first `n_samples` of this rank's share."""
        self.start = n_samples

    def probabilities(self, epoch: int | None = None) -> dict[int, float]:
        """{class: p_c(epoch)} (the current epoch by default)."""
        return dict(zip(self.classes, self._probs(self.epoch if epoch is None else epoch).tolist()))

    def _probs(self, epoch: int) -> torch.Tensor:
        if not self.classes:
            return torch.zeros(0, dtype=torch.float64)
        natural = self.counts.double() / self.n
        a = mixing(epoch, self.epochs, self.progressive)
        return (1 - a) * natural + a / len(self.classes)

    def draw(self, epoch: int) -> list[int]:
        """The epoch's global sequence: n sample indices drawn with replacement (same on every rank)."""
        if self._drawn is not None and self._drawn[0] == epoch:
            return self._drawn[1]
        if self.n == 0:
            return []
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        cdf = torch.cumsum(self._probs(epoch), 0)
        u = torch.rand(self.n, generator=g, dtype=torch.float64) * cdf[-1]
        cls = torch.searchsorted(cdf, u, right=True).clamp_(max=len(self.classes) - 1)  # class by p_c
        size = self.counts[cls]
        within = (torch.rand(self.n, generator=g, dtype=torch.float64) * size).long()   # uniform member
        order = self.members[self.offsets[cls] + torch.minimum(within, size - 1)].tolist()
        self._drawn = (epoch, order)
        return order

    def _total(self) -> int:
        """Length of the padded global sequence: ShardSampler's rule."""
        if self.world <= 1:
            return self.n
        if self.drop_last:
            return (self.n // self.world) * self.world
        return math.ceil(self.n / self.world) * self.world

    def indices(self) -> list[int]:
        order, total = self.draw(self.epoch), self._total()
        if total > len(order):  # pad by wrapping around, as ShardSampler does
            order = (order * math.ceil(total / max(1, len(order))))
        return order[:total][self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(range(self.rank, self._total(), self.world)) - self.start)

    def describe(self, key: str) -> str:
        """One train.log line: the rule, the number of classes and their natural counts."""
        counts = self.counts.tolist()
        listed = ", ".join(f"{c}: {k}" for c, k in list(zip(self.classes, counts))[:_NOTE_CLASSES])
        more = f", ... ({len(counts) - _NOTE_CLASSES} more)" if len(counts) > _NOTE_CLASSES else ""
        rule = (f"class frequencies move from natural (epoch 0) to uniform (epoch {max(0, self.epochs - 1)})"
                if self.progressive else "every class drawn equally often (with replacement, weight 1/count)")
        return f"{key}: {len(counts)} classes, natural counts {{{listed}{more}}}; {rule}"
