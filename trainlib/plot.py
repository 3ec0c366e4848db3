"""PNG plots of runs: `python -m trainlib.plot RUN_DIR [RUN_DIR ...] [--out DIR]` (also
`python -m trainlib plot ...`).

One PNG per quantity against the optimizer step: the training loss (`train_loss.png`), every
validation metric (`val_<name>.png`) and the learning rate (`lr.png`, one line per parameter
group). Several runs are overlaid, one line each, with a legend naming them. The files go to the
first run's `plots/` folder, or to --out; nothing else in a run directory is written.

Read from metrics.jsonl (every logged row); history.json (one row per epoch) fills in a quantity
metrics.jsonl lacks (no training row with a loss, say, when log.every_n_steps exceeds an epoch).
matplotlib is an optional extra (`pip install -e ".[plot]"`), imported only when plotting;
pyplot is not used, so plotting never changes a notebook's backend.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import UserError
from .runs import RunsError, labels, read_json, read_metrics

INSTALL_HINT = 'plotting needs matplotlib: pip install matplotlib (or pip install -e ".[plot]" in a checkout of trainlib)'

Series = dict[str, list[tuple[float, float]]]  # quantity -> [(step, value)], sorted by step


class PlotError(UserError):
    """matplotlib is missing, or a run has nothing to plot."""


@dataclass
class Plot:
    path: Path              # the PNG written
    quantity: str           # train/loss, val/<metric>, lr
    labels: list[str]       # the legend's entries, one per line drawn


def _finite(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)  # NaN/inf are kept: matplotlib leaves a gap, and a diverged run should show one


def _add(series: Series, quantity: str, step: object, value: object) -> None:
    v = _finite(value)
    if isinstance(step, (int, float)) and not isinstance(step, bool) and v is not None:
        series.setdefault(quantity, []).append((float(step), v))


def run_series(run_dir: Path | str) -> Series:
    """Every plotted quantity of one run. PlotError (naming the path) when there is none."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run directory")
    if not metrics.is_file():
        raise PlotError(f"{run_dir} is not a run directory with logged metrics (no metrics.jsonl in it)")
    rows = read_metrics(run_dir)
    if not rows:
        raise PlotError(f"{metrics} has no logged rows yet: nothing to plot")
    series: Series = {}
    for r in rows:
        split, step = r.get("split"), r.get("step")
        if split == "train":
            _add(series, "train/loss", step, r.get("loss"))
            for k, v in r.items():
                if k == "lr" or (k.startswith("lr_") and k[3:].isdigit()):
                    _add(series, k, step, v)
        elif split == "val":
            for k, v in r.items():
                if k not in ("step", "epoch", "split"):
                    _add(series, f"val/{k}", step, v)
    history = read_json(run_dir / "history.json")
    if isinstance(history, list):  # per-epoch values for what the logged rows lack
        missing = {"train/loss", "lr"} - series.keys()
        missing |= {k for r in history if isinstance(r, dict) for k in r if k.startswith("val/")} - series.keys()
        for r in history:
            if isinstance(r, dict):
                for k in missing:
                    _add(series, k, r.get("step"), r.get(k))
    for k, points in series.items():  # one value per step (the last logged), in step order
        series[k] = sorted(dict(points).items())
    if not series:
        raise PlotError(f"{metrics}: no training loss, validation metric or lr in its rows: nothing to plot")
    return series


def _file_name(quantity: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in quantity.replace("/", "_"))
    return f"{safe}.png"


def _order(quantities: set[str]) -> list[str]:
    val = sorted(q for q in quantities if q.startswith("val/"))
    return [q for q in ("train/loss", *val) if q in quantities] + (["lr"] if any(
        q == "lr" or q.startswith("lr_") for q in quantities) else [])


def _figure():
    try:
        import matplotlib  # noqa: F401  (first: a missing package fails here, whatever is cached)
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(INSTALL_HINT) from None
    return Figure


def plot_runs(run_dirs: list[Path | str], out: Path | str | None = None) -> list[Plot]:
    """Write one PNG per quantity into `out` (default: the first run's plots/ folder); runs overlaid.
    -> what was written, with each plot's legend entries. Raises PlotError (one line)."""
    if not run_dirs:
        raise PlotError("no run directory given")
    all_series = [run_series(d) for d in run_dirs]  # every input checked before anything is written
    Figure = _figure()
    names = labels([Path(d) for d in run_dirs])
    out_dir = Path(out) if out is not None else Path(run_dirs[0]) / "plots"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlotError(f"cannot create {out_dir}: {e.strerror or e}") from None
    from .checkpoint import atomic_write_bytes

    several = len(run_dirs) > 1
    written = []
    for quantity in _order(set().union(*all_series)):
        fig = Figure(figsize=(7.5, 4.5), dpi=100, layout="constrained")
        ax = fig.subplots()
        drawn: list[str] = []
        values: list[float] = []
        for name, series in zip(names, all_series):
            keys = [k for k in series if k == quantity] if quantity != "lr" else \
                sorted((k for k in series if k == "lr" or k.startswith("lr_")), key=lambda k: (k != "lr", len(k), k))
            for k in keys:
                xs, ys = zip(*series[k])
                group = f" group {k[3:]}" if k.startswith("lr_") else ""
                label = name + group if several else ("lr" + group if quantity == "lr" else quantity)
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.4)
                drawn.append(label)
                values += [y for y in ys if math.isfinite(y)]
        if values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")  # losses spanning orders of magnitude
        ax.set_xlabel("step")
        ax.set_ylabel(quantity)
        ax.set_title(quantity if several else f"{quantity}: {names[0]}")
        ax.grid(True, alpha=0.3)
        if len(drawn) > 1:
            ax.legend(fontsize="small")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        path = out_dir / _file_name(quantity)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:
            raise PlotError(f"cannot write {path}: {e.strerror or e}") from None
        written.append(Plot(path, quantity, drawn))
    return written


def plot_run(run_dir: Path | str) -> list[Path]:
    """The end-of-run plots: `<run_dir>/plots/*.png` when matplotlib is installed. Never raises:
    without matplotlib it does nothing, on any failure it logs one warning. -> the files written."""
    from .loggers import log

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    try:
        return [p.path for p in plot_runs([run_dir])]
    except Exception as e:  # noqa: BLE001  (plots are a convenience: never fail a finished run)
        log.warning(f"plots not written: {e}")
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainlib.plot",
                                description="PNG plots of training loss, every validation metric and lr against "
                                            "the step; several runs are overlaid. Needs matplotlib "
                                            '(pip install -e ".[plot]").')
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (several: overlaid)")
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: the first run's plots/)")
    args = p.parse_args(argv)
    try:
        plots = plot_runs(args.runs, args.out)
    except (PlotError, RunsError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    folder = plots[0].path.parent if plots else args.out
    print(f"wrote {len(plots)} plot(s) to {folder}: {', '.join(p.path.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
