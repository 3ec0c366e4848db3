"""Small training utilities of issue #12: gradient-norm and memory logging, cache cleanup, your own
optimizer and scheduler, and the seed projects' flag names on the command line."""
import json
import math

import numpy as np
import pytest
import torch

from tests.toy import make_trainer, toy_model
from trainlib.callbacks import Callback, MemoryCleanup
from trainlib.config import ConfigError, LogConfig
from trainlib.dist import DistEnv
from trainlib.stats import Throughput


class _Rows(Callback):
    def __init__(self):
        self.rows = []

    def on_train_log(self, state, row):
        self.rows.append(dict(row))


class _NormBeforeStep:
    """The gradients' norm as the optimizer is about to use them (grad_clip=0: nothing changes them)."""

    def __init__(self, optimizer, norm_type):
        self.norms = []
        optimizer.register_step_pre_hook(lambda opt, *a: self.norms.append(float(torch.linalg.vector_norm(
            torch.cat([p.grad.reshape(-1) for g in opt.param_groups for p in g["params"] if p.grad is not None]),
            norm_type))))


@pytest.mark.parametrize("norm_type", ["2", "inf", "1"])
def test_track_grad_norm_logs_the_global_norm_of_each_logging_step(tmp_path, norm_type):
    rows = _Rows()
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1", "log.every_n_steps=4",
                      f"trainer.track_grad_norm={norm_type}", "data.batch_size=4",
                      "trainer.accumulate_grad_batches=2"], callbacks=[rows])
    seen = _NormBeforeStep(t.optimizer, float(norm_type))
    t.fit()
    logged = [r["grad_norm"] for r in rows.rows]
    assert len(logged) == 3 and len(seen.norms) == 12  # 12 steps, logged at 4, 8, 12
    for got, step in zip(logged, (4, 8, 12)):
        assert got == pytest.approx(seen.norms[step - 1], rel=1e-5)
    assert len(set(logged)) == 3 and all(v > 0 for v in logged)
    lines = [json.loads(x) for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["grad_norm"] for x in lines if x.get("split") == "train"] == logged


def test_track_grad_norm_reuses_the_clipping_norm_which_is_measured_before_clipping(tmp_path):
    rows = _Rows()
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1", "log.every_n_steps=1",
                      "trainer.track_grad_norm=2", "trainer.grad_clip=1e-3"], callbacks=[rows])
    t.fit()
    assert all(r["grad_norm"] > 1e-3 for r in rows.rows), "the logged norm is the unclipped one"
    off = _Rows()
    make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=off", "trainer.max_epochs=1",
                  "log.every_n_steps=1"], callbacks=[off]).fit()
    assert "grad_norm" not in off.rows[0]


def test_track_grad_norm_bounds():
    for bad in ("-1", "nan"):
        with pytest.raises(ConfigError, match="trainer.track_grad_norm': expected 0 \\(off\\), a norm type > 0, or inf"):
            make_trainer([f"trainer.track_grad_norm={bad}"])


def test_log_gpu_memory_adds_allocator_figures_per_logging_row(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 2 * 2**30)
    on = Throughput(torch.device("cuda", 0), DistEnv(), LogConfig(log_gpu_memory=True))
    on.add(4)
    row = on.read(0.0, None, None)
    assert (row["mem_allocated_gb"], row["mem_reserved_gb"], row["peak_mem_gb"]) == (1.0, 2.0, 3.0)
    off = Throughput(torch.device("cuda", 0), DistEnv(), LogConfig())
    assert "mem_allocated_gb" not in off.read(0.0, None, None)
    cpu = Throughput(torch.device("cpu"), DistEnv(), LogConfig(log_gpu_memory=True))
    assert not any(k.startswith(("mem_", "peak_mem")) for k in cpu.read(0.0, None, None))


