"""Side-by-side speed of a training step: a hand-written loop vs trainlib (vs Lightning when installed).

    python -m launch.bench --model mlp --device cpu            # engine overhead on a small model
    python -m launch.bench --model pdan --device cuda          # GPU (adds compile; Lightning if importable)

Every variant trains the same model on the same data with the same batch, in this one process,
interleaved over --repeats rounds; the table shows the median ms/step of the timed steps (after
--warmup steps) and ratios to the hand-written loop and to Lightning. Only ratios measured in one
run mean anything: absolute times move between runs on a shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainlib import Callback, DataConfig, LogConfig, OptimConfig, Trainer, TrainerConfig


# ------------------------------------------------------------------------------------------------
# Workloads: (model factory, dataset, loss(outputs, batch), forward(model, batch))

def mlp_workload(batch: int, steps: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, 64, generator=g)
    y = torch.randint(0, 10, (batch * steps,), generator=g)
    model = lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))  # noqa: E731
    loss = lambda out, b: nn.functional.cross_entropy(out, b[1])  # noqa: E731
    return model, TensorDataset(x, y), loss, lambda m, b: m(b[0]), None


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


def pdan_workload(batch: int, steps: int):
    from recipes.pdan import PDAN, forward, loss_last_stage

    model = lambda: PDAN(num_stages=2, num_layers=5, num_channels=512, input_channels=1024, num_classes=157)  # noqa: E731
    return model, _PDANFeatures(batch * 8), loss_last_stage, forward, None


WORKLOADS: dict[str, Callable] = {"mlp": mlp_workload, "pdan": pdan_workload}


def _loss_value(out):
    return out["loss"] if isinstance(out, dict) else out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Variants

def hand_written(make_model, ds, loss_fn, fwd, device, batch, steps, lr, fused=False):
    """The loop a user would write by hand: DataLoader, forward, loss, backward, step."""
    torch.manual_seed(0)
    model = make_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda")
    stamps = []
    it = iter(loader)
    for _ in range(steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        b = _to(b, device)
        out = fwd(model, b)
        loss = _loss_value(loss_fn(out, b))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        stamps.append(time.perf_counter())
    return stamps


def _to(b, device):
    if isinstance(b, dict):
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}
    return [v.to(device, non_blocking=True) for v in b]


class _Stamps(Callback):
    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def on_train_step_end(self, trainer) -> None:
        _sync(self.device)  # benchmark only: time finished work
        self.stamps.append(time.perf_counter())


def trainlib_variant(**flags):
    def run(make_model, ds, loss_fn, fwd, device, batch, steps, lr):
        torch.manual_seed(0)
        stamp = _Stamps(device)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainerConfig(max_steps=steps, max_epochs=10**6, out_dir=tmp, save_top_k=0, save_last=False,
                                export=False, device=device.type, **flags)
            t = Trainer(make_model(), loss_fn, ds, config=cfg, optim=OptimConfig(name="adamw", lr=lr),
                        data=DataConfig(batch_size=batch, drop_last=True),
                        log_config=LogConfig(loggers=["jsonl"], every_n_steps=50, progress_bar=False),
                        forward_fn=fwd, callbacks=[stamp])
            t.fit()
        return stamp.stamps
    return run


def lightning_variant(make_model, ds, loss_fn, fwd, device, batch, steps, lr):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, b, i):
            loss = _loss_value(loss_fn(fwd(self.net, b), b))
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr)

    class Stamps(L.Callback):
        def __init__(self):
            self.stamps = []

        def on_train_batch_end(self, *a):
            _sync(device)
            self.stamps.append(time.perf_counter())

    torch.manual_seed(0)
    cb = Stamps()
    trainer = L.Trainer(max_steps=steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="32-true", logger=False, enable_checkpointing=False, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                     pin_memory=device.type == "cuda"))
    return cb.stamps


def ms_per_step(stamps: list[float], warmup: int) -> float:
    timed = stamps[warmup:]
    return 1000 * (timed[-1] - timed[0]) / (len(timed) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(WORKLOADS), default="mlp")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = the PERF_ANCHORS setting)")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    variants: dict[str, Callable] = {
        "hand-written loop": hand_written,
        # the same loop with the fused AdamW trainlib uses: isolates the engine's own overhead
        "hand-written, fused": lambda *a: hand_written(*a, fused=True),
        "trainlib eager": trainlib_variant(),
    }
    if device.type == "cuda":
        variants["trainlib compile"] = trainlib_variant(compile=True)
    try:
        import lightning  # noqa: F401

        variants["Lightning"] = lightning_variant
    except ImportError:
        pass

    make_model, ds, loss_fn, fwd, _ = WORKLOADS[args.model](args.batch, args.steps)
    results: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, fn in variants.items():
            stamps = fn(make_model, ds, loss_fn, fwd, device, args.batch, args.steps, args.lr)
            results[name].append(ms_per_step(stamps, args.warmup))

    med = {k: statistics.median(v) for k, v in results.items()}
    hand = med["hand-written loop"]
    light = med.get("Lightning")
    print(f"\nmodel={args.model} device={device} batch={args.batch} steps={args.steps} (timed {args.steps - args.warmup}) "
          f"repeats={args.repeats} threads={args.threads} torch={torch.__version__}")
    print(f"{'variant':<22}{'ms/step (median)':>18}{'spread':>16}{'vs hand-written':>18}{'Lightning / this':>18}")
    for k, v in med.items():
        spread = f"{min(results[k]):.3f}-{max(results[k]):.3f}"
        rel = f"{v / hand:.3f}x"
        lt = f"{light / v:.2f}x" if light else "-"
        print(f"{k:<22}{v:>18.3f}{spread:>16}{rel:>18}{lt:>18}")


if __name__ == "__main__":
    main()
