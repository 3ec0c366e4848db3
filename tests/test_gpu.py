"""GPU behaviour (marked `gpu`, skipped without CUDA): whole-step CUDA graphs replay the eager
computation, the loop never syncs the host outside logging steps, and compile works under DDP.

Run on a GPU machine: `python -m pytest -q -m gpu tests/test_gpu.py`
"""
import json

import pytest
import torch
from torch import nn

from tests.conftest import torchrun
from tests.toy import ToyData, make_trainer, masked_mse, toy_forward
from trainlib import DataConfig, LogConfig, OptimConfig, Trainer, TrainerConfig
from trainlib.callbacks import Callback

pytestmark = pytest.mark.gpu


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run_dir):
    return [r["loss"] for r in _rows(run_dir) if r["split"] == "train"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 1))


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=512):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, 32, generator=g)
        self.y = self.x[..., :1] * 2 - self.x[..., 1:2] + 0.05 * torch.randn(n, 4, 1, generator=g)
        self.valid = (torch.rand(n, 4, generator=g) > 0.3).float()
        self.valid[:, 0] = 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "valid": self.valid[i]}


def _fit(tmp_path, name, *, graphs, compile=False, precision="bf16-mixed", extra=None, callbacks=()):
    cfg = TrainerConfig(max_epochs=3, out_dir=str(tmp_path), run_name=name, save_top_k=0, save_last=False,
                        export=False, device="cuda", precision=precision, cuda_graphs=graphs, compile=compile,
                        grad_clip=1.0, **(extra or {}))
    t = Trainer(_mlp(), masked_mse, _Data(), config=cfg, optim=OptimConfig(name="adamw", lr=3e-3, scheduler="cosine",
                                                                            warmup_steps=5),
                data=DataConfig(batch_size=32, drop_last=False), log_config=LogConfig(loggers=["jsonl"], every_n_steps=1),
                forward_fn=toy_forward, callbacks=list(callbacks))
    t.fit()
    return t


@pytest.mark.parametrize("compile", [False, True])
def test_graph_replay_follows_the_eager_loss_trajectory(tmp_path, compile):
    eager = _fit(tmp_path, f"eager{compile}", graphs=False, compile=compile)
    graph = _fit(tmp_path, f"graph{compile}", graphs=True, compile=compile)
    assert graph.graphs is not None and not graph.graphs.disabled
    # 512 samples / 32 = 16 full batches: one shape, captured after 3 warm-up steps, replayed after
    assert graph.graphs.captured == 1 and len(graph.graphs.graphs) == 1
    a, b = _train_losses(eager.run_dir), _train_losses(graph.run_dir)
    assert len(a) == len(b) == 48
    assert a[-1] < 0.3 * a[0]  # it learned
    for i, (x, y) in enumerate(zip(a, b)):
        assert y == pytest.approx(x, rel=3e-2, abs=1e-3), f"step {i + 1}: eager {x} vs graph {y}"
    for (k, p), q in zip(eager.model.state_dict().items(), graph.model.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=3e-2, rtol=3e-2), k
    mfu = [r["mfu"] for r in _rows(graph.run_dir) if r["split"] == "train"]
    assert all(0 < m < 1 for m in mfu), mfu  # counted FLOPs against the GPU's peak
    # the schedule reached the captured step: the lr tensor the graph reads is the schedule's lr
    lr = graph.optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(graph.schedule.lrs[0], rel=1e-6)


def test_graphs_with_a_shorter_last_batch_and_accumulation(tmp_path):
    """500 samples, batch 32, 2 micro-batches a step: windows of shapes (32,32) and (32,20)."""
    def run(name, graphs):
        cfg = TrainerConfig(max_epochs=5, out_dir=str(tmp_path), run_name=name, save_top_k=0, save_last=False,
                            export=False, device="cuda", precision="32-true", cuda_graphs=graphs,
                            accumulate_grad_batches=2)
        t = Trainer(_mlp(), masked_mse, _Data(500), config=cfg, optim=OptimConfig(name="adamw", lr=1e-3),
                    data=DataConfig(batch_size=32), log_config=LogConfig(loggers=["jsonl"], every_n_steps=1),
                    forward_fn=toy_forward)
        t.fit()
        return t
    eager, graph = run("e", False), run("g", True)
    assert len(graph.graphs.graphs) == 2 and graph.graphs.captured == 2
    a, b = _train_losses(eager.run_dir), _train_losses(graph.run_dir)
    assert b == pytest.approx(a, rel=1e-3, abs=1e-5)


