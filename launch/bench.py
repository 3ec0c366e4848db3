"""Side-by-side speed and memory of a training step: hand-written loops vs trainlib vs Lightning.

    python -m launch.bench --model mlp --device cpu                 # engine overhead on a small model
    python -m launch.bench --model pdan --device cuda               # PDAN as in PERF_ANCHORS.md
    python -m launch.bench --model r2plus1d --device cuda --variants hand,trainlib

Every variant trains the same model on the same data with the same batch and precision, in this
one process, interleaved over --repeats rounds; the table shows the median ms/step of the timed
steps (after --warmup steps), the peak GPU memory, and ratios to the hand-written loop, to Lightning
and (on a GPU) to the hand-written compiled-and-graphed loop. Only ratios measured in one run mean
anything: absolute times move between runs on a shared machine.

Variants (names are matched by --variants, a comma-separated list of substrings):
  hand-written loop            DataLoader -> .to(device) -> forward/loss/backward -> AdamW.step
  hand-written fused           the same with AdamW(fused=True), the optimizer kernel trainlib uses
  hand-written graph           GPU: batches pre-loaded on the GPU, capturable fused AdamW, forward +
                               loss + backward + step captured in one torch.cuda.CUDAGraph, replayed
  hand-written compile+graph   GPU: the same with the model wrapped in torch.compile before capture
  trainlib eager               Trainer.fit with default settings (a TensorDataset is read a batch at a time)
  trainlib, per-sample data    the same, reading samples one by one through the DataLoader exactly like
                               the hand-written loop: the engine's own overhead
  trainlib compile             GPU: TrainerConfig(compile=True)
  trainlib graphs              GPU: TrainerConfig(cuda_graphs=True), DataConfig(device_resident=True)
  trainlib compile+graphs      GPU: both
  Lightning                    L.Trainer fed by an ordinary DataLoader (when `lightning` is importable)

Timing: a timestamp is taken at the end of every step; on a GPU the host synchronises only at the
first timed step and at the last step, so (as in real training) it may run ahead of the GPU, and
ms/step is the wall time between those two points over the steps between them.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainlib import Callback, DataConfig, LogConfig, OptimConfig, Trainer, TrainerConfig


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


WORKLOADS: dict[str, Callable[[int, int], Workload]] = {
    "mlp": mlp_workload, "pdan": pdan_workload, "r2plus1d": r2plus1d_workload, "segformer": segformer_workload}
DEFAULT_BATCH = {"mlp": 32, "pdan": 8, "r2plus1d": 8, "segformer": 8}
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
    one: the steps in between run as in real training, with the host free to run ahead."""

    def __init__(self, run: Run) -> None:
        self.run, self.stamps = run, []

    def tick(self) -> None:
        n = len(self.stamps)
        if n == self.run.warmup or n >= self.run.steps - 1:
            _sync(self.run.device)
        self.stamps.append(time.perf_counter())


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

