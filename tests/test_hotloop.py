"""The hot loop on CPU: no host-sync calls outside logging steps, the device-resident and
batch-at-a-time data paths give the same training as the per-sample DataLoader, compile modes
(also under 2-process DDP), and the CUDA-graph settings that must refuse or fall back clearly."""
import json
import logging

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset, TensorDataset

from tests.conftest import torchrun
from tests.fake_cuda import FakeCUDA, lr_tensors
from tests.toy import ToyData, make_trainer
from trainlib import ConfigError
from trainlib.callbacks import Callback
from trainlib.data import DeviceLoader, ShardSampler, build_loader
from trainlib.graphs import plain_optimizer_state
from trainlib.loggers import TIMING_KEYS
from trainlib.optim import LRSchedule
from trainlib.config import OptimConfig

SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero",
         "synchronize", "_local_scalar_dense"}


class _SyncSpy(TorchFunctionMode):
    """Records every tensor->host conversion (each one is a device sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed, self.hits = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.armed and name in SYNCS:
            import traceback
            self.hits.append((name, "".join(traceback.format_stack(limit=6)[:-1])))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._aten = _AtenSyncSpy(self).__enter__()  # syncs inside C++ ops (a 0-d tensor read as a Scalar)
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._aten.__exit__(*exc)
        return out


class _AtenSyncSpy(TorchDispatchMode):
    """aten._local_scalar_dense is what every tensor->host read becomes below Python: also the ones an
    operator does itself (e.g. a foreach op given a 0-d tensor where it takes a number)."""

    def __init__(self, spy: _SyncSpy) -> None:
        super().__init__()
        self.spy = spy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.spy.armed and func is torch.ops.aten._local_scalar_dense.default:
            import traceback
            self.spy.hits.append(("aten._local_scalar_dense", "".join(traceback.format_stack(limit=8)[:-1])))
        return func(*args, **(kwargs or {}))


class _Arm(Callback):
    """Arms the spy after each non-final step of an epoch; the logging step's first act (stats.fold) disarms it."""

    def __init__(self, spy: _SyncSpy) -> None:
        self.spy = spy

    def on_train_step_end(self, t) -> None:
        self.spy.armed = t.batch_in_epoch < t.train_batches


_FULL = ["trainer.accumulate_grad_batches=2", "trainer.nonfinite=skip", "trainer.grad_clip=1.0", "optim.name=adamw",
         "optim.scheduler=cosine", "trainer.ema_decay=0.9", "trainer.ema_warmup=true", "trainer.track_grad_norm=2"]
# oom_recovery runs eagerly (its agreement is host-side, on gloo: no device sync)
_OOM = ["trainer.oom_recovery=true", "trainer.accumulate_grad_batches=2", "trainer.track_grad_norm=inf"]


@pytest.mark.parametrize("extra,graphed", [([], False), ([], True), (_FULL, False), (_FULL, True), (_OOM, False)])
def test_no_host_sync_outside_logging_steps(tmp_path, extra, graphed, monkeypatch):
    spy = _SyncSpy()
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=2", "log.every_n_steps=5",
                      "trainer.save_top_k=0", "trainer.save_last=false", *extra], callbacks=[_Arm(spy)])
    if graphed:  # the graph path's own bookkeeping (copy-in, replay, unpacking) with the torch.cuda stand-in
        fake = FakeCUDA(t)
        fake.install(monkeypatch.setattr)
    fold = t.stats.fold

    def fold_and_disarm():
        spy.armed = False  # logging step: syncs allowed from here
        fold()

    t.stats.fold = fold_and_disarm
    with spy:
        t.fit()
    assert t.global_step >= 10
    if graphed:
        assert fake.replays > 0
    assert not spy.hits, "host sync in a non-logging step:\n" + "\n".join(f"{n}:\n{s}" for n, s in spy.hits[:3])


