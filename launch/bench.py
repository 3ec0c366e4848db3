"""Side-by-side speed of a training step: hand-written loops vs trainlib vs Lightning, like with like.

    python -m launch.bench --model mlp --device cpu                 # engine overhead on a small model
    torchrun --nproc_per_node=2 -m launch.bench --model mlp --device cpu   # the same under DDP (gloo)
    python -m launch.bench --model mlp --device cpu --instructions  # callgrind: instructions per step
    python -m launch.bench --model pdan --device cuda               # PDAN as in PERF_ANCHORS.md
    python -m launch.bench --model mvfoul --device cuda             # the mvfoul recipe: r2plus1d_18, 2 views, 16x112x112
    python -m launch.bench --model xca_flow --device cuda           # the xca flow UNet, 6 crops of 320x320 x 8 noise draws (xca_csnet: CS-Net)

Every variant trains the same model on the same data with the same batch and precision. Each run
of a variant is its own process (`python -m launch.bench --child ...`): no variant inherits another's
garbage-collector state, heap, allocator caches or torch flags. Runs are interleaved over --repeats
rounds; the table shows the median ms/step of the timed steps (after --warmup steps), the spread
over rounds, the peak GPU memory, and ratios. Only ratios measured in one invocation mean anything:
absolute times move between runs on a shared machine.

Every variant is described by three things, printed in its row:
  optimizer   AdamW's kernel: `fused` (AdamW(fused=True), what trainlib picks) or `unfused` (torch's default)
  data        per-sample          a DataLoader reads the samples one by one, nothing seeded
              per-sample seeded   the same, with python/numpy/torch seeded per batch (what trainlib does
                                  by default for a user's Dataset, so that augmentation is reproducible;
                                  the hand-written loop reads through trainlib.data.build_loader to pay
                                  exactly the same)
              batch fetch         a TensorDataset's rows fetched a batch at a time (trainlib's default
                                  for a TensorDataset; the hand-written loop through build_loader too)
              device-resident     GPU: batches already on the device (graph variants)
  norm        (DDP) mean: DDP's average of the ranks' gradients; exact: the loss weighted by the
              global sample count, which one extra all_reduce per step computes (trainlib's semantics:
              k micro-batches on N ranks give the gradient of one big batch)
  checked     (hand-written rows, ", checked") the loop keeps trainlib's promise that a step whose loss
              or gradient is NaN/inf is never applied: one device-side pass over the gradients and
              the loss (torch._amp_foreach_non_finite_check_and_unscale_ with a factor of 1), the
              flag handed to the fused AdamW as found_inf (no host sync; unfused: a host check);
              under DDP with exact norm the flag rides in the same all_reduce as the sample count

`vs reference` divides a variant's time by that of the hand-written loop with the SAME optimizer
kernel, data path and semantics (the non-finite check; under DDP, exact normalisation too); the
cell names that row: `1.022x [4]` = 1.022 times row 4. `vs unchecked loop` (one process) divides by
the same hand-written loop without the non-finite check, i.e. what that guarantee costs on top.
Hand-written references are added to the run automatically. `vs plain loop` divides by the loop a
user writes by hand (unfused AdamW, per-sample DataLoader, no check): it shows what trainlib's faster
defaults (fused AdamW, batch fetch) buy, in rows labelled as such.

Modes
  default          one process per variant run, interleaved rounds, wall clock
  DDP              under torchrun (WORLD_SIZE > 1): every rank runs the variants in turn, in-process
                   (a process group cannot be re-made per variant cheaply); rank 0 prints. The
                   hand-written DDP loop: DistributedSampler (or build_loader's ShardSampler for the
                   seeded / batch-fetch paths), DistributedDataParallel, the same AdamW kernel
  --instructions   each variant once under `valgrind --tool=callgrind --collect-atstart=no
                   --instr-atstart=no`; the child switches instrumentation and collection on after
                   the warm-up steps and collection off at the last step's end with callgrind's
                   client requests (issued from Python through a 28-byte machine-code stub and ctypes),
                   so only the training window is counted: no imports, no setup, no warm-up

Timing: a timestamp is taken at the end of every step; on a GPU the host synchronises only at the
first timed step and at the last step, so (as in real training) it may run ahead of the GPU, and
ms/step is the wall time between those two points over the steps between them.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import logging
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainlib import Callback, DataConfig, LogConfig, OptimConfig, Trainer, TrainerConfig
from trainlib.data import ShardSampler, build_loader

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Workloads: a model factory, a dataset, loss(outputs, batch) and forward(model, batch)

@dataclass
class Workload:
    make_model: Callable[[], nn.Module]
    dataset: Dataset
    loss_fn: Callable[[Any, Any], Any]
    forward: Callable[[nn.Module, Any], Any]


def mlp_workload(batch: int, steps: int) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, 64, generator=g)
    y = torch.randint(0, 10, (batch * steps,), generator=g)
    model = lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))  # noqa: E731
    loss = lambda out, b: nn.functional.cross_entropy(out, b[1])  # noqa: E731
    return Workload(model, TensorDataset(x, y), loss, lambda m, b: m(b[0]))


class _PDANFeatures(Dataset):
    """Fixed-length PDAN batches as in PERF_ANCHORS.md (T=512, 1024 input channels, 157 classes)."""

    def __init__(self, n: int, t: int = 512, dim: int = 1024, k: int = 157) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, t, generator=g)
        self.y = (torch.rand(n, t, k, generator=g) > 0.97).float()
        self.t = t

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.x[i], "mask": torch.ones(self.t), "labels": self.y[i]}


def pdan_workload(batch: int, steps: int) -> Workload:
    from recipes.pdan import PDAN, forward, loss_last_stage

    model = lambda: PDAN(num_stages=2, num_layers=5, num_channels=512, input_channels=1024, num_classes=157)  # noqa: E731
    return Workload(model, _PDANFeatures(batch * 8), loss_last_stage, forward)


def r2plus1d_workload(batch: int, steps: int) -> Workload:
    """torchvision's R(2+1)D-18 from scratch (nothing downloaded): clips [3, 16, 112, 112], 8 classes."""
    from torchvision.models.video import r2plus1d_18

    g = torch.Generator().manual_seed(0)
    n = 4 * batch  # 4 batches of clips: about 77 MB at batch 8
    x = torch.randn(n, 3, 16, 112, 112, generator=g)
    y = torch.randint(0, 8, (n,), generator=g)
    model = lambda: r2plus1d_18(weights=None, num_classes=8)  # noqa: E731
    loss = lambda out, b: nn.functional.cross_entropy(out, b[1])  # noqa: E731
    return Workload(model, TensorDataset(x, y), loss, lambda m, b: m(b[0]))


