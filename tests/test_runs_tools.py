"""Looking at runs: `python -m trainlib runs`, `compare` and `plot` (trainlib/runs.py, trainlib/plot.py)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.toy import ToyData, make_trainer
from trainlib import Metric
from trainlib.rundir import LOCK_NAME, RunLock
from trainlib.runs import RunsError, compare, comparison_text, find_runs, labels, load_run, runs_table

PNG = b"\x89PNG\r\n\x1a\n"


class MAE(Metric):
    """A second validation metric (val/mae), so the plots have more than val/loss."""

    def __init__(self):
        super().__init__()
        self.add_state("err", "sum")
        self.add_state("n", "sum")

    def update(self, out, batch):
        valid = batch["valid"].unsqueeze(-1)
        self.err = self.err + ((out - batch["y"]).abs() * valid).sum().double()
        self.n = self.n + valid.sum().double()

    def compute_from(self, s):
        return {"mae": float(s["err"] / s["n"])}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished toy runs under one out_dir that differ in optim.lr (lr_small first, lr_big last)."""
    out = tmp_path_factory.mktemp("runs")
    for name, lr in (("lr_small", "0.02"), ("lr_big", "0.08")):
        t = make_trainer([f"trainer.out_dir={out}", f"trainer.run_name={name}", f"optim.lr={lr}",
                          "trainer.max_epochs=3", "log.every_n_steps=2"], ToyData(48), metrics=lambda: [MAE()])
        t.fit()
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(two_runs: Path, tmp_path: Path, name: str = "lr_small") -> Path:
    dst = tmp_path / "copies" / name
    shutil.copytree(two_runs / name, dst)
    return dst


def best_from_history(run: Path) -> tuple[float, int]:
    rows = json.loads((run / "history.json").read_text())
    best = min(rows, key=lambda r: r["val/loss"])
    return best["val/loss"], best["epoch"]


# ------------------------------------------------------------------------------------------------
# runs

def test_runs_lists_both_runs_newest_first_with_recipe_status_and_best(two_runs):
    before = snapshot(two_runs)
    found = find_runs(two_runs)
    assert [r.name for r in found] == ["lr_big", "lr_small"]            # newest first
    for r in found:
        value, epoch = best_from_history(two_runs / r.name)
        assert r.recipe == "toy" and r.status == "finished" and r.reason == ""
        assert r.monitor == "val/loss" and r.best == value and r.best_epoch == epoch
        assert r.epochs_done == 3 and r.max_epochs == 3 and r.wall_s is not None and not r.wall_approx
    text = runs_table(found)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "recipe", "status", "best", "epochs", "wall", "updated"]
    assert lines[1].startswith("lr_big ") and lines[2].startswith("lr_small ")
    small = found[1]
    assert f"val/loss={small.best:.4g} (epoch {small.best_epoch + 1})" in lines[2] and " 3/3 " in lines[2]
    assert "finished" in lines[2] and "toy" in lines[2]
    assert snapshot(two_runs) == before                                   # read-only


def test_status_running_stopped_and_incomplete(two_runs, tmp_path):
    run = copy_run(two_runs, tmp_path)
    assert load_run(run).status == "finished"

    lock = RunLock(run)                                                   # a live run holds the lock
    lock.acquire()
    try:
        info = load_run(run)
        assert info.status == "running" and info.reason == f"pid {os.getpid()}"
        assert "running (pid" in runs_table([info])
    finally:
        lock.release()
    # a lock file nobody holds (its owner died): not running
    (run / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "since": "x"}))
    assert load_run(run).status == "finished"
    (run / LOCK_NAME).unlink()

    summary = json.loads((run / "summary.json").read_text())
    reason = "early stopping: val/loss did not improve for 2 validations"
    (run / "summary.json").write_text(json.dumps({**summary, "stop_reason": reason}))
    info = load_run(run)
    assert (info.status, info.reason) == ("stopped", reason) and info.status_text == f"stopped ({reason})"

    # resumed after its summary and killed: rows beyond the summary's step
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": summary["global_step"] + 2, "epoch": 3, "split": "train", "loss": 0.1}) + "\n")
    assert load_run(run).status == "incomplete"

    # killed before the end, no summary.json: only two of three epochs in history.json
    run2 = copy_run(two_runs, tmp_path, "lr_big")
    (run2 / "summary.json").unlink()
    rows = json.loads((run2 / "history.json").read_text())
    (run2 / "history.json").write_text(json.dumps(rows[:2]))
    info = load_run(run2)
    assert info.status == "incomplete" and info.epochs_done == 2 and info.wall_approx
    assert info.best == min(r["val/loss"] for r in rows[:2])              # history.json without a summary
    assert "~" in runs_table([info])


