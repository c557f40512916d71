"""The console line's progress: tokens seen, the ETA to train_iters and the time to the
next checkpoint, at the speed since the previous line (a fake loop and a fake clock)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from megatron_forge.training.callback import Callback
from megatron_forge.training.checkpoint_saver import CheckpointSaver
from megatron_forge.training.metrics_logger import MetricsLogger, _duration
from tests.training.fakes import FakeCheckpointer, fake_trainer


class Clock(Callback):
    """A clock that moves 2 s per step (before the logger reads it)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.now += 2.0


def _run(tmp_path: Path, *overrides: str, last_save: float = 100.0) -> tuple[list[str], list]:
    clock = Clock()
    checkpointer = FakeCheckpointer()
    checkpointer.last_save_time = last_save
    logger = MetricsLogger(tmp_path, log_interval=2)
    logger.clock = clock
    saver = CheckpointSaver(checkpointer)
    trainer = fake_trainer([clock, saver, logger], train_iters=10, overrides=overrides)
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], records


def test_line_shows_tokens_eta_and_next_checkpoint(tmp_path: Path, capsys) -> None:
    records, _ = _run(tmp_path, "checkpoint.save_interval=5")
    lines = [x for x in capsys.readouterr().out.splitlines() if "iteration" in x]
    # 16 samples of 128 tokens a step, 2 s a step; checkpoints at 5 and 10
    assert "| consumed samples:         32 | tokens seen: 4.10K |" in lines[0]
    assert lines[0].endswith("| ETA: 0:00:16 | next checkpoint in: 0:00:06")
    assert lines[2].endswith("| ETA: 0:00:08 | next checkpoint in: 0:00:08")  # step 6
    assert lines[-1].endswith("| ETA: 0:00:00 | next checkpoint in: 0:00:00")
    assert [r["eta_s"] for r in records] == pytest.approx([16, 12, 8, 4, 0])
    assert [r["next_checkpoint_s"] for r in records] == pytest.approx([6, 2, 8, 4, 0])
    assert [r["tokens_seen"] for r in records] == [32 * 128 * k for k in range(1, 6)]


def test_next_checkpoint_by_minutes_when_sooner(tmp_path: Path, capsys) -> None:
    # the last save at t=100, every 0.1 min = 6 s: due at 106, sooner than step 5 (t=110)
    records, _ = _run(
        tmp_path, "checkpoint.save_interval=5", "checkpoint.save_interval_minutes=0.1"
    )
    assert records[0]["next_checkpoint_s"] == pytest.approx(2.0)
    assert "next checkpoint in: 0:00:02" in capsys.readouterr().out


def test_no_checkpoint_interval_shows_eta_only(tmp_path: Path, capsys) -> None:
    records, _ = _run(tmp_path, "checkpoint.save_interval=0")
    assert "next_checkpoint_s" not in records[0] and records[0]["eta_s"] == pytest.approx(16)
    assert "next checkpoint" not in capsys.readouterr().out


def test_durations() -> None:
    assert _duration(5) == "0:00:05"
    assert _duration(3725.4) == "1:02:05"
    assert _duration(2 * 86400 + 3 * 3600) == "2d 03:00:00"