class _SyncCheck(Callback):
    """torch.cuda.set_sync_debug_mode('error') from the end of one step until the next logging step
    begins (the loop's `stats.fold`), so any host sync inside a non-logging step raises."""

    def __init__(self):
        self.checked = 0

    def on_train_step_end(self, t):
        if t.batch_in_epoch < t.train_batches:
            torch.cuda.set_sync_debug_mode("error")
            self.checked += 1

    def on_train_epoch_end(self, t):
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("graphs", [False, True])
def test_no_host_sync_in_non_logging_steps(tmp_path, graphs, monkeypatch):
    from trainlib.graphs import StepGraphs

    capture = StepGraphs._capture

    def capture_unchecked(self, g):  # the one-time capture synchronises by design (torch.cuda.graph)
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return capture(self, g)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(StepGraphs, "_capture", capture_unchecked)
    check = _SyncCheck()
    cfg_extra = dict(nonfinite="skip", accumulate_grad_batches=2)
    t = None
    try:
        cfg = TrainerConfig(max_epochs=2, out_dir=str(tmp_path), run_name=f"s{graphs}", save_top_k=0, save_last=False,
                            export=False, device="cuda", precision="bf16-mixed", cuda_graphs=graphs, grad_clip=1.0,
                            **cfg_extra)
        t = Trainer(_mlp(), masked_mse, _Data(), config=cfg, optim=OptimConfig(name="adamw", lr=1e-3, scheduler="cosine"),
                    data=DataConfig(batch_size=32), log_config=LogConfig(loggers=["jsonl"], every_n_steps=4),
                    forward_fn=toy_forward, callbacks=[check])
        fold = t.stats.fold

        def fold_unchecked():
            torch.cuda.set_sync_debug_mode(0)  # logging step: its syncs are the allowed ones
            fold()

        t.stats.fold = fold_unchecked
        t.fit()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert check.checked >= 10 and t.global_step == 16
    if graphs:
        assert t.graphs.captured >= 1 and not t.graphs.disabled  # the checked steps were replays


def test_compile_under_ddp_on_one_gpu_matches_eager(tmp_path):
    """Two processes share the GPU over gloo (NCCL refuses two ranks on one device)."""
    env = {"TRAINLIB_DIST_BACKEND": "gloo"}
    flags = ["trainer.max_epochs=2", "trainer.device=cuda", "trainer.save_top_k=0", "optim.name=adamw",
             "optim.lr=0.01"]
    r = torchrun(2, ["tests/toy.py", str(tmp_path / "e"), f"trainer.out_dir={tmp_path}/re", *flags], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for mode in ("true", "max-autotune-no-cudagraphs", "reduce-overhead"):
        r = torchrun(2, ["tests/toy.py", str(tmp_path / mode), f"trainer.out_dir={tmp_path}/r{mode}",
                         f"trainer.compile={mode}", *flags], env=env, timeout=900)
        assert r.returncode == 0, f"compile={mode}: {r.stderr[-3000:]}"
        a, b = torch.load(tmp_path / "e" / "weights.pt"), torch.load(tmp_path / mode / "weights.pt")
        for k in a:
            assert torch.allclose(a[k].cpu(), b[k].cpu(), atol=1e-4, rtol=1e-3), f"compile={mode} {k}"


def test_device_resident_pdan_with_graphs_learns(tmp_path):
    """The PDAN recipe end to end with its fast path: data on the GPU, buckets, compile + graphs."""
    r = torchrun(1, ["-m", "recipes.pdan", f"trainer.out_dir={tmp_path}", "trainer.run_name=p", "trainer.max_epochs=6",
                     "trainer.cuda_graphs=true", "trainer.compile=true", "trainer.precision=bf16-mixed",
                     "data.device_resident=true"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "captured the training step" in r.stderr + r.stdout
    val = [row for row in _rows(tmp_path / "p") if row["split"] == "val"]
    assert val[-1]["map"] > 0.5, val[-1]


def test_toy_trainer_runs_eagerly_when_capture_is_impossible(tmp_path):
    """A loss with a host sync: capture fails, the run says why in one line and finishes eagerly."""
    def syncing_loss(out, batch):
        r = masked_mse(out, batch)
        if r["loss"].item() < 0:  # a host sync inside the step
            raise AssertionError
        return r

    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.device=cuda", "trainer.cuda_graphs=true",
                      "trainer.max_epochs=2"], ToyData(96))
    t.loss_fn = syncing_loss
    t.fit()
    assert t.graphs.disabled.startswith("capture of the training step failed")
    assert t.global_step == 24
