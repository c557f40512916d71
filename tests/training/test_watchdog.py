"""The hang watchdog counts any sign of life (a step, a microbatch, a checkpoint save
starting or ending), so a long healthy evaluation is never taken for a hang, while silence
past train.hang_timeout_s still ends the process with status 4, naming the last step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_forge.config import ConfigError, load_config
from megatron_forge.training.exit_status import EXIT_HUNG, read_exit_status
from megatron_forge.training.watchdog import HangWatchdog, describe_stalled
from tests.conftest import run_worker


@pytest.mark.parametrize("value", ["0", "-5", "inf"])
def test_hang_timeout_must_be_positive(value: str) -> None:
    with pytest.raises(ConfigError, match=r"set it to null to disable the hang watchdog"):
        load_config(None, [f"train.hang_timeout_s={value}"])
    assert load_config(None, ["train.hang_timeout_s=null"]).train.hang_timeout_s is None


def _watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[HangWatchdog, list]:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # never requeue a real job
    fired: list[int] = []
    watchdog = HangWatchdog(tmp_path, timeout_s=0.6, max_requeues=0)
    watchdog.exit_process = fired.append  # record instead of ending the test process
    return watchdog, fired


def test_progress_keeps_a_long_evaluation_alive(tmp_path, monkeypatch, capsys) -> None:
    watchdog, fired = _watchdog(tmp_path, monkeypatch)
    trainer = SimpleNamespace(step=7)
    watchdog.on_train_start(trainer)
    try:
        watchdog.on_step_end(trainer, {})
        deadline = time.monotonic() + 2.0  # over three timeouts of evaluation batches
        while time.monotonic() < deadline:
            watchdog.on_progress(trainer, "evaluation batch")
            time.sleep(0.1)
        assert fired == []
        deadline = time.monotonic() + 5.0  # then silence: an evaluation batch that hangs
        while not fired and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watchdog.close(trainer)
    assert fired and fired[0] == EXIT_HUNG
    err = capsys.readouterr().err
    assert f"watchdog: rank 0 on host {os.uname().nodename} made no progress for" in err
    assert "(train.hang_timeout_s=0.6; last step 7, then: evaluation batch)" in err
    assert "Not requeued: not running under Slurm (no SLURM_JOB_ID). Exiting with status 4" in err
    status = read_exit_status(tmp_path)
    assert status["status"] == EXIT_HUNG and status["reason"] == "hung" and status["step"] == 7


def test_the_first_step_may_take_long(tmp_path, monkeypatch) -> None:
    watchdog, fired = _watchdog(tmp_path, monkeypatch)
    trainer = SimpleNamespace(step=0)
    watchdog.on_train_start(trainer)
    try:
        time.sleep(1.5)  # over twice the timeout, still in the first step
        assert fired == []
        watchdog.on_step_end(trainer, {})
        deadline = time.monotonic() + 5.0
        while not fired and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watchdog.close(trainer)
    assert fired and fired[0] == EXIT_HUNG


def test_heartbeat_shows_the_real_last_step(tmp_path, monkeypatch) -> None:
    """Written at every step end, not only every few seconds: a rank frozen right after
    a step shows that step."""
    watchdog, _ = _watchdog(tmp_path, monkeypatch)
    watchdog.timeout_s, watchdog.interval_s = 600, 60  # the thread never beats in time
    trainer = SimpleNamespace(step=3)
    watchdog.on_train_start(trainer)
    try:
        for step in (4, 5, 6):
            trainer.step = step
            watchdog.on_step_end(trainer, {})
        beat = json.loads((tmp_path / "heartbeat" / "rank0.json").read_text())
    finally:
        watchdog._stop.set()
    assert beat["step"] == 6 and beat["activity"] == "step end" and beat["pid"] == os.getpid()


def test_describe_stalled_says_what_the_rank_did_last() -> None:
    beats = {
        0: {"step": 9, "time": 100.0, "host": "a", "pid": 1, "activity": "step end"},
        1: {"step": 9, "time": 60.0, "host": "b", "pid": 2, "activity": "evaluation batch"},
    }
    text = describe_stalled(beats, now=101.0, stale_s=15)
    assert text == (
        "  rank 1 on host b (pid 2): no heartbeat for 41 s, last at step 9 "
        "(evaluation batch) (frozen or dead)"
    )


@pytest.mark.slow
def test_slow_evaluation_is_not_a_hang(tmp_path: Path) -> None:
    """The real Trainer: hang_timeout_s=3 and an evaluation of 8 batches of 0.8 s."""
    run_worker("tests.training.fault_worker", str(tmp_path), "slow_eval")
    r = json.loads((tmp_path / "slow_eval.json").read_text())
    assert r["raised"] == "finished" and r["fired"] == []
    assert r["eval_s"] > 2 * 3  # the evaluation outlasted the timeout twice over
