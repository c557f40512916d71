"""TensorBoard event files in ``<logging.dir>/tensorboard/`` (``logging.tensorboard: true``).

Global rank 0 writes the same scalars as W&B, under the same names (``train/loss``,
``val/loss``, ``throughput/mfu``...), at the training step. A resumed run opens a new
event file in the same directory with ``purge_step`` at its first step, so TensorBoard
drops the steps a preempted job logged after its last checkpoint instead of drawing them
twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_forge.monitoring.dashboard import dashboard_scalars, is_log_step
from megatron_forge.training.callbacks import Callback, is_logging_rank

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer


class TensorBoardLogger(Callback):
    def __init__(self, log_dir: str | Path, log_interval: int) -> None:
        self.path = Path(log_dir) / "tensorboard"
        self.log_interval = log_interval
        self.writer: Any = None

    def _open(self, trainer: Trainer) -> None:
        if self.writer is not None or not is_logging_rank():
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(self.path), purge_step=trainer.step + 1 if trainer.step else None
        )
        self.writer.add_text("config", f"```yaml\n{trainer.cfg.to_yaml()}```", trainer.step)

    def _write(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._open(trainer)
        if self.writer is None:
            return
        for name, value in dashboard_scalars(metrics).items():
            self.writer.add_scalar(name, value, metrics["step"])
        self.writer.flush()  # a preempted or killed job keeps what it logged

    def on_train_start(self, trainer: Trainer) -> None:
        self._open(trainer)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if is_log_step(metrics["step"], self.log_interval, trainer.cfg.train.train_iters):
            self._write(trainer, metrics)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write(trainer, metrics)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
