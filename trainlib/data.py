"""Data loading: an explicit, resumable distributed sampler, DataLoader wiring, device prefetch.

Why a sampler of our own: DistributedSampler cannot start in the middle of an epoch, and its
shuffle silently repeats unless `set_epoch` is called. Ours takes the epoch in `set_epoch`
(called by the trainer every epoch, always) and a `start` offset so that a resumed run skips the
samples it already consumed instead of replaying batches.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from .config import ConfigError


class ShardSampler(Sampler[int]):
    """Rank `rank` of `world` takes every world-th index of a (shuffled) permutation.

    Training (`shuffle=True`): the permutation depends on (seed, epoch) only, so all ranks agree,
    and it is padded by wrapping around so every rank gets the same number of samples (DDP needs
    equal step counts). Evaluation (`shuffle=False`, `pad=False`): no padding, so every sample is
    scored exactly once; ranks may get one sample more or less (metrics are reduced after the loop).

    Grouping (`groups`, one key per sample, and `group_size`): the shuffled order is cut into runs
    of `group_size` consecutive positions whose samples share one key, and the runs are shuffled.
    With group_size = batch size x world size x accumulation, every rank's micro-batches of one
    optimizer step come from the same group: with keys that say what shape a sample collates to
    (PDAN: its padded length), all ranks see the same batch shapes at every step, which is what
    whole-step CUDA graphs under DDP need. The few samples left over in each group fill the
    epoch's last runs.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 pad: bool = True, drop_last: bool = False, groups: Sequence[Hashable] | None = None,
                 group_size: int = 0) -> None:
        self.n, self.rank, self.world = n, rank, world
        self.shuffle, self.seed, self.pad, self.drop_last = shuffle, seed, pad, drop_last
        if groups is not None and len(groups) != n:
            raise ValueError(f"ShardSampler: {len(groups)} group keys for {n} samples")
        self.groups = list(groups) if groups is not None and group_size > 0 else None
        self.group_size = group_size
        self.epoch = 0
        self.start = 0  # samples of this rank's share already consumed (resume)
        self._cached: tuple[int, list[int]] | None = None  # (epoch, indices())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def skip(self, n_samples: int) -> None:
        """Start the current epoch after the first `n_samples` of this rank's share."""
        self.start = n_samples

    def indices(self) -> list[int]:
        """This rank's share of the epoch's order, computed once per epoch (len() and iter() ask again)."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._share())
        return self._cached[1]

    def _share(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(batch_seed(self.seed, -1, self.epoch, -1))  # same on every rank
            order = torch.randperm(self.n, generator=g).tolist()
            if self.groups is not None:
                order = self._grouped(order)
        else:
            order = list(range(self.n))
        if self.pad and self.world > 1:
            if self.drop_last:
                order = order[: (self.n // self.world) * self.world]
            else:
                total = math.ceil(self.n / self.world) * self.world
                order = (order * math.ceil(total / max(1, self.n)))[:total]
        return order[self.rank :: self.world]

    def _grouped(self, order: list[int]) -> list[int]:
        """`order` rearranged into shuffled runs of group_size samples with one key each, then
        each group's leftovers (fewer than group_size), group after group."""
        members: dict[Hashable, list[int]] = {}
        for i in order:  # first-seen order of the keys follows the shuffle: deterministic per epoch
            members.setdefault(self.groups[i], []).append(i)  # type: ignore[index]
        size, runs, rest = self.group_size, [], []
        for idx in members.values():
            full = len(idx) - len(idx) % size
            runs += [idx[lo : lo + size] for lo in range(0, full, size)]
            rest += idx[full:]
        g = torch.Generator()
        g.manual_seed(batch_seed(self.seed, -2, self.epoch, -2))  # same on every rank
        return [i for r in torch.randperm(len(runs), generator=g).tolist() for i in runs[r]] + rest

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


class SeededBatch(list):
    """A batch of indices that carries the seed its samples are drawn with (hashed on first use:
    datasets that draw nothing never pay for it)."""

    def __init__(self, indices: list[int], key: tuple[int, int, int, int]) -> None:
        super().__init__(indices)
        self.key = key

    @property
    def seed(self) -> int:
        return batch_seed(*self.key)


