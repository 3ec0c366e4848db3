"""Two-process torchrun (gloo): same global batch -> same weights as one process; disjoint shards."""
import json

import torch

from tests.conftest import torchrun


def _run(tmp_path, name, nproc, overrides):
    out = tmp_path / name
    r = torchrun(nproc, ["tests/toy.py", str(out), f"trainer.out_dir={tmp_path}/runs", f"trainer.run_name={name}",
                         "trainer.max_epochs=2", *overrides])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_two_processes_match_one_process_and_see_disjoint_samples(tmp_path):
    one = _run(tmp_path, "one", 1, ["data.batch_size=8"])
    two = _run(tmp_path, "two", 2, ["data.batch_size=4"])
    acc = _run(tmp_path, "acc", 2, ["data.batch_size=2", "trainer.accumulate_grad_batches=2"])
    w1 = torch.load(one / "weights.pt")
    init = None
    for other in (two, acc):
        w2 = torch.load(other / "weights.pt")
        for k in w1:
            # fp32 sums reduced in a different order: equal up to rounding
            assert torch.allclose(w1[k], w2[k], atol=1e-6, rtol=0), (other.name, k, (w1[k] - w2[k]).abs().max())
    from tests.toy import toy_model

    init = toy_model().state_dict()
    assert not torch.allclose(init["0.weight"], w1["0.weight"], atol=1e-3)

    seen = [json.loads((two / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = seen[0][epoch], seen[1][epoch]
        assert not set(a) & set(b), "ranks must see disjoint samples"
        assert sorted(a + b) == list(range(96))
    assert seen[0]["0"] != seen[0]["1"], "the sampler must reshuffle every epoch"


def test_the_step_statistics_ride_in_the_gradient_all_reduce(tmp_path):
    """Exact normalisation needs the step's global weight; under eager DDP it is reduced together with
    the gradients (one all-reduce of params + 2 numbers per step), not by a blocking collective of its own."""
    import json as _json

    out = _run(tmp_path, "count", 2, ["data.batch_size=4", "trainer.accumulate_grad_batches=2", "log.every_n_steps=1000",
                                      "--toy-count_all_reduce=1"])
    n_params = sum(p.numel() for p in __import__("tests.toy", fromlist=["toy_model"]).toy_model().parameters())
    for r in (0, 1):
        sizes = [n for n, _ in _json.loads((out / f"all_reduce_rank{r}.json").read_text())]
        steps = _json.loads((out / f"end_rank{r}.json").read_text())["step"]
        assert steps == 12 and sizes.count(n_params + 2) == steps, sizes[:20]
        # size 2 only for the epoch's mean loss at each epoch end, never per step
        assert sizes.count(2) == 2, "a separate all-reduce of [weight, non-finite flag] per step"


BELOW_ONE = '''
import json, sys
import torch
from torch import nn
from tests.toy import ToyData
from trainlib import DataConfig, LogConfig, OptimConfig, Trainer, TrainerConfig

class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.p * torch.ones(())

def loss_fn(out, batch):
    if torch.distributed.get_rank() == 0:  # weight 0.5: the gradient, 0.5 * 6e38 = 3e38, is finite
        return {"loss": out.sum() * 2e19 * 3e19, "weight": 0.5}
    return {"loss": out.sum() * 3e38, "weight": 1}

t = Trainer(One(), loss_fn, ToyData(32), config=TrainerConfig(out_dir=sys.argv[1], max_steps=3, nonfinite="skip"),
            optim=OptimConfig(name="sgd", lr=0.05, momentum=0.0), data=DataConfig(batch_size=8),
            log_config=LogConfig(every_n_steps=1, loggers=["jsonl"]), forward_fn=lambda m, b: m(b["x"]))
t.fit()
print(json.dumps({"rank": t.env.rank, "skipped": t.skipped_steps, "p": t.model.p.item()}))
'''


def test_ddp_ranks_agree_on_a_gradient_that_overflows_only_when_normalised(tmp_path):
    """The normalising multiply's own overflow is only seen by a second check, run when a loss weight
    may be below 1; DDP ranks have no verdict agreement after it, so they must decide alike: rank 0
    returns weight 0.5, rank 1 weight 1, and world / total = 4/3 turns both ranks' finite 3e38
    gradient into inf. Every step is skipped on both ranks and the weight stays 0 (deciding alone,
    rank 1 applied the inf)."""
    script = tmp_path / "below_one.py"
    script.write_text(BELOW_ONE)
    r = torchrun(2, [str(script), str(tmp_path / "runs")], timeout=120)  # (deciding alone, the ranks hung)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ends = sorted((json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"rank"')),
                  key=lambda e: e["rank"])
    assert ends == [{"rank": 0, "skipped": 3, "p": 0.0}, {"rank": 1, "skipped": 3, "p": 0.0}], r.stdout[-2000:]
