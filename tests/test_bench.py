"""launch/bench.py: argument checks, which variant each ratio divides by (same optimizer kernel,
same data path, same DDP semantics), the data path each variant really reads through, failure
isolation, the table's maths, the callgrind window, and tiny end-to-end runs of the process-per-
variant and DDP modes. No timing assertions."""
import io

import pytest
import torch
from torch.utils.data import TensorDataset

from launch import bench
from tests.conftest import torchrun

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_unknown_model_exits_with_clear_message(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--model", "resnet9000", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'resnet9000'" in err and "pdan" in err and "r2plus1d" in err


def test_steps_must_exceed_warmup(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--steps", "10", "--warmup", "9"])
    assert "--steps (10) must exceed --warmup (9)" in capsys.readouterr().err


def test_defaults_per_model_and_device():
    a = bench.parse_args(["--model", "pdan", "--device", "cpu"])
    assert (a.batch, a.precision, a.ddp, a.instructions) == (8, "32-true", False, False)
    a = bench.parse_args(["--model", "mlp", "--device", "cpu", "--precision", "bf16-mixed"])
    assert (a.batch, a.precision) == (32, "bf16-mixed")


def test_instructions_mode_is_single_process_cpu(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--instructions"])
    assert "--instructions counts a single CPU process" in capsys.readouterr().err


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("model", ["mlp", "pdan"])
@pytest.mark.parametrize("ddp", [False, True])
def test_every_ratio_divides_by_the_same_kernel_and_data_path(device, model, ddp, monkeypatch):
    monkeypatch.setattr(bench, "lightning_version", lambda: "2.6.6")  # list the Lightning rows too
    variants = bench.all_variants(device, model, ddp)
    assert all(s.ddp == ddp for s in variants.values())
    measured = [s for s in variants.values() if s.engine not in ("hand", "hand-graph")]
    assert measured
    for s in measured:
        refs = bench.ratio_refs(s, variants, gpu=device.type == "cuda")
        ref = variants[refs["vs reference"]]  # always present: the reference follows its variant
        assert ref.engine in ("hand", "hand-graph")
        assert (ref.fused, ref.data, ref.ddp) == (s.fused, s.data, s.ddp), (s.name, ref.name)
        assert ref.norm == s.norm  # DDP: trainlib's exact normalisation against the hand loop doing the same
        # trainlib never applies a non-finite step: its reference keeps that promise too (Lightning's does not)
        assert ref.checked == (s.engine == "trainlib" and s.data != bench.DEVICE), (s.name, ref.name)
        plain = variants[refs["vs plain loop"]]
        assert (plain.engine, plain.fused, plain.data, plain.norm, plain.checked) == (
            "hand", False, bench.PER_SAMPLE, "mean", False)
        if ddp:
            mean = variants[refs["vs mean-norm loop"]]
            assert (mean.fused, mean.data, mean.norm, mean.checked) == (s.fused, s.data, "mean", False)
            assert "vs unchecked loop" not in refs
        elif ref.checked:  # what the check costs: the same loop without it
            bare = variants[refs["vs unchecked loop"]]
            assert (bare.engine, bare.fused, bare.data, bare.checked) == ("hand", s.fused, s.data, False)
        if refs.get("Lightning / this"):
            light = variants[refs["Lightning / this"]]
            assert (light.engine, light.fused, light.data) == ("lightning", False, bench.PER_SAMPLE)
    names = {s.name: s for s in measured}
    if ddp:
        assert all(s.norm == "exact" for s in measured) and not any(s.engine == "lightning" for s in measured)
    else:
        # both AdamW kernels for trainlib and for Lightning
        assert {s.fused for s in measured if s.engine == "trainlib" and s.data == bench.SEEDED} == {True, False}
        assert {s.fused for s in measured if s.engine == "lightning"} == {True, False}
    # the faster defaults are rows of their own, labelled
    assert (any(bench.BATCH_FETCH in n and s.data == bench.BATCH_FETCH for n, s in names.items())
            == (model == "mlp"))
    assert any("random_fetch=False" in n and s.data == bench.PER_SAMPLE for n, s in names.items())
    assert any(s.data == bench.SEEDED and s.fused for s in measured)  # a user's Dataset, default seeding


def test_variant_filter_keeps_references():
    cpu = bench.all_variants(CPU, "mlp")
    assert not any("graph" in k or "compile" in k for k in cpu)  # GPU-only variants stay off the CPU table
    assert list(bench.select(cpu, " HAND-written ")) == [k for k in cpu if k.startswith("hand-written")]
    got = bench.select(cpu, "TENSORDATASET")
    assert list(got) == ["hand-written, per-sample", "hand-written, fused, batch fetch",
                         "hand-written, fused, batch fetch, checked", "trainlib default, batch fetch (TensorDataset)"]
    assert bench.select(cpu, "") == cpu


def test_no_matching_variant_exits(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--variants", "nothing-like-this"])
    assert "matches none of" in capsys.readouterr().err


@pytest.mark.parametrize("data", [bench.PER_SAMPLE, bench.SEEDED, bench.BATCH_FETCH])
def test_hand_loop_reads_through_the_same_path_as_trainlib(tmp_path, data):
    w = bench.mlp_workload(4, 8)
    run = bench.Run(CPU, batch=4, steps=8, warmup=1, lr=1e-3, precision="32-true")
    hand, _ = bench.hand_loader(w.dataset, data, run)
    ds = {bench.SEEDED: bench._UserDataset, bench.PER_SAMPLE: bench._PerSample}.get(data, lambda d: d)(w.dataset)
    t = bench.Trainer(w.make_model(), w.loss_fn, ds, config=bench.TrainerConfig(out_dir=str(tmp_path), device="cpu"),
                      data=bench.DataConfig(batch_size=4, drop_last=True), forward_fn=w.forward)
    mine = t.loaders["train"]
    if data == bench.PER_SAMPLE:  # the loop a user writes; trainlib: per-sample, no seeding
        assert hand.dataset is w.dataset and hand.batch_size == 4
        assert type(mine.dataset).__name__ == "SeededDataset" and mine.dataset.seeded is False
    else:  # the very loader trainlib builds: same wrapper, same seeding
        assert type(hand.dataset) is type(mine.dataset)
        assert hand.dataset.seeded == mine.dataset.seeded == (data == bench.SEEDED)
    if data == bench.BATCH_FETCH:
        assert isinstance(hand.dataset.dataset, TensorDataset) and hand.batch_size is None
    b = next(iter(hand))
    assert b[0].shape == (4, 64) and b[1].shape == (4,)


def test_ratios_and_table():
    v = bench.all_variants(CPU, "mlp")
    ref, tl = "hand-written, fused, per-sample seeded, checked", "trainlib, per-sample seeded"
    bare = "hand-written, fused, per-sample seeded"
    times = {k: [] for k in v}
    times.update({bench.HAND: [10.0, 12.0, 11.0], ref: [8.0], bare: [7.7], tl: [8.8],
                  "trainlib unfused, per-sample seeded": []})
    rows = {r["variant"]: r for r in bench.summarize(v, times, {k: None for k in v}, gpu=False)}
    assert rows[tl]["ms"] == 8.8
    assert rows[tl]["ratios"]["vs reference"] == pytest.approx(1.1)   # / hand-written fused, seeded, checked
    assert rows[tl]["ratios"]["vs plain loop"] == pytest.approx(0.8)  # / hand-written loop (median 11)
    assert rows[tl]["ratios"]["vs unchecked loop"] == pytest.approx(8.8 / 7.7)
    assert rows[tl]["refs"]["vs reference"] == list(v).index(ref) + 1
    assert rows[bench.HAND]["min"] == 10.0 and rows[bench.HAND]["max"] == 12.0
    lines = bench.format_table(list(rows.values()), gpu=False)
    assert lines[0].split()[:2] == ["#", "variant"] and lines[0].rstrip().endswith("vs unchecked loop")
    assert len({len(line) for line in lines}) == 1  # fixed width: pastes as one aligned block
    row = next(line for line in lines if tl + " " in line).split()
    assert row[-6:] == ["1.100x", f"[{list(v).index(ref) + 1}]", "0.800x", f"[{list(v).index(bench.HAND) + 1}]",
                        "1.143x", f"[{list(v).index(bare) + 1}]"]
    assert "failed" in next(line for line in lines if "trainlib unfused" in line)


def test_failing_variant_is_reported_and_others_go_on():
    calls = {"ok": 0, "boom": 0}
    specs = {n: bench.Spec(n, "hand", True, bench.PER_SAMPLE) for n in ("ok", "boom", "short", "wrong kernel")}

    def runner(s):
        if s.name in calls:
            calls[s.name] += 1
        if s.name == "boom":
            raise ValueError("capture failed\nlong traceback text")
        if s.name == "short":
            return {"stamps": [0.0, 1.0], "fused": True}  # stopped early: its last timestamp means nothing
        return {"stamps": [float(i) for i in range(5)], "fused": s.name != "wrong kernel"}

    run = bench.Run(CPU, batch=2, steps=5, warmup=1, lr=1e-3, precision="32-true")
    out = io.StringIO()
    times, peaks, failed = bench.run_variants(specs, run, repeats=2, runner=runner, out=out)
    lines = out.getvalue().splitlines()
    assert "variant boom failed: ValueError: capture failed" in lines
    assert "variant short failed: RuntimeError: ran 2 of 5 steps" in lines
    assert "variant wrong kernel failed: RuntimeError: ran the unfused kernel, row says fused" in lines
    assert len(lines) == 3  # one line each, not retried in the second round
    assert calls == {"ok": 2, "boom": 1}
    assert times["ok"] == [1000.0, 1000.0] and times["boom"] == [] and set(failed) == {"boom", "short", "wrong kernel"}
    assert peaks["ok"] is None  # no GPU memory on cpu


def test_clock_window_brackets_the_timed_steps():
    events = []
    run = bench.Run(CPU, batch=2, steps=6, warmup=2, lr=1e-3, precision="32-true")
    clock = bench.Clock(run, window=lambda on: events.append((on, len(clock.stamps))))
    for _ in range(run.steps):
        clock.tick()
    # on right after the stamp that starts the timed span, off before the last stamp:
    # the window holds steps - warmup - 1 steps, the ones ms_per_step divides by
    assert events == [(True, 3), (False, 5)]


def test_callgrind_helpers(tmp_path):
    req = bench.client_request()
    if req is not None:  # x86-64: the stub runs natively and answers 0 (not under valgrind)
        assert req(bench._VG_RUNNING_ON_VALGRIND) == 0
        with pytest.raises(RuntimeError, match="not running under valgrind"):
            bench.callgrind_window()
    f = tmp_path / "callgrind.out"
    f.write_text("version: 1\ncreator: callgrind-3.22.0\nevents: Ir\nsummary: 0\n\nfl=x\nfn=y\n1 5\ntotals: 123456\n")
    assert bench.callgrind_total(str(f)) == 123456


def test_tiny_cpu_run_one_process_per_variant(capsys):
    bench.main(["--model", "mlp", "--device", "cpu", "--steps", "6", "--warmup", "2", "--repeats", "1",
                "--variants", "random_fetch,unfused"])
    out = capsys.readouterr().out
    assert "failed" not in out, out  # every child ran the kernel its row names
    header = next(line for line in out.splitlines() if line.startswith("model=mlp"))
    assert "device=cpu" in header and "batch=32" in header and "one process per variant run" in header
    rows = {line.split("  ")[1].strip(): line for line in out.splitlines() if line[:3].strip().isdigit()}
    assert set(rows) == {"hand-written, per-sample", "hand-written, fused, per-sample",
                         "hand-written, fused, per-sample, checked", "hand-written, per-sample seeded",
                         "hand-written, per-sample seeded, checked", "trainlib, per-sample (random_fetch=False)",
                         "trainlib unfused, per-sample seeded"}
    assert "x [" in rows["trainlib unfused, per-sample seeded"]


def test_tiny_ddp_run_prints_one_table():
    r = torchrun(2, ["-m", "launch.bench", "--model", "mlp", "--device", "cpu", "--steps", "6", "--warmup", "2",
                     "--repeats", "1", "--variants", "random_fetch", "--batch", "8"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("mode: DDP x2 (gloo)") == 1  # rank 0 prints
    assert "failed" not in r.stdout and "run summary" not in r.stdout, r.stdout
    rows = [line for line in r.stdout.splitlines() if line[:3].strip().isdigit()]
    names = [line.split("  ")[1].strip() for line in rows]
    assert names == ["hand-written DDP, per-sample", "hand-written DDP, fused, per-sample, exact norm, checked",
                     "hand-written DDP, fused, per-sample", "trainlib DDP, per-sample (random_fetch=False)"]
    assert rows[-1].rstrip().endswith("x [3]") and "x [2]" in rows[-1]  # vs exact-norm ref and vs mean-norm


@pytest.mark.gpu
def test_gpu_hand_written_graph_variants_run(capsys):
    bench.main(["--model", "mlp", "--device", "cuda", "--steps", "12", "--warmup", "4", "--repeats", "1",
                "--variants", "graphs"])
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert "hand-written compile+graph" in out and "vs hand graph" in out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cause", ["loss", "grad"])
def test_the_checked_hand_loop_never_applies_a_nonfinite_step(fused, cause):
    """The like-for-like reference keeps trainlib's promise: a step whose loss (finite gradients) or
    gradient (finite loss) is NaN/inf leaves the weights as they were; the unchecked loop does not."""
    def run(checked):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 10)

        def loss(out, b):
            ce = torch.nn.functional.cross_entropy(out, b[1])
            return ce + float("nan") if cause == "loss" else ce + torch.sqrt(0 * model.weight.sum())

        w = bench.Workload(lambda: model, bench.mlp_workload(4, 3).dataset, loss, lambda m, b: m(b[0]))
        before = {k: t.clone() for k, t in model.state_dict().items()}
        bench.hand_written(w, bench.Run(CPU, 4, 3, 1, 1e-2, "32-true"), fused=fused, data=bench.SEEDED,
                           checked=checked)
        return before, model.state_dict()

    before, after = run(checked=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = run(checked=False)
    assert not all(torch.equal(before[k], after[k]) for k in before)
