"""The run directory: resume=auto finds the newest checkpoint of any kind and never deletes a run;
a lock keeps two runs out of one folder; a failed start leaves nothing behind; a full or
read-only disk is one clear line with every earlier file intact."""
import errno
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.test_resume import command, start
from tests.toy import ToyData, make_trainer
from trainlib import checkpoint, rundir
from trainlib.checkpoint import CheckpointError
from trainlib.config import ConfigError


def files(folder):
    """Every file under `folder` with its bytes (the lock file aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK_NAME}


def train(tmp_path, *overrides, data=None):
    t = make_trainer([f"trainer.out_dir={tmp_path}", *overrides], data or ToyData(64))
    t.fit()
    return t


@pytest.mark.parametrize("keep", [["trainer.keep_last_k=1", "trainer.ckpt_every_n_steps=3"], ["trainer.save_top_k=1"]],
                         ids=["step_files", "top_k"])
def test_resume_auto_without_last_ckpt_resumes_the_newest_checkpoint(tmp_path, keep):
    full = train(tmp_path, "trainer.run_name=full", "trainer.max_epochs=2", "optim.name=adamw")
    common = ["trainer.run_name=r", "optim.name=adamw", "trainer.save_last=false", "trainer.save_top_k=0", *keep]
    part = make_trainer([f"trainer.out_dir={tmp_path}", *common, "trainer.max_epochs=2"], ToyData(64))
    part.tc.max_epochs = 1  # the same schedule length as the full run, stopped after one epoch
    part.fit()
    run = tmp_path / "r"
    assert not (run / "checkpoints" / "last.ckpt").exists()
    rows_before = (run / "metrics.jsonl").read_bytes()
    rest = train(tmp_path, *common, "trainer.max_epochs=2", "trainer.resume=auto")
    assert rest.global_step == 16
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, rest.model.state_dict()[k]), k
    assert (run / "metrics.jsonl").read_bytes().startswith(rows_before)
    name = "step=00000008.ckpt" if "keep_last_k" in keep[0] else "epoch=000-step=8-"
    assert f"resumed from {run / 'checkpoints'}/{name}" in (run / "train.log").read_text()


def test_resume_auto_with_no_checkpoint_refuses_and_changes_nothing(tmp_path):
    common = ["trainer.run_name=r", "trainer.save_last=false", "trainer.save_top_k=0", "trainer.max_epochs=1"]
    train(tmp_path, *common)
    run = tmp_path / "r"
    before = files(run)
    assert "metrics.jsonl" in before and "model.safetensors" in before
    with pytest.raises(ConfigError, match=f"run directory {run} already holds a run but no checkpoint to resume; "
                                          "start over with trainer.overwrite=true, or pick another trainer.run_name"):
        train(tmp_path, *common, "trainer.resume=auto")
    assert files(run) == before
    # starting over is explicit, and says so in the new train.log
    train(tmp_path, *common, "trainer.resume=auto", "trainer.overwrite=true")
    assert f"trainer.overwrite=true: removed the previous run's files in {run}" in (run / "train.log").read_text()


def test_resume_from_a_run_directory_continues_in_it(tmp_path):
    train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1")
    run = tmp_path / "r"
    t = train(tmp_path / "elsewhere", f"trainer.resume={run}", "trainer.max_epochs=2")
    assert t.run_dir == run and t.global_step == 16 and not (tmp_path / "elsewhere").exists()
    assert checkpoint.load(run / "checkpoints" / "last.ckpt")["global_step"] == 16
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=f"trainer.resume={empty}: no checkpoint in {empty / 'checkpoints'} "
                                              r"\(expected last.ckpt, step=<N>.ckpt or a top-k file\)"):
        train(tmp_path, f"trainer.resume={empty}")


@pytest.mark.parametrize("case", ["resume_missing", "resume_corrupt", "resume_empty", "ckpt_path_missing"])
def test_a_failed_start_leaves_no_run_directory(tmp_path, case):
    bad = tmp_path / "bad.ckpt"
    if case == "resume_corrupt":
        bad.write_bytes(b"not a checkpoint")
    elif case == "resume_empty":
        bad.write_bytes(b"")
    key = "trainer.ckpt_path" if case == "ckpt_path_missing" else "trainer.resume"
    expected = {"resume_missing": f"trainer.resume: checkpoint not found: {bad}",
                "resume_corrupt": f"cannot read checkpoint {bad}: the file is truncated, corrupt or not a torch checkpoint",
                "resume_empty": f"cannot read checkpoint {bad}: the file is empty (0 bytes)",
                "ckpt_path_missing": f"checkpoint not found: {bad}"}[case]
    out = tmp_path / "runs"
    with pytest.raises(CheckpointError) as e:
        train(out, "trainer.run_name=r", f"{key}={bad}")
    assert expected in str(e.value)
    assert not out.exists()
    t = make_trainer([f"trainer.out_dir={out}", "trainer.run_name=r"], ToyData(64))
    with pytest.raises(CheckpointError):
        t.test(str(bad))
    assert not out.exists()


def test_an_empty_checkpoint_file_is_one_clear_error_for_load_model(tmp_path):
    import trainlib

    empty = tmp_path / "e.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {empty}: the file is empty"):
        trainlib.load_model(empty, model=torch.nn.Linear(2, 1))


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(run, **owner):
    run.mkdir(parents=True, exist_ok=True)
    (run / rundir.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "since": "2026-01-01 00:00:00",
                                                    "job": "", **owner}))


def hold_lock(run):
    """A live process that holds the run directory's lock."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from trainlib.rundir import RunLock; "
            f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"held"
    return p