def test_memory_cleanup_empties_the_cache_every_n_steps(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=1", "trainer.memory_cleanup_interval=5",
                      "trainer.device=cpu"])
    assert any(isinstance(cb, MemoryCleanup) for cb in __import__("trainlib").callbacks.default_callbacks(
        t.cfg, [], checkpoints=False))
    t.fit()
    assert t.global_step == 12 and len(calls) == 2  # steps 5 and 10


def _own(tmp_path, name, epochs, resume=False, scheduler=None):
    overrides = [f"trainer.out_dir={tmp_path}", f"trainer.run_name={name}", f"trainer.max_epochs={epochs}"]
    t = make_trainer(overrides + (["trainer.resume=auto"] if resume else []),
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.5),
                     scheduler=scheduler or (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)))
    t.fit()
    return t


def test_your_own_optimizer_and_scheduler_train_checkpoint_and_resume_exactly(tmp_path):
    whole = _own(tmp_path, "whole", 3)
    assert isinstance(whole.optimizer, torch.optim.SGD) and whole.optimizer.defaults["momentum"] == 0.5
    assert whole.schedule.lrs == [0.2 * 0.5 ** (whole.global_step // 5)]  # StepLR stepped once per optimizer step
    _own(tmp_path, "part", 1)
    resumed = _own(tmp_path, "part", 3, resume=True)
    assert resumed.schedule.lrs == whole.schedule.lrs
    a, b = whole.model_state_dict(), resumed.model_state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ConfigError, match="the checkpoint's LR schedule is StepLR, this run's is ExponentialLR"):
        _own(tmp_path, "part", 4, resume=True, scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.9))
    with pytest.raises(ConfigError, match="LR schedule is a StepLR of your own; resume with the same scheduler"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=part", "trainer.max_epochs=4",
                      "trainer.resume=auto"]).fit()


def test_a_plateau_scheduler_of_your_own_sees_the_monitored_value(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=4"],
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
                     scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5,
                                                                                      threshold=10.0))
    t.fit()  # threshold=10 (relative): no validation counts as an improvement, so each of the 4 halves the lr
    assert t.schedule.lrs == [0.05 * 0.5 ** 4]


def test_a_scheduler_factory_may_ask_for_the_run_length(tmp_path):
    lengths = []

    def onecycle(opt, total_steps):
        lengths.append(total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total_steps)

    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.max_epochs=2"], scheduler=onecycle)
    t.fit()
    assert lengths == [24] and t.global_step == 24


