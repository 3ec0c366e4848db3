"""Where runs write (issue #13): default run names are unique (two Trainers started in the same
second both run), a second fit() stays in its folder, trainer.resume=auto without a run name takes
the newest run whose config matches (or refuses naming the candidates), and test(), fast_dev_run and
resume=<file> write into the run they belong to or a clearly named sub-folder."""
import json
import multiprocessing as mp
import time

import pytest

from tests.test_rundir import files
from tests.toy import ToyData, make_trainer
from trainlib import rundir
from trainlib.config import ConfigError

STAMP = "20261202_134501"


@pytest.fixture
def same_second(monkeypatch):
    """Every run name's clock reads the same second."""
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: STAMP if fmt == "%Y%m%d_%H%M%S" else real(fmt, *a))


def fit(out, *overrides, data=None):
    t = make_trainer([f"trainer.out_dir={out}", *overrides], data or ToyData(64))
    t.fit()
    return t


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_two_trainers_started_in_the_same_second_both_run_in_their_own_folder(tmp_path, same_second):
    a = fit(tmp_path, "trainer.max_epochs=1")
    b = fit(tmp_path, "trainer.max_epochs=1", "optim.lr=0.1")  # a notebook loop over learning rates
    assert (a.run_dir, b.run_dir) == (tmp_path / f"toy_{STAMP}", tmp_path / f"toy_{STAMP}-2")
    for t in (a, b):
        assert t.global_step == 8 and (t.run_dir / "model.safetensors").is_file()
    assert json.loads((b.run_dir / "summary.json").read_text())["global_step"] == 8
    assert "optim:\n  name: sgd\n  lr: 0.1" in (b.run_dir / "config.yaml").read_text()


def _take(out, barrier, results):
    barrier.wait()
    results.put(rundir.make_unique(out / f"toy_{STAMP}").name)


def test_two_processes_naming_a_run_at_the_same_instant_get_two_folders(tmp_path):
    ctx = mp.get_context("fork")
    for i in range(10):
        out = tmp_path / str(i)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_take, args=(out, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted([results.get(timeout=5), results.get(timeout=5)]) == [f"toy_{STAMP}", f"toy_{STAMP}-2"], i


def test_a_second_fit_stays_in_its_folder_and_trains_only_when_there_is_more_to_train(tmp_path):
    t = fit(tmp_path, "trainer.max_epochs=1")
    run, first = t.run_dir, t.fit_result
    before = files(run)
    assert t.fit() == first                                   # at its end: nothing trained, nothing written
    assert names(tmp_path) == [run.name] and t.global_step == 8
    after = files(run)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}
    assert after["train.log"].decode().endswith(
        f"fit() again: {run} is trained to epoch 1, step 8 (trainer.max_epochs=1 reached): nothing more to train; "
        "raise trainer.max_epochs (or max_steps) to train on in the same folder\n")
    t.tc.max_epochs = 2                                       # more to train: on, in the same folder
    t.fit()
    assert t.run_dir == run and names(tmp_path) == [run.name] and t.global_step == 16
    assert [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [0, 1]
    assert f"fit() again on the same Trainer: continuing in {run} at epoch 1, step 8" in (run / "train.log").read_text()


def test_resume_auto_takes_the_newest_run_whose_config_matches_and_names_it(tmp_path):
    fit(tmp_path, "trainer.run_name=mine", "trainer.max_epochs=1")            # the user's run, under a name
    fit(tmp_path, "trainer.max_epochs=1", "optim.lr=0.1")                      # newer, another lr
    t = fit(tmp_path, "trainer.max_epochs=2", "trainer.resume=auto", "log.every_n_steps=3")  # keys a resume may change
    assert t.run_dir == tmp_path / "mine" and t.global_step == 16 and len(names(tmp_path)) == 2
    assert (f"trainer.resume=auto: continuing {tmp_path / 'mine'}, the newest run of recipe toy in {tmp_path} whose "
            "config matches this one; 1 other run(s) of it there differ") in (t.run_dir / "train.log").read_text()


def test_resume_auto_refuses_naming_the_candidates_when_no_config_matches(tmp_path):
    fit(tmp_path, "trainer.run_name=r1", "trainer.max_epochs=1")
    fit(tmp_path, "trainer.run_name=r2", "trainer.max_epochs=1", "optim.lr=0.1")
    before = {name: files(tmp_path / name) for name in names(tmp_path)}
    with pytest.raises(ConfigError) as e:
        fit(tmp_path, "trainer.max_epochs=2", "trainer.resume=auto", "optim.lr=0.2", "trainer.seed=3")
    assert str(e.value).startswith(f"trainer.resume=auto: no run of recipe toy in {tmp_path} has this config")
    assert ("how they differ (theirs -> yours): r2 (trainer.seed: 0 -> 3, optim.lr: 0.1 -> 0.2); "
            "r1 (trainer.seed: 0 -> 3, optim.lr: 0.05 -> 0.2). Continue one with trainer.resume=<its folder>, or drop "
            "trainer.resume to start a new run") in str(e.value)
    assert {name: files(tmp_path / name) for name in names(tmp_path)} == before  # nothing new, nothing changed


def test_test_fast_dev_run_and_resume_from_a_file_write_into_the_run_they_belong_to(tmp_path, same_second):
    t = fit(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1")
    run = tmp_path / "r"
    before = files(run)
    t.test()                                                  # after its fit: beside its files
    assert t.run_dir == run / f"test_{STAMP}"
    e = make_trainer([f"trainer.out_dir={tmp_path}"], ToyData(64))
    e.test(str(run / "checkpoints" / "best.ckpt"))           # test_only with the run's checkpoint
    assert e.run_dir == run / f"test_{STAMP}-2"
    e = make_trainer([f"trainer.out_dir={tmp_path}"], ToyData(64))
    e.test()                                                  # weights of no run
    assert e.run_dir == tmp_path / "test" / f"toy_{STAMP}"
    d = fit(tmp_path, "trainer.run_name=r", "trainer.fast_dev_run=true")
    assert d.run_dir == run / f"fast_dev_run_{STAMP}" and d.global_step == 1
    d = fit(tmp_path, "trainer.fast_dev_run=true")
    assert d.run_dir == tmp_path / "fast_dev_run" / f"toy_{STAMP}"
    d = fit(tmp_path, "trainer.fast_dev_run=true", "trainer.run_name=dry")     # a folder named for it
    assert d.run_dir == tmp_path / "dry" and not list((tmp_path / "dry" / "checkpoints").iterdir())
    assert {k: v for k, v in files(run).items() if "_" + STAMP not in k} == before
    r = fit(tmp_path, f"trainer.resume={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2")
    assert r.run_dir == run and r.global_step == 16          # continued in its run
    assert names(tmp_path) == ["dry", "fast_dev_run", "r", "test"]  # no new top-level run folder
