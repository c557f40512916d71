"""How a run ends: on success, on a failure and on preemption every callback's ``close``
runs (one failing close does not skip the others), ``on_error`` sees failures only, and
a failed run drops its in-flight checkpoint write without a collective.

The loop tests drive :meth:`Trainer.train` with a stand-in ``train_step`` (no model, no
process group). The worker tests run the real Trainer in one process of its own (see
tests/training/worker.py): async checkpoint writers, the data-wait timer after an
evaluation, and the W&B run id through a checkpoint.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, Optional

import pytest

from megatron_forge.checkpointing.state import callback_states
from megatron_forge.training.callback import Callback
from megatron_forge.training.checkpoint_saver import CheckpointSaver
from megatron_forge.training.preemption import EXIT_PREEMPTED, Preempted, PreemptionHandler
from megatron_forge.training.watchdog import HangWatchdog
from tests.conftest import run_worker
from tests.training.fakes import FakeCheckpointer, fake_trainer


class Recorder(Callback):
    """Appends (name, hook) to a shared log; fails where told to."""

    def __init__(
        self,
        log: list[tuple[str, str]],
        name: str,
        fail_at_step: Optional[int] = None,
        fail_with: type[BaseException] = RuntimeError,
        fail_on_error: bool = False,
        fail_close: bool = False,
    ) -> None:
        self.log, self.name = log, name
        self.fail_at_step, self.fail_with = fail_at_step, fail_with
        self.fail_on_error, self.fail_close = fail_on_error, fail_close
        self.errors: list[BaseException] = []

    def on_train_start(self, trainer: Any) -> None:
        self.log.append((self.name, "on_train_start"))

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.log.append((self.name, f"on_step_end {trainer.step}"))
        if trainer.step == self.fail_at_step:
            if self.fail_with is Preempted:
                raise Preempted(signal.SIGTERM)
            raise self.fail_with(f"boom at step {trainer.step}")

    def on_train_end(self, trainer: Any) -> None:
        self.log.append((self.name, "on_train_end"))

    def on_error(self, trainer: Any, error: BaseException) -> None:
        self.log.append((self.name, "on_error"))
        self.errors.append(error)
        if self.fail_on_error:
            raise ValueError("on_error failed")

    def close(self, trainer: Any) -> None:
        self.log.append((self.name, "close"))
        if self.fail_close:
            raise OSError(f"{self.name} could not close")


def _hooks(log: list[tuple[str, str]], name: str) -> list[str]:
    return [hook for who, hook in log if who == name]


def test_error_reaches_on_error_and_every_close(tmp_path: Path, capsys) -> None:
    log: list[tuple[str, str]] = []
    first = Recorder(log, "first", fail_close=True)
    failing = Recorder(log, "failing", fail_at_step=2, fail_on_error=True)
    last = Recorder(log, "last")
    checkpointer = FakeCheckpointer()
    watchdog = HangWatchdog(tmp_path, timeout_s=60, max_requeues=0)
    sigterm = signal.getsignal(signal.SIGTERM)
    callbacks = [
        watchdog,
        CheckpointSaver(checkpointer),
        first,
        failing,
        last,
        PreemptionHandler(None, max_requeues=0),
    ]
    with pytest.raises(RuntimeError, match="boom at step 2"):
        fake_trainer(callbacks).train()
    for name in ("first", "failing", "last"):
        assert _hooks(log, name)[-2:] == ["on_error", "close"], (name, log)
        assert "on_train_end" not in _hooks(log, name)
    assert [str(e) for e in last.errors] == ["boom at step 2"]  # after failing's on_error
    assert checkpointer.closed == [True]  # the write in flight is aborted, no collective
    assert checkpointer.saved == []
    assert watchdog._thread is None  # stopped and joined
    assert signal.getsignal(signal.SIGTERM) is sigterm  # the handler is restored
    err = capsys.readouterr().err
    assert "WARNING: Recorder.on_error failed" in err
    assert "WARNING: Recorder.close failed" in err and "first could not close" in err


def test_preemption_is_a_clean_stop_that_closes(tmp_path: Path) -> None:
    log: list[tuple[str, str]] = []
    checkpointer = FakeCheckpointer()
    callbacks = [
        CheckpointSaver(checkpointer),
        Recorder(log, "a"),
        Recorder(log, "preempting", fail_at_step=2, fail_with=Preempted),
        Recorder(log, "b"),
    ]
    with pytest.raises(SystemExit) as stopped:
        fake_trainer(callbacks).train()
    assert stopped.value.code == EXIT_PREEMPTED
    for name in ("a", "preempting", "b"):
        hooks = _hooks(log, name)
        assert hooks[-1] == "close" and "on_error" not in hooks, (name, log)
    assert checkpointer.closed == [False]  # a clean stop finishes the save queue


def test_failing_close_after_success_fails_the_run_after_all_closes() -> None:
    log: list[tuple[str, str]] = []
    checkpointer = FakeCheckpointer()
    callbacks = [
        Recorder(log, "a", fail_close=True),
        CheckpointSaver(checkpointer),
        Recorder(log, "b"),
    ]
    with pytest.raises(OSError, match="a could not close"):
        fake_trainer(callbacks).train()
    assert _hooks(log, "a") == _hooks(log, "b")
    assert _hooks(log, "b")[-2:] == ["on_train_end", "close"]
    assert checkpointer.saved == [3] and checkpointer.closed == [False]


class Stateful(Callback):
    state_key = "counter"

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value} if self.value else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def test_train_state_carries_callback_states() -> None:
    trainer = fake_trainer([Stateful(7), Recorder([], "stateless")])
    trainer._callback_states = {"wandb": {"run_id": "kept"}, "counter": {"value": 1}}
    trainer.step, trainer.consumed_samples = 5, 80
    state = trainer.train_state()
    assert (state.step, state.consumed_samples) == (5, 80)
    # the live callback wins; a state no callback of this run takes is carried along
    assert state.callbacks == {"wandb": {"run_id": "kept"}, "counter": {"value": 7}}


def test_old_checkpoints_keep_their_wandb_run_id() -> None:
    assert callback_states({"extra_state": {"wandb_run_id": "old1"}}) == {
        "wandb": {"run_id": "old1"}
    }
    assert callback_states({"callback_states": {"wandb": {"run_id": "new"}}}) == {
        "wandb": {"run_id": "new"}
    }
    assert callback_states({}) == {}


# ---------------------------------------------------------------------------------------
# The real Trainer, in a process of its own


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lifecycle")
    run_worker("tests.training.worker", str(out))
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_data_wait_is_measured_after_evaluations(worker_results) -> None:
    waits = worker_results["data_wait"]
    assert sorted(waits, key=int) == ["1", "2", "3", "4"]  # eval after steps 2 and 4
    assert all(wait > 0 for wait in waits.values()), waits


@pytest.mark.slow
def test_wandb_run_id_round_trips_through_a_checkpoint(worker_results) -> None:
    r = worker_results["wandb_state"]
    assert r["stored"] == {"wandb": {"run_id": "run-42"}}
    assert r["restored"] == {"run_id": "run-42"}
    assert r["carried"] == {"wandb": {"run_id": "run-42"}}  # a run without W&B keeps it


@pytest.mark.slow
def test_failed_run_drops_the_write_in_flight(worker_results) -> None:
    r = worker_results["error"]
    assert r["raised"] == "RuntimeError: boom at step 2"
    assert r["tracker"] == 1  # step 2 was being written: never finalized
    assert r["queued"] == 0 and r["writers"] == []
    assert r["closed"] is True


@pytest.mark.slow
def test_preempted_run_saves_then_closes(worker_results) -> None:
    r = worker_results["preempt"]
    assert r["raised"] == f"Preempted: {EXIT_PREEMPTED}"
    assert r["tracker"] == 3  # saved (blocking) at the step the signal arrived
    assert r["queued"] == 0 and r["writers"] == []
    assert r["on_error"] is False and r["closed"] is True
