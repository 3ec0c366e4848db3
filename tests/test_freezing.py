"""Freezing and unfreezing modules during a run (trainlib/freezing.py): state.set_trainable and
FreezeSchedule in one process, under DDP and FSDP on 2 gloo ranks, with CUDA-graph bookkeeping,
and across resumes. Also a script for torchrun (like tests/toy.py):

    torchrun --nproc_per_node=2 tests/test_freezing.py OUT_DIR key=value ... [--fz-plateau=1] [--fz-bad=1]

writes OUT_DIR/weights.pt (rank 0) and OUT_DIR/trainable_rank<r>.json (what trained in each epoch).
Default schedule: stem + blocks.0 frozen in epoch 0, blocks.1 until epoch 2, and blocks.2 frozen in
epoch 2 only (a freeze and an unfreeze mid-run); --fz-plateau: blocks.2, then blocks.1, unfrozen
on plateaus of a scripted metric (PLATEAU); --fz-bad: the ranks ask for different changes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.toy import ToyData, make_trainer  # noqa: E402
from trainlib import Callback, ConfigError, FreezeSchedule, Metric  # noqa: E402
from trainlib.freezing import resolve  # noqa: E402

# val/scripted by epoch: patience 2 -> no improvement at epochs 2, 3 (unfreeze the 1st group; it
# trains from epoch 4), new best at 4, none at 5, 6 (the 2nd group trains from epoch 7)
PLATEAU = [5.0, 4.0, 4.5, 4.2, 3.0, 3.1, 3.2, 3.3]


class Net(nn.Module):
    """stem -> 3 residual blocks -> head."""

    def __init__(self, dim: int = 6, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.stem = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class Scripted(Metric):
    """A validation metric with a given value per epoch: {"scripted": values[epoch]}."""

    def __init__(self, values: list[float], epoch: int) -> None:
        super().__init__()
        self.value = values[min(epoch, len(values) - 1)]

    def update(self, outputs, batch) -> None: ...

    def compute_from(self, states) -> dict:
        return {"scripted": self.value}


class Toggle(Callback):
    """blocks.2 frozen during epoch `epoch` only: a decision from the epoch, applied again at fit start."""

    def __init__(self, epoch: int = 2) -> None:
        self.epoch = epoch

    def on_fit_start(self, state) -> None:
        state.set_trainable({"blocks.2": state.epoch != self.epoch})

    on_train_epoch_start = on_fit_start


class Trained(Callback):
    """The parameters that train in each epoch (recorded at its start, after the schedule)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, list[str]] = {}

    def on_train_epoch_start(self, state) -> None:
        self.by_epoch[state.epoch] = sorted(n for n, p in state.model.named_parameters() if p.requires_grad)


def default_schedule() -> list[Callback]:
    return [FreezeSchedule([["stem", "blocks.0"], "blocks.1"], unfreeze_at=[1, 2]), Toggle()]


def plateau_schedule() -> FreezeSchedule:
    return FreezeSchedule(["blocks.2", "blocks.1"], patience=2, monitor="val/scripted")


def scripted(get_trainer):
    return lambda: [Scripted(PLATEAU, get_trainer().state.epoch)]


# ----------------------------------------------------------------------------------- one process
def _trainer(tmp_path, name, extra, callbacks, n=32, **kw):
    return make_trainer([f"trainer.out_dir={tmp_path}", f"trainer.run_name={name}", "optim.name=adamw", *extra],
                        ToyData(n), Net(), callbacks=callbacks, **kw)