def hand_written(w: Workload, run: Run, fused: bool = False) -> list[float]:
    """The loop a user would write by hand: DataLoader, forward, loss, backward, step."""
    dev = run.device
    torch.manual_seed(0)
    model = w.make_model().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.0, fused=fused)
    loader = DataLoader(w.dataset, batch_size=run.batch, shuffle=True, drop_last=True,
                        pin_memory=dev.type == "cuda")
    clock = Clock(run)
    it = iter(loader)
    for _ in range(run.steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        b = _to(b, dev)
        with _autocast(run):
            loss = _loss_value(w.loss_fn(w.forward(model, b), b))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick()
    return clock.stamps


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


class _PerSample(Dataset):
    """The workload's samples read one at a time, as the hand-written loop's DataLoader reads them
    (a TensorDataset would be fetched a batch at a time by trainlib). No augmentation, so trainlib
    is told it need not seed each batch (`random_fetch = False`)."""

    random_fetch = False

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def trainlib_variant(device_resident: bool = False, per_sample: bool = False, **flags):
    """Trainer.fit with TrainerConfig(**flags); device_resident: trainlib's own GPU input pipeline;
    per_sample: the hand-written loop's data path exactly (isolates the engine's own overhead)."""
    def run_(w: Workload, run: Run) -> list[float]:
        torch.manual_seed(0)
        stamp = _Stamps(run)
        dataset = _PerSample(w.dataset) if per_sample else w.dataset
        data = DataConfig(batch_size=run.batch, drop_last=True, **({"device_resident": True} if device_resident else {}))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainerConfig(max_steps=run.steps, max_epochs=10**6, out_dir=tmp, save_top_k=0, save_last=False,
                                export=False, device=run.device.type, precision=run.precision, **flags)
            t = Trainer(w.make_model(), w.loss_fn, dataset, config=cfg, optim=OptimConfig(name="adamw", lr=run.lr),
                        data=data, log_config=LogConfig(loggers=["jsonl"], every_n_steps=50, progress_bar=False),
                        forward_fn=w.forward, callbacks=[stamp])
            t.fit()
        return stamp.clock.stamps
    return run_


def lightning_version() -> Optional[str]:
    try:
        import lightning
    except ImportError:
        return None
    return lightning.__version__


def lightning_variant(w: Workload, run: Run) -> list[float]:
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
            return torch.optim.AdamW(self.parameters(), lr=run.lr, weight_decay=0.0)

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
    return cb.clock.stamps


def all_variants(device: torch.device) -> dict[str, Callable[[Workload, Run], list[float]]]:
    v: dict[str, Callable[[Workload, Run], list[float]]] = {
        "hand-written loop": hand_written,
        # the same loop with the fused AdamW trainlib uses: isolates the engine's own overhead
        "hand-written fused": lambda w, r: hand_written(w, r, fused=True),
    }
    if device.type == "cuda":
        v["hand-written graph"] = lambda w, r: hand_graphed(w, r, compile_model=False)
        v["hand-written compile+graph"] = hand_graphed
    v["trainlib eager"] = trainlib_variant()
    v["trainlib, per-sample data"] = trainlib_variant(per_sample=True)
    if device.type == "cuda":
        v["trainlib compile"] = trainlib_variant(compile=True)
        v["trainlib graphs"] = trainlib_variant(cuda_graphs=True, device_resident=True)
        v["trainlib compile+graphs"] = trainlib_variant(compile=True, cuda_graphs=True, device_resident=True)
    if lightning_version():
        v["Lightning"] = lightning_variant
    return v


def select(variants: dict, spec: str) -> dict:
    """Keep the variants whose name contains one of the comma-separated substrings (any case)."""
    keys = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not keys:
        return dict(variants)
    return {k: f for k, f in variants.items() if any(s in k.lower() for s in keys)}


# ------------------------------------------------------------------------------------------------
# Running and reporting

HAND, HAND_GRAPH, LIGHTNING = "hand-written loop", "hand-written compile+graph", "Lightning"


@contextlib.contextmanager
def _same_global_flags():
    """A variant (Lightning, trainlib) may set process-wide torch flags; the next one must not inherit them."""
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


def run_variants(variants: dict, w: Workload, run: Run, repeats: int, out=sys.stdout):
    """Interleaved rounds (drift hits every variant alike). Returns ({name: [ms/step per round]},
    {name: peak GiB or None}, {name: error}); a variant that raises is reported in one line and
    not run again."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, Optional[float]] = {k: None for k in variants}
    failed: dict[str, str] = {}
    cuda = run.device.type == "cuda"
    for _ in range(repeats):
        for name, fn in variants.items():
            if name in failed:
                continue
            gc.collect()
            if cuda:
                torch._dynamo.reset()  # every compiled variant compiles afresh: no recompile limits, no sharing
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(run.device)
            try:
                with _same_global_flags():
                    stamps = fn(w, run)
                times[name].append(ms_per_step(stamps, run.warmup, run.steps))
            except Exception as e:  # noqa: BLE001 - one broken variant must not cost the others' numbers
                msg = (str(e).strip().splitlines() or [""])[0]
                failed[name] = f"{type(e).__name__}: {msg}"
                times[name], peaks[name] = [], None  # a variant that failed in any round is reported as failed
                print(f"variant {name} failed: {failed[name]}", file=out, flush=True)
                continue
            finally:
                if cuda:
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize(run.device)
            if cuda:
                peak = torch.cuda.max_memory_allocated(run.device) / 2**30
                peaks[name] = max(peaks[name] or 0.0, peak)
    return times, peaks, failed


def summarize(times: dict[str, list[float]], peaks: dict[str, Optional[float]], gpu: bool) -> list[dict]:
    """One row per variant: median, spread, peak and the ratios (None where a reference is missing)."""
    med = {k: statistics.median(v) for k, v in times.items() if v}
    hand, light, hgraph = med.get(HAND), med.get(LIGHTNING), med.get(HAND_GRAPH)
    rows = []
    for k, v in times.items():
        m = med.get(k)
        rows.append({
            "variant": k, "ms": m, "min": min(v) if v else None, "max": max(v) if v else None,
            "peak_gib": peaks.get(k),
            "vs_hand": m / hand if m and hand else None,
            "lightning_over": light / m if m and light else None,
            "vs_hand_graph": m / hgraph if (gpu and m and hgraph) else None,
        })
    return rows


def format_table(rows: list[dict], gpu: bool) -> list[str]:
    """Fixed-width text: the variant name left-aligned, every other column right-aligned."""
    def f(x, spec, suffix=""):
        return "-" if x is None else f"{x:{spec}}{suffix}"

    head = ["variant", "ms/step (median)", "spread", "peak GiB", "vs hand-written", "Lightning / this"]
    head += ["vs hand graph"] if gpu else []
    table = [head]
    for r in rows:
        if r["ms"] is None:
            cells = ["failed"] + ["-"] * (len(head) - 2)
        else:
            cells = [f(r["ms"], ".3f"), f"{r['min']:.3f}-{r['max']:.3f}", f(r["peak_gib"], ".2f"),
                     f(r["vs_hand"], ".3f", "x"), f(r["lightning_over"], ".2f", "x")]
            cells += [f(r["vs_hand_graph"], ".2f", "x")] if gpu else []
        table.append([r["variant"]] + cells)
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    return [row[0].ljust(widths[0]) + "".join(cell.rjust(w + 3) for cell, w in zip(row[1:], widths[1:]))
            for row in table]


def header(args, run: Run) -> str:
    dev = run.device
    where = f"gpu={torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else f"cpu={platform.machine()}"
    return (f"model={args.model} device={dev} {where} batch={run.batch} precision={run.precision} "
            f"steps={run.steps} (timed: {run.warmup + 2}-{run.steps}) repeats={args.repeats} "
            f"threads={args.threads} torch={torch.__version__} lightning={lightning_version() or 'not installed'}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(WORKLOADS), default="mlp")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 for pdan and r2plus1d, 32 for mlp")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="used by every variant; default: bf16-mixed on cuda, 32-true on cpu")
    ap.add_argument("--steps", type=int, default=300, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=50, help="untimed steps at the start of each run")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = the PERF_ANCHORS setting)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default="", help="comma-separated substrings of variant names to run (default: all)")
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
    args.batch = args.batch or DEFAULT_BATCH[args.model]
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    variants = select(all_variants(device), args.variants)
    if not variants:
        ap.error(f"--variants {args.variants!r} matches none of: {', '.join(all_variants(device))}")
    args.selected = variants
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(torch.device(args.device), args.batch, args.steps, args.warmup, args.lr, args.precision)
    w = WORKLOADS[args.model](args.batch, args.steps)
    times, peaks, _ = run_variants(args.selected, w, run, args.repeats)
    gpu = run.device.type == "cuda"
    print("\n" + header(args, run))
    for line in format_table(summarize(times, peaks, gpu), gpu):
        print(line)


if __name__ == "__main__":
    main()
