"""The documented commands run: every fenced command marked runnable in README.md and docs/ is executed.

Marking a block (the line right before its ```bash fence):

    <!-- docs:run -->                                     run every command of the block as written
    <!-- docs:run small="trainer.max_epochs=1 ..." -->    append these words to every command (a small size)
    <!-- docs:run small="..." small2="hpo.n_trials=1" -->  ... and these to the 2nd command of the block only
    <!-- docs:run expect="text" -->                       the output must contain this text (every command)

A command is a line of the block (lines ending in a backslash continue it); `# ...` comments and blank
lines are dropped. The commands of a block run in order, in one scratch folder shared by the whole
docs check (holding links to launch/ and configs/, so runs/, logs/ and sqlite files land there), with
the repository on PYTHONPATH, the test's python first on PATH, no visible GPU, one thread per process
and the session's synthetic-data cache. Each must exit 0; a training run must print the final line
(FINAL_LINE), a hyper-parameter search its best line (HPO_LINE), unless `expect=` says otherwise.

Leave unmarked: commands that need a GPU, real datasets, several nodes or more than 2 processes, and
any with a placeholder (`...`, `<run>`) or a path outside the repository (/data/..., /models/...).
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"^<!--\s*docs:run\b(?P<attrs>.*?)-->\s*$")
ATTR = re.compile(r'(\w+)="([^"]*)"')
FENCE = re.compile(r"^```(bash|sh|shell)?\s*$")
FINAL_LINE = re.compile(r"\[trainlib\] final\b")     # trainlib.recipe.run: the end-of-run line
HPO_LINE = re.compile(r"\[hpo\] best\b")             # trainlib.hpo: the study's best trial
# README.md and docs/launching.md: every command there that runs on a CPU is marked; this many at least
MIN_MARKED_README_LAUNCHING = 16
TIMEOUT_S = 300


@dataclass
class Block:
    path: Path
    line: int                                         # of the marker, 1-based
    attrs: dict[str, str]
    commands: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{_rel(self.path)}:{self.line}"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _commands(lines: list[str]) -> list[str]:
    out, current = [], ""
    for raw in lines:
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if shlex.split(current, comments=True):
            out.append(current)
        current = ""
    if current.strip() and shlex.split(current, comments=True):
        out.append(current)
    return out


def marked_blocks(paths=DOCS) -> list[Block]:
    blocks = []
    for path in paths:
        lines = path.read_text().splitlines()
        for i, text in enumerate(lines):
            m = MARKER.match(text.strip())
            if not m:
                continue
            attrs = dict(ATTR.findall(m["attrs"]))
            where = f"{_rel(path)}:{i + 1}"
            unknown = set(attrs) - {"small", "expect"} - {k for k in attrs if re.fullmatch(r"small\d+", k)}
            assert not unknown, f"{where}: unknown docs:run attribute(s) {sorted(unknown)}"
            assert ATTR.sub("", m["attrs"]).strip() == "", f"{where}: attributes are name=\"value\": {text!r}"
            assert i + 1 < len(lines) and FENCE.match(lines[i + 1].strip()), \
                f"{where}: a docs:run marker must be the line right before a ```bash fence"
            body = []
            for j in range(i + 2, len(lines)):
                if lines[j].strip().startswith("```"):
                    break
                body.append(lines[j])
            else:
                raise AssertionError(f"{where}: the fenced block is not closed")
            blocks.append(Block(path, i + 1, attrs, _commands(body)))
    return blocks


def command_line(block: Block, n: int) -> str:
    """The n-th command (0-based) with its size-reducing words appended, as one shell line."""
    words = shlex.split(block.commands[n], comments=True)
    words += shlex.split(block.attrs.get("small", "")) + shlex.split(block.attrs.get(f"small{n + 1}", ""))
    return shlex.join(words)


def expected(block: Block, cmd: str) -> re.Pattern | None:
    if "expect" in block.attrs:
        return re.compile(re.escape(block.attrs["expect"]))
    words = shlex.split(cmd)
    if any(w in ("-h", "--help", "-n", "--dry-run") for w in words):
        return None
    if "launch.hyperopt" in words:
        return HPO_LINE
    if any(w.startswith("recipes.") for w in words) or "launch/train_ddp.sh" in words:
        return FINAL_LINE
    return None


BLOCKS = marked_blocks()


# ---- the markers themselves (cheap) ----------------------------------------------------------------


def test_marked_commands_are_runnable_as_written():
    assert BLOCKS, "no docs:run marker found"
    for b in BLOCKS:
        assert b.commands, f"{b.id}: a marked block without a command"
        for n, cmd in enumerate(b.commands):
            text = command_line(b, n)
            assert "..." not in text and not re.search(r"<[a-z_]+>", text), f"{b.id}: a placeholder in {cmd!r}"
            assert not re.search(r"(^|[\s=])/(data|models|path)/", text), f"{b.id}: a path outside the repo in {cmd!r}"
            nproc = re.search(r"--nproc_per_node[= ](\d+)", text)
            assert nproc is None or int(nproc[1]) <= 2, f"{b.id}: more than 2 processes on a CPU: {cmd!r}"
            assert not re.search(r"(^|\s)(-g|--gpus)\b", text) or re.search(r"(^|\s)(-n|--dry-run)\b", text), \
                f"{b.id}: a GPU command: {cmd!r}"
            assert " -b" not in f" {text}" and "--background" not in text, f"{b.id}: background runs stay unmarked"
        for k in b.attrs:
            if k.startswith("small") and k != "small":
                assert int(k[5:]) <= len(b.commands), f"{b.id}: {k} but the block has {len(b.commands)} command(s)"


def test_readme_and_launching_mark_their_cpu_commands():
    counted = [b for b in BLOCKS if b.path.name in ("README.md", "launching.md") and b.path.parent in (ROOT, ROOT / "docs")]
    n = sum(len(b.commands) for b in counted)
    assert n >= MIN_MARKED_README_LAUNCHING, (f"only {n} marked commands in README.md and docs/launching.md "
                                              f"(at least {MIN_MARKED_README_LAUNCHING}): was a marker dropped?")


def test_marker_parsing(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text('text\n<!-- docs:run small="a=1" small2="b=2" -->\n```bash\n# comment\n'
                   "python -m recipes.pdan \\\n    trainer.x=1   # trailing\n\nbash launch/train_ddp.sh -r pdan -n\n```\n"
                   "```bash\nnot marked\n```\n")
    (b,) = marked_blocks([doc])
    assert len(b.commands) == 2
    assert command_line(b, 0) == "python -m recipes.pdan trainer.x=1 a=1"
    assert command_line(b, 1) == "bash launch/train_ddp.sh -r pdan -n a=1 b=2"
    assert expected(b, command_line(b, 0)) is FINAL_LINE and expected(b, command_line(b, 1)) is None


# ---- the config files the docs use --------------------------------------------------------------------


def test_every_config_file_the_docs_name_exists_and_loads():
    from trainlib.recipe import build_config, find_recipe

    named = set()
    for path in [*DOCS, ROOT / "launch" / "train_ddp.sh", ROOT / "launch" / "slurm_example.sbatch"]:
        named |= set(re.findall(r"\bconfigs/[\w./-]+\.ya?ml\b", path.read_text()))
    assert "configs/pdan.yaml" in named
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.y*ml")}
    assert named <= shipped, f"documented but not shipped: {sorted(named - shipped)}"
    assert {"configs/pdan.yaml", "configs/segformer.yaml"} <= shipped
    for rel in sorted(shipped):
        data = yaml.safe_load((ROOT / rel).read_text())
        recipe = find_recipe(data["recipe"])
        # configs/<recipe>.yaml, or the seed's own layout configs/<kind>/<recipe>/<name>.yaml (xca)
        assert rel == f"configs/{recipe.name}.yaml" or f"/{recipe.name}/" in rel, f"{rel} names recipe {data['recipe']}"
        # the seed's own configs name their data folder (data.train_dir): no synthetic demo for them
        names_data = any((data.get("data") or {}).get(k) for k in ("root", "train_dir"))
        for extra in ([], ["data.root=/d"]):
            cfg, _, demo = build_config(recipe, ["--config", str(ROOT / rel), *extra])
            assert cfg.recipe == recipe.name and demo == (not extra and not names_data), rel
            if extra:
                assert cfg.data.root == "/d", rel


def test_launcher_help_lists_the_registered_recipes():
    from trainlib import available_recipes

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", str(ROOT / "launch" / "train_ddp.sh"), "-h"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "-r, --recipe" in l)
    assert line.rstrip(".").endswith(", ".join(available_recipes())), line


# ---- running them -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs_run")
    for name in ("launch", "configs"):
        (d / name).symlink_to(ROOT / name)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_command_runs(block: Block, workdir: Path):
    for n in range(len(block.commands)):
        cmd = command_line(block, n)
        env = {**os.environ,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PET_MASTER_PORT": str(_free_port())}   # torchrun without --standalone: not the shared 29500
        env.pop("TRAINLIB_TORCHRUN", None)
        r = subprocess.run(["bash", "-c", cmd], cwd=workdir, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
        out = r.stdout + r.stderr
        where = f"{block.id}, command {n + 1}: {cmd}\n(in {workdir})"
        assert r.returncode == 0, f"{where}\nexit {r.returncode}\n{out[-4000:]}"
        want = expected(block, cmd)
        if want is not None:
            assert want.search(out), f"{where}\nno line matching {want.pattern!r} in the output:\n{out[-4000:]}"