def test_a_block_frozen_until_epoch_2_keeps_its_start_and_the_others_keep_their_adam_state(tmp_path):
    class Probe(Callback):
        def __init__(self):
            self.rows = []

        def _row(self, state, when):
            opt, m = state.optimizer, state.model
            b0 = list(m.blocks[0].parameters())
            s1 = opt.state.get(m.blocks[1][0].weight, {})  # (indexing the defaultdict would add an entry)
            self.rows.append({"epoch": state.epoch, "when": when, "b0": [p.detach().clone() for p in b0],
                              "b0_state": [p in opt.state for p in b0], "b0_train": b0[0].requires_grad,
                              "b1_exp_avg": s1.get("exp_avg"), "b1_copy": s1["exp_avg"].clone() if s1 else None,
                              "b1_step": float(s1["step"]) if s1 else 0.0,
                              "b0_step": float(opt.state[b0[0]]["step"]) if b0[0] in opt.state else None})

        def on_train_epoch_start(self, state):
            self._row(state, "start")

        def on_train_epoch_end(self, state):
            self._row(state, "end")

    probe = Probe()
    t = _trainer(tmp_path, "run", ["trainer.max_epochs=4"], [FreezeSchedule(["blocks.0"], unfreeze_at=[2]), probe])
    t.fit()
    start = [p.detach() for p in Net().blocks[0].parameters()]
    rows = {(r["epoch"], r["when"]): r for r in probe.rows}
    steps = t.steps_per_epoch  # 4
    for e in (0, 1):  # frozen: bit-equal to the start, no optimizer state
        r = rows[e, "end"]
        assert not r["b0_train"] and r["b0_state"] == [False, False]
        assert all(torch.equal(a, b) for a, b in zip(r["b0"], start))
    for e in (2, 3):  # trains from epoch 2: it moves and has its own state, counted from its first step
        r = rows[e, "end"]
        assert r["b0_train"] and r["b0_state"] == [True, True] and r["b0_step"] == steps * (e - 1)
        assert all(not torch.equal(a, b) for a, b in zip(r["b0"], start))
    # blocks.1's Adam state is one tensor, updated in place, whose step counts every step of the run
    first = rows[0, "end"]["b1_exp_avg"]
    assert all(r["b1_exp_avg"] is first for r in probe.rows if r["b1_exp_avg"] is not None)
    assert [rows[e, "end"]["b1_step"] for e in range(4)] == [steps * (e + 1) for e in range(4)]
    # the change itself leaves it as it was (end of epoch 1 -> start of epoch 2), then it goes on
    assert torch.equal(rows[1, "end"]["b1_copy"], rows[2, "start"]["b1_copy"])
    assert not torch.equal(rows[2, "start"]["b1_copy"], rows[2, "end"]["b1_copy"])
    text = (tmp_path / "run" / "train.log").read_text()
    assert "trainable parameters changed at epoch 0 (on_fit_start): frozen blocks.0.0.weight, blocks.0.0.bias" in text
    assert "trainable parameters changed at epoch 2 (on_train_epoch_start): unfrozen blocks.0.0.weight" in text


def test_plateau_unfreezes_the_next_group_after_patience_validations(tmp_path):
    trained = Trained()
    schedule = plateau_schedule()
    t = _trainer(tmp_path, "plateau", ["trainer.max_epochs=8"], [schedule, trained], metrics=scripted(lambda: t))
    t.fit()
    b1 = ["blocks.1.0.bias", "blocks.1.0.weight"]
    b2 = ["blocks.2.0.bias", "blocks.2.0.weight"]
    always = ["blocks.0.0.bias", "blocks.0.0.weight", "head.bias", "head.weight", "stem.bias", "stem.weight"]
    # worked out by hand from PLATEAU and patience 2 (see its comment)
    expected = {e: sorted(always + (b2 if e >= 4 else []) + (b1 if e >= 7 else [])) for e in range(8)}
    assert trained.by_epoch == expected
    assert schedule.state_dict() == {"opened": 2, "best": 3.0, "wait": 0}  # every group open: no more counting
    text = (tmp_path / "plateau" / "train.log").read_text()
    assert "FreezeSchedule: val/scripted did not improve for 2 validation(s): unfreezing blocks.2" in text
    assert "FreezeSchedule: val/scripted did not improve for 2 validation(s): unfreezing blocks.1" in text