class _FoulClips(Dataset):
    """Actions of 2 views of uint8 clips [2, 3, 16, 112, 112] with both tasks' labels, as the mvfoul recipe's
    loader gives them after decoding (the decoder is left out: it runs in DataLoader workers)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.clips = torch.randint(0, 256, (n, 2, 3, 16, 112, 112), generator=g, dtype=torch.uint8)
        self.action, self.offence = torch.randint(0, 8, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        return {"clips": self.clips[i], "view_mask": torch.ones(2, dtype=torch.bool), "action": self.action[i],
                "offence": self.offence[i], "scored_offence": self.offence[i], "index": torch.tensor(i)}


def mvfoul_workload(batch: int, steps: int) -> Workload:
    """The mvfoul recipe's model (R(2+1)D-18 from scratch, max pooling over 2 views, VARS heads), its
    forward (uint8 -> float, Kinetics normalisation on the device) and its weighted two-task loss."""
    from recipes.mvfoul import FoulRecognizer, build_mvfoul_model, forward
    from recipes.mvfoul.losses import MultiTaskLoss, TaskLoss, class_weights_from_counts

    weights = class_weights_from_counts(torch.tensor([40.0, 35.0, 15.0, 10.0]))
    task = MultiTaskLoss(TaskLoss("weighted", weights), TaskLoss("weighted", class_weights_from_counts(torch.ones(8))))

    def loss(out, b):
        task.to(b["offence"].device)
        return task(out, b["offence"], b["action"])

    model = lambda: FoulRecognizer(build_mvfoul_model("r2plus1d_18", "max"))  # noqa: E731
    return Workload(model, _FoulClips(4 * batch), loss, forward)


class _Segmentation(Dataset):
    """512x512 images with 35-class pixel labels (255 = ignore on a border), as the SegFormer recipe reads them."""

    def __init__(self, n: int, size: int = 512, k: int = 35) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, k, (n, size, size), generator=g)
        self.y[:, :4] = 255

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def segformer_workload(batch: int, steps: int) -> Workload:
    """The SegFormer recipe's own MiT-b0 + decode head (PERF_ANCHORS: B=8, 512x512, 35 classes)."""
    from recipes.segformer import SegFormer, SegFormerConfig, forward, loss

    model = lambda: SegFormer.from_config(SegFormerConfig(variant="b0", num_labels=35))  # noqa: E731
    return Workload(model, _Segmentation(2 * batch), loss, forward)