def test_bad_optimizer_and_scheduler_arguments_are_named():
    with pytest.raises(ConfigError, match="optimizer=: expected a torch.optim.Optimizer"):
        make_trainer([], optimizer=lambda params: "adam")
    stranger = torch.optim.SGD(toy_model().parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizer=: it holds parameters that are not the model's"):
        make_trainer([], optimizer=stranger)
    with pytest.raises(ConfigError, match="scheduler=: it drives another optimizer than the run's"):
        make_trainer([], scheduler=torch.optim.lr_scheduler.StepLR(stranger, 2))
    model = toy_model()
    built = torch.optim.SGD(model.parameters(), lr=0.1)
    assert make_trainer([], model=model, optimizer=built).optimizer is built


SEED_FLAGS = {"--auto_lr_find": "tune.auto_lr_find", "--auto_scale_batch_size": "tune.auto_scale_batch_size",
              "--enable_profiler": "profiler.enabled", "--track_grad_norm 2": "trainer.track_grad_norm",
              "--log_gpu_memory": "log.log_gpu_memory", "--memory_cleanup_interval 10": "trainer.memory_cleanup_interval",
              "--use_class_balanced_sampler": "data.use_class_balanced_sampler",
              "--progressive_class_balancing": "data.progressive_class_balancing",
              "--gradient_checkpointing": "trainer.gradient_checkpointing", "--oom_recovery": "trainer.oom_recovery",
              "--gradient_clip_norm 1.0": "trainer.grad_clip"}


@pytest.mark.parametrize("recipe_name", ["pdan", "segformer", "mvfoul"])
def test_the_seed_flag_names_set_their_keys_on_every_recipe(recipe_name):
    from trainlib.config import leaves
    from trainlib.recipe import build_config, find_recipe

    recipe = find_recipe(recipe_name)
    argv = [a for flag in SEED_FLAGS for a in flag.split()]
    cfg, _, _ = build_config(recipe, argv)
    table = leaves(cfg)
    for flag, key in SEED_FLAGS.items():
        owner, f, _ = table[key]
        value = getattr(owner, f.name)
        expected = {"2": 2.0, "10": 10, "1.0": 1.0}.get(flag.split()[-1], True)
        assert value == expected and not (isinstance(value, float) and math.isnan(value)), (flag, value)


def test_a_scheduler_of_your_own_fills_the_device_lr_a_captured_step_reads():
    from tests.fake_cuda import lr_tensors
    from trainlib.optim import TorchSchedule

    opt = torch.optim.SGD(toy_model().parameters(), lr=0.1)
    sched = TorchSchedule(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    lr_tensors(opt)
    captured = opt.param_groups[0]["lr"]
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is captured and float(captured) == pytest.approx(0.025)
    assert sched.lrs == [pytest.approx(0.025)]


def test_gradient_checkpointing_is_refused_with_captured_graphs():
    with pytest.raises(ConfigError, match="gradient_checkpointing=true cannot be captured with trainer.cuda_graphs"):
        make_trainer(["trainer.gradient_checkpointing=true", "trainer.cuda_graphs=true"])


def test_grad_norm_under_fsdp_with_clipping_is_logged(tmp_path):
    from tests.conftest import torchrun

    r = torchrun(2, ["tests/toy.py", str(tmp_path / "out"), f"trainer.out_dir={tmp_path}", "trainer.run_name=f",
                     "trainer.strategy=fsdp", "trainer.fsdp_min_params=1", "trainer.grad_clip=1.0",
                     "trainer.track_grad_norm=2", "trainer.max_epochs=1", "log.every_n_steps=2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    norms = [x["grad_norm"] for x in rows if x.get("split") == "train"]
    assert len(norms) == 3 and all(v > 0 and math.isfinite(v) for v in norms)


def test_what_oom_recovery_and_the_batch_finder_cannot_make_safe_is_refused():
    with pytest.raises(ConfigError, match="oom_recovery=true cannot run with trainer.sync_batchnorm=true"):
        make_trainer(["trainer.oom_recovery=true", "trainer.sync_batchnorm=true"])


def test_a_failing_finder_releases_the_run_directory(tmp_path):
    common = [f"trainer.out_dir={tmp_path}", "trainer.run_name=r", "trainer.max_epochs=1"]
    with pytest.raises(ConfigError, match="optim.lr"):
        make_trainer([*common, "tune.auto_lr_find=true", "optim.lr=0"]).fit()
    make_trainer([*common, "trainer.overwrite=true"]).fit()  # the lock of the failed start is gone


def _readers():
    from recipes.panollava.data import load_panorama
    from recipes.segformer.data import read_image, read_mask
    from recipes.xca.data import read_gray
    from trainlib.data import image_file_size

    return {"image": read_image, "mask": read_mask, "label": lambda p: read_gray(p, "label"),
            "panorama": lambda p: load_panorama(p, (8, 16)), "size": lambda p: image_file_size(p, "image")}


@pytest.mark.parametrize("reader", ["image", "mask", "label", "panorama", "size"])
@pytest.mark.parametrize("fault", ["bomb", "garbage"])
def test_every_image_reader_ends_an_unreadable_file_in_one_line_naming_it(tmp_path, monkeypatch, reader, fault):
    """A decompression bomb (over PIL's pixel limit: DecompressionBombError, not an OSError) or a
    file that is no image: one DataError naming the file, from every recipe's reader."""
    from PIL import Image

    from trainlib.config import DataError

    path = tmp_path / "x.png"
    if fault == "bomb":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 100 pixels > 2 x 20: PIL refuses to open it
    else:
        path.write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{reader if reader != 'size' else 'image'} {path} cannot be read \("):
        _readers()[reader](str(path))