def test_the_lock_keeps_a_second_run_out_and_a_dead_owner_is_taken_over(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    holder = hold_lock(run)
    try:
        with pytest.raises(rundir.RunDirError, match=f"run directory {run} is in use by process {holder.pid} on "
                                                      f"{socket.gethostname()} .started .*; wait for it to end"):
            train(tmp_path, "trainer.run_name=r")
        assert not (run / "checkpoints").exists()  # nothing was written into the other run's folder
    finally:
        holder.kill()
        holder.wait()
    write_lock(run, host="another-host", pid=1)
    with pytest.raises(rundir.RunDirError, match=f"in use by process 1 on host another-host .*delete {run / '.lock'}"):
        train(tmp_path, "trainer.run_name=r")
    gone = dead_pid()
    write_lock(run, pid=gone)  # what a SIGKILLed owner leaves: the file, no flock
    train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1")
    assert (f"took over the lock of process {gone} on {socket.gethostname()} (started 2026-01-01 00:00:00), which "
            "is no longer running") in (run / "train.log").read_text()
    assert not (run / rundir.LOCK_NAME).exists()  # released at the end of the run


def _race(run, barrier, results):
    barrier.wait()
    try:
        rundir.RunLock(run).acquire()
        results.put("got")
        barrier.wait()  # hold it until both have tried
    except rundir.RunDirError:
        results.put("refused")
        barrier.wait()


def test_two_runs_starting_at_the_same_instant_cannot_both_take_the_lock(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for i in range(20):
        run = tmp_path / f"r{i}"
        run.mkdir()
        if i % 2:  # half the rounds start from a dead owner's lock file
            write_lock(run, pid=dead_pid())
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(run, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted([results.get(timeout=5), results.get(timeout=5)]) == ["got", "refused"], i


def test_an_elastic_restart_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch):
    """The folder's dead owner was an earlier attempt of this same torchrun job: its rows are this
    run's, so the restart starts over; any other dead owner's run is refused (test above)."""
    run = tmp_path / "r"
    train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1", "trainer.save_last=false", "trainer.save_top_k=0")
    write_lock(run, pid=dead_pid(), job="job-7")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    t = train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1", "trainer.resume=auto")
    assert t.global_step == 8
    assert "died before its first checkpoint: starting over" in (run / "train.log").read_text()


def test_read_only_output_folder_is_one_clear_line(tmp_path, monkeypatch):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr("pathlib.Path.mkdir", read_only)
    with pytest.raises(rundir.RunDirError, match=f"cannot write the run directory {tmp_path / 'r'}: Read-only file "
                                                  r"system \(EROFS\); set trainer.out_dir to a writable folder"):
        train(tmp_path, "trainer.run_name=r")


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=r", "trainer.ckpt_every_n_steps=2",
                      "trainer.max_epochs=1"], ToyData(64))
    write = checkpoint.atomic_write_bytes

    def full_disk(path, payload):
        if str(path).endswith(".ckpt") and t.global_step >= 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, payload)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full_disk)
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    with pytest.raises(rundir.RunDirError, match=f"cannot write checkpoint {last} \\(the previous file is kept\\): "
                                                  r"No space left on device \(ENOSPC\); free some space"):
        t.fit()
    assert checkpoint.load(last)["global_step"] == 4
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]
    assert not (tmp_path / "r" / rundir.LOCK_NAME).exists()


@pytest.mark.parametrize("fault,expected", [
    ("--toy-readonly=1", "error: cannot write the run directory {run}: Read-only file system (EROFS)"),
    ("--toy-disk_full_step=3", "error: cannot write checkpoint {run}/checkpoints/last.ckpt (the previous file is "
                               "kept): No space left on device (ENOSPC)")])