def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """A stable 63-bit seed for one batch (the same in every process and every run)."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{epoch}/{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededBatchSampler(Sampler[SeededBatch]):
    """Batches of a ShardSampler, each tagged with batch_seed(seed, rank, epoch, batch index).

    With `SeededDataset` this makes every random draw inside `__getitem__` (augmentation, random
    crops, noise) a function of the batch's identity, not of which worker fetched it or how many
    batches came before: a run resumed in the middle of an epoch draws exactly what the
    uninterrupted run drew, with any num_workers.
    """

    def __init__(self, sampler: ShardSampler, batch_size: int, drop_last: bool) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __iter__(self) -> Iterator[SeededBatch]:
        s, bs = self.sampler, self.batch_size
        idx = list(s)
        first = s.start // bs
        for b, lo in enumerate(range(0, len(idx), bs)):
            chunk = idx[lo : lo + bs]
            if len(chunk) < bs and self.drop_last:
                return
            yield SeededBatch(chunk, (s.seed, s.rank, s.epoch, first + b))

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class SeededDataset(Dataset):
    """Fetches a SeededBatch with python, numpy and torch seeded from the batch's seed, then puts
    torch's CPU RNG state back (so fetching in the main process does not disturb dropout). The
    python and numpy global RNGs are left reseeded: they belong to the data pipeline, and saving and
    restoring numpy's state costs ~90 us per batch, more than a small model's whole step overhead."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        # a dataset whose items are a pure function of the index (`random_fetch = False`) skips
        # the per-batch seeding (~30 us a batch, a noticeable share of a small model's step)
        self.seeded = getattr(dataset, "random_fetch", True)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        return _fetch(indices, self.seeded, lambda idx: [self.dataset[i] for i in idx])


def _fetch(indices: list[int], seeded: bool, read: Callable[[list[int]], Any]) -> Any:
    """read(indices), under the batch's seed when it carries one and the dataset draws randomness."""
    seed = getattr(indices, "seed", None) if seeded else None
    if seed is None:
        return read(indices)
    with _seeded(seed):
        return read(indices)


class _seeded:
    """python, numpy and torch's CPU generator seeded for one batch; torch's state put back after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        # CPU generator only: torch.manual_seed also queues a CUDA seeding call that records a
        # stack trace each time (1 ms per batch, and a queue that grows) until CUDA initialises.
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.saved)


def _no_collate(batch: Any) -> Any:
    return batch


@contextlib.contextmanager
def open_image(path: Any, what: str) -> Iterator[Any]:
    """PIL's `Image.open(path)` for a user's file: what PIL cannot read (not an image, truncated, a
    decompression bomb over PIL's pixel limit) ends in one DataError naming `what` (image, mask,
    label, panorama) and the file. A DataError raised in the block passes through unchanged."""
    from PIL import Image, UnidentifiedImageError

    from .config import DataError

    try:
        with Image.open(path) as im:
            yield im
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{what} {path} cannot be read ({e})") from None


def image_file_size(path: str, what: str) -> tuple[int, int]:
    """(width, height) of a user's image file from its header (no decoding), or one clear DataError."""
    with open_image(path, what) as im:
        return im.size


def load_json(path: str, what: str, error: type[Exception] | None = None) -> Any:
    """A user's JSON file (annotations, metadata, model config), or one clear error naming it."""
    import json

    from .config import DataError

    error = error or DataError
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from None


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with the loader's base seed + worker id; derive numpy/random from it.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class BatchFetch(Dataset):
    """A dataset read a batch at a time: `dataset.get_batch(indices)` returns the collated batch
    (TensorDataset: one indexing op per tensor). Per-sample `__getitem__` plus collation can cost
    more than a small model's step; this is the path that avoids it."""

    def __init__(self, dataset: Dataset, seeded: bool = True) -> None:
        self.dataset = dataset
        # a TensorDataset's rows are fixed: nothing to seed
        self.seeded = seeded and not isinstance(dataset, TensorDataset) and getattr(dataset, "random_fetch", True)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: list[int]) -> Any:
        return _fetch(indices, self.seeded, self._get)

    def _get(self, indices: list[int]) -> Any:
        ds = self.dataset
        if isinstance(ds, TensorDataset):
            index = torch.as_tensor(indices)
            return [t[index] for t in ds.tensors]
        return ds.get_batch(indices)  # type: ignore[attr-defined]


