"""The command line: parsing `--flag value` / `key=value` arguments, the engine's seed-flag aliases,
switch aliases, and the flags that belong to the launcher (answered with the torchrun command)."""
from __future__ import annotations

import shlex
from typing import Any

from .config import ConfigError

ENGINE_ALIASES = {
    "lr": "optim.lr", "optimizer": "optim.name", "scheduler": "optim.scheduler", "weight_decay": "optim.weight_decay",
    "batch_size": "data.batch_size", "logger": "log.loggers", "wandb_project": "log.wandb_project",
    "log_every_n_steps": "log.every_n_steps", "gradient_clip_val": "trainer.grad_clip",
    "gradient_clip_norm": "trainer.grad_clip", "enable_profiler": "profiler.enabled",
}
LAUNCHER_FLAGS = {"gpus", "devices", "nproc_per_node", "num_nodes", "devices_per_node"}


def parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], bool]:
    """-> (yaml path, [(key, raw value)], help wanted). Accepts k=v, --k v, --k=v and bare --flag (true)."""
    config_path, pairs, want_help = None, [], False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            want_help = True
        elif a in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{a} needs a YAML file path")
            config_path, i = argv[i + 1], i + 1
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        elif a.startswith("--"):
            body = a[2:]
            if "=" in body:
                k, v = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1] \
                    and argv[i + 1] not in ("-h", "-c"):
                k, v, i = body, argv[i + 1], i + 1
            else:
                k, v = body, "true"
            pairs.append((k.replace("-", "_"), v))
        elif "=" in a:
            k, v = a.split("=", 1)
            pairs.append((k, v))
        else:
            raise ConfigError(f"unexpected argument {a!r}: overrides look like section.key=value (see --help)")
        i += 1
    return config_path, pairs, want_help


def switched(pairs: list[tuple[str, Any]], aliases: dict[str, str]) -> list[tuple[str, Any]]:
    """Switch aliases (`--mixed_precision` -> trainer.precision=16-mixed) as key=value pairs, placed
    first so a flag that sets the same key with a value wins (`--test_run --test_batches 3`)."""
    first, rest = [], []
    for k, v in pairs:
        target = aliases.get(k, "")
        if "=" not in target:
            rest.append((k, v))
            continue
        on = str(v).strip().lower()
        if on not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            raise ConfigError(f"--{k} is a switch (it sets {target}): give it alone or as --{k}=true|false, got {v!r}")
        if on in ("true", "1", "yes", "on"):
            first.append(tuple(target.split("=", 1)))
    return first + rest


def launcher_hint(launcher: dict[str, Any], pairs: list[tuple[str, Any]], module: str) -> str:
    """The torchrun command for --num_nodes / --devices_per_node / --gpus: processes are the launcher's."""
    nodes = str(launcher.get("num_nodes", "1"))
    per_node = str(launcher.get("devices_per_node") or launcher.get("nproc_per_node") or launcher.get("devices")
                   or launcher.get("gpus") or "N")
    prefix = ""
    if per_node == "-1":
        per_node = "gpu"  # torchrun's own "one process per GPU"
    elif "," in per_node:  # --gpus 0,1: those devices, one process each
        prefix = f"CUDA_VISIBLE_DEVICES={per_node} "
        per_node = str(len([g for g in per_node.split(",") if g.strip()]))
    rest = " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in pairs if k not in LAUNCHER_FLAGS)
    flags = ", ".join(f"--{k}" for k in launcher)
    if nodes != "1":
        cmd = (f"{prefix}torchrun --nnodes={nodes} --nproc_per_node={per_node} --node_rank=<0..{int(nodes) - 1 if nodes.isdigit() else 'N-1'}> "
               f"--rdzv_backend=c10d --rdzv_endpoint=<node 0 host>:29500 -m {module} {rest}".rstrip())
        where = "on every node (the same command; node_rank 0 on the host named in rdzv_endpoint)"
    else:
        cmd, where = f"{prefix}torchrun --nproc_per_node={per_node} -m {module} {rest}".rstrip(), ""
    verb = "picks" if len(launcher) == 1 else "pick"
    return (f"{flags} {verb} the number of processes, which the launcher owns, not the training script; run"
            + (f" {where}" if where else "") + f":\n    {cmd}\n(or launch/train_ddp.sh -g/-d; "
            "launch/slurm_example.sbatch on a cluster)")