class _VesselCrops(Dataset):
    """Training crops as the xca recipe gives them: image [1, S, S] in [-1, 1], a binary vessel label."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, size, size, generator=g) * 2 - 1
        self.y = (torch.rand(n, 1, size, size, generator=g) < 0.1).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


def _xca_workload(arch: str, batch: int, size: int, noise_copies: int = 1) -> Workload:
    """The xca recipe's training step for one arch at the seed's sizes (flow.yaml: the ADM UNet at 32
    channels x [1, 2, 4, 8], 3 blocks, each crop with 8 noise draws: 6 crops = 48 UNet samples per
    forward; csnet.yaml: CS-Net at 32..512), 320x320 crops."""
    from recipes.xca import VesselSegmenter, XCAModel, forward
    from recipes.xca.model import loss_fn

    m = XCAModel(arch_name=arch, noise_copies=noise_copies)
    return Workload(lambda: VesselSegmenter(m, size), _VesselCrops(2 * batch, size), loss_fn(arch, m.bce_weight),
                    forward)


def xca_flow_workload(batch: int, steps: int) -> Workload:
    return _xca_workload("dhariwal_concat_unet", batch, 320, noise_copies=8)


def xca_csnet_workload(batch: int, steps: int) -> Workload:
    return _xca_workload("csnet", batch, 320)


WORKLOADS: dict[str, Callable[[int, int], Workload]] = {
    "mlp": mlp_workload, "pdan": pdan_workload, "r2plus1d": r2plus1d_workload, "segformer": segformer_workload,
    "mvfoul": mvfoul_workload, "xca_flow": xca_flow_workload, "xca_csnet": xca_csnet_workload}
DEFAULT_BATCH = {"mlp": 32, "pdan": 8, "r2plus1d": 8, "segformer": 8, "mvfoul": 8, "xca_flow": 6, "xca_csnet": 8}
PRECISIONS = ("32-true", "bf16-mixed")  # what every variant (hand-written, trainlib, Lightning) can run


@dataclass
class Run:
    """What every variant shares: device, batch, step counts, learning rate, precision."""
    device: torch.device
    batch: int
    steps: int
    warmup: int
    lr: float
    precision: str


# ------------------------------------------------------------------------------------------------
# Helpers

def _loss_value(out):
    return out["loss"] if isinstance(out, dict) else out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _map(b, fn):
    if isinstance(b, dict):
        return {k: fn(v) for k, v in b.items()}
    return [fn(v) for v in b]


def _to(b, device):
    return _map(b, lambda v: v.to(device, non_blocking=True))


def _copy_into(static, b) -> None:
    for k in (static.keys() if isinstance(static, dict) else range(len(static))):
        static[k].copy_(b[k], non_blocking=True)


def _autocast(run: Run, cache: bool = True):
    if run.precision == "bf16-mixed":
        return torch.autocast(run.device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


class Clock:
    """Step-end timestamps. On a GPU the host syncs only before the first timed stamp and the last
    one: the steps in between run as in real training, with the host free to run ahead.
    window: called with True right after the first timed stamp (end of step `warmup`) and with
    False at the last step's end, before its stamp: the instruction-count mode's window."""

    def __init__(self, run: Run, window: Optional[Callable[[bool], None]] = None) -> None:
        self.run, self.stamps, self.window = run, [], window or _WINDOW

    def tick(self) -> None:
        n = len(self.stamps)
        if n == self.run.warmup or n >= self.run.steps - 1:
            _sync(self.run.device)
        if n == self.run.steps - 1 and self.window:
            self.window(False)
        self.stamps.append(time.perf_counter())
        if n == self.run.warmup and self.window:
            self.window(True)


_WINDOW: Optional[Callable[[bool], None]] = None  # set in an instruction-count child (callgrind_window)


def ms_per_step(stamps: list[float], warmup: int, steps: Optional[int] = None) -> float:
    """Mean ms/step from the end of step `warmup` to the end of the last step."""
    if steps is not None and len(stamps) != steps:
        raise RuntimeError(f"ran {len(stamps)} of {steps} steps")
    timed = stamps[warmup:]
    if len(timed) < 2:
        raise RuntimeError(f"{len(stamps)} steps leave fewer than 2 timestamps after {warmup} warm-up steps")
    return 1000 * (timed[-1] - timed[0]) / (len(timed) - 1)


# ------------------------------------------------------------------------------------------------
# Variants: fn(workload, run) -> list of step-end timestamps

# ------------------------------------------------------------------------------------------------
# Variants

PER_SAMPLE, SEEDED, BATCH_FETCH, DEVICE = "per-sample", "per-sample seeded", "batch fetch", "device-resident"
DATA_PATHS = (PER_SAMPLE, SEEDED, BATCH_FETCH, DEVICE)


@dataclass(frozen=True)
class Spec:
    """One variant: what runs (engine) and the conditions a ratio must hold equal (fused, data, norm)."""
    name: str
    engine: str            # hand | hand-graph | trainlib | lightning
    fused: bool
    data: str              # one of DATA_PATHS
    norm: str = "mean"     # DDP: mean (DDP's average) or exact (global sample-count weighting)
    ddp: bool = False
    flags: tuple = ()      # trainlib: TrainerConfig(**dict(flags)); hand-graph: (("compile", bool),)
    note: str = ""         # what makes the row special (shown after the name in the docs)
    checked: bool = False  # hand: a step whose loss or gradient is not finite is not applied (as trainlib)

    @property
    def kernel(self) -> str:
        return "fused" if self.fused else "unfused"


def hand_name(fused: bool, data: str, norm: str = "mean", ddp: bool = False, checked: bool = False) -> str:
    return (f"hand-written{' DDP' if ddp else ''}{', fused' if fused else ''}, {data}"
            f"{', exact norm' if norm == 'exact' else ''}{', checked' if checked else ''}")


def hand_spec(fused: bool, data: str, norm: str = "mean", ddp: bool = False, checked: bool = False) -> Spec:
    return Spec(hand_name(fused, data, norm, ddp, checked), "hand", fused, data, norm, ddp, checked=checked)


def reference(s: Spec) -> Optional[Spec]:
    """The hand-written loop a variant is measured against: same kernel, data path and semantics
    (trainlib: the non-finite check; under DDP exact normalisation too; Lightning: neither)."""
    if s.engine in ("hand", "hand-graph"):
        return None
    if s.data == DEVICE:  # trainlib graphs vs the hand-written graphed loop, compiled or not
        comp = dict(s.flags).get("compile", False)
        return Spec(HAND_GRAPH if comp else "hand-written graph", "hand-graph", True, DEVICE, flags=(("compile", comp),))
    tl = s.engine == "trainlib"
    return hand_spec(s.fused, s.data, "exact" if (s.ddp and tl) else "mean", s.ddp, checked=tl)


def unchecked_reference(s: Spec) -> Optional[Spec]:
    """One process: the reference loop without the non-finite check (what the guarantee costs)."""
    r = reference(s)
    return hand_spec(r.fused, r.data) if r is not None and r.checked and not s.ddp else None


def plain_reference(s: Spec) -> Spec:
    """The loop a user writes by hand: unfused AdamW, a per-sample DataLoader."""
    return hand_spec(False, PER_SAMPLE, "mean", s.ddp)


def mean_norm_reference(s: Spec) -> Optional[Spec]:
    """DDP: the same hand-written loop without exact normalisation (no extra collective) and
    without the non-finite check: DDP as most users write it."""
    r = reference(s)
    return hand_spec(r.fused, r.data, "mean", True) if r and s.ddp else None


HAND, HAND_GRAPH, LIGHTNING = hand_name(False, PER_SAMPLE), "hand-written compile+graph", "Lightning, unfused"


def all_variants(device: torch.device, model: str = "mlp", ddp: bool = False) -> dict[str, Spec]:
    """The variants of a run, hand-written references included (a reference follows its users)."""
    batch_fetch = model in TENSOR_DATASETS  # only a TensorDataset is fetched a batch at a time
    tl = "trainlib DDP" if ddp else "trainlib"
    norm = "exact" if ddp else "mean"  # trainlib's semantics; with one process both are the same
    main = [
        Spec(f"{tl}, {SEEDED}", "trainlib", True, SEEDED, norm, ddp, note="a user's Dataset, trainlib's defaults"),
        Spec(f"{tl}, {PER_SAMPLE} (random_fetch=False)", "trainlib", True, PER_SAMPLE, norm, ddp,
             note="the dataset declares it draws no randomness: no per-batch seeding"),
    ]
    if not ddp:
        main.insert(1, Spec(f"{tl} unfused, {SEEDED}", "trainlib", False, SEEDED,
                            note="optimizer=AdamW(fused=False) given to Trainer"))
    if batch_fetch:
        main.append(Spec(f"{tl} default, {BATCH_FETCH} (TensorDataset)", "trainlib", True, BATCH_FETCH, norm, ddp,
                         note="trainlib's default for a TensorDataset"))
    if device.type == "cuda" and not ddp:
        main += [Spec("trainlib compile", "trainlib", True, BATCH_FETCH if batch_fetch else SEEDED,
                      flags=(("compile", True),)),
                 Spec("trainlib graphs", "trainlib", True, DEVICE, flags=(("cuda_graphs", True),)),
                 Spec("trainlib compile+graphs", "trainlib", True, DEVICE,
                      flags=(("compile", True), ("cuda_graphs", True)))]
    if lightning_version() and not ddp:
        main += [Spec(LIGHTNING, "lightning", False, PER_SAMPLE), Spec("Lightning, fused", "lightning", True, PER_SAMPLE)]
    refs: list[Spec] = []
    for s in main:
        for r in (reference(s), plain_reference(s), unchecked_reference(s), mean_norm_reference(s)):
            if r is not None and r not in refs:
                refs.append(r)
    order = {p: i for i, p in enumerate(DATA_PATHS)}
    refs.sort(key=lambda r: (r.engine != "hand", order[r.data], r.fused, r.norm, r.checked))
    return {s.name: s for s in refs + main}


def select(variants: dict[str, Spec], spec: str) -> dict[str, Spec]:
    """Keep the variants whose name contains one of the comma-separated substrings (any case), and
    the hand-written references they are measured against."""
    keys = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not keys:
        return dict(variants)
    chosen = {k for k in variants if any(s in k.lower() for s in keys)}
    for k in list(chosen):
        for r in (reference(variants[k]), plain_reference(variants[k]), unchecked_reference(variants[k]),
                  mean_norm_reference(variants[k])):
            if r is not None and r.name in variants:
                chosen.add(r.name)
    return {k: v for k, v in variants.items() if k in chosen}


TENSOR_DATASETS = {"mlp", "r2plus1d"}


# ------------------------------------------------------------------------------------------------
# Running one variant (in the child process)

class _UserDataset(Dataset):
    """The workload's samples read one at a time, as a user's own Dataset: trainlib seeds each
    batch's fetch (random_fetch defaults to True)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


