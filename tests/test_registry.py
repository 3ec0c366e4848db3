"""The recipe registry and the engine's dependency direction (issue #11, item 1).

- the engine never imports `recipes`; trainlib's modules import each other without a circle;
- a recipe package outside this repository, passed by module path, trains, is rebuilt by
  `trainlib.load_model` in a fresh process and is tuned by launch.hyperopt, with no registration;
- a package that registers a recipe in the `trainlib.recipes` entry-point group is found by name;
- an unknown name, a module without a recipe, an attribute that is not one: one clear error each.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from trainlib.config import ConfigError
from trainlib.recipe import available_recipes, build_config, find_recipe, recipe_ref

TRAINLIB = ROOT / "trainlib"


# ------------------------------------------------------------------------------------------------
# Dependency direction

def test_importing_every_trainlib_module_imports_no_recipe():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import trainlib
        names = [m.name for m in pkgutil.walk_packages(trainlib.__path__, "trainlib.")]
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m == "recipes" or m.startswith("recipes."))
        assert not loaded, f"importing trainlib loaded {loaded}"
        print(len(names), "modules")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the trainlib modules it imports, wherever the import statement is (module level,
    inside a function, under TYPE_CHECKING): each is a dependency someone has to reason about."""
    files = {_module_name(p): p for p in TRAINLIB.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}

    def target(base: str, name: str) -> str:
        # `from base import name`: the submodule when there is one, else base itself (a name defined in it)
        return f"{base}.{name}" if f"{base}.{name}" in files else base

    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            deps: list[str] = []
            if isinstance(node, ast.Import):
                deps = [a.name for a in node.names if a.name.split(".")[0] == "trainlib"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                elif node.module and node.module.split(".")[0] == "trainlib":
                    base = node.module
                else:
                    continue
                deps = [target(base, a.name) for a in node.names]
            graph[mod] |= {d for d in deps if d in files and d != mod}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for comp in components:
        start = min(comp)
        # shortest path back to start inside the component (breadth-first)
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w not in parents:
                        parents[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        v = parents[start]
        while v != start:
            path.append(v)
            v = parents[v]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def test_the_import_graph_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_trainlib_modules_import_each_other_without_a_circle():
    graph = import_graph()
    assert "trainlib.config" in graph["trainlib.recipe"]            # the graph is read at all
    cycles = find_cycles(graph)
    assert not cycles, "import circles in trainlib:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------------------------
# A user's recipe package, outside this repository

USER_RECIPE = '''
"""A tiny regression recipe, the kind a user writes in a package of their own."""
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from trainlib.config import DataConfig, opt
from trainlib.recipe import Recipe


@dataclass
class TinyModel:
    hidden: int = opt(8, "hidden units", ge=1)
    init_from: str = opt("", "a start-from file read by build_model (gone by inference time)")


@dataclass
class TinyData(DataConfig):
    n: int = opt(64, "samples per split", ge=8)


def build_model(cfg):
    if cfg.model.init_from:
        torch.manual_seed(int(open(cfg.model.init_from).read()))
    return nn.Sequential(nn.Linear(4, cfg.model.hidden), nn.Tanh(), nn.Linear(cfg.model.hidden, 1))


def make_synthetic(root, cfg):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        x = torch.randn(cfg.data.n, 4, generator=g)
        torch.save({"x": x, "y": x.sum(1, keepdim=True)}, f"{root}/{split}.pt")


def build_datasets(cfg):
    splits = {}
    for split in ("train", "val"):
        d = torch.load(f"{cfg.data.root}/{split}.pt", weights_only=True)
        splits[split] = TensorDataset(d["x"], d["y"])
    return splits


def loss(outputs, batch):
    return nn.functional.mse_loss(outputs, batch[1])


recipe = Recipe(name="tiny", model_config=TinyModel, data_config=TinyData, build_model=build_model,
                build_datasets=build_datasets, loss=loss, make_synthetic=make_synthetic,
                defaults={"trainer.max_epochs": 1, "log.loggers": ["jsonl"], "data.batch_size": 16},
                inference_overrides={"model.init_from": ""})
not_a_recipe = "a string"
'''


def write_user_package(root: Path, name: str) -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A recipe package of a user\'s own."""\n')
    (pkg / "myrecipe.py").write_text(USER_RECIPE)
    (pkg / "norecipe.py").write_text("x = 1\n")
    (pkg / "broken.py").write_text("import a_dependency_that_is_missing\n")
    return root


def run_python(args: list[str], path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_user_recipe_by_module_path_trains_reloads_and_is_tuned_without_registration(tmp_path):
    path = write_user_package(tmp_path / "site", "userrecipes")
    out = tmp_path / "runs"
    seed_file = tmp_path / "init_seed.txt"
    seed_file.write_text("7")
    train = ("import sys; from trainlib.recipe import exit_process, main; from userrecipes.myrecipe import recipe; "
             "exit_process(main(recipe, sys.argv[1:]))")
    r = run_python(["-c", train, f"trainer.out_dir={out}", "model.hidden=5", f"model.init_from={seed_file}"], path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = out.iterdir()
    assert run.name.startswith("tiny_")                     # run directories keep the recipe's short name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"] == "userrecipes.myrecipe" and saved["model"]["hidden"] == 5
    seed_file.unlink()                                      # start-from weights are gone by inference time

    reload = textwrap.dedent("""
        import sys, torch, trainlib
        from safetensors.torch import load_file
        run = sys.argv[1]
        model = trainlib.load_model(run)
        exported = load_file(run + "/model.safetensors")
        state = model.state_dict()
        assert state.keys() == exported.keys(), (sorted(state), sorted(exported))
        assert all(torch.equal(state[k], exported[k]) for k in exported)
        assert model[0].out_features == 5 and not model.training
        assert not [m for m in sys.modules if m.split(".")[0] == "recipes"]
        print("rebuilt")
    """)
    r = run_python(["-c", reload, str(run)], path)
    assert r.returncode == 0 and "rebuilt" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]

    r = run_python(["-m", "launch.hyperopt", "recipe=userrecipes.myrecipe", "hpo.n_trials=1", "hpo.final=false",
                    "hpo.study_name=s", f"trainer.out_dir={tmp_path / 'study'}", "model.hidden=5"], path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    best = json.loads((tmp_path / "study" / "s" / "best_hyperparams.json").read_text())
    assert best["trial"] == 0 and best["metric"] == "val/loss" and "optim.lr" in best["params"]
    trial = yaml.safe_load((tmp_path / "study" / "s" / "trial_0" / "config.yaml").read_text())
    assert trial["recipe"] == "userrecipes.myrecipe" and trial["model"]["hidden"] == 5


def test_a_registered_recipe_of_another_package_is_found_by_name(tmp_path):
    path = write_user_package(tmp_path / "site", "regrecipes")
    info = path / "regrecipes-0.1.dist-info"                # what `pip install` of a package with the entry point writes
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: regrecipes\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[trainlib.recipes]\ntiny = regrecipes.myrecipe:recipe\n")
    check = textwrap.dedent("""
        from trainlib.recipe import available_recipes, build_config, find_recipe, recipe_ref
        rec = find_recipe("tiny")
        assert rec is find_recipe("regrecipes.myrecipe") and rec.name == "tiny"
        assert recipe_ref(rec) == "tiny" and build_config(rec, [])[0].recipe == "tiny"
        print(available_recipes())
    """)
    r = run_python(["-c", check], path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"pdan", "segformer", "tiny"} <= set(eval(r.stdout.strip().splitlines()[-1]))


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user package importable in this process (removed from sys.modules afterwards)."""
    monkeypatch.syspath_prepend(str(write_user_package(tmp_path / "site", "inproc_recipes")))
    yield "inproc_recipes"
    for name in [m for m in sys.modules if m.split(".")[0] == "inproc_recipes"]:
        del sys.modules[name]


def test_module_paths_resolve_and_what_a_run_stores_finds_the_recipe_again(user_package):
    rec = find_recipe(f"{user_package}.myrecipe")
    assert rec.name == "tiny" and find_recipe(f"{user_package}.myrecipe:recipe") is rec
    assert recipe_ref(rec) == f"{user_package}.myrecipe"
    cfg = build_config(rec, ["data.root=/d"])[0]
    assert find_recipe(cfg.recipe) is rec
    pdan = find_recipe("pdan")                              # a registered recipe stores its name, however found
    assert find_recipe("recipes.pdan") is pdan and build_config(find_recipe("recipes.pdan"), [])[0].recipe == "pdan"
    assert {"pdan", "segformer"} <= set(available_recipes())


def test_a_module_without_a_recipe_or_an_attribute_that_is_not_one_is_one_clear_error(user_package):
    with pytest.raises(ConfigError, match=rf"^recipe={user_package}.norecipe: module {user_package}.norecipe has "
                                          r"no `recipe`; expected `recipe = Recipe\(...\)` in it"):
        find_recipe(f"{user_package}.norecipe")
    with pytest.raises(ConfigError, match=rf"^recipe={user_package}.myrecipe:not_a_recipe: "
                                          rf"{user_package}.myrecipe.not_a_recipe is str, not a trainlib.recipe.Recipe$"):
        find_recipe(f"{user_package}.myrecipe:not_a_recipe")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"):
        find_recipe(f"{user_package}.broken")               # the recipe's own import error, as is


def test_an_unknown_recipe_is_one_error_listing_the_registered_ones(tmp_path, capsys):
    for ref in ("nosuch", "nosuch_pkg.mod", "recipes.nosuch", "not a name"):
        with pytest.raises(ConfigError) as e:
            find_recipe(ref)
        msg = str(e.value)
        assert msg.startswith(f"unknown recipe {ref!r}: neither a registered name (registered: mvfoul, panollava, pdan, segformer, xca")
        assert "trainlib.recipes" in msg and "mypkg.myrecipe" in msg and "\n" not in msg

    from trainlib.hpo import main
    assert main(["recipe=nosuch", f"trainer.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe 'nosuch'") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_load_model_of_a_recipe_that_is_not_here_says_so(tmp_path):
    import torch
    from safetensors.torch import save_file

    import trainlib

    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(f), metadata={"config": yaml.safe_dump({"recipe": "gone_pkg.mod"})})
    with pytest.raises(ConfigError, match=rf"^{f} was trained by recipe 'gone_pkg.mod', which cannot be found here: "
                                          r"unknown recipe 'gone_pkg.mod'"):
        trainlib.load_model(f)
