"""Whole-step CUDA graphs: capture forward, backward, clipping and the optimizer step once per
batch shape, then replay the graph with one launch per step.

Why: small and medium models are launch-bound; on an H100 the PDAN step drops from ~17 ms eager
to ~9 ms replayed (~5 ms with torch.compile inside the graph). What must hold for a replay to be
the same computation as the eager step, and how this module ensures it:

- static inputs: each batch is copied into buffers owned here (one `_foreach_copy_` launch);
- static shapes: one graph per batch signature (shapes and dtypes of every tensor leaf); a new
  signature runs `WARMUP` eager steps first (DDP: 11, it rebuilds its buckets after the first);
- warm-up on a side stream, with the static buffers, so autograd and the optimizer create their
  lazily allocated state (optimizer moments, cuBLAS workspaces) outside the capture; the capture
  runs on that same stream;
- no host syncs inside the step: the optimizer runs with `capturable=True` and the learning rate
  lives in a device tensor that the schedule fills before each replay (optim.LRSchedule);
- graph-owned outputs are cloned right after each replay, before any other replay can overwrite
  them; the graphs share one memory pool (they never run concurrently and keep nothing else alive);
- capture in thread-local mode, so a DataLoader's pin-memory thread may keep working meanwhile;
- under DDP every rank makes the same choice at every step: NCCL requires a collective to be
  captured on all ranks or on none, and ranks may see different batch shapes (PDAN's buckets). A
  host-side gloo all-reduce of the step's shape digest (no GPU sync) tells whether all ranks agree;
  if not, every rank runs that step eagerly.

Where capture cannot work (a host sync or CPU-side control flow in the model, too many shapes),
the trainer is told why in one line and the step runs eagerly from then on (under DDP a failed
capture ends the run with that line: the reducer cannot go on after an aborted backward).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.distributed as torch_dist

from .config import UserError
from .data import map_tensors, tensor_leaves
from .loggers import log

WARMUP = 3          # eager steps per new batch signature before its capture
WARMUP_DDP = 11     # DDP rebuilds buckets after its first iteration (PyTorch CUDA-graph notes)
MAX_GRAPHS = 16     # distinct batch signatures before new ones stay eager


def signature(batches: list[Any]) -> tuple:
    """What a graph is specialised to: per micro-batch, the shape and dtype of every tensor."""
    return tuple(tuple((tuple(t.shape), t.dtype) for t in tensor_leaves(b)) for b in batches)


def signature_digest(key: tuple) -> int:
    """A 56-bit digest of a signature, the same in every process (hash() of dtypes is not)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=7).digest(), "little")


def why_not_graphable(device: torch.device, precision: str) -> str:
    """'' when whole-step capture can apply, else the reason in a few words."""
    if device.type != "cuda":
        return "CUDA graphs need a GPU"
    if precision == "16-mixed":
        return ("precision=16-mixed uses a GradScaler, which reads its inf check on the host every step; "
                "use bf16-mixed")
    return ""


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Optimizer state and learning rate on the device, so its step has no host sync and the
    schedule can change the lr of a captured step (it fills the tensor before each replay).
    Called after any checkpoint load (load_state_dict brings back float lrs)."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device != device:
            state["step"] = step.to(device=device, dtype=torch.float32)


def plain_optimizer_state(state: dict) -> dict:
    """An optimizer state_dict with float lrs and capturable off, loadable by any run (CPU included)."""
    groups = []
    for g in state["param_groups"]:
        g = dict(g)
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = float(g["lr"])  # host sync: checkpoint time only
        if g.get("capturable"):
            g["capturable"] = False
        groups.append(g)
    return {**state, "param_groups": groups}


class _Graph:
    def __init__(self, static: list[Any]) -> None:
        self.static = static                         # the micro-batches the graph reads
        self.static_leaves = [t for b in static for t in tensor_leaves(b)]
        self.seen = 0                                # eager warm-up steps run so far
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None         # graph-owned output (cloned after each replay)