class _PerSample(_UserDataset):
    """The same, declaring that it draws no randomness: trainlib does not seed its batches."""
    random_fetch = False


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def hand_loader(ds: Dataset, data: str, run: Run):
    """(loader, set_epoch) for the hand-written loop's data path."""
    rank, world = _rank_world()
    pin = run.device.type == "cuda"
    if data == PER_SAMPLE:
        if world > 1:
            from torch.utils.data.distributed import DistributedSampler
            sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=0, drop_last=True)
            return DataLoader(ds, batch_size=run.batch, sampler=sampler, drop_last=True, pin_memory=pin), sampler.set_epoch
        return DataLoader(ds, batch_size=run.batch, shuffle=True, drop_last=True, pin_memory=pin), lambda e: None
    if data not in (SEEDED, BATCH_FETCH):
        raise ValueError(f"hand-written loop: no data path {data!r}")
    if data == BATCH_FETCH and not isinstance(ds, TensorDataset):
        raise ValueError("batch fetch needs a TensorDataset")
    sampler = ShardSampler(len(ds), rank, world, shuffle=True, seed=0, drop_last=True)
    source = _UserDataset(ds) if data == SEEDED else ds
    loader = build_loader(source, batch_size=run.batch, sampler=sampler, collate_fn=None, num_workers=0,
                          pin_memory=pin, drop_last=True, seeded=True)
    return loader, sampler.set_epoch


def apply_if_finite(opt: torch.optim.Optimizer, params: list[nn.Parameter], found: torch.Tensor,
                    one: torch.Tensor, loss: Optional[torch.Tensor] = None) -> None:
    """opt.step() unless `found` (1: some rank's loss was not finite), `loss` or a gradient is NaN/inf:
    one device-side pass (the AMP check with a factor of 1, values unchanged), the flag handed to a
    fused optimizer as found_inf (skipped on the device, no host sync); an unfused one needs the host."""
    checked = [p.grad for p in params if p.grad is not None] + ([loss.detach().float()] if loss is not None else [])
    torch._amp_foreach_non_finite_check_and_unscale_(checked, found, one)
    if opt.defaults.get("fused"):
        opt.grad_scale, opt.found_inf = None, found.reshape(())
        opt.step()
    elif not found.item():  # host sync: an unfused kernel cannot skip a step on the device
        opt.step()


