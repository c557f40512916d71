"""TensorBoard event files in ``<logging.dir>/tensorboard/`` (``logging.tensorboard: true``).

Global rank 0 writes the same scalars as W&B, under the same names (``train/loss``,
``val/loss``, ``throughput/mfu``...), at the training step. A resumed run opens a new
event file in the same directory with ``purge_step`` at its first step, so TensorBoard
drops the steps a preempted job logged after its last checkpoint instead of drawing them
twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_forge.monitoring.dashboard import dashboard_scalars
from megatron_forge.utils import is_rank0


class TensorBoardLogger:
    """Scalars of metric dicts into one event file; every call is a no-op off rank 0."""

    def __init__(self, log_dir: str | Path) -> None:
        self.path = Path(log_dir) / "tensorboard"
        self.writer: Any = None

    def open(self, step: int, config_yaml: str) -> None:
        """Start the event file (once) for a run at ``step``, recording its config."""
        if self.writer is not None or not is_rank0():
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.path), purge_step=step + 1 if step else None)
        self.writer.add_text("config", f"```yaml\n{config_yaml}```", step)

    def log(self, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for name, value in dashboard_scalars(metrics).items():
            self.writer.add_scalar(name, value, metrics["step"])
        self.writer.flush()  # a preempted or killed job keeps what it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
