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