def hand_written(w: Workload, run: Run, fused: bool = False, data: str = PER_SAMPLE, norm: str = "mean",
                 checked: bool = False) -> list[float]:
    """The loop a user writes by hand: DataLoader, forward, loss, backward, step (DDP under torchrun).
    norm="exact" (DDP): the loss is weighted by this rank's sample count over the global count, an
    all_reduce per step, so the gradient is that of the global batch whatever the ranks' counts.
    checked: a step whose loss (on any rank) or gradient is not finite is not applied (as trainlib;
    under DDP with exact norm the loss flag rides in the sample count's all_reduce)."""
    dev = run.device
    rank, world = _rank_world()
    if checked and world > 1 and norm != "exact":
        raise ValueError("a checked DDP loop needs exact norm (its all_reduce carries the ranks' loss flags)")
    torch.manual_seed(0)
    model = w.make_model().to(dev)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.0, fused=fused)
    loader, set_epoch = hand_loader(w.dataset, data, run)
    exact = norm == "exact" and world > 1
    params, one = list(model.parameters()), torch.ones(1, device=dev)
    clock = Clock(run)
    epoch = 0
    set_epoch(epoch)
    it = iter(loader)
    for _ in range(run.steps):
        try:
            b = next(it)
        except StopIteration:
            epoch += 1
            set_epoch(epoch)
            it = iter(loader)
            b = next(it)
        b = _to(b, dev)
        with _autocast(run):
            loss = _loss_value(w.loss_fn(w.forward(net, b), b))
        found = None
        if exact:
            n = torch.tensor(float(_batch_len(b)), device=dev)
            # [count, 0 if the loss is finite else NaN] summed over ranks (x * 0 is NaN for inf/NaN)
            total = torch.stack([n, loss.detach().float() * 0]) if checked else n.clone()
            torch.distributed.all_reduce(total)
            if checked:
                total, found = total[0], torch.isnan(total[1:]).float()
            loss = loss * (n * world / total)  # DDP averages over ranks: sum_r n_r loss_r / total
        loss.backward()
        if checked:
            apply_if_finite(opt, params, torch.zeros(1, device=dev) if found is None else found, one,
                            None if exact else loss)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick()
    return clock.stamps


def _batch_len(b) -> int:
    v = next(iter(b.values())) if isinstance(b, dict) else b[0]
    return len(v)


def hand_graphed(w: Workload, run: Run, compile_model: bool = True, warmup_iters: int = 3) -> list[float]:
    """The reference fast loop (GPU): batches pre-loaded on the GPU, forward + loss + backward +
    a capturable fused AdamW step captured in one CUDA graph, following the whole-network capture
    example of the PyTorch "CUDA Graphs" notes; each step copies the next batch into the static
    inputs and replays the graph. compile_model: wrap the model in torch.compile (default mode)
    first (it compiles during the warm-up iterations, before capture)."""
    dev = run.device
    if dev.type != "cuda":
        raise RuntimeError("CUDA graphs need a GPU")
    torch.manual_seed(0)
    model = w.make_model().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(run.lr, device=dev), weight_decay=0.0, fused=True,
                            capturable=True)
    net = torch.compile(model) if compile_model else model
    batches = [_to(b, dev) for b in DataLoader(w.dataset, batch_size=run.batch, shuffle=False, drop_last=True)]
    static = _map(batches[0], torch.clone)

    def step() -> torch.Tensor:
        # autocast's weight-cast cache does not mix with graph capture (see make_graphed_callables)
        with _autocast(run, cache=False):
            loss = _loss_value(w.loss_fn(w.forward(net, static), static))
        loss.backward()
        opt.step()
        return loss

    # Warm up on a side stream (compiles, allocates optimizer state, runs autograd's lazy init).
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*without CUDA graph capture")  # expected here
        for _ in range(warmup_iters):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream(dev).wait_stream(s)

    # Capture. Grads are None here, so backward allocates them from the graph's private pool and
    # every replay overwrites (does not accumulate into) them.
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        static_loss = step()

    clock = Clock(run)
    for i in range(run.steps):
        _copy_into(static, batches[i % len(batches)])
        g.replay()
        clock.tick()
    if not torch.isfinite(static_loss).item():  # after timing: a graph that replays garbage is a failure
        raise RuntimeError(f"non-finite loss after {run.steps} replays")
    return clock.stamps


class _Stamps(Callback):
    def __init__(self, run: Run) -> None:
        self.clock = Clock(run)

    def on_train_step_end(self, trainer) -> None:
        self.clock.tick()


def _shared_tmpdir():
    """A temporary folder, the same on every rank (rank 0 makes it)."""
    rank, world = _rank_world()
    if world == 1:
        return tempfile.TemporaryDirectory()
    holder = [tempfile.mkdtemp(prefix="trainlib-bench-") if rank == 0 else None]
    torch.distributed.broadcast_object_list(holder, src=0)

    @contextlib.contextmanager
    def cm():
        try:
            yield holder[0]
        finally:
            torch.distributed.barrier()
            if rank == 0:
                shutil.rmtree(holder[0], ignore_errors=True)
    return cm()


def trainlib_run(w: Workload, run: Run, s: Spec) -> tuple[list[float], dict]:
    """Trainer.fit on the spec's data path and optimizer kernel; TrainerConfig(**flags)."""
    torch.manual_seed(0)
    stamp = _Stamps(run)
    dataset = {SEEDED: _UserDataset, PER_SAMPLE: _PerSample}.get(s.data, lambda d: d)(w.dataset)
    if s.data == BATCH_FETCH and not isinstance(dataset, TensorDataset):
        raise ValueError("batch fetch needs a TensorDataset")
    data = DataConfig(batch_size=run.batch, drop_last=True, **({"device_resident": True} if s.data == DEVICE else {}))
    # fused: trainlib's own choice (build_optimizer); unfused: an optimizer given to the Trainer
    optimizer = None if s.fused else (lambda p: torch.optim.AdamW(p, lr=run.lr, weight_decay=0.0, fused=False))
    with _shared_tmpdir() as tmp:
        cfg = TrainerConfig(max_steps=run.steps, max_epochs=10**6, out_dir=tmp, run_name="bench", save_top_k=0,
                            save_last=False, export=False, device=run.device.type, precision=run.precision,
                            **dict(s.flags))
        t = Trainer(w.make_model(), w.loss_fn, dataset, config=cfg, optim=OptimConfig(name="adamw", lr=run.lr),
                    data=data, log_config=LogConfig(loggers=["jsonl"], every_n_steps=50, progress_bar=False),
                    forward_fn=w.forward, callbacks=[stamp], optimizer=optimizer)
        t.fit()
        fused = bool(t.optimizer.defaults.get("fused"))
    return stamp.clock.stamps, {"fused": fused}