class StepGraphs:
    """Runs `step_fn(batches) -> 1-D tensor` eagerly or as a replayed CUDA graph.

    `step_fn` must be pure device work: no host syncs, no host-side decisions that change
    between steps (those belong outside, e.g. the LR schedule). It receives the static copies of
    the batches, so it must not keep references to them.
    """

    def __init__(self, step_fn: Callable[[list[Any]], torch.Tensor], device: torch.device, ddp: bool) -> None:
        self.step_fn, self.device, self.ddp = step_fn, device, ddp
        self.warmup = WARMUP_DDP if ddp else WARMUP
        # host-side agreement between ranks (see the module docstring); a collective to create
        self.group = torch_dist.new_group(backend="gloo") if ddp else None
        self.graphs: dict[tuple, _Graph] = {}
        self.side = torch.cuda.Stream(device)
        self.pool = None                             # memory pool shared by every graph
        self.disabled = ""                           # why graphs stopped being used, once known
        self.full = False                            # MAX_GRAPHS reached (warned once)
        self.captured = 0

    def __call__(self, batches: list[Any]) -> torch.Tensor:
        if self.disabled:
            return self.step_fn(batches)
        key = signature(batches)
        if self.group is not None and not self._all_ranks_have(key):
            return self.step_fn(batches)  # shapes differ between ranks: every rank runs this step eagerly
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= MAX_GRAPHS:  # known shapes keep their graphs; new ones run eagerly
                if not self.full:
                    self.full = True
                    log.warning(f"trainer.cuda_graphs: more than {MAX_GRAPHS} distinct batch shapes; steps with "
                                "new shapes run eagerly (pad inputs to a few fixed lengths)")
                return self.step_fn(batches)
            static = map_tensors(batches, lambda t: torch.empty_like(t, memory_format=torch.contiguous_format))
            g = self.graphs[key] = _Graph(static)
        torch._foreach_copy_(g.static_leaves, [t for b in batches for t in tensor_leaves(b)])
        if g.graph is None:
            if g.seen < self.warmup:
                g.seen += 1
                return self._warmup_step(g)
            if not self._capture(g):
                return self.step_fn(batches)
        g.graph.replay()
        return g.out.clone()  # take ownership before another replay writes the same memory

    def _all_ranks_have(self, key: tuple) -> bool:
        d = signature_digest(key)
        t = torch.tensor([d, -d], dtype=torch.int64)  # CPU tensor over gloo: no GPU sync
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=self.group)
        return int(t[0]) == d and -int(t[1]) == d  # max == min: every rank has this signature

    def _warmup_step(self, g: _Graph) -> torch.Tensor:
        cur = torch.cuda.current_stream(self.device)
        self.side.wait_stream(cur)
        with torch.cuda.stream(self.side):
            out = self.step_fn(g.static)
        cur.wait_stream(self.side)
        return out.clone()

    def _capture(self, g: _Graph) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            # captured on the warm-up stream: NCCL (2.28+ window registration, multi-node IB) wants
            # the collectives of warm-up and capture on one stream (vLLM PR 29207, torchtitan PR 2922)
            with torch.cuda.graph(graph, pool=self.pool, stream=self.side, capture_error_mode="thread_local"):
                out = self.step_fn(g.static)
        except Exception as e:  # a host sync or unsupported op in the step: say so, run eagerly
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = (f"capture of the training step failed ({type(e).__name__}: {first[:200]}); the model "
                      "or loss probably syncs with the host (.item(), .cpu(), data-dependent shapes)")
            if self.ddp:  # DDP's reducer is left waiting for the aborted backward: no eager way on
                raise UserError(f"trainer.cuda_graphs: {reason}; run again with trainer.cuda_graphs=false") from None
            self._disable(reason)
            torch.cuda.synchronize(self.device)
            return False
        if self.pool is None:
            self.pool = graph.pool()
        g.graph, g.out = graph, out
        self.captured += 1
        log.info(f"trainer.cuda_graphs: captured the training step for batch shape "
                 f"{[list(s) for s, _ in signature(g.static)[0]]} ({self.captured} graph(s))")
        return True

    def reset(self) -> None:
        """The step is another computation now (freezing.py changed which parameters train, and
        DDP's reducer): drop every graph; each shape warms up and is captured again."""
        if self.graphs and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no replay in flight when its graph and pool go
        self.graphs, self.pool, self.full = {}, None, False

    def _disable(self, reason: str) -> None:
        if not self.disabled:
            self.disabled = reason
            log.warning(f"trainer.cuda_graphs: {reason}; running the step eagerly from here on")
