"""When to checkpoint: every ``checkpoint.save_interval`` steps or
``checkpoint.save_interval_minutes``, and at the end of the run. How to write one is
:class:`megatron_forge.checkpointing.Checkpointer`'s business."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megatron_forge.checkpointing import Checkpointer
from megatron_forge.training.callback import Callback

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer


class CheckpointSaver(Callback):
    """Saves when due, finalizes background saves each step, and saves at the end."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer
        self.failed = False

    def save(self, trainer: Trainer, blocking: bool = False) -> None:
        """Checkpoint the trainer at its current step (all ranks together)."""
        with trainer.params_synced():
            self.checkpointer.save(
                trainer.model,
                trainer.optimizer,
                trainer.scheduler,
                trainer.train_state(),
                trainer.cfg.to_dict(),
                blocking=blocking,
            )

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.checkpointer.finalize(blocking=False)
        if self.checkpointer.due(trainer.step):
            self.save(trainer)
            metrics["checkpoint_blocked_s"] = self.checkpointer.last_blocked_s

    def on_train_end(self, trainer: Trainer) -> None:
        self.save(trainer, blocking=True)

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.failed = True

    def close(self, trainer: Trainer) -> None:
        # After an error the other ranks may not join the finalizing all-reduce: the save
        # in flight is dropped, and the last complete checkpoint stays the tracker's.
        self.checkpointer.close(abort=self.failed)
