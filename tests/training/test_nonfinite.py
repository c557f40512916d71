"""Non-finite loss or gradient norm: the step updates nothing, N in a row stop the run
with status 5 or roll it back to the newest checkpoint, and no checkpoint is written from
a non-finite state, so retention never trades good checkpoints for bad ones.

Fast tests drive the loop with a stand-in step (tests/training/fakes.py); the slow ones
run the real Trainer in a process of its own (tests/training/fault_worker.py), with NaN
from a real cause (train.lr=1e10) or from poisoned samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from megatron_forge.config import ConfigError, load_config, validate_for_world
from megatron_forge.training.checkpoint_saver import CheckpointSaver
from megatron_forge.training.exit_status import EXIT_NONFINITE, read_exit_status
from megatron_forge.training.metrics_logger import MetricsLogger
from megatron_forge.training.nonfinite import NonFiniteGuard, NonFiniteStop
from tests.conftest import run_worker
from tests.training.fakes import FakeCheckpointer, fake_trainer

NAN = float("nan")


def _guard(**overrides: Any) -> NonFiniteGuard:
    cfg = load_config(None, [f"train.{k}={v}" for k, v in overrides.items()])
    return NonFiniteGuard(cfg.train)


def test_guard_counts_steps_in_a_row() -> None:
    guard = _guard(max_nonfinite_steps=2)
    guard.record(3, True)
    assert guard.decide() is None
    guard.record(4, False)  # a finite step ends the streak
    guard.record(5, True)
    assert guard.decide() is None
    guard.record(6, True)
    assert guard.decide() == "stop" and guard.steps_text() == "steps 5-6"


def test_guard_rolls_back_a_bounded_number_of_times() -> None:
    guard = _guard(nonfinite_policy="rollback", max_nonfinite_steps=1, max_rollbacks=2)
    for step in (5, 7, 9):
        guard.record(step, True)
        if guard.decide() == "rollback":
            guard.rolled_back()
    assert guard.rollbacks == 2 and guard.decide() == "stop"
    assert guard.state_dict() == {"rollbacks": 2}
    fresh = _guard(nonfinite_policy="rollback")
    fresh.load_state_dict({"rollbacks": 2})
    assert fresh.rollbacks == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps=0 must be >= 1 (default: 3)"),
        ("train.max_rollbacks=-1", "train.max_rollbacks=-1 must be >= 0 (default: 3)"),
        ("train.nonfinite_policy=ignore", "train.nonfinite_policy='ignore' must be one of"),
    ],
)
def test_policy_fields_are_validated(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_rollback_needs_checkpoints() -> None:
    cfg = load_config(None, ["train.nonfinite_policy=rollback", "checkpoint.save=null"])
    with pytest.raises(ConfigError, match="train.nonfinite_policy=rollback reloads the newest"):
        validate_for_world(cfg, 1)


def test_steps_in_a_row_stop_with_status_5(tmp_path: Path, capsys) -> None:
    losses = {2: NAN, 3: math.inf, 5: NAN, 6: NAN, 7: NAN}
    logger = MetricsLogger(tmp_path, log_interval=100)
    trainer = fake_trainer([logger], train_iters=10, losses=losses, status_dir=tmp_path)
    with pytest.raises(NonFiniteStop) as stopped:
        trainer.train()
    assert stopped.value.code == EXIT_NONFINITE == 5
    assert trainer.step == 7  # steps 2-3 were not 3 in a row
    err = capsys.readouterr().err
    assert "WARNING: non-finite step 2: lm loss nan, grad norm nan; the update was skipped" in err
    assert "non-finite step 3: lm loss inf" in err
    expected = (
        "stopping at step 7: loss or grad norm NaN/inf at steps 5-7, 3 in a row "
        "(train.max_nonfinite_steps=3, train.nonfinite_policy=skip); no checkpoint was "
        "written. To recover: lower train.lr or raise train.warmup_iters, then resume, or "
        "set train.nonfinite_policy=rollback to skip the data that caused it. Exit status 5 "
        "(nonfinite)"
    )
    assert expected in err
    status = read_exit_status(tmp_path)
    assert status["status"] == 5 and status["reason"] == "nonfinite" and status["step"] == 7
    assert status["message"] == expected
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["step"]) for r in records if "event" in r]
    assert events == [
        ("nonfinite_step", 2),
        ("nonfinite_step", 3),
        ("nonfinite_step", 5),
        ("nonfinite_step", 6),
        ("nonfinite_step", 7),
        ("nonfinite_stop", 7),
    ]
    # every non-finite step's metrics are logged, whatever logging.log_interval says
    assert [r["step"] for r in records if "loss" in r] == [2, 3, 5, 6, 7]


def test_no_checkpoint_from_a_nonfinite_step(tmp_path: Path, capsys) -> None:
    """A save due at a non-finite step is refused, then made at the next finite step."""
    checkpointer = FakeCheckpointer(tmp_path / "ckpt", save_interval=2)
    saver = CheckpointSaver(checkpointer)
    trainer = fake_trainer([saver], train_iters=6, losses={4: NAN})
    trainer.train()
    assert checkpointer.saved == [2, 5, 6]  # 4 refused, made up at 5; 6 at the end
    err = capsys.readouterr().err
    assert (
        "WARNING: no checkpoint saved at step 4: the loss or grad norm of step 4 was "
        f"NaN/inf; the newest checkpoint under {tmp_path / 'ckpt'} is kept as it is"
    ) in err


def test_stop_finishes_the_save_in_flight(tmp_path: Path) -> None:
    checkpointer = FakeCheckpointer(tmp_path / "ckpt")
    trainer = fake_trainer(
        [CheckpointSaver(checkpointer)],
        train_iters=5,
        losses={2: NAN, 3: NAN},
        overrides=("train.max_nonfinite_steps=2",),
    )
    with pytest.raises(NonFiniteStop):
        trainer.train()
    assert checkpointer.finalized == 1 and checkpointer.saved == []


# ---------------------------------------------------------------------------------------
# The real Trainer


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nonfinite")
    scenarios = ["skip_keeps_params", "nan_stop", "rollback", "rollback_bounded"]
    run_worker("tests.training.fault_worker", str(out), *scenarios, timeout=900)
    return out


def _result(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_skipped_step_leaves_parameters_bit_identical(faults: Path) -> None:
    r = _result(faults, "skip_keeps_params")
    assert r["differ"] == [] and r["compared"] > 20  # params, main params, Adam state
    m = r["metrics"]
    assert m["3"]["skipped"] and m["3"]["nonfinite"] and math.isnan(m["3"]["loss"])
    assert m["3"]["lr"] == m["2"]["lr"]  # the lr schedule waits too
    assert math.isfinite(m["4"]["loss"]) and not m["4"]["skipped"]
    assert (m["5"]["skipped_steps"], m["5"]["nan_steps"]) == (1, 1)
    assert r["raised"] == "finished" and r["status"]["status"] == 0


@pytest.mark.slow
def test_nan_run_stops_with_its_finite_checkpoints_kept(faults: Path) -> None:
    """train.lr=1e10: NaN from step 3; with keep_last=2 and a save every step, the two
    checkpoints before the NaN are the ones kept, and both load with finite weights."""
    r = _result(faults, "nan_stop")
    assert r["raised"] == f"NonFiniteStop: {EXIT_NONFINITE}"
    assert r["steps"] == [1, 2, 3, 4, 5]
    assert all(math.isnan(r["losses"][s]) for s in ("3", "4", "5"))
    assert r["iterations"] == [1, 2] and r["tracker"] == 2
    assert r["finite"] == {"1": True, "2": True}
    kinds = [e["event"] for e in r["events"]]
    assert kinds.count("nonfinite_step") == 3 and kinds.count("checkpoint_refused") == 3
    assert kinds[-1] == "nonfinite_stop"
    assert r["status"]["status"] == 5
    assert "the newest checkpoint, " in r["status"]["message"]
    assert "ckpt_nan/iter_0000002, holds finite parameters" in r["status"]["message"]


@pytest.mark.slow
def test_rollback_skips_the_bad_data_and_recovers(faults: Path) -> None:
    """Samples 12-23 (steps 4-6) are poisoned: after 3 bad steps the run reloads step 2
    and continues at sample 24, then trains to the end with finite losses."""
    r = _result(faults, "rollback")
    assert r["raised"] == "finished" and r["status"]["status"] == 0
    assert r["steps"] == [1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8, 9, 10]
    assert math.isfinite(r["final_loss"])
    assert r["consumed_samples"] == 56  # 14 steps of 4 samples: none read twice
    assert r["iterations"] == [2, 4, 6, 8, 10] and r["tracker"] == 10
    assert r["rollbacks"] == {"rollbacks": 1}  # carried in checkpoints
    (event,) = [e for e in r["events"] if e["event"] == "rollback"]
    assert (event["step"], event["to_step"], event["skipped_samples"]) == (6, 2, [8, 24])
    assert event["message"].startswith(
        "rollback 1 of 3 (train.max_rollbacks): loss or grad norm NaN/inf at steps 4-6; reloaded "
    )
    assert event["message"].endswith(
        "ckpt_rollback/iter_0000002 (step 2) and skipping the 16 samples read since it "
        "(samples 8-23); training continues from step 2 at sample 24"
    )


@pytest.mark.slow
def test_rollbacks_are_bounded(faults: Path) -> None:
    r = _result(faults, "rollback_bounded")
    assert r["raised"] == f"NonFiniteStop: {EXIT_NONFINITE}"
    kinds = [e["event"] for e in r["events"] if e["event"] != "checkpoint_refused"]
    assert kinds == ["nonfinite_step"] * 2 + ["rollback"] + ["nonfinite_step"] * 2 + [
        "nonfinite_stop"
    ]
    assert "after 1 rollback (train.max_rollbacks=1)" in r["status"]["message"]
    assert r["tracker"] == 2
