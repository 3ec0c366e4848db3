"""What a person sees: progress (bar or plain lines, and train.log), metrics.csv, the end-of-run summary."""
import csv
import json
import math
import re
import sys

import pytest

from tests.toy import ToyData, make_trainer
from trainlib.callbacks import Callback
from trainlib.loggers import TIMING_KEYS, ConsoleLogger, resolve_progress
from trainlib.run_summary import one_line

LINE = re.compile(r"epoch (\d+)/(\d+)  step (\d+)  batch (\d+)/(\d+)  loss (\S+)  lr (\S+)  "
                  r"[\d.]+ it/s  ETA \d+:\d\d:\d\d")


def jsonl(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def progress_lines(text):
    return [tuple(m.groups()) for m in LINE.finditer(text)]


@pytest.fixture
def no_bar_env(monkeypatch):
    monkeypatch.delenv("TRAINLIB_BAR", raising=False)


def test_plain_lines_when_stdout_is_not_a_terminal(tmp_path, capsys, monkeypatch, no_bar_env):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    # 96 samples / batch 8 = 12 steps per epoch: logging steps 5, 10, 12 (epoch end), 15, 20, 24
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=lines", "trainer.max_epochs=2",
                      "log.every_n_steps=5", "log.loggers=[console,jsonl]"])
    t.fit()
    logged = progress_lines((tmp_path / "lines" / "train.log").read_text())
    assert [int(s) for _, _, s, *_ in logged] == [5, 10, 12, 15, 20, 24]
    assert [(int(e), int(n)) for e, n, *_ in logged] == [(1, 2)] * 3 + [(2, 2)] * 3
    assert [(int(b), int(n)) for *_, b, n, _, _ in logged] == [(5, 12), (10, 12), (12, 12), (3, 12), (8, 12), (12, 12)]
    train = [r for r in jsonl(tmp_path / "lines") if r["split"] == "train"]
    for line, row in zip(logged, train):
        loss, lr = line[5], line[6]
        assert math.isclose(float(loss), row["loss"], rel_tol=1e-3) and float(lr) == pytest.approx(0.05)
    # the console shows the same lines (not a terminal: no bar)
    assert progress_lines(capsys.readouterr().out) == logged


def test_bar_in_a_terminal_keeps_the_lines_out_of_the_console(tmp_path, capsys, monkeypatch, no_bar_env):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=bar", "trainer.max_epochs=2",
                      "log.every_n_steps=5", "log.loggers=[console,jsonl]"])
    assert t.cfg.log.progress == "auto"
    t.fit()
    out = capsys.readouterr().out
    assert progress_lines(out) == []  # no plain lines on the console ...
    assert "epoch 1/2" in out and "epoch 2/2" in out and "it/s" in out  # ... a bar
    assert len(progress_lines((tmp_path / "bar" / "train.log").read_text())) == 6  # train.log has them
    # the second epoch's bar shows the first epoch's last loss from its first draw
    draws = [d for d in re.split(r"[\r\n]", out) if "epoch 2/2" in d]
    assert draws and "loss=" in draws[0], draws[:2]


def test_the_bar_shows_the_last_known_loss_before_the_first_logging_step(monkeypatch, capsys):
    c = ConsoleLogger("bar")
    c.epoch_start(0, 10, 3)
    c.log({"step": 5, "epoch": 0, "split": "train", "loss": 0.25, "lr": 0.001})
    c.epoch_start(1, 10, 3)
    assert c.bar.desc.startswith("epoch 2/3") and c.bar.postfix == "loss=0.25, lr=1.0e-03"
    c.close()


def test_progress_switch(monkeypatch, no_bar_env):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert resolve_progress("auto") == "bar" and resolve_progress("lines") == "lines"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert resolve_progress("auto") == "lines" and resolve_progress("bar") == "bar"
    assert resolve_progress("auto", progress_bar=False) == resolve_progress("bar", progress_bar=False) == "off"
    monkeypatch.setenv("TRAINLIB_BAR", "1")
    assert resolve_progress("auto") == "bar" and resolve_progress("off") == "off"


def test_progress_off_and_the_old_alias_write_no_lines(tmp_path, no_bar_env):
    for name, flag in (("off", "log.progress=off"), ("alias", "log.progress_bar=false")):
        t = make_trainer([f"trainer.out_dir={tmp_path}", f"trainer.run_name={name}", "trainer.max_epochs=1",
                          "log.every_n_steps=5", "log.loggers=[console,jsonl]", flag])
        t.fit()
        text = (tmp_path / name / "train.log").read_text()
        assert progress_lines(text) == [] and "[val] epoch 1/1" in text


class Widen(Callback):
    """A column that first appears in the middle of the run: metrics.csv is rewritten with it."""

    def on_train_log(self, state, row):
        if state.global_step > 14:
            row["late"] = state.global_step / 7


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def assert_csv_matches_jsonl(run):
    table, rows = read_csv(run / "metrics.csv"), jsonl(run)
    header, body = table[0], table[1:]
    assert header not in body and len(body) == len(rows)
    first_seen = list(dict.fromkeys(k for r in rows for k in r))
    assert header == first_seen
    for cells, row in zip(body, rows):
        for k, cell in zip(header, cells):
            if k not in row:
                assert cell == "", (k, row)
            elif isinstance(row[k], str):
                assert cell == row[k]
            else:
                assert float(cell) == row[k], (k, cell, row[k])
    return header, body


def test_csv_has_one_header_and_the_jsonl_values(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=csv", "trainer.max_epochs=2",
                      "log.every_n_steps=5", "log.loggers=[jsonl,csv]"], test_data=ToyData(16, seed=2),
                     callbacks=[Widen()])
    t.fit()
    header, body = assert_csv_matches_jsonl(tmp_path / "csv")
    assert header[:3] == ["step", "epoch", "split"] and "late" in header and "lr" in header
    assert {c[2] for c in body} == {"train", "val", "test"}