def per_sample(dataset: Any, method: str) -> list | None:
    """`dataset.<method>()` (one value per sample, a tensor or array becomes a list), also through
    Subset and ConcatDataset (hyperopt's train fraction, its final train+val run); None if unknown."""
    own = getattr(dataset, method, None)
    if callable(own):
        values = own()
        return values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else list(values)
    if isinstance(dataset, torch.utils.data.Subset):
        inner = per_sample(dataset.dataset, method)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        parts = [per_sample(d, method) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [k for p in parts for k in p]  # type: ignore[union-attr]
    return None


def shape_keys(dataset: Any) -> list | None:
    """One key per sample saying what shape it collates to (`dataset.shape_keys()`)."""
    return per_sample(dataset, "shape_keys")


def class_labels(dataset: Any) -> list | None:
    """One int class label per sample (`dataset.class_labels()`, for class-balanced sampling)."""
    return per_sample(dataset, "class_labels")


def fetches_batches(dataset: Any) -> bool:
    return isinstance(dataset, TensorDataset) or callable(getattr(dataset, "get_batch", None))


def build_loader(dataset: Dataset, *, batch_size: int, sampler: ShardSampler, collate_fn: Callable | None,
                 num_workers: int, pin_memory: bool, drop_last: bool, seeded: bool = False) -> DataLoader:
    """`seeded=True` (training): per-batch seeded fetching, exact on resume (SeededBatchSampler).
    Datasets with `get_batch(indices)` (and TensorDataset) are fetched a batch at a time."""
    common = dict(collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                  worker_init_fn=_seed_worker if num_workers else None, persistent_workers=False)
    if fetches_batches(dataset):
        common["collate_fn"] = _no_collate
        batches = SeededBatchSampler(sampler, batch_size, drop_last)
        gen = torch.Generator().manual_seed(batch_seed(sampler.seed, sampler.rank, -1, -1))
        return DataLoader(BatchFetch(dataset, seeded), batch_size=None, sampler=batches, generator=gen, **common)
    if seeded:
        # Its own generator: creating the iterator (mid-epoch after a resume) must not draw from
        # the global torch RNG that dropout uses.
        gen = torch.Generator().manual_seed(batch_seed(sampler.seed, sampler.rank, -1, -1))
        return DataLoader(SeededDataset(dataset), batch_sampler=SeededBatchSampler(sampler, batch_size, drop_last),
                          generator=gen, **common)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor inside nested dicts/lists/tuples (other leaves pass through)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts/lists/tuples, depth-first."""
    out: list[torch.Tensor] = []
    map_tensors(obj, lambda t: out.append(t) or t)
    return out


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: the leading dim of its first tensor (depth-first)."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):  # (inputs, target)
        return batch[0].shape[0] if batch[0].dim() else 1
    stack = [batch]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            return obj.shape[0] if obj.dim() else 1
        if isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))
        elif isinstance(obj, (list, tuple)):
            stack.extend(reversed(obj))
    return 1


class DeviceLoader:
    """A split collated once into device memory; each batch is a gather there (no per-batch
    host work, no copies: what a feature dataset like PDAN's that fits in GPU memory wants).

    Same batches in the same order as `build_loader` with the same sampler, so switching it on
    changes speed, not results. Caveats: items are read once, so per-sample random augmentation
    is frozen; collation must give tensors with a leading sample dimension (variable-length
    items are padded to the longest of the whole split) or lists of per-sample values. A dataset
    with `trim_batch(batch, rows)` gets each gathered batch to cut back to what its own collate
    would have padded those rows to (PDAN: the batch's length bucket), so padding to the split's
    longest item costs memory, not compute.
    """

    on_device = True

    def __init__(self, dataset: Dataset, *, batch_size: int, sampler: ShardSampler, collate_fn: Callable | None,
                 device: torch.device, drop_last: bool, seeded: bool = False, share: "DeviceLoader | None" = None) -> None:
        self.sampler, self.batch_size, self.drop_last, self.device = sampler, batch_size, drop_last, device
        self.dataset, self.n = dataset, len(dataset)  # type: ignore[arg-type]
        if share is not None:  # another loader over the same dataset (PDAN's val and test): one copy in memory
            self.data = share.data
            return
        if fetches_batches(dataset):
            data = BatchFetch(dataset, seeded=False)._get(list(range(self.n)))
        else:
            data = (collate_fn or default_collate)([dataset[i] for i in range(self.n)])
        self.data = map_tensors(data, lambda t: t.to(device))
        for t in tensor_leaves(self.data):
            if t.dim() == 0 or t.shape[0] != self.n:
                raise ValueError(f"data.device_resident: the collated split has a tensor of shape {list(t.shape)}; "
                                 f"expected a leading dimension of {self.n} (one row per sample)")

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        idx = list(self.sampler)
        if not idx:
            return
        index = torch.tensor(idx, dtype=torch.long)
        if self.device.type == "cuda":
            index = index.pin_memory()
        index = index.to(self.device, non_blocking=True)  # once per epoch
        bs = self.batch_size
        trim = getattr(self.dataset, "trim_batch", None)
        for lo in range(0, len(idx), bs):
            if lo + bs > len(idx) and self.drop_last:
                return
            rows = idx[lo : lo + bs]
            batch = self._gather(self.data, index[lo : lo + bs], rows)
            yield trim(batch, rows) if trim else batch

    def _gather(self, obj: Any, sel: torch.Tensor, rows: list[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.index_select(0, sel)
        if isinstance(obj, dict):
            return {k: self._gather(v, sel, rows) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            if len(obj) == self.n and not any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
                return [obj[r] for r in rows]  # per-sample values (ids, names)
            return type(obj)(self._gather(v, sel, rows) for v in obj)
        return obj


class DevicePrefetcher:
    """Iterate a loader with batch i+1 already on its way to the GPU while step i runs.

    On CUDA the copy runs on a side stream from pinned memory (non_blocking); the compute stream
    waits on an event, and the batch's memory is marked as used by the compute stream. On CPU it
    simply yields the loader's batches.
    """

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.on_device = getattr(loader, "on_device", False)  # DeviceLoader: nothing to copy
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and not self.on_device else None
        self.wait_s = 0.0  # host time spent waiting for the loader (throughput logging)

    def __len__(self) -> int:
        return len(self.loader)

    def _plain(self) -> Iterator[Any]:
        """Batches that need no copy (CPU, or already on the device): just time the waits."""
        clock, it = time.perf_counter, iter(self.loader)
        while True:
            t0 = clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait_s += clock() - t0
            yield batch

    def _load(self, it: Iterator) -> Any:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return StopIteration
        finally:
            self.wait_s += time.perf_counter() - t0
        if self.stream is None:
            return batch if self.device.type == "cpu" or self.on_device else to_device(batch, self.device)
        with torch.cuda.stream(self.stream):
            return to_device(batch, self.device, non_blocking=True)

    def __iter__(self) -> Iterator[Any]:
        if self.stream is None and (self.device.type == "cpu" or self.on_device):
            return self._plain()  # (returned, not delegated to: one generator level per batch)
        return self._copied()

    def _copied(self) -> Iterator[Any]:
        """Batches copied to the device, the next one's copy on a side stream while this one trains."""
        it = iter(self.loader)
        nxt = self._load(it)
        while nxt is not StopIteration:
            cur = nxt
            if self.stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                map_tensors(cur, lambda t: t.record_stream(torch.cuda.current_stream(self.device)) or t)
            nxt = self._load(it)
            yield cur


def limit_batches(n: int, limit: int | float) -> int:
    """trainer.limit_*_batches (checked when the config was built): an int is a count, a float a
    fraction of n (at least one batch when it is > 0)."""
    if isinstance(limit, float):
        return min(n, max(1, int(n * limit)) if limit > 0 and n > 0 else 0)
    return min(n, limit)


def build_loaders(datasets: dict[str, Any], data: Any, *, seed: int, accumulate: int, rank: int, world: int,
                  device: torch.device, collate_fn: Callable | None, graphs_on: bool,
                  notes: list[str], epochs: int = 1) -> tuple[dict[str, Any], ShardSampler | None]:
    """-> ({split: loader}, the train sampler). Training shuffles by (seed, epoch) and pads every
    rank to the same count; val/test are scored exactly once. `data.group_by_shape` draws each
    optimizer step's batches from one shape group (auto: with CUDA graphs and a dataset that has
    shape_keys()). `data.use_class_balanced_sampler` / `data.progressive_class_balancing`: the
    train split is drawn class-balanced from the dataset's class_labels() (balanced.py; `epochs`
    is the run length the progressive rule spans); they do not combine with group_by_shape."""
    loaders: dict[str, Any] = {}

    def loader(ds: Any, batch_size: int, sampler: ShardSampler, drop_last: bool, seeded: bool = False) -> Any:
        if data.device_resident:
            same = next((ld for ld in loaders.values() if isinstance(ld, DeviceLoader) and ld.dataset is ds), None)
            return DeviceLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, device=device,
                                drop_last=drop_last, seeded=seeded, share=same)
        return build_loader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                            num_workers=data.num_workers, pin_memory=data.pin_memory and device.type == "cuda",
                            drop_last=drop_last, seeded=seeded)

    train_sampler = None
    train = datasets.get("train")
    if train is not None:
        setting = data.group_by_shape
        progressive = bool(getattr(data, "progressive_class_balancing", False))
        uniform = bool(getattr(data, "use_class_balanced_sampler", False))
        balance = progressive or uniform
        if balance:
            key = "data.progressive_class_balancing" if progressive else "data.use_class_balanced_sampler"
            if setting is True:
                raise ConfigError(f"{key}=true cannot be combined with data.group_by_shape=true (the class-balanced "
                                  "draw is not grouped by shape): set data.group_by_shape=false")
            if setting == "auto" and graphs_on and shape_keys(train) is not None:
                notes.append(f"data.group_by_shape=auto: off, because {key}=true (the two do not combine)")
            setting = False
        keys = shape_keys(train) if setting else None
        if setting == "auto":
            setting = graphs_on and keys is not None
        if not setting:
            keys = None
        elif keys is None:
            raise ConfigError(f"data.group_by_shape=true: the train dataset ({type(train).__name__}) has no "
                              "shape_keys() method saying which samples collate to the same shape")
        elif len(keys) != len(train):
            raise ConfigError(f"data.group_by_shape: {type(train).__name__}.shape_keys() gave {len(keys)} keys "
                              f"for {len(train)} samples (expected one per sample)")
        else:
            notes.append(f"data.group_by_shape: each optimizer step draws its batches from one of "
                         f"{len(set(keys))} shape groups")
        if balance:
            from .balanced import ClassBalancedSampler, checked_labels

            labels = checked_labels(class_labels(train), train, key)
            train_sampler = ClassBalancedSampler(labels, rank, world, seed=seed, drop_last=data.drop_last,
                                                 progressive=progressive, epochs=epochs)
            both = " (data.use_class_balanced_sampler is on too: the progressive rule wins)" if uniform else ""
            notes.append(train_sampler.describe(key) + (both if progressive else ""))
        else:
            train_sampler = ShardSampler(len(train), rank, world, shuffle=True, seed=seed, pad=True,
                                         drop_last=data.drop_last, groups=keys,
                                         group_size=data.batch_size * world * accumulate)
        loaders["train"] = loader(train, data.batch_size, train_sampler, data.drop_last, seeded=True)
        if len(loaders["train"]) == 0:
            raise ConfigError(f"the train split has {len(train)} samples: not enough for one batch of "
                              f"data.batch_size={data.batch_size} on {world} process(es)")
    for split in [s for s in datasets if s != "train"]:  # val, test and unlabelled ones (predict_data)
        ds = datasets.get(split)
        if ds is not None:
            if len(ds) == 0:
                raise ConfigError(f"the {split} split is empty")
            sampler = ShardSampler(len(ds), rank, world, shuffle=False, pad=False)
            loaders[split] = loader(ds, data.val_batch_size or data.batch_size, sampler, False)
    return loaders, train_sampler
