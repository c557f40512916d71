"""tools/plot_run.py on synthetic metrics.jsonl files: runs overlaid, MFU in percent,
resumed steps de-duplicated, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest


def _write_run(run_dir: Path, steps: list[int], mfu: float, loss0: float) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for step in steps:
        lines.append(
            {
                "step": step,
                "loss": loss0 / step,
                "lr": 1e-4 * step,
                "tokens_per_s_per_gpu": 1000.0 * step,
                "tflops_per_gpu": 400.0,
                "mfu": mfu,
            }
        )
        if step % 20 == 0:
            lines.append({"step": step, "val_loss": loss0 / step + 0.1, "val_ppl": 1.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_runs_are_overlaid_with_mfu_in_percent(plot_run, tmp_path: Path) -> None:
    _write_run(tmp_path / "a" / "llama", [10, 20, 30, 40], mfu=0.41, loss0=100.0)
    _write_run(tmp_path / "b" / "llama", [10, 20], mfu=0.38, loss0=80.0)
    # a resumed run logs steps after its last checkpoint again: the later record wins
    with (tmp_path / "a" / "llama" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 40, "loss": 2.0, "lr": 4e-3, "mfu": 0.42}) + "\n")
        f.write('{"step": 50, "loss": 1.')  # a line cut short by a run still writing
    fig = plot_run.plot_runs([tmp_path / "a" / "llama", tmp_path / "b" / "llama"])
    loss, lr, tput, eff = fig.axes
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "a/llama train",
        "a/llama val",
        "b/llama train",
        "b/llama val",
    ]
    a_train, a_val, b_train, b_val = loss.get_lines()
    assert list(a_train.get_xdata()) == [10, 20, 30, 40]
    assert list(a_train.get_ydata()) == [10.0, 5.0, 100 / 30, 2.0]
    assert list(a_val.get_xdata()) == [20, 40] and list(b_val.get_xdata()) == [20]
    assert a_val.get_color() == a_train.get_color() != b_train.get_color()
    assert eff.get_title() == "MFU" and eff.get_ylabel() == "MFU (%)"
    assert list(eff.get_lines()[0].get_ydata()) == pytest.approx([41, 41, 41, 42])
    assert list(eff.get_lines()[1].get_ydata()) == pytest.approx([38, 38])
    assert list(tput.get_lines()[1].get_ydata()) == [10000.0, 20000.0]
    assert len(lr.get_lines()) == 2


def test_cli_writes_a_png_headless(plot_run, tmp_path: Path) -> None:
    _write_run(tmp_path / "run", [10, 20], mfu=0.5, loss0=10.0)
    out = tmp_path / "plots" / "curves.png"
    assert plot_run.main([str(tmp_path / "run"), "-o", str(out)]) == 0
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (1430, 880)  # 13 x 8 inches at 110 dpi


def test_missing_run_is_a_clear_error(plot_run, tmp_path: Path, capsys) -> None:
    assert plot_run.main([str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 2
    assert f"{tmp_path / 'nope' / 'metrics.jsonl'} does not exist" in capsys.readouterr().err


SCHEDULES = [
    "configs/tiny.yaml:train.decay_style=cosine",
    "configs/tiny.yaml:train.decay_style=linear",
    "configs/tiny.yaml:train.decay_style=wsd,train.wsd_decay_iters=12",
    "configs/tiny.yaml:train.decay_style=inverse-square-root",
]


def test_schedules_are_plotted_without_training(plot_run, tmp_path: Path) -> None:
    from megatron_forge.config import load_config
    from megatron_forge.training.optim import lr_curve

    fig = plot_run.plot_schedules(SCHEDULES)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train.decay_style=cosine",
        "train.decay_style=linear",
        "train.decay_style=wsd,train.wsd_decay_iters=12",
        "train.decay_style=inverse-square-root",
    ]
    for spec, line in zip(SCHEDULES, ax.get_lines()):
        path, overrides = plot_run.parse_schedule(spec)
        assert list(line.get_xdata()) == list(range(1, 61))  # tiny: 60 steps
        assert list(line.get_ydata()) == lr_curve(load_config(path, overrides))
    wsd = list(ax.get_lines()[2].get_ydata())
    assert wsd[5:48] == [3e-3] * 43 and wsd[-1] == pytest.approx(3e-4)  # stable, decayed
    out = tmp_path / "lr.png"
    assert plot_run.main(["--schedules", *SCHEDULES, "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_ramp_up_adds_the_batch_size_panel(plot_run) -> None:
    spec = "configs/tiny.yaml:train.rampup_batch_size=[4,4,64],train.micro_batch_size=4"
    assert plot_run.parse_schedule(spec)[1] == [
        "train.rampup_batch_size=[4,4,64]",
        "train.micro_batch_size=4",
    ]
    lr_ax, batch_ax = plot_run.plot_schedules([spec], ["ramp"]).axes
    # 4 a step until 16 samples are consumed past each of the 3 increments (64 / 3 each)
    assert list(batch_ax.get_lines()[0].get_ydata())[:12] == [4] * 6 + [8] * 3 + [12, 12, 16]


def test_bad_schedule_is_a_clear_error(plot_run, tmp_path: Path, capsys) -> None:
    argv = ["--schedules", "configs/tiny.yaml:train.decay_style=wsd", "-o", str(tmp_path / "x")]
    assert plot_run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "train.decay_style=wsd needs train.wsd_decay_iters >= 1" in err
