"""Callbacks that bind :mod:`megatron_forge.monitoring` to the train loop: throughput and
MFU into each step's metrics, and the W&B, MLflow and TensorBoard dashboards.

W&B also gets an alert (``wandb.alert``) for each event in :data:`ALERTS`: loss and
grad-norm spikes, persistent stragglers, a stop on NaN/inf, a hang and a preemption
(``logging.wandb_alerts``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from megatron_forge.config import Config
from megatron_forge.monitoring.dashboard import is_log_step
from megatron_forge.monitoring.mlflow_logger import MlflowLogger
from megatron_forge.monitoring.tensorboard import TensorBoardLogger
from megatron_forge.monitoring.throughput import ThroughputMonitor
from megatron_forge.monitoring.wandb_logger import WandbLogger
from megatron_forge.training.callback import Callback
from megatron_forge.training.exit_status import EXIT_HUNG

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer


class ThroughputCallback(Callback):
    """Adds ``tflops_per_gpu`` and ``mfu`` to each step's metrics; runs before the loggers."""

    def __init__(self, cfg: Config, device_name: Optional[str] = None) -> None:
        self.cfg = cfg
        self.device_name = device_name
        self.monitor: Optional[ThroughputMonitor] = None

    def _monitor(self, trainer: Trainer) -> ThroughputMonitor:
        if self.monitor is None:
            vocab = self.cfg.model.vocab_size or trainer.tokenizer.vocab_size
            self.monitor = ThroughputMonitor(self.cfg, vocab, self.device_name)
            self.monitor.announce()
        return self.monitor

    def on_train_start(self, trainer: Trainer) -> None:
        self._monitor(trainer)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._monitor(trainer).add_to(metrics)


ALERTS: dict[str, tuple[str, bool]] = {
    "loss_spike": ("Loss spike", False),
    "grad_norm_spike": ("Grad norm spike", False),
    "straggler": ("Straggler", False),
    "nonfinite_stop": ("Stopped: NaN/inf steps", True),
    "hang": ("Hang: exiting", True),
    "preempted": ("Preempted", False),
}
"""Event kind -> (W&B alert title, whether it is an error rather than a warning)."""

ENDS_PROCESS = {"hang"}
"""Events after which the process exits at once (no ``close``): finish the runs now."""


class RunTrackerCallback(Callback):
    """What the W&B and MLflow callbacks share: each logged step's metrics and every
    evaluation go to the tracker's run, whose id is resumable state (a resumed or requeued
    job continues the same run); the run is finished as failed after an error or when the
    process is about to exit at once (:data:`ENDS_PROCESS`). Subclasses set ``state_key``
    and ``logger`` and say how to start and finish their run."""

    logger: Any

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.failed = False

    def _start(self, trainer: Trainer) -> None:
        raise NotImplementedError

    def _finish(self, failed: bool) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.logger.run_id} if self.logger.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.logger.run_id = state.get("run_id")

    def on_train_start(self, trainer: Trainer) -> None:
        self._start(trainer)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        t = trainer.cfg.train
        if is_log_step(metrics["step"], self.cfg.logging.log_interval, t.train_iters):
            self.logger.log(metrics)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._start(trainer)  # evaluation-only runs have no train start
        self.logger.log(metrics)

    def on_event(self, trainer: Trainer, event: dict[str, Any]) -> None:
        if event.get("event") in ENDS_PROCESS:
            self._finish(failed=True)

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.failed = True

    def close(self, trainer: Trainer) -> None:
        self._finish(failed=self.failed)


class WandbCallback(RunTrackerCallback):
    """The run tracker on W&B, which also gets an alert for each event in :data:`ALERTS`
    (``logging.wandb_alerts``)."""

    state_key = "wandb"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.logger = WandbLogger(cfg)

    def _start(self, trainer: Trainer) -> None:
        self.logger.start(trainer.world_size)

    def _finish(self, failed: bool) -> None:
        self.logger.finish(exit_code=1 if failed else None)

    def on_event(self, trainer: Trainer, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ALERTS and self.cfg.logging.wandb_alerts:
            title, error = ALERTS[kind]
            self.logger.alert(title, f"{self.cfg.logging.dir}: {event['message']}", error)
        if kind in ENDS_PROCESS:
            self.logger.finish(exit_code=EXIT_HUNG)


class MlflowCallback(RunTrackerCallback):
    """The run tracker on MLflow (``logging.mlflow_experiment``)."""

    state_key = "mlflow"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.logger = MlflowLogger(cfg)

    def _start(self, trainer: Trainer) -> None:
        self.logger.start(trainer.world_size, trainer.step)

    def _finish(self, failed: bool) -> None:
        self.logger.finish(failed=failed)


class TensorBoardCallback(Callback):
    """Writes the logged steps and evaluations to ``<logging.dir>/tensorboard``."""

    def __init__(self, cfg: Config) -> None:
        self.log_interval = cfg.logging.log_interval
        self.logger = TensorBoardLogger(cfg.logging.dir)
        self.opened = False

    def _open(self, trainer: Trainer) -> None:
        if not self.opened:  # on the first hook: evaluation-only runs have no train start
            self.logger.open(trainer.step, trainer.cfg.to_yaml())
            self.opened = True

    def _log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._open(trainer)
        self.logger.log(metrics)

    def on_train_start(self, trainer: Trainer) -> None:
        self._open(trainer)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if is_log_step(metrics["step"], self.log_interval, trainer.cfg.train.train_iters):
            self._log(trainer, metrics)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._log(trainer, metrics)

    def close(self, trainer: Trainer) -> None:
        self.logger.close()