def test_the_sync_spy_catches_a_sync_in_the_loss(tmp_path):
    """The check above can fail: a loss that calls .item() is caught."""
    from tests.toy import masked_mse

    def syncing_loss(out, batch):
        r = masked_mse(out, batch)
        r["weight"] = float(r["weight"].item())
        return r

    spy = _SyncSpy()
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1", "log.every_n_steps=5",
                      "trainer.save_top_k=0", "trainer.save_last=false"], callbacks=[_Arm(spy)])
    t.loss_fn = syncing_loss
    with spy:
        t.fit()
    assert any(name in ("item", "_local_scalar_dense") for name, _ in spy.hits)


class _PlainDataset(Dataset):
    """The same samples as a TensorDataset, fetched one by one (the DataLoader's default path)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _fit_weights(tmp_path, name, ds, overrides=()):
    from torch import nn
    from trainlib import DataConfig, OptimConfig, Trainer, TrainerConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    cfg = TrainerConfig(max_epochs=3, out_dir=str(tmp_path), run_name=name, save_top_k=0, save_last=False,
                        export=False, device="cpu")
    data = DataConfig(batch_size=7, drop_last=False)
    for o in overrides:
        k, v = o.split("=")
        setattr(data, k, v == "true")
    t = Trainer(model, lambda out, b: nn.functional.cross_entropy(out, b[1]), ds, ds, config=cfg,
                optim=OptimConfig(name="adamw", lr=0.01), data=data)
    t.fit()
    return {k: v.clone() for k, v in t.model.state_dict().items()}, t


def test_batch_fetch_and_device_resident_data_train_exactly_like_per_sample_loading(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    base, _ = _fit_weights(tmp_path, "plain", _PlainDataset(x, y))
    batched, tb = _fit_weights(tmp_path, "batched", TensorDataset(x, y))
    resident, tr = _fit_weights(tmp_path, "resident", _PlainDataset(x, y), ["device_resident=true"])
    assert type(tb.loaders["train"].dataset).__name__ == "BatchFetch"
    assert isinstance(tr.loaders["train"], DeviceLoader) and isinstance(tr.loaders["val"], DeviceLoader)
    init = torch.nn.Sequential(torch.nn.Linear(5, 16))
    assert not torch.equal(base["0.weight"], init[0].weight)  # it trained
    for k in base:
        assert torch.equal(base[k], batched[k]), k
        assert torch.equal(base[k], resident[k]), k


def test_device_loader_batches_equal_dataloader_batches_with_ids_and_shards():
    ds = ToyData(23)
    for rank in (0, 1):
        s1 = ShardSampler(len(ds), rank, 2, shuffle=True, seed=5)
        s2 = ShardSampler(len(ds), rank, 2, shuffle=True, seed=5)
        s1.set_epoch(2), s2.set_epoch(2)
        a = list(build_loader(ds, batch_size=4, sampler=s1, collate_fn=None, num_workers=0, pin_memory=False,
                              drop_last=False, seeded=True))
        b = list(DeviceLoader(ds, batch_size=4, sampler=s2, collate_fn=None, device=torch.device("cpu"),
                              drop_last=False, seeded=True))
        assert len(a) == len(b) == 3
        for p, q in zip(a, b):
            assert p.keys() == q.keys()
            for k in p:
                assert torch.equal(p[k], q[k]), k


def test_device_loader_refuses_a_collate_without_a_sample_dimension():
    class Odd(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.ones(2)

    with pytest.raises(ValueError, match=r"data.device_resident: .* leading dimension of 4"):
        DeviceLoader(Odd(), batch_size=2, sampler=ShardSampler(4), collate_fn=lambda items: torch.ones(3),
                     device=torch.device("cpu"), drop_last=False)


def test_lr_schedule_fills_a_device_lr_tensor_and_checkpoints_plain_floats():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = LRSchedule(opt, OptimConfig(lr=0.1, scheduler="cosine"), total_steps=10, steps_per_epoch=10)
    lr_tensor = torch.tensor(0.1)
    opt.param_groups[0]["lr"] = lr_tensor
    opt.param_groups[0]["capturable"] = True
    for _ in range(5):
        sched.step()
    assert opt.param_groups[0]["lr"] is lr_tensor  # filled in place: a captured step keeps reading it
    assert lr_tensor.item() == pytest.approx(0.05, rel=1e-6) == sched.lrs[0]
    plain = plain_optimizer_state(opt.state_dict())
    assert plain["param_groups"][0]["lr"] == pytest.approx(0.05) and isinstance(plain["param_groups"][0]["lr"], float)
    assert plain["param_groups"][0]["capturable"] is False
    assert opt.param_groups[0]["capturable"] is True  # the live optimizer is untouched


def test_cuda_graphs_refuse_reduce_overhead_and_fall_back_on_cpu(tmp_path, caplog):
    with pytest.raises(ConfigError, match="trainer.compile=reduce-overhead already replays CUDA graphs"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.cuda_graphs=true", "trainer.compile=reduce-overhead"])
    with caplog.at_level(logging.WARNING, logger="trainlib"):
        t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.cuda_graphs=true", "trainer.max_epochs=1"])
    assert "trainer.cuda_graphs=true ignored: CUDA graphs need a GPU; running eagerly" in caplog.text
    assert not t.use_graphs
    t.fit()
    assert t.graphs is None and t.global_step > 0


def test_compile_under_two_process_ddp_matches_eager(tmp_path):
    """torch.compile (inductor on CPU) of the inner module, wrapped in DDP over gloo."""
    common = ["tests/toy.py"]
    flags = ["trainer.max_epochs=2", "data.batch_size=8", "trainer.save_top_k=0"]
    r = torchrun(2, common + [str(tmp_path / "eager"), f"trainer.out_dir={tmp_path}/re", *flags], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, common + [str(tmp_path / "comp"), f"trainer.out_dir={tmp_path}/rc", "trainer.compile=true",
                              *flags], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "eager" / "weights.pt")
    b = torch.load(tmp_path / "comp" / "weights.pt")
    for k in a:
        assert "_orig_mod" not in k
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), f"{k}: {(a[k] - b[k]).abs().max()}"


def test_flop_count_of_a_linear_model_is_three_forwards():
    from trainlib.flops import peak_flops, train_flops_per_sample

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    batch = (torch.randn(8, 64), torch.zeros(8))
    per_sample = train_flops_per_sample(model, lambda m, b: m(b[0]), batch, 8)
    assert per_sample == 3 * 2 * (64 * 32 + 32 * 10)
    assert model.training  # put back
    assert peak_flops(torch.device("cpu")) is None  # no MFU on a CPU


def test_device_resident_val_and_test_of_one_dataset_share_memory(tmp_path):
    val = ToyData(32, seed=1)
    t = make_trainer([f"trainer.out_dir={tmp_path}", "data.device_resident=true"], val_data=val, test_data=val)
    assert t.loaders["val"].data is t.loaders["test"].data
    assert t.loaders["train"].data is not t.loaders["val"].data


@pytest.mark.parametrize("extra", [
    ["optim.name=adamw", "optim.scheduler=cosine", "optim.warmup_steps=3", "trainer.grad_clip=0.5"],
    ["trainer.accumulate_grad_batches=2", "trainer.nonfinite=skip", "optim.name=adamw", "optim.scheduler=onecycle"],
])
def test_graph_bookkeeping_replays_the_eager_run_exactly(tmp_path, monkeypatch, extra):
    """ToyData(100), batch 8: 12 full batches and one of 4 per epoch, so two batch shapes (windows)."""
    common = [f"trainer.out_dir={tmp_path}", "trainer.max_epochs=6", "log.every_n_steps=3", *extra]
    eager = make_trainer(common + ["trainer.run_name=e"], ToyData(100))
    lr_tensors(eager.optimizer)  # the same float32 lr as the graphed run (a Python float rounds differently)
    eager.fit()

    t = make_trainer(common + ["trainer.run_name=g"], ToyData(100))
    fake = FakeCUDA(t)
    fake.install(monkeypatch.setattr)
    t.fit()

    assert len(t.graphs.graphs) == 2 and fake.captures == 2 and not t.graphs.disabled
    assert fake.replays > t.global_step // 2  # most steps were replays
    lr = t.optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(t.schedule.lrs[0], rel=1e-6)
    assert t.schedule.lrs[0] != pytest.approx(t.schedule.lr_at(t.schedule.base_lrs[0], 0))  # the lr moved
    for k, v in eager.model.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k
    rows = lambda tr: [{k: v for k, v in r.items() if k not in TIMING_KEYS}  # noqa: E731
                       for r in map(json.loads, (tr.run_dir / "metrics.jsonl").read_text().splitlines())]
    assert rows(eager) == rows(t)


def test_graph_bookkeeping_under_two_process_ddp_matches_eager_ddp(tmp_path):
    """2 gloo ranks with the torch.cuda stand-in: the ranks agree on every step's shape (a host-side
    all-reduce), warm up 11 steps (DDP), capture together and replay; weights equal eager DDP."""
    reports = _eager_and_graphed_ddp(tmp_path, ["trainer.max_epochs=5", "optim.scheduler=cosine"])
    for report in reports:
        # 50 samples a rank: 6 batches of 8 and one of 2 per epoch; only the full shape reaches 11 warm-ups
        assert report == {"graphs": 2, "captures": 1, "replays": 5 * 6 - 11}, report


def _eager_and_graphed_ddp(tmp_path, extra):
    """tests/toy.py on 2 gloo ranks twice, eagerly (lr as a tensor, like the graphed run) and with
    the torch.cuda stand-in: asserts equal weights, returns each rank's graph report."""
    flags = ["data.batch_size=8", "trainer.save_top_k=0", "optim.name=adamw", "--toy-n=100", *extra]
    for name, mode in (("e", "--toy-lr_tensor=1"), ("g", "--toy-fake_graphs=1")):
        r = torchrun(2, ["tests/toy.py", str(tmp_path / name), f"trainer.out_dir={tmp_path}/r{name}", mode, *flags])
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "e" / "weights.pt"), torch.load(tmp_path / "g" / "weights.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return [json.loads((tmp_path / "g" / f"graphs_rank{rank}.json").read_text()) for rank in (0, 1)]


def test_group_by_shape_auto_follows_cuda_graphs_and_true_needs_shape_keys(tmp_path, monkeypatch):
    from trainlib import graphs

    base = [f"trainer.out_dir={tmp_path}"]
    assert make_trainer(base, ToyData(40, ragged=True)).train_sampler.groups is None  # auto, CPU: no graphs
    on = make_trainer(base + ["data.group_by_shape=true"], ToyData(40, ragged=True)).train_sampler
    assert on.groups == [2 + i % 3 for i in range(40)] and on.group_size == 8
    acc = make_trainer(base + ["data.group_by_shape=true", "trainer.accumulate_grad_batches=3"], ToyData(40))
    assert acc.train_sampler.group_size == 24  # one group per optimizer step
    monkeypatch.setattr(graphs, "why_not_graphable", lambda *a: "")  # as on a GPU
    assert make_trainer(base + ["trainer.cuda_graphs=true"], ToyData(40)).train_sampler.groups == [4] * 40
    assert make_trainer(base + ["trainer.cuda_graphs=true", "data.group_by_shape=false"],
                        ToyData(40)).train_sampler.groups is None
    # through hyperopt's wrappers: a Subset (train fraction) and a ConcatDataset (train + val)
    ragged = ToyData(40, ragged=True)
    sub = make_trainer(base + ["trainer.cuda_graphs=true"], torch.utils.data.Subset(ragged, [5, 6, 7, 8]))
    assert sub.train_sampler.groups == [4, 2, 3, 4]
    both = torch.utils.data.ConcatDataset([ragged, ToyData(10)])
    assert make_trainer(base + ["trainer.cuda_graphs=true"], both).train_sampler.groups == \
        [2 + i % 3 for i in range(40)] + [4] * 10
    tensors = TensorDataset(torch.randn(40, 4, 6), torch.randn(40, 4, 1), torch.ones(40, 4))
    assert make_trainer(base + ["trainer.cuda_graphs=true"], tensors).train_sampler.groups is None  # no keys: off
    with pytest.raises(ConfigError, match=r"data.group_by_shape=true: the train dataset \(TensorDataset\) has no "
                                          r"shape_keys\(\)"):
        make_trainer(base + ["data.group_by_shape=true"], tensors)


def test_shape_grouping_lets_ragged_batches_replay_under_two_process_ddp(tmp_path):
    """Ragged toy items (2, 3 or 4 positions, padded per batch) under 2 gloo ranks with the
    torch.cuda stand-in and data.group_by_shape=true: every step's batches share one length on
    both ranks, so each of the 3 lengths is warmed up, captured and replayed; weights equal the
    eager DDP run with the same grouping."""
    reports = _eager_and_graphed_ddp(tmp_path, ["trainer.max_epochs=10", "--toy-ragged=1", "data.group_by_shape=true"])
    for report in reports:
        # per epoch each length fills 2 runs of 16 samples (2 steps); 4 leftovers make a last step of
        # 2 per rank, seen 10 times at most: never past the 11 warm-ups. 3 x (20 - 11) replays.
        assert report["captures"] == 3 and report["replays"] == 27, report


def _agreement_worker(rank, init_file, results):
    import types

    import torch.distributed as td

    from trainlib.graphs import StepGraphs, signature

    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        me = types.SimpleNamespace(group=td.new_group(backend="gloo"))
        same = signature([{"x": torch.zeros(8, 64)}])
        mine = signature([{"x": torch.zeros(8, 64 * (rank + 1))}])  # rank 1 has a longer batch
        results[rank] = (StepGraphs._all_ranks_have(me, same), StepGraphs._all_ranks_have(me, mine))
    finally:
        td.destroy_process_group()


def test_ranks_with_different_batch_shapes_do_not_agree(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_agreement_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    assert dict(results) == {0: (True, False), 1: (True, False)}


def test_the_logged_loss_is_the_weighted_mean_whatever_the_items_shapes():
    """The window sums each step's (loss, weight, parts): 0-dim scalars (the usual), shape [1], and a
    captured step's columns of k micro-batches (an epoch's last window shorter) weigh the same."""
    from trainlib.dist import DistEnv
    from trainlib.stats import RunningStats

    t = torch.tensor
    stats = RunningStats(torch.device("cpu"), DistEnv(rank=0, world_size=1, local_rank=0))
    stats.add([(t(1.0), t(2.0), {"ce": t(0.5)})], t(0.0))
    stats.add([(t([3.0]), t([1.0]), {"ce": t([1.0])})], t(0.0))
    stats.add([(t([2.0, 4.0]), t([1.0, 3.0]), {"ce": t([2.0, 0.0])})], t(0.0))
    values, skips = stats.window()
    assert values["weight"] == 7.0 and values["loss"] == 1 * 2 + 3 * 1 + 2 * 1 + 4 * 3
    assert values["part:ce"] == 0.5 * 2 + 1.0 + 2.0 and skips == [0.0, 0.0, 0.0]
    stats.add([(t(2.0), t(2.0), {"ce": t(1.0)}), (t(float("nan")), t(1.0), {"ce": t(1.0)})], t(1.0))
    values, skips = stats.window()  # a non-finite micro-batch is left out of the sums
    assert values["loss"] == 4.0 and values["weight"] == 2.0 and skips == [1.0]