def test_nested_names_the_longer_wins_and_mistakes_fail_clearly(tmp_path):
    calls = []

    class Ask(Callback):  # one request per test case, at the first epoch start
        def __init__(self, changes, event="on_train_epoch_start"):
            self.changes, self.event = changes, event

        def on_train_epoch_start(self, state):
            if self.event == "on_train_epoch_start":
                calls.append(state.set_trainable(self.changes))

        def on_train_step_end(self, state):
            if self.event == "on_train_step_end":
                state.set_trainable(self.changes)

    one = ["trainer.max_epochs=1"]
    _trainer(tmp_path, "a", one, [Ask({"blocks": False, "blocks.1": True})]).fit()
    assert calls == [["blocks.0.0.bias", "blocks.0.0.weight", "blocks.2.0.bias", "blocks.2.0.weight"]]
    tied = Net()
    tied.blocks[2][0].weight = tied.blocks[1][0].weight  # one parameter, two names
    target = resolve(tied, {"blocks.2": False})  # named by the module that does not hold its first name
    assert [n for n, train in target.items() if not train] == ["blocks.1.0.weight", "blocks.2.0.bias"]
    cases = [({"blocks.9": False}, "set_trainable: 'blocks.9' is not a module of the model "
                                   r"\(its top-level modules: stem, blocks, head\)"),
             ({"blocks.0.1": False}, "'blocks.0.1' has no parameters"),
             ({"": False}, "this would freeze every parameter of the model"),
             ({"head": "no"}, r"expected \{module name: True\|False\}, got 'head': 'no'")]
    for i, (changes, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            _trainer(tmp_path, f"e{i}", one, [Ask(changes)]).fit()
    with pytest.raises(ConfigError, match="set_trainable called mid-epoch or outside fit"):
        _trainer(tmp_path, "mid", one, [Ask({"head": False}, "on_train_step_end")]).fit()

    # only a parameter the optimizer holds can be unfrozen (and with EMA on, one it averages)
    built_frozen = Net()
    built_frozen.head.requires_grad_(False)
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=opt", *one], ToyData(32), built_frozen,
                     callbacks=[Ask({"head": True})])
    with pytest.raises(ConfigError, match="head.weight, head.bias cannot be unfrozen: the optimizer does not hold"):
        t.fit()
    in_group = Net()
    in_group.head.requires_grad_(False)
    t = make_trainer([f"trainer.out_dir={tmp_path}", "trainer.run_name=ema", "trainer.ema_decay=0.9", *one],
                     ToyData(32), in_group, callbacks=[Ask({"head": True})], param_groups=list(in_group.parameters()))
    with pytest.raises(ConfigError, match="cannot be unfrozen with trainer.ema_decay > 0"):
        t.fit()

    for kwargs, message in [({"unfreeze_at": [3, 1]}, "unfreeze_at must be epochs >= 0 in increasing order"),
                            ({"unfreeze_at": [1, 2, 3]}, "unfreeze_at has 3 epochs for 2 groups"),
                            ({"patience": -1}, "patience must be an integer >= 0"),
                            ({"mode": "up"}, "mode must be 'min' or 'max'"),
                            ({"min_delta": -0.1}, "min_delta must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            FreezeSchedule(["blocks.0", "blocks.1"], **kwargs)
    with pytest.raises(ConfigError, match=r"monitor 'val/acc' is not among the validation metrics \(val/loss\)"):
        _trainer(tmp_path, "mon", one, [FreezeSchedule(["head"], patience=1, monitor="val/acc")]).fit()


def test_ema_averages_what_was_trainable_when_built_including_what_the_schedule_froze(tmp_path):
    class Shadow(Callback):
        def on_train_epoch_end(self, state):
            if state.epoch == 0:  # frozen during epoch 0: its average stays the start value exactly
                self.b0 = ema.shadow[ema.names.index("blocks.0.0.weight")].clone()

    probe = Shadow()
    t = _trainer(tmp_path, "ema", ["trainer.max_epochs=2", "trainer.ema_decay=0.5"],
                 [FreezeSchedule(["blocks.0"], unfreeze_at=[1]), probe])
    ema = t.ema
    assert len(ema.names) == 10  # every parameter: all were trainable when the Trainer was built
    t.fit()
    start = Net().blocks[0][0].weight.detach()
    assert torch.equal(probe.b0, start)
    assert not torch.equal(ema.shadow[ema.names.index("blocks.0.0.weight")], start)  # it follows once unfrozen


def test_a_change_drops_the_captured_graphs_and_replays_the_eager_run(tmp_path, monkeypatch):
    from tests.fake_cuda import FakeCUDA, lr_tensors

    extra = ["trainer.max_epochs=3"]
    eager = _trainer(tmp_path, "e", extra, [FreezeSchedule(["blocks.0"], unfreeze_at=[1])])
    lr_tensors(eager.optimizer)  # the graphed run's float32 lr
    eager.fit()
    t = _trainer(tmp_path, "g", extra, [FreezeSchedule(["blocks.0"], unfreeze_at=[1])])
    fake = FakeCUDA(t)
    fake.install(monkeypatch.setattr)
    t.fit()
    # one batch shape: captured once before the change (epoch 0) and once after it (epoch 1)
    assert fake.captures == 2 and len(t.graphs.graphs) == 1 and not t.graphs.disabled
    for k, v in eager.model.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k


def test_an_epoch_boundary_stop_before_or_after_an_unfreeze_resumes_bit_exactly(tmp_path):
    extra = ["trainer.save_top_k=-1", "trainer.monitor=val/scripted"]  # every top-k file kept
    holder = {}
    kw = {"metrics": scripted(lambda: holder["t"])}

    def trainer(name, epochs, *more):
        holder["t"] = t = _trainer(tmp_path, name, [f"trainer.max_epochs={epochs}", *extra, *more],
                                   [plateau_schedule(), Trained()], **kw)
        return t

    def same(t, stop):
        assert t.callbacks[-1].by_epoch == {e: v for e, v in full.callbacks[-1].by_epoch.items() if e >= stop}
        for k, v in full.model.state_dict().items():
            assert torch.equal(v, t.model.state_dict()[k]), (stop, k)

    full = trainer("full", 8)
    full.fit()
    for stop in (3, 4, 7):  # the first group unfreezes at the validation of epoch 3, the second at epoch 6
        trainer(f"s{stop}", stop).fit()
        t = trainer(f"s{stop}", 8, "trainer.resume=auto")
        t.fit()
        same(t, stop)
    # the top-k file written at the validation that unfroze blocks.2 holds
    # that decision: the schedule runs before the checkpoint callback
    (top_k,) = (tmp_path / "full" / "checkpoints").glob("epoch=003-*.ckpt")
    t = trainer("from_top_k", 8, f"trainer.resume={top_k}")
    t.fit()
    same(t, 4)


# ------------------------------------------------------------------------------- torchrun (gloo)
def _run(tmp_path, name, nproc, extra, ok=True):
    from tests.conftest import torchrun

    r = torchrun(nproc, [__file__, str(tmp_path / name), f"trainer.out_dir={tmp_path / 'runs'}",
                         f"trainer.run_name={name}", "trainer.max_epochs=4", "optim.name=adamw", *extra])
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _weights(tmp_path, name):
    return torch.load(tmp_path / name / "weights.pt")


def _trained(tmp_path, name, rank=0):
    return json.loads((tmp_path / name / f"trainable_rank{rank}.json").read_text())


def _close(a, b, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


SCHEDULE = {"0": ["blocks.2.0.bias", "blocks.2.0.weight", "head.bias", "head.weight"]}
SCHEDULE["1"] = sorted(SCHEDULE["0"] + ["blocks.0.0.bias", "blocks.0.0.weight", "stem.bias", "stem.weight"])
SCHEDULE["2"] = sorted(set(SCHEDULE["1"]) - {"blocks.2.0.bias", "blocks.2.0.weight"} |
                       {"blocks.1.0.bias", "blocks.1.0.weight"})
SCHEDULE["3"] = sorted(set(SCHEDULE["2"]) | {"blocks.2.0.bias", "blocks.2.0.weight"})


def test_ddp_freeze_and_unfreeze_mid_run_match_one_process_with_twice_the_batch(tmp_path):
    _run(tmp_path, "one", 1, ["data.batch_size=8"])
    r = _run(tmp_path, "two", 2, ["data.batch_size=4", "trainer.find_unused_parameters=false"])
    assert _trained(tmp_path, "one") == _trained(tmp_path, "two") == _trained(tmp_path, "two", 1) == SCHEDULE
    # a new reducer at fit start (the frozen groups), epoch 1, epoch 2 (blocks.1 unfrozen by the
    # schedule, then blocks.2 frozen by Toggle: one rebuild per change) and epoch 3
    assert r.stdout.count("(DDP reducer rebuilt)") == 5, r.stdout[-3000:]
    one, two = _weights(tmp_path, "one"), _weights(tmp_path, "two")
    _close(one, two)  # no unused-parameter error, no gradient left out of the all-reduce
    start = Net().state_dict()
    assert all(not torch.equal(one[k], start[k]) for k in start)  # every group trained at some point

    # the ranks must agree: a decision that differs between them fails on every rank, clearly
    r = _run(tmp_path, "bad", 2, ["data.batch_size=4", "--fz-bad=1"], ok=False)
    assert r.returncode != 0
    assert "set_trainable: the ranks asked for different changes at epoch 1 (on_train_epoch_start): " \
           "rank 0: {'head': False}; rank 1: {'head': True}" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


def test_fsdp_units_with_frozen_and_trainable_parameters_train_like_ddp_and_resume_exactly(tmp_path):
    # fsdp_min_params=60: each block's Linear (72 parameters) is a unit, the root holds stem and head;
    # stem frozen while head trains: one unit with both, then all of it trainable. blocks.1 is
    # frozen as built (in the optimizer through param_groups): DDP's first reducer has no hook for it
    built = ["data.batch_size=4", "--fz-built_frozen=1"]
    fsdp = [*built, "trainer.strategy=fsdp", "trainer.fsdp_min_params=60"]
    _run(tmp_path, "ddp", 2, built)
    r = _run(tmp_path, "fsdp", 2, fsdp)
    assert "4 sharding unit(s) over 2 ranks: blocks.0.0, blocks.1.0, blocks.2.0, <root>" in r.stdout, r.stdout[-2000:]
    assert _trained(tmp_path, "fsdp") == _trained(tmp_path, "fsdp", 1) == SCHEDULE
    sharded = _weights(tmp_path, "fsdp")
    _close(_weights(tmp_path, "ddp"), sharded)
    # stopped after epoch 0: the groups never trained have no optimizer state in the file, and a
    # resume under FSDP starts them fresh, as the uninterrupted run did; after epoch 2: blocks.2 is
    # frozen there, blocks.1 was frozen as built: their states are saved and taken back (the
    # loader would skip a parameter frozen when it loads), and epoch 3 goes on with them
    for stop in (1, 3):
        _run(tmp_path, f"part{stop}", 2, fsdp + [f"trainer.max_epochs={stop}"])
        _run(tmp_path, f"part{stop}", 2, fsdp + ["trainer.resume=auto"])
        _close(sharded, _weights(tmp_path, f"part{stop}"), atol=0)


def test_sigkill_at_random_moments_around_the_unfreezes_then_resume_is_bit_exact(tmp_path):
    import random

    from tests.test_resume import compare, finish, kill_at_random_moments, start

    def command(out, run_dir, extra):
        return [sys.executable, __file__, str(out), f"trainer.out_dir={run_dir.parent}",
                f"trainer.run_name={run_dir.name}", "trainer.max_epochs=8", "optim.name=adamw",
                "trainer.ckpt_every_n_steps=1", "log.every_n_steps=2", "trainer.save_top_k=2", "--fz-plateau=1",
                "--fz-delay=0.01", *extra]

    ref_out, ref_dir = tmp_path / "ref_out", tmp_path / "runs" / "ref"
    finish(start(command(ref_out, ref_dir, [])))
    out, run_dir = tmp_path / "out", tmp_path / "runs" / "killed"
    kill_at_random_moments(lambda resume: command(out, run_dir, ["trainer.resume=auto"] * resume),
                           run_dir / "checkpoints" / "last.ckpt", random.Random(5), times=3, max_delay=2.5)
    compare(ref_out, ref_dir, out, run_dir)


def main(argv: list[str]) -> None:
    from tests.toy import split_toy_flags
    from trainlib.recipe import exit_process, guarded

    out = Path(argv[0])
    flags, overrides = split_toy_flags([a.replace("--fz-", "--toy-") for a in argv[1:]])
    trained = Trained()
    holder = {}
    kw: dict = {}
    if flags.get("plateau"):
        callbacks: list[Callback] = [plateau_schedule()]
        kw["metrics"] = scripted(lambda: holder["t"])
    else:
        callbacks = default_schedule()
    if flags.get("bad"):  # a decision taken from something that differs between ranks
        class Bad(Callback):
            def on_train_epoch_start(self, state):
                if state.epoch == 1:
                    state.set_trainable({"head": state.rank == 1})

        callbacks.append(Bad())
    model = Net()
    if flags.get("built_frozen"):  # blocks.1 frozen as built, but in the optimizer (the recipe's param_groups)
        model.blocks[1].requires_grad_(False)
        kw["param_groups"] = [{"params": list(model.parameters())}]
    data = ToyData(32, delay=flags.get("delay", 0.0))
    holder["t"] = trainer = make_trainer(overrides, data, model, callbacks=[*callbacks, trained], **kw)

    def body():
        trainer.fit()
        rank = trainer.env.rank
        out.mkdir(parents=True, exist_ok=True)
        (out / f"trainable_rank{rank}.json").write_text(json.dumps(trained.by_epoch))
        weights = trainer.model_state_dict()  # every rank: a gather under FSDP
        if rank == 0:
            torch.save(weights, out / "weights.pt")

    exit_process(guarded(body))


if __name__ == "__main__":
    main(sys.argv[1:])
