"""A stand-in for torch.cuda's graph API on CPU, to test the engine's CUDA-graph bookkeeping
(static inputs, one graph per shape, warm-up counts, packed outputs, the device lr, the DDP
agreement) without a GPU. Capture runs the step and then puts every piece of state back (a real
capture executes nothing); replay runs the recorded step again on the static inputs and writes
the graph's static output in place, as a real replay does."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import torch


def lr_tensors(optimizer: torch.optim.Optimizer, device: Any = None) -> None:
    """What graphs.make_capturable does that a CPU optimizer accepts: the lr as a (float32) tensor.
    An eager baseline needs it too, to round the lr exactly as the graphed run does."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]))


class FakeCUDA:
    def __init__(self, trainer: Any) -> None:
        self.trainer, self.replays, self.captures = trainer, 0, 0
        fake = self

        class Graph:
            def __init__(self) -> None:
                self.fn: Callable | None = None
                self.out: torch.Tensor | None = None

            def replay(self) -> None:
                fake.replays += 1
                self.out.copy_(self.fn())

            def pool(self) -> None:
                return None

        self.Graph = Graph

    def graph(self, g: Any, pool: Any = None, stream: Any = None, capture_error_mode: str = "global"):
        t = self.trainer

        @contextlib.contextmanager
        def capture():
            model = {k: v.clone() for k, v in t.model.state_dict().items()}
            opt = copy.deepcopy(t.optimizer.state_dict())
            lrs = [grp["lr"] for grp in t.optimizer.param_groups]
            rng = torch.get_rng_state()
            ema = [s.clone() for s in t.ema.shadow] + [t.ema.updates.clone()] if t.ema else []
            step_fn, seen = t.graphs.step_fn, {}

            def recording(batches):  # remember what the graph would replay
                g.fn = lambda: step_fn(batches)
                seen["out"] = out = step_fn(batches)
                return out

            t.graphs.step_fn = recording
            try:
                yield
            finally:
                t.graphs.step_fn = step_fn
                g.out = seen["out"]
                t.model.load_state_dict(model)
                t.optimizer.load_state_dict(opt)
                for grp, lr in zip(t.optimizer.param_groups, lrs):
                    grp["lr"] = lr  # load_state_dict brought back floats: keep the live lr tensors
                torch.set_rng_state(rng)
                if ema:
                    torch._foreach_copy_(t.ema.shadow + [t.ema.updates], ema)
                self.captures += 1
        return capture()

    def install(self, setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
        """Patch torch.cuda (and graphs.make_capturable) with `setattr_` (pytest's monkeypatch.setattr
        undoes it after the test) and switch the trainer's graphs on."""
        from trainlib import graphs

        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        setattr_(torch.cuda, "Stream", lambda *a, **k: stream())
        setattr_(torch.cuda, "current_stream", lambda *a, **k: stream())
        setattr_(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        setattr_(torch.cuda, "synchronize", lambda *a: None)
        setattr_(torch.cuda, "CUDAGraph", self.Graph)
        setattr_(torch.cuda, "graph", self.graph)
        setattr_(graphs, "make_capturable", lr_tensors)
        self.trainer.use_graphs = True
