"""launch/train_ddp.sh: the command it builds (--dry-run), its errors, help, and how it runs.

The dry-run format is one line on stdout:
    [CUDA_VISIBLE_DEVICES=<ids> ]<launcher> <torchrun flags> -m recipes.<recipe> [--config FILE]
        [trainer.precision=..] [trainer.strategy=.. ...] [overrides, in order]
with words that hold characters outside [A-Za-z0-9_./:=,@%+-] in single quotes. The launcher is
forced to `torchrun` with TRAINLIB_TORCHRUN so the tests do not depend on what is on PATH, and a
fake `nvidia-smi` that lists no GPU comes first on PATH so `-d -1` is deterministic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "train_ddp.sh"
BASH = shutil.which("bash") or "/bin/bash"

pytestmark = pytest.mark.skipif(not Path(BASH).exists(), reason="needs bash")


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture()
def fakebin(tmp_path: Path) -> Path:
    """A folder first on PATH; holds an nvidia-smi that lists no GPU (tests may replace it)."""
    d = tmp_path / "fakebin"
    d.mkdir()
    _write_exe(d / "nvidia-smi", "#!/bin/sh\nexit 0\n")
    return d


@pytest.fixture()
def launch(fakebin: Path):
    def run(*args: str, env: dict | None = None, cwd: Path | None = None, path: str | None = None):
        e = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TRAINLIB_TORCHRUN")}
        e["TRAINLIB_TORCHRUN"] = "torchrun"
        e["PATH"] = path if path is not None else f"{fakebin}{os.pathsep}{e.get('PATH', '')}"
        e.update(env or {})
        return subprocess.run(
            [BASH, str(SCRIPT), *args], capture_output=True, text=True, env=e, cwd=cwd or REPO, timeout=60
        )

    return run


def dry(launch, *args: str, **kw) -> str:
    r = launch("-n", *args, **kw)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1, r.stdout
    return r.stdout.rstrip("\n")


# ---- the command line ------------------------------------------------------------------------


def test_gpus_precision_strategy_and_overrides_in_order(launch):
    r = launch("-r", "pdan", "-g", "1,2", "-p", "bf16-mixed", "-s", "ddp", "trainer.max_epochs=3", "-n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "CUDA_VISIBLE_DEVICES=1,2 torchrun --standalone --nproc_per_node=2 -m recipes.pdan "
        "trainer.precision=bf16-mixed trainer.strategy=ddp trainer.max_epochs=3\n"
    )
    assert r.stderr == ""
    # overrides keep their order, options may come anywhere, long spellings and --opt=value work
    out = dry(launch, "data.batch_size=8", "--recipe=pdan", "trainer.max_epochs=3", "--gpus", "0, 3,5",
              "optim.lr=0.001")
    assert out == (
        "CUDA_VISIBLE_DEVICES=0,3,5 torchrun --standalone --nproc_per_node=3 -m recipes.pdan "
        "data.batch_size=8 trainer.max_epochs=3 optim.lr=0.001"
    )


def test_recipe_read_from_config(launch, tmp_path):
    (tmp_path / "run.yaml").write_text("# PDAN on TSU\nmodel:\n  num_stages: 2\nrecipe: pdan\ntrainer:\n  max_epochs: 2\n")
    assert dry(launch, "-c", "run.yaml", cwd=tmp_path) == (
        "torchrun --standalone --nproc_per_node=1 -m recipes.pdan --config run.yaml"
    )
    # quoted value, trailing comment, CRLF line ends; overrides follow --config
    (tmp_path / "q.yaml").write_bytes(b"recipe: \"pdan\"   # the recipe\r\ntrainer:\r\n  seed: 1\r\n")
    assert dry(launch, "--config", "q.yaml", "-p", "32", "trainer.seed=3", cwd=tmp_path) == (
        "torchrun --standalone --nproc_per_node=1 -m recipes.pdan --config q.yaml "
        "trainer.precision=32-true trainer.seed=3"
    )


def test_recipe_option_wins_over_config_key(launch, tmp_path):
    (tmp_path / "x.yaml").write_text("recipe: xca\n")
    r = launch("-n", "-c", "x.yaml", "-r", "pdan", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "torchrun --standalone --nproc_per_node=1 -m recipes.pdan --config x.yaml\n"
    assert "overrides 'recipe: xca'" in r.stderr


def test_devices(launch):
    assert dry(launch, "-r", "pdan", "-d", "3") == "torchrun --standalone --nproc_per_node=3 -m recipes.pdan"
    assert dry(launch, "-r", "pdan", "--devices=1") == "torchrun --standalone --nproc_per_node=1 -m recipes.pdan"
    # -d with -g: -1 or the number of ids
    assert dry(launch, "-r", "pdan", "-g", "4,5", "-d", "-1").startswith(
        "CUDA_VISIBLE_DEVICES=4,5 torchrun --standalone --nproc_per_node=2 "
    )
    assert dry(launch, "-r", "pdan", "-g", "4,5", "-d", "2").startswith("CUDA_VISIBLE_DEVICES=4,5 ")


@pytest.mark.parametrize("trainer,expected", [
    ("trainer:\n  max_epochs: 3\n  devices: 2   # two\n", "2"),
    ("trainer:\n  logger:\n    init_args:\n      devices: 4\n  devices: \"3\"\n", "3"),  # its own depth only
    ("trainer: {max_epochs: 3, devices: 5}\n", "5"),
    ("trainer:\r\n\tdevices: 6\r\n", "6"),
    ("model:\n  devices: 9\ntrainer:\n  max_epochs: 1\n", "1"),  # not trainer's: the default
    ("trainer:\n  # c\n\n  devices: '-1'\n", "1"),                 # -1: every GPU (none here)
])
def test_devices_from_the_configs_trainer_section(launch, tmp_path, trainer, expected):
    """The seed's YAML says how many processes (Lightning's trainer.devices); -d / -g win."""
    (tmp_path / "c.yaml").write_text("recipe: xca\n" + trainer)
    r = launch("-n", "-c", "c.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"torchrun --standalone --nproc_per_node={expected} -m recipes.xca --config c.yaml\n"
    assert ("trainer.devices in c.yaml" in r.stderr) == ("devices:" in trainer.split("trainer:")[1].split("init_args")[-1])
    assert dry(launch, "-c", "c.yaml", "-d", "7", cwd=tmp_path).startswith("torchrun --standalone --nproc_per_node=7 ")
    (tmp_path / "bad.yaml").write_text("recipe: xca\ntrainer:\n  devices: all\n")
    r = launch("-n", "-c", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "bad.yaml: trainer.devices must be -1 or a positive integer, got 'all'" in r.stderr


def test_devices_all_counts_gpus(launch, fakebin):
    # no GPU: -1 (the default) means one process
    assert dry(launch, "-r", "pdan") == "torchrun --standalone --nproc_per_node=1 -m recipes.pdan"
    # nvidia-smi -L lists 3 GPUs (MIG lines under a GPU are not counted)
    _write_exe(
        fakebin / "nvidia-smi",
        "#!/bin/sh\n[ \"$1\" = -L ] || exit 1\n"
        "echo 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho '  MIG 3g.40gb Device 0: (UUID: MIG-x)'\n"
        "echo 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\necho 'GPU 2: NVIDIA H100 (UUID: GPU-c)'\n",
    )
    assert dry(launch, "-r", "pdan", "-d", "-1") == "torchrun --standalone --nproc_per_node=3 -m recipes.pdan"
    # CUDA_VISIBLE_DEVICES already set: its ids are what this run may use
    assert dry(launch, "-r", "pdan", env={"CUDA_VISIBLE_DEVICES": "2,7"}) == (
        "torchrun --standalone --nproc_per_node=2 -m recipes.pdan"
    )
    assert dry(launch, "-r", "pdan", env={"CUDA_VISIBLE_DEVICES": ""}) == (
        "torchrun --standalone --nproc_per_node=1 -m recipes.pdan"
    )


@pytest.mark.parametrize(
    ("given", "passed"),
    [("16", "16-mixed"), ("32", "32-true"), ("bf16", "bf16-mixed"), ("16-mixed", "16-mixed"),
     ("32-true", "32-true"), ("bf16-mixed", "bf16-mixed"), ("bf16-true", "bf16-true")],
)
def test_precision_mapping(launch, given, passed):
    assert dry(launch, "-r", "pdan", "-d", "1", "-p", given) == (
        f"torchrun --standalone --nproc_per_node=1 -m recipes.pdan trainer.precision={passed}"
    )


def test_strategy_mapping(launch):
    base = "torchrun --standalone --nproc_per_node=1 -m recipes.pdan"
    assert dry(launch, "-r", "pdan", "-s", "ddp_find_unused_parameters_true", "trainer.max_epochs=1") == (
        f"{base} trainer.strategy=ddp trainer.find_unused_parameters=true trainer.max_epochs=1"
    )
    assert dry(launch, "-r", "pdan", "--strategy", "none") == f"{base} trainer.strategy=none"
    assert dry(launch, "-r", "pdan", "-s", "fsdp") == f"{base} trainer.strategy=fsdp"
    r = launch("-n", "-r", "pdan", "-s", "ddp_spawn")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{base} trainer.strategy=ddp\n"
    assert len(r.stderr.strip().splitlines()) == 1 and "torchrun" in r.stderr and "spawn" in r.stderr


def test_multi_node_flags(launch, tmp_path):
    expected = (
        "torchrun --nnodes=2 --node_rank=1 --rdzv_id=job42 --rdzv_backend=c10d "
        "--rdzv_endpoint=node0:29500 --nproc_per_node=4 -m recipes.pdan --config cfg.yaml trainer.max_epochs=3"
    )
    (tmp_path / "cfg.yaml").write_text("recipe: pdan\n")
    assert dry(launch, "-c", "cfg.yaml", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500",
               "--rdzv-id", "job42", "-d", "4", "trainer.max_epochs=3", cwd=tmp_path) == expected
    # underscore and --opt=value spellings give the same command
    assert dry(launch, "-c", "cfg.yaml", "--nnodes=2", "--node_rank=1", "--rdzv_endpoint=node0:29500",
               "--rdzv_id=job42", "--devices", "4", "trainer.max_epochs=3", cwd=tmp_path) == expected
    assert dry(launch, "-r", "pdan", "-d", "8", "--nnodes", "1:4", "--rdzv-endpoint", "h:1234",
               "--rdzv-backend", "etcd-v2", "--max-restarts", "3") == (
        "torchrun --nnodes=1:4 --rdzv_backend=etcd-v2 --rdzv_endpoint=h:1234 --max_restarts=3 "
        "--nproc_per_node=8 -m recipes.pdan"
    )
    assert dry(launch, "-r", "pdan", "--max_restarts=2", "trainer.resume=auto") == (
        "torchrun --standalone --max_restarts=2 --nproc_per_node=1 -m recipes.pdan trainer.resume=auto"
    )
    assert dry(launch, "-r", "pdan", "--nnodes", "1") == "torchrun --standalone --nproc_per_node=1 -m recipes.pdan"


def test_quoting_and_verbatim_after_double_dash(launch):
    assert dry(launch, "-r", "pdan", "-d", "1", "model.name=a b", "log.tag=it's", "--", "-x", "--help") == (
        "torchrun --standalone --nproc_per_node=1 -m recipes.pdan 'model.name=a b' 'log.tag=it'\\''s' -x --help"
    )


def test_launcher_command(launch, fakebin, tmp_path):
    # an explicit multi-word launcher
    assert dry(launch, "-r", "pdan", env={"TRAINLIB_TORCHRUN": "python3 -m torch.distributed.run"}) == (
        "python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m recipes.pdan"
    )
    # not set: torchrun when it is on PATH, else python -m torch.distributed.run
    onlybin = tmp_path / "onlybin"
    onlybin.mkdir()
    for tool in ("dirname",):
        os.symlink(shutil.which(tool), onlybin / tool)
    _write_exe(onlybin / "python", "#!/bin/sh\nexit 0\n")
    env = {"TRAINLIB_TORCHRUN": ""}
    assert dry(launch, "-r", "pdan", "-d", "2", env=env, path=str(onlybin)) == (
        "python -m torch.distributed.run --standalone --nproc_per_node=2 -m recipes.pdan"
    )
    _write_exe(onlybin / "torchrun", "#!/bin/sh\nexit 0\n")
    assert dry(launch, "-r", "pdan", "-d", "2", env=env, path=str(onlybin)) == (
        "torchrun --standalone --nproc_per_node=2 -m recipes.pdan"
    )


# ---- errors and help -------------------------------------------------------------------------


def test_missing_recipe(launch, tmp_path):
    r = launch("-n", "trainer.max_epochs=3")
    assert r.returncode != 0
    assert r.stdout == ""
    assert "-r/--recipe" in r.stderr and "recipe:" in r.stderr
    (tmp_path / "norecipe.yaml").write_text("trainer:\n  max_epochs: 3\n  # recipe: pdan\n")
    r = launch("-n", "-c", "norecipe.yaml", cwd=tmp_path)
    assert r.returncode != 0
    assert "-r/--recipe" in r.stderr and "recipe:" in r.stderr and "norecipe.yaml" in r.stderr


def test_unknown_option_is_an_error_with_usage(launch):
    for bad in ("-x", "--bogus", "--gpu=0"):
        r = launch("-n", "-r", "pdan", bad)
        assert r.returncode != 0, bad
        assert r.stdout == ""
        assert f"unknown option: {bad}" in r.stderr and "Usage:" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "does_not_exist.yaml"], "config file not found: does_not_exist.yaml"),
        (["-r", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
        (["-r", "pdan", "-p", "64"], "-p/--precision must be one of"),
        (["-r", "pdan", "-s", "deepspeed"], "-s/--strategy must be one of"),
        (["-r", "pdan", "-d", "0"], "-d/--devices must be -1 or a positive integer"),
        (["-r", "pdan", "-g", "1,1"], "lists GPU 1 twice"),
        (["-r", "pdan", "-g", "1,,2"], "-g/--gpus must be comma-separated"),
        (["-r", "pdan", "-g", "1,2", "-d", "3"], "does not match -g"),
        (["-r", "pdan", "--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint"),
        (["-r", "pdan", "--node-rank", "1"], "--node-rank needs --rdzv-endpoint"),
        (["-r", "pdan", "-c"], "option -c needs a value"),
        (["-r", "pdan", "-b=1"], "unknown option: -b=1"),
        (["-r", "pdan", "--background=yes"], "option --background takes no value"),
    ],
)
def test_bad_input_fails_with_a_clear_message(launch, args, message):
    r = launch("-n", *args)
    assert r.returncode != 0
    assert r.stdout == ""
    assert message in r.stderr


def test_help_lists_every_option(launch):
    for flag in ("-h", "--help"):
        r = launch(flag)
        assert r.returncode == 0
        assert r.stderr == ""
        for opt in ("-c, --config", "-r, --recipe", "-g, --gpus", "-d, --devices", "-s, --strategy",
                    "-p, --precision", "-b, --background", "-n, --dry-run", "-h, --help", "--nnodes",
                    "--node-rank", "--rdzv-endpoint", "--rdzv-id", "--rdzv-backend", "--max-restarts",
                    "TRAINLIB_TORCHRUN"):
            assert opt in r.stdout, opt
        for value in ("ddp_find_unused_parameters_true", "ddp_spawn", "fsdp", "16-mixed", "bf16-true"):
            assert value in r.stdout, value
        assert r.stdout.count("Default") >= 10
        assert 'bash launch/train_ddp.sh -c configs/pdan.yaml -g "1,2,3,4" -b' in r.stdout
        assert "tail -f logs/" in r.stdout
    # help wins over anything else on the line, even a missing recipe
    assert launch("-p", "64", "--help").returncode == 0


# ---- running (with a fake launcher that reports what it got) -----------------------------------

FAKE_LAUNCHER = """\
import json, os, signal, sys
print(json.dumps({"argv": sys.argv[1:], "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}))
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


@pytest.fixture()
def fake_launcher(tmp_path: Path) -> str:
    p = tmp_path / "fake_torchrun.py"
    p.write_text(FAKE_LAUNCHER)
    if " " in sys.executable or " " in str(p):
        pytest.skip("paths with spaces")
    return f"{sys.executable} {p}"


def test_foreground_run_execs_the_command(launch, fakebin, fake_launcher):
    _write_exe(fakebin / "nvidia-smi", list_gpus(4))  # -g 3,1 needs GPUs 3 and 1 to exist
    r = launch("-r", "pdan", "-g", "3,1", "trainer.max_epochs=2", env={"TRAINLIB_TORCHRUN": fake_launcher})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["argv"] == ["--standalone", "--nproc_per_node=2", "-m", "recipes.pdan", "trainer.max_epochs=2"]
    assert got["cvd"] == "3,1"
    assert "CUDA_VISIBLE_DEVICES=3,1 " in r.stderr  # the command is echoed to stderr
    # the launcher's exit status is the script's
    r = launch("-r", "pdan", env={"TRAINLIB_TORCHRUN": fake_launcher, "FAKE_RC": "3"})
    assert r.returncode == 3


def list_gpus(n: int) -> str:
    """A fake nvidia-smi whose -L lists n GPUs (with a MIG line under the first, not a GPU)."""
    lines = [f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'" for i in range(n)]
    if n:
        lines.insert(1, "echo '  MIG 3g.40gb Device 0: (UUID: MIG-x)'")
    return "#!/bin/sh\n[ \"$1\" = -L ] || exit 1\n" + "".join(f"{line}\n" for line in lines)


NO_GPU_HINT = "-g needs GPUs; use -d N to start N CPU processes instead"


def test_gpus_that_are_not_there_are_refused(launch, fakebin, fake_launcher, tmp_path):
    """-g 9 without that GPU used to train on the CPU silently: it must stop with one line, exit 2,
    before the launcher runs (the fake launcher would print its argv on stdout)."""
    env = {"TRAINLIB_TORCHRUN": fake_launcher}

    def refused(*args, **kw):
        r = launch("-r", "pdan", *args, env={**env, **kw.pop("env", {})}, **kw)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stdout == ""
        assert len(r.stderr.splitlines()) == 1, r.stderr
        return r.stderr

    # no nvidia-smi at all (a PATH with only what the script needs before the check)
    bare = tmp_path / "bare"
    bare.mkdir()
    os.symlink(shutil.which("dirname"), bare / "dirname")
    assert refused("-g", "9", path=str(bare)) == (
        f"launch/train_ddp.sh: error: -g 9: no GPU is visible (nvidia-smi not found); {NO_GPU_HINT}\n")
    # nvidia-smi lists none (the fixture's)
    assert refused("-g", "0,1") == (
        f"launch/train_ddp.sh: error: -g 0,1: no GPU is visible (nvidia-smi -L lists none); {NO_GPU_HINT}\n")
    # CUDA_VISIBLE_DEVICES="" hides every GPU, even where nvidia-smi lists some
    _write_exe(fakebin / "nvidia-smi", list_gpus(2))
    assert refused("-g", "0", env={"CUDA_VISIBLE_DEVICES": ""}) == (
        "launch/train_ddp.sh: error: -g 0: no GPU is visible (CUDA_VISIBLE_DEVICES='' hides them all); "
        f"{NO_GPU_HINT}\n")
    # two GPUs listed (the MIG line is not one): id 2 and up do not exist; the bad id is named
    expected = "launch/train_ddp.sh: error: -g {}: there is no GPU {}: nvidia-smi -L lists 2 GPU(s), ids 0-1\n"
    assert refused("-g", "0,9") == expected.format("0,9", 9)
    assert refused("-g", "2") == expected.format("2", 2)
    assert refused("-g", "1,02") == expected.format("1,02", "02")
    # -b is refused the same way, before a log is written
    assert refused("-b", "-g", "5", cwd=tmp_path) == expected.format("5", 5)
    assert not (tmp_path / "logs").exists()
    # ids that exist run; UUIDs are not range-checked
    for ids in ("1,0", "GPU-1"):
        r = launch("-r", "pdan", "-g", ids, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["cvd"] == ids


def test_dry_run_does_not_check_gpus(launch, tmp_path):
    """-n shows the command on a machine without GPUs (docs, CI): no check there."""
    bare = tmp_path / "bare"
    bare.mkdir()
    os.symlink(shutil.which("dirname"), bare / "dirname")
    assert dry(launch, "-r", "pdan", "-g", "9", path=str(bare)) == (
        "CUDA_VISIBLE_DEVICES=9 torchrun --standalone --nproc_per_node=1 -m recipes.pdan")
    assert dry(launch, "-r", "pdan", "-g", "0,9") == (
        "CUDA_VISIBLE_DEVICES=0,9 torchrun --standalone --nproc_per_node=2 -m recipes.pdan")


def test_background_run(launch, fake_launcher, tmp_path):
    r = launch("-r", "pdan", "-b", "trainer.max_epochs=2", env={"TRAINLIB_TORCHRUN": fake_launcher}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pid = int(re.search(r"PID (\d+)", r.stdout).group(1))
    m = re.search(r"tail -f (logs/pdan_\d{8}_\d{6}(_\d+)?\.log)", r.stdout)
    assert m, r.stdout
    assert f"kill {pid}" in r.stdout
    log = tmp_path / m.group(1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and '"argv"' not in log.read_text():
        time.sleep(0.05)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("# ") and "-m recipes.pdan trainer.max_epochs=2" in lines[0]
    got = json.loads(lines[-1])
    assert got["argv"][-3:] == ["-m", "recipes.pdan", "trainer.max_epochs=2"]
    # a background job keeps SIGINT (kill -INT PID must reach the run)
    assert got["sigint_ignored"] is False


def test_script_is_valid_bash():
    r = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert SCRIPT.read_text().splitlines()[1:20].count("set -euo pipefail") == 1