def lightning_version() -> Optional[str]:
    try:
        import lightning
    except ImportError:
        return None
    return lightning.__version__


def lightning_run(w: Workload, run: Run, fused: bool) -> tuple[list[float], dict]:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = w.make_model()

        def training_step(self, b, i):
            loss = _loss_value(w.loss_fn(w.forward(self.net, b), b))
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=run.lr, weight_decay=0.0, fused=fused)

    class Stamps(L.Callback):
        def __init__(self):
            self.clock = Clock(run)

        def on_train_batch_end(self, *a):
            self.clock.tick()

    torch.manual_seed(0)
    cb = Stamps()
    cuda = run.device.type == "cuda"
    trainer = L.Trainer(max_steps=run.steps, accelerator="gpu" if cuda else "cpu", devices=1,
                        precision=run.precision, logger=False, enable_checkpointing=False, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), DataLoader(w.dataset, batch_size=run.batch, shuffle=True, drop_last=True, pin_memory=cuda))
    return cb.clock.stamps, {"fused": fused}


def run_spec(s: Spec, w: Workload, run: Run) -> tuple[list[float], dict]:
    """Run one variant in this process: (step-end timestamps, {"fused": the kernel actually used})."""
    if s.engine == "hand":
        if s.ddp != (_rank_world()[1] > 1):
            raise RuntimeError(f"{s.name}: {'needs' if s.ddp else 'must not run under'} torchrun")
        return hand_written(w, run, s.fused, s.data, s.norm, s.checked), {"fused": s.fused}
    if s.engine == "hand-graph":
        return hand_graphed(w, run, compile_model=dict(s.flags).get("compile", False)), {"fused": True}
    if s.engine == "trainlib":
        return trainlib_run(w, run, s)
    if s.engine == "lightning":
        return lightning_run(w, run, s.fused)
    raise ValueError(f"unknown engine {s.engine!r}")


# ------------------------------------------------------------------------------------------------
# Callgrind client requests from Python (x86-64): valgrind.h's magic sequence in an executable page

_VG_RUNNING_ON_VALGRIND = 0x1001
_CG_TOGGLE_COLLECT, _CG_START_INSTRUMENTATION = 0x43540002, 0x43540004  # VG_USERREQ_TOOL_BASE('C','T') + n
# mov rax,rdi (args); xor edx,edx (default 0); rol rdi,3/13/61/51; xchg rbx,rbx; mov rax,rdx; ret
_STUB = bytes.fromhex("4889f8" "31d2" "48c1c703" "48c1c70d" "48c1c73d" "48c1c733" "4887db" "4889d0" "c3")


def client_request() -> Optional[Callable[..., int]]:
    """request(code, *args) -> valgrind's answer (0 when not under valgrind); None off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_STUB)
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)(ctypes.addressof(ctypes.c_char.from_buffer(page)))

    def request(code: int, *args: int) -> int:
        arr = (ctypes.c_uint64 * 6)(code, *args, *([0] * (5 - len(args))))
        return fn(ctypes.addressof(arr))
    request.page = page  # keep the page mapped
    return request


def callgrind_window() -> Callable[[bool], None]:
    """The Clock's window hook: instrumentation + collection on after warm-up, collection off at the end."""
    req = client_request()
    if req is None or req(_VG_RUNNING_ON_VALGRIND) == 0:
        raise RuntimeError("--instructions: this child is not running under valgrind on x86-64")

    def window(on: bool) -> None:
        if on:
            req(_CG_START_INSTRUMENTATION)
        req(_CG_TOGGLE_COLLECT)
    return window


def callgrind_total(path: str) -> int:
    """The Ir total of a callgrind output file (its `totals:` line, else its `summary:` line)."""
    text = Path(path).read_text()
    m = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(r"^summary:\s+(\d+)", text, re.M)
    if not m:
        raise RuntimeError(f"no totals line in {path}")
    return int(m.group(1))


# ------------------------------------------------------------------------------------------------
# Processes: one child per variant run

MARK = "BENCH-RESULT "


def child_main(payload: str) -> None:
    """`python -m launch.bench --child JSON`: run one variant, print its result on one marked line."""
    p = json.loads(payload)
    global _WINDOW
    try:
        torch.set_num_threads(p["threads"])
        s = Spec(**{**p["spec"], "flags": tuple(tuple(f) for f in p["spec"]["flags"])})
        run = Run(torch.device(p["device"]), p["batch"], p["steps"], p["warmup"], p["lr"], p["precision"])
        if p.get("count"):
            _WINDOW = callgrind_window()
        w = WORKLOADS[p["model"]](run.batch, run.steps)
        stamps, info = run_spec(s, w, run)
        peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
        result = {"stamps": stamps, "peak": peak, **info}
    except Exception as e:  # noqa: BLE001 - reported by the parent in one line
        result = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}
    print(MARK + json.dumps(result), flush=True)


def child_payload(s: Spec, args, count: bool = False) -> str:
    return json.dumps({"spec": asdict(s), "model": args.model, "device": args.device, "batch": args.batch,
                       "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "precision": args.precision,
                       "threads": args.threads, "count": count})


def run_child(cmd: list[str], timeout: Optional[float] = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            if "error" in res:
                raise RuntimeError(res["error"])
            return res
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"child exited {proc.returncode}: {tail}")


def isolated_runner(args) -> Callable[[Spec], dict]:
    """runner(spec) -> {"stamps", "peak", "fused"}: one fresh `python -m launch.bench --child` per call."""
    return lambda s: run_child([sys.executable, "-m", "launch.bench", "--child", child_payload(s, args)])


