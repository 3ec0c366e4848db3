"""profiler.enabled=true (issue #12): torch.profiler over a window of optimizer steps writes a
Chrome-trace JSON (TensorBoard, Perfetto) and the top-operator table into <run>/profiler/, prints
the table to train.log, runs only inside its window, and flushes a window the run cut short."""
import json

import torch

from tests.conftest import torchrun
from tests.toy import make_trainer, toy_forward
from trainlib.callbacks import EarlyStopping, Profile, default_callbacks
from trainlib.config import Config
from trainlib.recipe import build_config

WINDOW = ["profiler.enabled=true", "profiler.wait=1", "profiler.warmup=1", "profiler.active=2"]


def traces(run_dir, rank=0):
    return sorted((run_dir / "profiler").glob(f"rank{rank}.*.pt.trace.json"))


def test_a_window_writes_a_trace_a_table_and_the_log_and_the_loop_runs_without_it_after(tmp_path):
    enabled, closed = [], []  # per training forward (= optimizer step): recording? the profiler shut down?

    def forward(model, batch):
        if torch.is_grad_enabled():
            enabled.append(torch.autograd._profiler_enabled())
            closed.append(next(cb for cb in t.callbacks if isinstance(cb, Profile)).profiler.done)
        return toy_forward(model, batch)

    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=run", "trainer.max_epochs=1", *WINDOW],
                     forward_fn=forward)
    t.fit()
    # steps 1 (wait) and 2 (warmup) run unrecorded, 3 and 4 recorded, the other 8 with no profiler at all
    assert len(enabled) == 12
    assert enabled == [False, False, True, True] + [False] * 8, enabled
    assert closed == [False] * 4 + [True] * 8  # after its window the profiler is gone, not idling in the loop

    (trace,) = traces(t.run_dir)
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"aten::addmm", "aten::linear"} <= names  # the toy's nn.Linear, forward
    assert "autograd::engine::evaluate_function: AddmmBackward0" in names  # and backward
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3"]

    table = (t.run_dir / "profiler" / "top_ops_rank0.txt").read_text()
    assert table.startswith("profiler: top 15 operators by self_cpu_time_total over 2 step(s), rank0")
    assert "Self CPU %" in table and "aten::addmm" in table
    rules = [i for i, line in enumerate(table.splitlines()) if line.startswith("-----")]
    assert len(rules) == 3 and rules[2] - rules[1] - 1 == 15  # profiler.row_limit rows
    log = (t.run_dir / "train.log").read_text()
    assert f"profiler: recorded 2 step(s), global steps 3-4; trace: {trace}" in log
    assert f"tensorboard --logdir {t.run_dir / 'profiler'}" in log
    assert all(line in log for line in table.splitlines())  # the printed table, line by line


def test_a_run_ending_inside_the_window_still_writes_its_trace(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=short", "trainer.max_steps=3",
                      "profiler.enabled=true", "profiler.wait=1", "profiler.warmup=1", "profiler.active=5",
                      "profiler.row_limit=4"])
    t.fit()
    (trace,) = traces(t.run_dir)
    assert "aten::addmm" in {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    log = (t.run_dir / "train.log").read_text()
    assert ("profiler: recorded 1 step(s), global step 3 (the run ended before the window completed: 1 of "
            "profiler.active=5; the trace runs on to the end of training); trace: ") in log
    assert "top 4 operators" in (t.run_dir / "profiler" / "top_ops_rank0.txt").read_text()


def test_a_run_ending_before_the_recorded_steps_says_it_recorded_nothing(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=none", "trainer.max_steps=2",
                      "profiler.enabled=true", "profiler.wait=1", "profiler.warmup=2"])
    t.fit()
    assert ("profiler: nothing recorded: the run ended after 2 step(s), before the recorded part of the window "
            "(profiler.wait=1, profiler.warmup=2); no trace written") in (t.run_dir / "train.log").read_text()
    assert not traces(t.run_dir) and not (t.run_dir / "profiler" / "top_ops_rank0.txt").exists()
    assert not torch.autograd._profiler_enabled()  # nothing left running in the process


def test_the_callback_comes_after_early_stopping_only_when_enabled_and_the_seed_flag_sets_it():
    cfg = Config()
    assert not any(isinstance(cb, Profile) for cb in default_callbacks(cfg, [], checkpoints=True))
    cfg.profiler.enabled = True
    kinds = [type(cb) for cb in default_callbacks(cfg, [], checkpoints=True)]
    assert kinds.index(Profile) == kinds.index(EarlyStopping) + 1

    from recipes.pdan import recipe

    assert build_config(recipe, ["--enable_profiler"])[0].profiler.enabled is True
    assert build_config(recipe, [])[0].profiler.enabled is False


def test_every_rank_profiles_its_own_process(tmp_path):
    r = torchrun(2, ["tests/toy.py", str(tmp_path / "out"), f"trainer.out_dir={tmp_path}", "trainer.run_name=ddp",
                     "trainer.max_epochs=1", *WINDOW])
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "ddp" / "profiler"
    for rank in (0, 1):
        (trace,) = traces(tmp_path / "ddp", rank)
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert "aten::addmm" in names
        assert (folder / f"top_ops_rank{rank}.txt").read_text().startswith(
            f"profiler: top 15 operators by self_cpu_time_total over 2 step(s), rank{rank}")
    assert "each of the 2 ranks wrote its own rank<r> files there" in r.stdout
    assert r.stdout.count("profiler: top 15 operators") == 1  # printed by rank 0 only
