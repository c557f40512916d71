"""torch_dist checkpoints in Megatron-LM's layout, through megatron-core dist_checkpointing.

Storage only: the functions here take the parts they store (model chunks, optimizer,
scheduler, a :class:`TrainState`) and know nothing of the training loop, which decides
when to save (``megatron_forge.training.checkpoint_saver``).

- :mod:`.directory`: ``<root>/iter_0000100/`` per checkpoint, the tracker
  ``latest_checkpointed_iteration.txt`` naming the newest complete one, retention.
- :mod:`.state`: what a checkpoint holds (:class:`TrainState`, sharded model and
  optimizer in ``checkpoint.optimizer_format``, per-rank RNG, Megatron-LM's common
  entries) and megatron-core 0.16.1 workarounds for the optimizer.
- :mod:`.saver`: :class:`Checkpointer`, fully parallel asynchronous saves with a cached
  plan, finalized on all ranks.
- :mod:`.loader`: :func:`load_checkpoint`, resume or reshard from the newest checkpoint
  (or ``checkpoint.load_iteration``), ours or Megatron-LM's.
- :mod:`.ownership`: ``forge_owner.json``, the run a directory belongs to and the
  checkpoints it wrote; a new run never writes over another run's.
- :mod:`.lock`: one live run per directory (``forge.lock``, flock held by rank 0).
"""

from megatron_forge.checkpointing.directory import (
    TRACKER,
    complete_iterations,
    iteration_dir,
    iterations_to_delete,
    latest_iteration,
    resolve_iteration,
    saved_iterations,
)
from megatron_forge.checkpointing.loader import iteration_to_load, load_checkpoint
from megatron_forge.checkpointing.lock import DirectoryLock
from megatron_forge.checkpointing.ownership import OWNER_FILE, Owner, read_owner
from megatron_forge.checkpointing.saver import Checkpointer
from megatron_forge.checkpointing.state import TrainState

__all__ = [
    "OWNER_FILE",
    "TRACKER",
    "Checkpointer",
    "DirectoryLock",
    "Owner",
    "TrainState",
    "complete_iterations",
    "iteration_dir",
    "iteration_to_load",
    "iterations_to_delete",
    "latest_iteration",
    "load_checkpoint",
    "read_owner",
    "resolve_iteration",
    "saved_iterations",
]