def inline_runner(w: Workload, run: Run) -> Callable[[Spec], dict]:
    """runner(spec) in this process (DDP: every rank runs every variant in turn)."""
    def runner(s: Spec) -> dict:
        import gc
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(run.device)
        with _same_global_flags(), contextlib.redirect_stdout(io.StringIO()), _quiet_logs():
            stamps, info = run_spec(s, w, run)
        peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
        return {"stamps": stamps, "peak": peak, **info}
    return runner


@contextlib.contextmanager
def _quiet_logs():
    """In-process runs: trainlib's run summary and notes would interleave with the table."""
    lg = logging.getLogger("trainlib")
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


@contextlib.contextmanager
def _same_global_flags():
    """In-process runs (DDP): a variant may set process-wide torch flags; the next must not inherit them."""
    saved = (torch.get_num_threads(), torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def instructions_runner(args, keep_dir: Optional[str] = None) -> Callable[[Spec], dict]:
    """runner(spec) -> {"instructions", "window_steps", "fused"}: the child under callgrind, counting
    only the training window (see callgrind_window)."""
    if not shutil.which("valgrind"):
        raise RuntimeError("--instructions needs valgrind on PATH")
    if keep_dir:
        os.makedirs(keep_dir, exist_ok=True)

    def runner(s: Spec) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(keep_dir or tmp, "callgrind." + re.sub(r"[^a-z0-9]+", "-", s.name.lower()).strip("-"))
            cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--instr-atstart=no",
                   f"--callgrind-out-file={out}", sys.executable, "-m", "launch.bench", "--child",
                   child_payload(s, args, count=True)]
            res = run_child(cmd)
            n = len(res["stamps"])
            if n != args.steps:
                raise RuntimeError(f"ran {n} of {args.steps} steps")
            return {"instructions": callgrind_total(out), "window_steps": args.steps - args.warmup - 1,
                    "fused": res["fused"]}
    return runner


# ------------------------------------------------------------------------------------------------
# Running and reporting

def run_variants(specs: dict[str, Spec], run: Run, repeats: int, runner: Callable[[Spec], dict], out=sys.stdout):
    """Interleaved rounds (drift hits every variant alike). Returns ({name: [ms/step per round]},
    {name: peak GiB or None}, {name: error}); a variant that fails (or whose optimizer kernel is
    not the one its row says) is reported in one line and not run again."""
    times: dict[str, list[float]] = {k: [] for k in specs}
    peaks: dict[str, Optional[float]] = {k: None for k in specs}
    failed: dict[str, str] = {}
    for _ in range(repeats):
        for name, s in specs.items():
            if name in failed:
                continue
            try:
                res = runner(s)
                if "fused" in res and bool(res["fused"]) != s.fused:
                    raise RuntimeError(f"ran the {'fused' if res['fused'] else 'unfused'} kernel, row says {s.kernel}")
                times[name].append(ms_per_step(res["stamps"], run.warmup, run.steps))
            except Exception as e:  # noqa: BLE001 - one broken variant must not cost the others' numbers
                msg = (str(e).strip().splitlines() or [""])[0]
                failed[name] = msg if msg.startswith(type(e).__name__) else f"{type(e).__name__}: {msg}"
                times[name], peaks[name] = [], None  # a variant that failed in any round is reported as failed
                print(f"variant {name} failed: {failed[name]}", file=out, flush=True)
                continue
            if res.get("peak") is not None:
                peaks[name] = max(peaks[name] or 0.0, res["peak"])
    return times, peaks, failed


def ratio_refs(s: Spec, specs: dict[str, Spec], gpu: bool) -> dict[str, Optional[str]]:
    """Column -> the name of the variant this row is divided by (None: no such column entry)."""
    def named(r):
        return r.name if r is not None and r.name in specs and r.name != s.name else None
    cols = {"vs reference": named(reference(s)), "vs plain loop": named(plain_reference(s))}
    if not s.ddp:
        cols["vs unchecked loop"] = named(unchecked_reference(s))
    if s.ddp:
        cols["vs mean-norm loop"] = named(mean_norm_reference(s))
    cols["Lightning / this"] = LIGHTNING if LIGHTNING in specs and LIGHTNING != s.name else None
    if gpu:
        cols["vs hand graph"] = HAND_GRAPH if HAND_GRAPH in specs and HAND_GRAPH != s.name else None
    return cols


def summarize(specs: dict[str, Spec], values: dict[str, list[float]], peaks: dict[str, Optional[float]],
              gpu: bool) -> list[dict]:
    """One row per variant: median, spread, peak and the ratios (None where a reference is missing).
    values: ms/step per round, or instructions per step (one 'round')."""
    med = {k: statistics.median(v) for k, v in values.items() if v}
    names = list(specs)
    rows = []
    for k, s in specs.items():
        m = med.get(k)
        row = {"variant": k, "index": names.index(k) + 1, "optimizer": s.kernel, "data": s.data, "norm": s.norm,
               "ms": m, "min": min(values[k]) if values.get(k) else None,
               "max": max(values[k]) if values.get(k) else None, "peak_gib": peaks.get(k), "ratios": {}, "refs": {}}
        for col, ref in ratio_refs(s, specs, gpu).items():
            r = med.get(ref) if ref else None
            if col == "Lightning / this":
                row["ratios"][col] = r / m if (m and r) else None
            else:
                row["ratios"][col] = m / r if (m and r) else None
            row["refs"][col] = names.index(ref) + 1 if ref else None
        rows.append(row)
    return rows


