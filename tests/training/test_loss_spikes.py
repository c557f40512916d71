"""Loss-spike and grad-norm-jump detection: the running z-score on a made-up series, and
a real spike (logits scaled in one step's forward) in the observed 2-rank run, flagged at
that step in metrics.jsonl, the console and the W&B offline run's alerts."""

from __future__ import annotations

from typing import Any

import pytest

from megatron_forge.config import ConfigError, load_config
from megatron_forge.training.callback import Callback
from megatron_forge.training.loss_spikes import LossSpikeDetector, RunningZScore
from tests.monitoring import wandb_files
from tests.training.fakes import fake_trainer
from tests.training.observed_run import SPIKE_STEP, observed  # noqa: F401 (fixture)


class Events(Callback):
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.metrics: dict[int, dict[str, Any]] = {}

    def on_event(self, trainer: Any, event: dict[str, Any]) -> None:
        self.events.append(event)

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.metrics[metrics["step"]] = dict(metrics)


def test_zscore_waits_for_a_full_window_and_skips_nonfinite() -> None:
    z = RunningZScore(5)
    assert [z.score(v) for v in (2.0, 2.1, 1.9, 2.0, 2.0)] == [None] * 5
    assert z.score(float("nan")) is None and len(z.values) == 5  # never joins the window
    # std of the window is 0.063, above the 1% floor (0.02): 2.5 is 7.9 std above the mean
    assert z.score(2.5) == pytest.approx((2.5 - 2.0) / 0.0632456, rel=1e-4)
    flat = RunningZScore(5)
    for _ in range(5):
        flat.score(3.0)
    # a flat curve: the std floor (1% of the mean) keeps tiny noise from being a spike
    assert flat.score(3.003) == pytest.approx(0.1)


def test_spike_is_flagged_at_its_step_only(capsys: pytest.CaptureFixture[str]) -> None:
    losses = {step: 3.0 - 0.01 * step + (0.005 if step % 2 else 0.0) for step in range(1, 13)}
    losses[9] = 6.0  # the spike; the grad norm (= the loss in the fake trainer) jumps too
    losses[10] = float("nan")  # a non-finite step is the NaN guard's business, not a spike
    record = Events()
    trainer = fake_trainer(
        [LossSpikeDetector(load_config(None, ["logging.spike_window=5"])), record],
        train_iters=12,
        losses=losses,
    )
    trainer.train()
    kinds = [(e["event"], e["step"]) for e in record.events if "spike" in e["event"]]
    assert kinds == [("loss_spike", 9), ("grad_norm_spike", 9)]
    assert record.metrics[9]["loss_spike"] is True and record.metrics[9]["loss_zscore"] > 4
    assert not any(m.get("loss_spike") for s, m in record.metrics.items() if s != 9)
    assert "loss_zscore" not in record.metrics[5] and "loss_zscore" in record.metrics[6]
    err = capsys.readouterr().err
    assert "WARNING: loss spike at step 9: loss 6 is " in err
    assert "logging.spike_zscore=4" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("logging.spike_window=3", "logging.spike_window=3 is too short"),
        ("logging.spike_zscore=0", "logging.spike_zscore=0.0 must be a positive number"),
        ("logging.spike_window=-1", "logging.spike_window=-1 must be >= 0"),
    ],
)
def test_bad_spike_settings_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.slow
def test_injected_spike_is_flagged_at_its_step(observed) -> None:  # noqa: F811
    records = observed["records"]
    spikes = [r for r in records if r.get("event") == "loss_spike"]
    assert [r["step"] for r in spikes] == [SPIKE_STEP], spikes
    assert spikes[0]["zscore"] > 4 and spikes[0]["value"] > spikes[0]["mean"]
    assert not [r for r in records if "event" in r and "loss" in r]  # step records only
    grad = [r["step"] for r in records if r.get("event") == "grad_norm_spike"]
    assert SPIKE_STEP in grad
    steps = {r["step"]: r for r in records if "loss" in r and "event" not in r}
    assert steps[SPIKE_STEP]["loss_spike"] is True
    assert not [s for s, r in steps.items() if r.get("loss_spike") and s != SPIKE_STEP]
    assert f"WARNING: loss spike at step {SPIKE_STEP}: " in observed["logs"][0]


@pytest.mark.slow
def test_wandb_offline_run_holds_the_alerts(observed) -> None:  # noqa: F811
    first = sorted((observed["dir"] / "wandb").glob("offline-run-*"))[0]
    alerts = [
        r.alert
        for r in wandb_files.records(wandb_files.run_file(first))
        if r.WhichOneof("record_type") == "alert"
    ]
    by_title = {a.title: a for a in alerts}
    assert f"step {SPIKE_STEP}" in by_title["Loss spike"].text
    assert by_title["Loss spike"].level == "WARN"
    assert "rank 1" in by_title["Straggler"].text