def test_runs_of_nested_folders_and_bad_input(two_runs, tmp_path):
    study = tmp_path / "study"
    for trial in ("trial_0", "trial_1"):
        shutil.copytree(two_runs / "lr_small", study / trial)
    assert sorted(r.name for r in find_runs(tmp_path)) == ["study/trial_0", "study/trial_1"]
    assert [r.name for r in find_runs(study / "trial_0")] == ["trial_0"]  # a run directory itself
    assert labels([study / "trial_0" / "final", tmp_path / "x" / "final"]) == ["trial_0/final", "x/final"]
    with pytest.raises(RunsError, match=rf"^{tmp_path / 'nope'}: no such directory"):
        find_runs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert find_runs(tmp_path / "empty") == []
    with pytest.raises(RunsError, match=rf"^{tmp_path / 'empty'} is not a run directory"):
        load_run(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------
# compare

def test_compare_shows_only_the_keys_that_differ_and_best_metrics_side_by_side(two_runs):
    before = snapshot(two_runs)
    c = compare([two_runs / "lr_small", two_runs / "lr_big"])
    assert c.names == ["lr_small", "lr_big"]
    assert c.differences == {"optim.lr": [0.02, 0.08]}                 # run_name: the column headers
    assert c.equal > 50
    text = comparison_text(c)
    assert "optim.lr" in text and "0.02" in text and "0.08" in text
    for same in ("optim.name", "trainer.max_epochs", "data.batch_size", "trainer.run_name"):
        assert same not in text
    rows = dict(c.metrics)
    small, big = (best_from_history(two_runs / n)[0] for n in ("lr_small", "lr_big"))
    assert rows["best val/loss (min)"] == [f"{small:.4g}", f"{big:.4g}"]
    assert rows["status"] == ["finished", "finished"] and rows["epochs"] == ["3/3", "3/3"]
    assert "val/mae at best" in rows and "final val/mae" in rows
    assert snapshot(two_runs) == before
    with pytest.raises(RunsError, match="at least two"):
        compare([two_runs / "lr_small"])


# ------------------------------------------------------------------------------------------------
# plot

def test_plot_writes_one_png_per_quantity_with_the_runs_overlaid(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    from trainlib.plot import plot_run, plot_runs

    run = copy_run(two_runs, tmp_path)
    plots = plot_runs([run])
    assert [(p.path.name, p.quantity, p.labels) for p in plots] == [
        ("train_loss.png", "train/loss", ["train/loss"]), ("val_loss.png", "val/loss", ["val/loss"]),
        ("val_mae.png", "val/mae", ["val/mae"]), ("lr.png", "lr", ["lr"])]
    for p in plots:
        assert p.path.parent == run / "plots" and p.path.read_bytes()[:8] == PNG and p.path.stat().st_size > 1000
    assert plot_run(run) == [p.path for p in plots]                       # what the trainer calls

    before = snapshot(two_runs)
    out = tmp_path / "both"
    plots = plot_runs([two_runs / "lr_small", two_runs / "lr_big"], out=out)
    assert {p.path.name for p in plots} == {"train_loss.png", "val_loss.png", "val_mae.png", "lr.png"}
    assert sorted(f.name for f in out.iterdir()) == sorted(p.path.name for p in plots)
    for p in plots:
        assert p.labels == ["lr_small", "lr_big"] and p.path.read_bytes()[:8] == PNG
    assert snapshot(two_runs) == before                                   # --out: the runs are untouched


def test_plot_of_rows_without_history_and_extra_lr_groups(tmp_path):
    pytest.importorskip("matplotlib")
    from trainlib.plot import plot_runs, run_series

    run = tmp_path / "hand"
    run.mkdir()
    rows = [{"step": s, "epoch": s // 4, "split": "train", "loss": 1.0 / s, "lr": 0.1, "lr_1": 0.01}
            for s in range(1, 9)]
    rows += [{"step": 4, "epoch": 0, "split": "val", "loss": 0.5, "map": 0.3},
             {"step": 8, "epoch": 1, "split": "val", "loss": 0.4, "map": float("nan")}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "spl')
    series = run_series(run)                                              # a half-written last line is skipped
    assert set(series) == {"train/loss", "lr", "lr_1", "val/loss", "val/map"}
    assert series["val/loss"] == [(4.0, 0.5), (8.0, 0.4)]
    plots = plot_runs([run])
    assert [p.path.name for p in plots] == ["train_loss.png", "val_loss.png", "val_map.png", "lr.png"]
    assert plots[-1].labels == ["lr", "lr group 1"]


def test_plot_bad_input_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    from trainlib.plot import INSTALL_HINT, PlotError, main, plot_run, plot_runs

    (tmp_path / "nometrics").mkdir()
    (tmp_path / "nometrics" / "config.yaml").write_text("recipe: toy\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    cases = {tmp_path / "missing": "no such run directory",
             tmp_path / "nometrics": "no metrics.jsonl in it",
             tmp_path / "empty": "has no logged rows yet"}
    for path, why in cases.items():
        with pytest.raises(PlotError, match=why):
            plot_runs([path])
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and why in err and err.count("\n") == 1
        assert not (path / "plots").exists()

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("trainlib").addHandler(handler)
    try:
        pytest.importorskip("matplotlib")
        assert plot_run(tmp_path / "empty") == []                       # never raises: one warning
        assert len(warnings) == 1 and warnings[0].startswith("plots not written: ") and "empty" in warnings[0]
    finally:
        logging.getLogger("trainlib").removeHandler(handler)

    hand = tmp_path / "ok"
    hand.mkdir()
    (hand / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 0, "split": "train", "loss": 1.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)                 # matplotlib not installed
    assert main([str(hand)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {INSTALL_HINT}\n" and "pip install matplotlib" in err and 'pip install -e ".[plot]"' in err
    assert plot_run(hand) == [] and not (hand / "plots").exists()


# ------------------------------------------------------------------------------------------------
# the command lines

def test_the_command_lines_and_their_exit_codes(two_runs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)

    before = snapshot(two_runs)
    r = cli("trainlib", "--help")
    assert r.returncode == 0 and all(f"\n  {c} " in r.stdout for c in ("runs", "compare", "plot"))
    r = cli("trainlib", "runs", str(two_runs))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("lr_big ") and lines[2].startswith("lr_small ") and "finished" in lines[2]
    r = cli("trainlib", "compare", str(two_runs / "lr_small"), str(two_runs / "lr_big"))
    assert r.returncode == 0 and "optim.lr" in r.stdout and "best val/loss (min)" in r.stdout, r.stderr
    assert snapshot(two_runs) == before
    r = cli("trainlib", "runs")                                           # default: ./runs, absent here
    assert r.returncode == 2 and r.stderr == "error: runs: no such directory (runs are written under " \
                                             "trainer.out_dir, default runs/)\n"
    r = cli("trainlib.plot", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'nope'}: no such run directory\n"
    r = cli("trainlib", "frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_a_run_writes_its_plots_at_the_end_when_asked(tmp_path):
    from tests.toy import make_trainer

    on = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=on", "trainer.max_epochs=2", "log.plots=true"])
    on.fit()
    written = sorted(p.name for p in (on.run_dir / "plots").iterdir())
    assert written == ["lr.png", "train_loss.png", "val_loss.png"], written
    assert all((on.run_dir / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in written)
    off = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=off", "trainer.max_epochs=1"])
    off.fit()
    assert not (off.run_dir / "plots").exists()
