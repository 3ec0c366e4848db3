"""launch/bench.py: argument checks, variant selection, failure isolation, the table's ratio maths,
and a tiny CPU run end to end. No timing assertions."""
import io

import pytest
import torch

from launch import bench


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
    assert (a.batch, a.precision) == (8, "32-true")
    a = bench.parse_args(["--model", "mlp", "--device", "cpu", "--precision", "bf16-mixed"])
    assert (a.batch, a.precision) == (32, "bf16-mixed")


def test_variant_filter():
    cpu = bench.all_variants(torch.device("cpu"))
    assert not any("graph" in k or "compile" in k for k in cpu)  # GPU-only variants stay off the CPU table
    assert list(bench.select(cpu, "hand")) == ["hand-written loop", "hand-written fused"]
    assert list(bench.select(cpu, " TRAINLIB , fused")) == ["hand-written fused", "trainlib eager",
                                                           "trainlib, per-sample data"]
    assert bench.select(cpu, "") == cpu


def test_no_matching_variant_exits(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--variants", "nothing-like-this"])
    assert "matches none of" in capsys.readouterr().err


def test_ratios_and_table():
    times = {bench.HAND: [10.0, 12.0, 11.0], bench.HAND_GRAPH: [2.0], "trainlib compile+graphs": [2.2],
             bench.LIGHTNING: [22.0], "trainlib graphs": []}
    peaks = {bench.HAND: 1.25, bench.HAND_GRAPH: 2.0, "trainlib compile+graphs": 2.5, bench.LIGHTNING: 1.0,
             "trainlib graphs": None}
    rows = {r["variant"]: r for r in bench.summarize(times, peaks, gpu=True)}
    best = rows["trainlib compile+graphs"]
    assert best["ms"] == 2.2
    assert best["vs_hand"] == pytest.approx(0.2)           # time / hand-written eager loop (median 11)
    assert best["lightning_over"] == pytest.approx(10.0)   # Lightning time / this time
    assert best["vs_hand_graph"] == pytest.approx(1.1)     # time / hand-written compile+graph
    assert rows[bench.HAND]["min"] == 10.0 and rows[bench.HAND]["max"] == 12.0
    assert rows["trainlib graphs"]["ms"] is None

    lines = bench.format_table(list(rows.values()), gpu=True)
    assert lines[0].split()[0] == "variant" and lines[0].rstrip().endswith("vs hand graph")
    assert len({len(line) for line in lines}) == 1  # fixed width: pastes as one aligned block
    by_name = {line.split("  ")[0].strip(): line.split() for line in lines[1:]}
    assert by_name["trainlib compile+graphs"][-4:] == ["2.50", "0.200x", "10.00x", "1.10x"]
    assert "failed" in by_name["trainlib graphs"]
    cpu_lines = bench.format_table(bench.summarize(times, peaks, gpu=False), gpu=False)
    assert "vs hand graph" not in cpu_lines[0]


def test_failing_variant_is_reported_and_others_go_on():
    calls = {"ok": 0, "boom": 0}

    def ok(w, run):
        calls["ok"] += 1
        return [float(i) for i in range(run.steps)]  # 1 s per step

    def boom(w, run):
        calls["boom"] += 1
        raise ValueError("capture failed\nlong traceback text")

    def short(w, run):
        return [0.0, 1.0]  # stopped early: its last timestamp means nothing

    run = bench.Run(torch.device("cpu"), batch=2, steps=5, warmup=1, lr=1e-3, precision="32-true")
    out = io.StringIO()
    times, peaks, failed = bench.run_variants({"ok": ok, "boom": boom, "short": short}, None, run, repeats=2, out=out)
    lines = out.getvalue().splitlines()
    assert "variant boom failed: ValueError: capture failed" in lines
    assert "variant short failed: RuntimeError: ran 2 of 5 steps" in lines
    assert len(lines) == 2  # one line each, not retried in the second round
    assert calls == {"ok": 2, "boom": 1}
    assert times["ok"] == [1000.0, 1000.0] and times["boom"] == [] and set(failed) == {"boom", "short"}
    assert peaks["ok"] is None  # no GPU memory on cpu


def test_tiny_cpu_run_prints_one_table(capsys):
    bench.main(["--model", "mlp", "--device", "cpu", "--steps", "6", "--warmup", "2", "--repeats", "1",
                "--variants", "hand-written loop,trainlib"])
    out = capsys.readouterr().out
    assert "failed" not in out
    header = next(line for line in out.splitlines() if line.startswith("model=mlp"))
    assert "device=cpu" in header and "batch=32" in header and "precision=32-true" in header
    rows = [line for line in out.splitlines() if line.startswith(("hand-written loop", "trainlib eager"))]
    assert len(rows) == 2 and rows[0].split()[-2] == "1.000x"


@pytest.mark.gpu
def test_gpu_hand_written_graph_variants_run(capsys):
    bench.main(["--model", "mlp", "--device", "cuda", "--steps", "12", "--warmup", "4", "--repeats", "1",
                "--variants", "hand-written"])
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert "hand-written compile+graph" in out and "vs hand graph" in out