def format_table(rows: list[dict], gpu: bool, ddp: bool = False, lightning: bool = False,
                 unit: str = "ms/step (median)", instructions: bool = False) -> list[str]:
    """Fixed-width text: the variant name left-aligned, every other column right-aligned. Ratio
    columns say which row they divide by: `1.022x [3]` = 1.022 times row 3's figure."""
    def f(x, spec, suffix=""):
        return "-" if x is None else f"{x:{spec}}{suffix}"

    cols = ["vs reference", "vs plain loop"] + (["vs mean-norm loop"] if ddp else ["vs unchecked loop"]) + \
        (["Lightning / this"] if lightning else []) + (["vs hand graph"] if gpu else [])
    head = ["#", "variant", "optimizer", "data"] + (["norm"] if ddp else []) + [unit]
    head += [] if instructions else ["spread", "peak GiB"]
    head += cols
    table = [head]
    for r in rows:
        left = [str(r["index"]), r["variant"], r["optimizer"], r["data"]] + ([r["norm"]] if ddp else [])
        if r["ms"] is None:
            cells = ["failed"] + ["-"] * (len(head) - len(left) - 1)
        else:
            cells = [f(r["ms"], ",.0f" if instructions else ".3f")]
            if not instructions:
                cells += [f"{r['min']:.3f}-{r['max']:.3f}", f(r["peak_gib"], ".2f")]
            for c in cols:
                x, ref = r["ratios"].get(c), r["refs"].get(c)
                cells.append("-" if x is None else f"{x:.3f}x [{ref}]")
        table.append(left + cells)
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    n_left = 5 if ddp else 4
    lines = []
    for row in table:
        lines.append((row[0].rjust(widths[0]) + "  " + "  ".join(c.ljust(w) for c, w in zip(row[1:n_left], widths[1:n_left]))
                      + "".join(c.rjust(w + 3) for c, w in zip(row[n_left:], widths[n_left:]))).rstrip())
    width = max(len(line) for line in lines)
    return [line.ljust(width) for line in lines]


def header(args, run: Run, world: int = 1) -> str:
    dev = run.device
    where = f"gpu={torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else f"cpu={platform.machine()}"
    mode = "instructions (callgrind, training window only)" if args.instructions else \
        (f"DDP x{world} ({'nccl' if dev.type == 'cuda' else 'gloo'}), in-process" if world > 1 else
         "one process per variant run")
    return (f"model={args.model} device={dev.type} {where} batch={run.batch}{'/rank' if world > 1 else ''} "
            f"precision={run.precision} steps={run.steps} (timed: {run.warmup + 2}-{run.steps}) "
            f"repeats={1 if args.instructions else args.repeats} threads={args.threads} torch={torch.__version__} "
            f"lightning={lightning_version() or 'not installed (no Lightning rows)'} mode: {mode}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(WORKLOADS), default="mlp")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 for pdan, r2plus1d, segformer, mvfoul (actions of 2 views), xca_csnet; 6 for xca_flow (the seed's train_bs); 32 for mlp")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="used by every variant; default: bf16-mixed on cuda, 32-true on cpu")
    ap.add_argument("--steps", type=int, default=300, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=50, help="untimed steps at the start of each run")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = the PERF_ANCHORS setting)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default="", help="comma-separated substrings of variant names to run (default: "
                    "all); the hand-written references of the chosen ones are always added")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per step under callgrind (training window only), each variant once")
    ap.add_argument("--keep-callgrind", default=None, metavar="DIR",
                    help="--instructions: keep the callgrind output files in DIR")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device {args.device!r}: {e}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    if args.steps - args.warmup < 2:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) by at least 2")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.instructions and (args.ddp or device.type != "cpu"):
        ap.error("--instructions counts a single CPU process: not under torchrun, --device cpu")
    args.batch = args.batch or DEFAULT_BATCH[args.model]
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    variants = select(all_variants(device, args.model, args.ddp), args.variants)
    if not variants:
        ap.error(f"--variants {args.variants!r} matches none of: "
                 f"{', '.join(all_variants(device, args.model, args.ddp))}")
    args.selected = variants
    return args


def main(argv=None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--child"]:
        return child_main(raw[1])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(torch.device(args.device), args.batch, args.steps, args.warmup, args.lr, args.precision)
    gpu = run.device.type == "cuda"
    world, rank = 1, 0
    if args.ddp:
        from trainlib import dist as tdist
        env = tdist.init(tdist.pick_device(args.device, tdist.env_from_torchrun()), 600.0)
        world, rank = env.world_size, env.rank
        if gpu:
            run = replace(run, device=torch.device("cuda", env.local_rank % torch.cuda.device_count()))
        w = WORKLOADS[args.model](args.batch, args.steps)
        runner = inline_runner(w, run)
    elif args.instructions:
        runner = instructions_runner(args, args.keep_callgrind)
    else:
        runner = isolated_runner(args)
    out = sys.stdout if rank == 0 else open(os.devnull, "w")
    if args.instructions:
        values, failed = {k: [] for k in args.selected}, {}
        for name, s in args.selected.items():
            try:
                res = runner(s)
                if bool(res["fused"]) != s.fused:
                    raise RuntimeError(f"ran the {'fused' if res['fused'] else 'unfused'} kernel, row says {s.kernel}")
                values[name] = [res["instructions"] / res["window_steps"]]
            except Exception as e:  # noqa: BLE001
                failed[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"variant {name} failed: {failed[name]}", file=out, flush=True)
        rows = summarize(args.selected, values, {}, gpu=False)
        print("\n" + header(args, run), file=out)
        for line in format_table(rows, gpu=False, lightning=LIGHTNING in args.selected,
                                 unit="instructions/step", instructions=True):
            print(line, file=out)
        return None
    times, peaks, _ = run_variants(args.selected, run, args.repeats, runner, out=out)
    print("\n" + header(args, run, world), file=out)
    for line in format_table(summarize(args.selected, times, peaks, gpu), gpu, ddp=args.ddp,
                             lightning=LIGHTNING in args.selected):
        print(line, file=out, flush=True)
    if args.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return None


if __name__ == "__main__":
    main()
