#!/usr/bin/env python
"""Training curves from metrics.jsonl, for runs you cannot (or do not want to) see in W&B.

    python tools/plot_run.py runs/tiny [runs/other ...] -o curves.png [--labels a b]
    python tools/plot_run.py --schedules CONFIG[:key=value,...] [...] -o lr.png

Four panels, the runs overlaid: loss (train as lines, validation as dashed markers),
learning rate, throughput (tokens/s per GPU) and MFU in % (TFLOP/s per GPU when a run has
no MFU, e.g. on CPU or an unknown GPU). Headless: renders with matplotlib's Agg canvas,
no display or pyplot needed.

``--schedules`` plots the learning rate of each step of configs, without training: each
argument is a config file and, after a colon, comma-separated overrides, e.g.
``configs/tiny.yaml:train.decay_style=wsd,train.wsd_decay_iters=12``. The curves come from
the scheduler a run builds (megatron-core's OptimizerParamScheduler, stepped in samples);
with a batch-size ramp-up a second panel shows the global batch of each step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from matplotlib.figure import Figure


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (or of a metrics.jsonl path). A line cut
    short by a run still writing is skipped."""
    path = Path(run_dir)
    path = path if path.is_file() else path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory (logging.dir)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(
    records: list[dict[str, Any]], key: str, scale: float = 1.0
) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step. Where a resumed run logged a step
    again (steps after the last checkpoint of a preempted job), the later record wins."""
    by_step = {r["step"]: r[key] * scale for r in records if r.get(key) is not None}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, or the last two path components where names repeat."""
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in run_dirs]


def plot_runs(run_dirs: list[str | Path], labels: Optional[list[str]] = None) -> Figure:
    """A 2 x 2 figure (loss, learning rate, throughput, MFU or TFLOP/s) of the runs."""
    paths = [Path(d) for d in run_dirs]
    labels = labels or run_labels(paths)
    runs = [read_records(p) for p in paths]
    with_mfu = all(any("mfu" in r for r in records) for records in runs)
    fig = Figure(figsize=(13, 8), layout="constrained")
    ax_loss, ax_lr, ax_tput, ax_eff = fig.subplots(2, 2).flat
    for label, records in zip(labels, runs):
        (line,) = ax_loss.plot(*series(records, "loss"), label=f"{label} train")
        steps, values = series(records, "val_loss")
        if steps:
            ax_loss.plot(steps, values, "o--", color=line.get_color(), label=f"{label} val")
        ax_lr.plot(*series(records, "lr"), color=line.get_color(), label=label)
        ax_tput.plot(*series(records, "tokens_per_s_per_gpu"), color=line.get_color(), label=label)
        key, scale = ("mfu", 100.0) if with_mfu else ("tflops_per_gpu", 1.0)
        ax_eff.plot(*series(records, key, scale), color=line.get_color(), label=label)
    titles = [
        (ax_loss, "loss", "lm loss"),
        (ax_lr, "learning rate", "lr"),
        (ax_tput, "throughput", "tokens/s per GPU"),
        (
            ax_eff,
            "MFU" if with_mfu else "model TFLOP/s per GPU (no MFU: peak unknown)",
            "MFU (%)" if with_mfu else "TFLOP/s per GPU",
        ),
    ]
    for ax, title, ylabel in titles:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def parse_schedule(spec: str) -> tuple[str, list[str]]:
    """``CONFIG[:key=value,...]`` -> (config path, overrides); commas inside [...] belong
    to a list value (``train.rampup_batch_size=[4,4,64]``)."""
    path, _, rest = spec.partition(":")
    overrides = [x for x in re.split(r",(?![^\[]*\])", rest) if x] if rest else []
    return path, overrides


def schedule_curve(spec: str) -> tuple[list[int], list[float], list[int]]:
    """(steps, lr of each step, global batch of each step) of the run a spec describes."""
    from megatron_forge.config import load_config
    from megatron_forge.data.datasets import BatchSizes
    from megatron_forge.training.optim import lr_curve

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex")  # CPU notes
    path, overrides = parse_schedule(spec)
    cfg = load_config(path, overrides)
    sizes = BatchSizes(cfg.train)
    steps = list(range(1, cfg.train.train_iters + 1))
    batches = [sizes.at(sizes.samples_at_step(step - 1)) for step in steps]
    return steps, lr_curve(cfg), batches


def plot_schedules(specs: list[str], labels: Optional[list[str]] = None) -> Figure:
    """The learning rate (and, with a ramp-up, the global batch) of each step of the runs
    the specs describe."""
    curves = [schedule_curve(spec) for spec in specs]
    labels = labels or [",".join(parse_schedule(s)[1]) or s for s in specs]
    ramped = any(len(set(batches)) > 1 for _, _, batches in curves)
    fig = Figure(figsize=(13, 8 if ramped else 5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True) if ramped else [fig.subplots()]
    for label, (steps, lrs, batches) in zip(labels, curves):
        (line,) = axes[0].plot(steps, lrs, label=label)
        if ramped:
            axes[1].plot(steps, batches, color=line.get_color(), label=label)
    axes[0].set_title("learning rate schedule")
    axes[0].set_ylabel("lr")
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if ramped:
        axes[1].set_title("global batch size (ramp-up)")
        axes[1].set_ylabel("samples")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="*", type=Path, help="run directories (logging.dir)")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"))
    parser.add_argument("--labels", nargs="+", help="legend labels, one per run or schedule")
    parser.add_argument(
        "--schedules",
        nargs="+",
        metavar="CONFIG[:OVERRIDES]",
        help="plot the lr schedules of configs, without training (see above)",
    )
    args = parser.parse_args(argv)
    curves = args.schedules or args.run_dirs
    if bool(args.schedules) == bool(args.run_dirs):
        parser.error("give run directories or --schedules, not both (nor neither)")
    if args.labels and len(args.labels) != len(curves):
        what = "schedules" if args.schedules else "runs"
        parser.error(f"--labels has {len(args.labels)} names for {len(curves)} {what}")
    from megatron_forge.errors import ForgeError

    try:
        if args.schedules:
            fig = plot_schedules(args.schedules, args.labels)
        else:
            fig = plot_runs(args.run_dirs, args.labels)
    except (FileNotFoundError, ForgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
