"""How a run ends, as its exit status and as <logging.dir>/exit_status.json, including
under torchrun, which turns every failed worker's status into its own 1."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from megatron_forge.checkpointing import latest_iteration
from megatron_forge.training.callback import Callback
from megatron_forge.training.exit_status import (
    EXIT_PREEMPTED,
    clear_exit_status,
    read_exit_status,
    write_exit_status,
)
from megatron_forge.training.preemption import Preempted
from tests.conftest import MOCK_TINY, REPO, read_metrics, training_command
from tests.training.fakes import fake_trainer


class Raise(Callback):
    def __init__(self, error: BaseException, at: int = 2) -> None:
        self.error, self.at = error, at

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.at:
            raise self.error


def test_write_read_clear(tmp_path: Path) -> None:
    write_exit_status(tmp_path, 3, "preempted", 12, "SIGTERM at step 12", checkpoint="c")
    record = read_exit_status(tmp_path)
    assert {k: record[k] for k in ("status", "reason", "step", "message", "checkpoint")} == {
        "status": 3,
        "reason": "preempted",
        "step": 12,
        "message": "SIGTERM at step 12",
        "checkpoint": "c",
    }
    write_exit_status(tmp_path, 1, "error", 12, only_if_absent=True)
    assert read_exit_status(tmp_path)["status"] == 3  # the first outcome stands
    clear_exit_status(tmp_path)
    assert read_exit_status(tmp_path) is None


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (None, 0, "finished"),
        (Preempted(signal.SIGTERM, {"checkpoint": None}), 3, "preempted"),
        (RuntimeError("boom"), 1, "error"),
    ],
)
def test_the_loop_records_its_outcome(tmp_path: Path, error, status, reason) -> None:
    callbacks = [Raise(error)] if error is not None else []
    trainer = fake_trainer(callbacks, train_iters=3, status_dir=tmp_path)
    if error is None:
        trainer.train()
    else:
        with pytest.raises(type(error)):
            trainer.train()
    record = read_exit_status(tmp_path)
    assert (record["status"], record["reason"]) == (status, reason)
    assert record["step"] == (3 if error is None else 2)
    if isinstance(error, RuntimeError):
        assert record["message"] == "RuntimeError: boom"
    if isinstance(error, Preempted):
        assert record["signal"] == "SIGTERM"


def _torchrun(run: Path, ckpt: Path) -> subprocess.Popen:
    overrides = [
        *MOCK_TINY,
        "train.eval_interval=0",
        "train.train_iters=100000",
        f"checkpoint.save={ckpt}",
        f"checkpoint.load={ckpt}",
        "checkpoint.save_interval=100000",
        "logging.log_interval=1",
    ]
    cmd, env = training_command(2, "configs/tiny.yaml", overrides, run)
    env.pop("SLURM_JOB_ID", None)  # never requeue a real job from a test
    log = open(run.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.mark.slow
def test_preempted_under_torchrun(tmp_path: Path) -> None:
    """SIGTERM to torchrun (as `kill` or Slurm sends it): torchrun forwards it to the
    workers, they save and exit 3, and torchrun itself exits 1. The checkpoint and
    exit_status.json tell what happened."""
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    proc = _torchrun(run, ckpt)
    try:
        deadline = time.time() + 300
        while len(read_metrics(run)) < 3:
            assert proc.poll() is None, run.with_suffix(".log").read_text()[-3000:]
            assert time.time() < deadline, "no training steps"
            time.sleep(0.5)
        workers = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = run.with_suffix(".log").read_text()
    assert status == 1, log[-3000:]
    assert "SignalException: Process" in log and "got signal: 15" in log
    record = read_exit_status(run)
    assert record is not None, log[-3000:]
    assert (record["status"], record["reason"], record["signal"]) == (
        EXIT_PREEMPTED,
        "preempted",
        "SIGTERM",
    )
    step = record["step"]
    assert latest_iteration(ckpt) == step
    assert record["checkpoint"] == str(ckpt / f"iter_{step:07d}")
    assert (
        f"SIGTERM at step {step}: saved checkpoint to {ckpt} (iter_{step:07d}); not "
        "requeued: not running under Slurm (no SLURM_JOB_ID). Exiting with status 3 "
        f"(preempted), recorded in {run / 'exit_status.json'}"
    ) in log
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
