"""trainer.oom_recovery: an out-of-memory error in a step (injected on CPU as the torch.OutOfMemoryError
CUDA raises) halves the micro-batch and retries the step; every rank agrees, none deadlocks, and the
result is the run that used the small micro-batch from that step on. Recorded in checkpoints."""
import torch

from tests.conftest import torchrun
from tests.toy import make_trainer, toy_forward
from trainlib.config import ConfigError, UserError


def _run(tmp_path, name, overrides, nproc=2):
    out = tmp_path / name
    r = torchrun(nproc, ["tests/toy.py", str(out), f"trainer.out_dir={tmp_path}/runs", f"trainer.run_name={name}",
                         "trainer.oom_recovery=true", *overrides])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout + r.stderr


def test_oom_on_one_rank_of_two_continues_on_both_and_matches_the_small_micro_batch_run(tmp_path):
    # 96 samples, 2 ranks, batch 8: 6 steps an epoch. From step 7 (epoch 1's first) rank 1 only fits 4 samples.
    hit, text = _run(tmp_path, "hit", ["data.batch_size=8", "trainer.max_epochs=2",
                                       "--toy-oom_above=4", "--toy-oom_step=7", "--toy-oom_rank=1"])
    assert "out of memory in step 7 on rank(s) [1]: micro-batch halved to 4 sample(s), 2 micro-batches" in text
    assert text.count("out of memory in step") == 1, "one halving is enough: later steps fit"
    for r in (0, 1):
        assert '"step": 12' in (hit / f"end_rank{r}.json").read_text()
    ckpt = torch.load(tmp_path / "runs" / "hit" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["micro_splits"] == 2
    # the reference: epoch 0 at batch 8, then (resumed) batch 4 with 2 micro-batches per step
    _run(tmp_path, "ref", ["data.batch_size=8", "trainer.max_epochs=1"])
    ref, _ = _run(tmp_path, "ref2", ["data.batch_size=4", "trainer.accumulate_grad_batches=2", "trainer.max_epochs=2",
                                     f"trainer.resume={tmp_path}/runs/ref/checkpoints/last.ckpt"])
    a, b = torch.load(hit / "weights.pt"), torch.load(ref / "weights.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    from tests.toy import toy_model

    assert not torch.allclose(toy_model().state_dict()["0.weight"], a["0.weight"], atol=1e-3)


def test_the_reduced_micro_batch_is_checkpointed_and_a_resume_keeps_it(tmp_path):
    def tight(limit):
        def forward(model, batch):
            if model.training and batch["x"].shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return toy_forward(model, batch)
        return forward

    common = [f"trainer.out_dir={tmp_path}", "trainer.oom_recovery=true", "data.batch_size=8"]
    whole = make_trainer([*common, "trainer.run_name=whole", "trainer.max_epochs=2"], forward_fn=tight(2))
    whole.fit()
    assert whole.step.splits == 4  # 8 -> 4 -> 2 samples
    first = make_trainer([*common, "trainer.run_name=part", "trainer.max_epochs=1"], forward_fn=tight(2))
    first.fit()
    # resumed without any memory limit: the checkpoint's micro-batch is used, so the result is the same
    second = make_trainer([*common, "trainer.run_name=part", "trainer.max_epochs=2", "trainer.resume=auto"])
    second.fit()
    assert second.step.splits == 4
    a, b = whole.model_state_dict(), second.model_state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_out_of_memory_with_one_sample_per_micro_batch_is_one_clear_error(tmp_path):
    def never_fits(model, batch):
        if model.training:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return toy_forward(model, batch)

    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.oom_recovery=true", "data.batch_size=4"],
                     forward_fn=never_fits)
    try:
        t.fit()
        raise AssertionError("expected an error")
    except UserError as e:
        assert "out of memory in step 1 even with a micro-batch of 1 sample (trainer.oom_recovery)" in str(e)


def test_without_oom_recovery_the_error_is_not_swallowed(tmp_path):
    def never_fits(model, batch):
        if model.training:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return toy_forward(model, batch)

    t = make_trainer([f"trainer.out_dir={tmp_path}"], forward_fn=never_fits)
    try:
        t.fit()
        raise AssertionError("expected an error")
    except torch.OutOfMemoryError:
        pass


def test_oom_recovery_refuses_what_it_cannot_make_safe():
    for bad, text in ((["trainer.strategy=fsdp"], "cannot run with trainer.strategy=fsdp"),
                      (["trainer.cuda_graphs=true"], "needs eager steps")):
        try:
            make_trainer(["trainer.oom_recovery=true", *bad])
            raise AssertionError("expected an error")
        except ConfigError as e:
            assert text in str(e)