def test_two_processes_end_with_one_line_on_a_disk_fault(tmp_path, fault, expected):
    out, run = tmp_path / "out", tmp_path / "runs" / "r"
    p = start(command(2, out, run, [fault]))
    text = p.communicate(timeout=120)[0].decode()
    assert p.returncode != 0
    for r in (0, 1):
        assert f"[rank {r}] " + expected.format(run=run) in text, text[-3000:]
    assert not re.search(r'File ".*(trainlib|tests)/', text), text[-3000:]  # no worker traceback (torchrun's own aside)
    if "disk_full" in fault:
        assert checkpoint.load(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_resuming_from_a_top_k_file_keeps_best_top_k_and_history_as_the_uninterrupted_run(tmp_path):
    common = ["trainer.save_last=false", "trainer.save_top_k=2", "optim.lr=0.2"]
    full = train(tmp_path, "trainer.run_name=full", "trainer.max_epochs=3", *common)
    train(tmp_path, "trainer.run_name=part", "trainer.max_epochs=2", *common)
    part = train(tmp_path, "trainer.run_name=part", "trainer.max_epochs=3", "trainer.resume=auto", *common)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, part.model.state_dict()[k]), k
    names = lambda run: sorted(p.name for p in (tmp_path / run / "checkpoints").glob("epoch=*"))  # noqa: E731
    assert names("full") == names("part") and len(names("part")) == 2
    best = {run: (tmp_path / run / "checkpoints" / "best.ckpt").stat().st_ino for run in ("full", "part")}
    linked = {run: [n for n in names(run) if (tmp_path / run / "checkpoints" / n).stat().st_ino == best[run]]
              for run in best}
    assert linked["full"] == linked["part"] and len(linked["part"]) == 1
    epochs = lambda run: [r["epoch"] for r in json.loads((tmp_path / run / "history.json").read_text())]  # noqa: E731
    assert epochs("full") == epochs("part") == [0, 1, 2]


def test_resume_auto_without_a_run_name_takes_the_run_written_last(tmp_path):
    train(tmp_path, "trainer.run_name=toy_zeta", "trainer.max_epochs=1")
    train(tmp_path, "trainer.run_name=toy_aaa", "trainer.max_epochs=1")  # newer, though its name sorts first
    t = train(tmp_path, "trainer.max_epochs=2", "trainer.resume=auto")
    assert t.run_dir == tmp_path / "toy_aaa" and t.global_step == 16


def test_an_unreadable_newest_checkpoint_is_named_and_the_next_newest_resumed(tmp_path, capsys):
    train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1", "trainer.keep_last_k=1")
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    last.unlink()  # (it was a hard link of step=00000008.ckpt)
    last.write_bytes(b"")
    t = train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=2", "trainer.keep_last_k=1", "trainer.resume=auto")
    assert t.global_step == 16
    assert (f"cannot read checkpoint {last}: the file is empty (0 bytes) (EOFError); resuming from the next "
            f"newest checkpoint, {tmp_path / 'r' / 'checkpoints' / 'step=00000008.ckpt'}") in capsys.readouterr().out


def test_evaluating_a_trained_run_leaves_its_files_as_they_are(tmp_path):
    train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1")
    run = tmp_path / "r"
    before = files(run)
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=r"], ToyData(64),
                     val_data=ToyData(32, seed=1))
    result = t.test(str(run / "checkpoints" / "best.ckpt"), split="val")
    assert t.run_dir.parent == run and t.run_dir.name.startswith("test_") and "val/loss" in result
    assert {k: v for k, v in files(run).items() if not k.startswith("test_")} == before


def test_small_faults_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="trainer.limit_train_batches=0 leaves no training batch in an epoch"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.limit_train_batches=0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.device='cuda' but CUDA is not available here; use trainer.device=cpu"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.device=cuda"])
    empty = tmp_path / "model.safetensors"
    empty.write_bytes(b"")
    import trainlib

    with pytest.raises(CheckpointError, match=f"cannot read {empty}: not a complete safetensors file"):
        trainlib.load_model(empty, model=torch.nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="config key 'trainer.run_name': expected a folder name"):
        make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=../escape"])


def test_a_resume_never_writes_into_another_run(tmp_path):
    train(tmp_path, "trainer.run_name=a", "trainer.max_epochs=2")
    train(tmp_path, "trainer.run_name=b", "trainer.max_epochs=1")
    before = files(tmp_path / "b")
    with pytest.raises(ConfigError, match=f"run directory {tmp_path / 'b'} already holds a run"):
        train(tmp_path, "trainer.run_name=b", f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
              "trainer.max_epochs=3")
    assert files(tmp_path / "b") == before


def test_an_elastic_restart_never_deletes_checkpoints(tmp_path, monkeypatch):
    train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1")
    run = tmp_path / "r"
    before = files(run)
    write_lock(run, pid=dead_pid(), job="job-8")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(ConfigError, match="already holds a run; continue it with trainer.resume=auto"):
        train(tmp_path, "trainer.run_name=r", "trainer.max_epochs=1")
    assert files(run) == before


def test_max_steps_between_logging_steps_still_logs_them(tmp_path):
    t = train(tmp_path, "trainer.run_name=m", "trainer.max_steps=5", "log.every_n_steps=10")
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert t.global_step == 5 and [r["step"] for r in rows if r["split"] == "train"] == [5]
    with pytest.raises(ConfigError, match="config key 'log.loggers': expected any of console, jsonl, .*tensorboard"):
        train(tmp_path, "trainer.run_name=x", "log.loggers=[tensorbord]")
