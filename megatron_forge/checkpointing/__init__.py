"""torch_dist checkpoints in Megatron-LM's layout, through megatron-core dist_checkpointing.

Storage only: the functions here take the parts they store (model chunks, optimizer,
scheduler, a :class:`TrainState`) and know nothing of the training loop, which decides
when to save (``megatron_forge.training.checkpoint_saver``).

- :mod:`.directory`: ``<root>/iter_0000100/`` per checkpoint, the tracker
  ``latest_checkpointed_iteration.txt`` naming the newest complete one, retention.
- :mod:`.state`: what a checkpoint holds (:class:`TrainState`, sharded model and
  optimizer, per-rank RNG) and megatron-core 0.16.1 workarounds for the optimizer.
- :mod:`.saver`: :class:`Checkpointer`, asynchronous saves finalized on all ranks.
- :mod:`.loader`: :func:`load_checkpoint`, resume or reshard from the newest checkpoint.
"""

from megatron_forge.checkpointing.directory import (
    TRACKER,
    iteration_dir,
    iterations_to_delete,
    latest_iteration,
    saved_iterations,
)
from megatron_forge.checkpointing.loader import load_checkpoint
from megatron_forge.checkpointing.saver import Checkpointer
from megatron_forge.checkpointing.state import TrainState

__all__ = [
    "TRACKER",
    "Checkpointer",
    "TrainState",
    "iteration_dir",
    "iterations_to_delete",
    "latest_iteration",
    "load_checkpoint",
    "saved_iterations",
]
