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