def test_csv_after_a_resume_equals_the_uninterrupted_run(tmp_path):
    common = [f"trainer.out_dir={tmp_path}", "log.every_n_steps=5", "log.loggers=[jsonl,csv]"]
    make_trainer(common + ["trainer.run_name=whole", "trainer.max_epochs=2"], callbacks=[Widen()]).fit()
    make_trainer(common + ["trainer.run_name=parts", "trainer.max_epochs=1"], callbacks=[Widen()]).fit()
    run = tmp_path / "parts"
    # rows written after the checkpoint by a run that then died: the resume drops them
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 13, "epoch": 1, "split": "train", "loss": 9.0, "ghost": 1.0}) + "\n")
    with open(run / "metrics.csv", "a") as f:
        f.write("13,1,train,9.0\n")
    make_trainer(common + ["trainer.run_name=parts", "trainer.max_epochs=2", "trainer.resume=auto"],
                 callbacks=[Widen()]).fit()
    assert_csv_matches_jsonl(run)

    def untimed(path):
        table = read_csv(path)
        keep = [i for i, k in enumerate(table[0]) if k not in TIMING_KEYS]
        return [[r[i] for i in keep] for r in table]

    assert untimed(run / "metrics.csv") == untimed(tmp_path / "whole" / "metrics.csv")


def summary_of(run):
    return json.loads((run / "summary.json").read_text())


def history_best(run, mode):
    hist = [r for r in json.loads((run / "history.json").read_text()) if "val/loss" in r]
    best = (min if mode == "min" else max)(hist, key=lambda r: r["val/loss"])
    return best, hist


def test_summary_after_max_epochs_names_the_best_epoch_and_the_exported_weights(tmp_path, capsys):
    # mode=max on val/loss: the best epoch is the worst one, so it cannot be mistaken for the last
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=max", "trainer.max_epochs=3",
                      "trainer.mode=max", "log.loggers=[console,jsonl]"], test_data=ToyData(16, seed=2))
    t.fit()
    run = tmp_path / "max"
    s = summary_of(run)
    best, hist = history_best(run, "max")
    assert s["stop_reason"] == "finished" and s["stopped_by"] == "max_epochs" and s["epochs_done"] == 3
    assert s["best"] == {"metric": "val/loss", "value": best["val/loss"], "epoch": best["epoch"], "step": best["step"]}
    assert best["epoch"] != hist[-1]["epoch"]  # (the test means something)
    assert s["final"]["val/loss"] == hist[-1]["val/loss"] and s["final_epoch"] == hist[-1]["epoch"]
    assert set(s["test"]) == {"test/loss"} and "test/loss" not in s["final"]
    w = s["weights"]
    assert w["source"] == "best" and (w["epoch"], w["step"]) == (best["epoch"], best["step"])
    assert s["files"]["best_ckpt"] and s["files"]["last_ckpt"] and s["files"]["model"]
    assert s["train_samples_per_s"] > 0 and s["wall_s"] > 0
    assert t.summary == s
    text = (run / "train.log").read_text()
    assert f"best val/loss = {best['val/loss']:.5g} (max) at epoch {best['epoch'] + 1}/3" in text
    assert "final (last epoch, 3/3)" in text and "model.safetensors holds best.ckpt's weights" in text
    line = one_line(s)
    assert line.startswith(f"val/loss={hist[-1]['val/loss']:.4f} (last epoch)")
    assert f"best val/loss={best['val/loss']:.4f} (epoch {best['epoch'] + 1}/3, in model.safetensors)" in line


def test_summary_after_early_stopping(tmp_path):
    # min_delta larger than any change: the first validation is the best, the second stops the run
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=early", "trainer.max_epochs=6",
                      "trainer.early_stop_patience=1", "trainer.early_stop_min_delta=100"])
    t.fit()
    run = tmp_path / "early"
    s = summary_of(run)
    best, hist = history_best(run, "min")
    assert s["stopped_by"] == "early_stopping" and s["stop_reason"].startswith("early stopping")
    assert s["epochs_done"] == 2 == len(hist)
    assert (s["best"]["value"], s["best"]["epoch"]) == (best["val/loss"], best["epoch"])
    assert s["weights"]["source"] == "best" and s["weights"]["epoch"] == best["epoch"]


def test_summary_without_validation_exports_the_final_ema_weights(tmp_path):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=noval", "trainer.max_epochs=1",
                      "trainer.ema_decay=0.9"], val_data=None)
    t.fit()
    s = summary_of(tmp_path / "noval")
    assert s["best"] is None and s["files"]["best_ckpt"] is None
    assert s["weights"]["source"] == "final" and s["weights"]["ema"] and "EMA" in s["weights"]["text"]
    assert set(s["final"]) == {"train/loss"}


def test_summary_after_a_non_finite_stop_and_after_max_time(tmp_path):
    data = ToyData()
    data.y[5] = float("nan")  # the batch holding sample 5 has a NaN loss: trainer.nonfinite=stop ends the run
    make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=nan", "trainer.max_epochs=3"], data).fit()
    s = summary_of(tmp_path / "nan")
    assert s["stopped_by"] == "non_finite" and "non-finite" in s["stop_reason"] and s["epochs_done"] == 0
    make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=time", "trainer.max_epochs=3",
                  "trainer.max_time=0:00:00:00"]).fit()  # over time at the first logging step
    s = summary_of(tmp_path / "time")
    assert s["stopped_by"] == "max_time" and "max_time" in s["stop_reason"]
