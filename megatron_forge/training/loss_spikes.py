"""Loss spikes and grad-norm jumps, against a running statistic of the recent steps.

Each step's loss and gradient norm are compared with the mean and standard deviation of
the previous ``logging.spike_window`` steps (finite values only; detection starts once
the window is full). A value more than ``logging.spike_zscore`` standard deviations above
the mean is a spike. The standard deviation counts as at least 1% of the mean, so that
the noise of a very flat curve (a few thousandths) is not taken for a spike.

Every step's metrics get ``loss_zscore`` and ``grad_norm_zscore`` (once the window is
full); a spike adds ``loss_spike`` / ``grad_norm_spike`` to them and is an event of its
own (``loss_spike``, ``grad_norm_spike``): a WARNING line on the console, a record in
metrics.jsonl whatever the log interval, and a W&B alert. The loss is the same on every
rank (the trainer all-reduces it), so every rank takes the same decision.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from megatron_forge.config import Config
from megatron_forge.training.callback import Callback

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer

RELATIVE_STD_FLOOR = 0.01
"""The standard deviation is taken as at least this fraction of the window's mean."""


class RunningZScore:
    """z-scores of a series against its previous ``window`` finite values."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def stats(self) -> Optional[tuple[float, float]]:
        """(mean, standard deviation with its floor) of the window; None until it is full."""
        if len(self.values) < (self.values.maxlen or 0):
            return None
        mean = statistics.fmean(self.values)
        std = statistics.pstdev(self.values, mean)
        return mean, max(std, RELATIVE_STD_FLOOR * abs(mean), 1e-12)

    def score(self, value: float) -> Optional[float]:
        """The z-score of ``value``, then ``value`` joins the window. None for a
        non-finite value (never added) or while the window fills."""
        if not math.isfinite(value):
            return None
        found = self.stats()
        self.values.append(value)
        if found is None:
            return None
        mean, std = found
        return (value - mean) / std


class LossSpikeDetector(Callback):
    """Flags loss spikes and grad-norm jumps; runs before the loggers."""

    SERIES = (("loss", "loss_spike"), ("grad_norm", "grad_norm_spike"))

    def __init__(self, cfg: Config) -> None:
        self.window = cfg.logging.spike_window
        self.threshold = cfg.logging.spike_zscore
        self.scores = {name: RunningZScore(self.window) for name, _ in self.SERIES}

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if metrics.get("nonfinite"):  # the non-finite guard's business, not a spike
            return
        for name, event in self.SERIES:
            value = metrics.get(name)
            if value is None:
                continue
            window = self.scores[name]
            stats = window.stats()
            z = window.score(float(value))
            if z is None:
                continue
            metrics[f"{name}_zscore"] = z
            if z > self.threshold and stats is not None:
                metrics[event] = True
                trainer.emit(self._event(event, name, metrics["step"], float(value), z, stats))

    def _event(
        self, event: str, name: str, step: int, value: float, z: float, stats: tuple[float, float]
    ) -> dict[str, Any]:
        mean, std = stats
        what = "loss" if name == "loss" else "grad norm"
        message = (
            f"{what} spike at step {step}: {what} {value:.4g} is {z:.1f} standard deviations "
            f"above the mean {mean:.4g} (std {std:.3g}) of the previous {self.window} steps "
            f"(logging.spike_zscore={self.threshold:g}, logging.spike_window={self.window})"
        )
        return {
            "event": event,
            "step": step,
            "metric": name,  # not the metric's own key: readers of metrics.jsonl select
            "value": value,  # step records by it ("loss" in record)
            "zscore": z,
            "mean": mean,
            "std": std,
            "message": message,
        }
