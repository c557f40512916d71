"""When to checkpoint: every ``checkpoint.save_interval`` steps or
``checkpoint.save_interval_minutes``, and at the end of the run. How to write one is
:class:`megatron_forge.checkpointing.Checkpointer`'s business.

A checkpoint is never written while the newest step's loss or gradient norm was NaN/inf,
nor from parameters that are not all finite: such a save is refused with a warning (and
a ``checkpoint_refused`` event), and a due save is retried at the next finite step. So
the tracker and retention only ever move on to checkpoints a run can continue from.

Metrics of a step that saved: ``checkpoint_blocked_s`` (the time the step was held up),
of which ``checkpoint_plan_s`` (building the sharded state and the save plan) and
``checkpoint_stage_s`` (the device-to-host copy, on GPUs, and the fork of the background
writer, whose copy-on-write snapshot stages CPU tensors); and of the step at
which a background write was found finished, ``checkpoint_write_s`` (from the end of
staging until every rank had written) with ``checkpoint_write_step``, the save's step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from megatron_forge.checkpointing import Checkpointer
from megatron_forge.training.callback import Callback
from megatron_forge.training.nonfinite import parameters_finite

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer


class CheckpointSaver(Callback):
    """Saves when due, finalizes background saves each step, and saves at the end."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer
        self.failed = False
        self.deferred = False
        """A due save was refused (non-finite step): retried at the next finite step."""

    def _refusal(self, trainer: Trainer) -> Optional[str]:
        """Why the trainer's state must not be saved now, or None. All ranks call this
        together (one all-reduce)."""
        if trainer.last_step_nonfinite():
            return f"the loss or grad norm of step {trainer.step} was NaN/inf"
        if trainer.model is not None and not parameters_finite(trainer.model):
            return f"parameters are NaN/inf at step {trainer.step}"
        return None

    def save(self, trainer: Trainer, blocking: bool = False) -> bool:
        """Checkpoint the trainer at its current step (all ranks together); False when
        refused (see the module's docstring)."""
        with trainer.params_synced():
            why_not = self._refusal(trainer)
            if why_not is not None:
                newest = self.checkpointer.root
                trainer.emit(
                    {
                        "event": "checkpoint_refused",
                        "step": trainer.step,
                        "message": f"no checkpoint saved at step {trainer.step}: {why_not}; "
                        f"the newest checkpoint under {newest} is kept as it is",
                    }
                )
                return False
            trainer.progress("checkpoint save")
            self.checkpointer.save(
                trainer.model,
                trainer.optimizer,
                trainer.scheduler,
                trainer.train_state(),
                trainer.cfg.to_dict(),
                blocking=blocking,
            )
        trainer.progress("checkpoint saved")
        return True

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        ck = self.checkpointer
        ck.finalize(blocking=False)
        due = ck.due(trainer.step)
        if due or (self.deferred and not trainer.last_step_nonfinite()):
            saved = self.save(trainer)
            self.deferred = not saved
            if saved:
                # blocked = plan (sharded state, validation, save plan) + stage (device-
                # to-host copy, fork of the writer) + waiting for the previous save, if any
                metrics["checkpoint_blocked_s"] = ck.last_blocked_s
                # (getattr: a checkpointer without the breakdown reports the total only)
                for name in ("plan", "stage"):
                    if hasattr(ck, f"last_{name}_s"):
                        metrics[f"checkpoint_{name}_s"] = getattr(ck, f"last_{name}_s")
        written = getattr(ck, "written", None)
        if written is not None:  # a save finished writing: its background time
            metrics["checkpoint_write_s"], metrics["checkpoint_write_step"] = written[1], written[0]
            ck.written = None

    def finish_writes(self, trainer: Trainer) -> None:
        self.checkpointer.finalize(blocking=True)

    def on_event(self, trainer: Trainer, event: dict[str, Any]) -> None:
        if event["event"] == "rollback":  # the state a deferred save was due for is gone
            self.deferred = False

    def on_train_end(self, trainer: Trainer) -> None:
        self.save(trainer, blocking=True)

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.failed = True

    def close(self, trainer: Trainer) -> None:
        # After an error the other ranks may not join the finalizing all-reduce: the save
        # in flight is dropped, and the last complete checkpoint stays the tracker's.
        self.checkpointer.close(abort=self.failed)
