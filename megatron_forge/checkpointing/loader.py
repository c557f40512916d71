"""Resuming: :func:`load_checkpoint` reads the newest complete checkpoint of a root (or
``checkpoint.load_iteration``) into the parts it is given and returns the
:class:`~.state.TrainState` to continue from. :func:`iteration_to_load` says which, and
refuses rather than guesses when the tracker is lost, unreadable or names a missing
iteration (the entry point calls it at startup, before building anything).

Resharding (load under another layout): TP, PP (with or without virtual pipeline), DP and
EP may all change, for weights and optimizer state, because both are stored per global
parameter. RNG states are restored only when the TP/PP/CP/DP layout is unchanged (they
are per rank); otherwise a warning says they were reseeded from train.seed. Changing the
model's shape, family or padded vocabulary is refused by dist_checkpointing's shape
validation, naming the tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from megatron_forge.checkpointing.collective import on_rank0
from megatron_forge.checkpointing.directory import TRACKER, iteration_dir, resolve_iteration
from megatron_forge.checkpointing.files import check_safe_to_load, read_errors, verify_iteration
from megatron_forge.checkpointing.ownership import (
    effective_load_iteration,
    kept_from_previous_owner,
    read_owner,
)
from megatron_forge.checkpointing.state import (
    TrainState,
    callback_states,
    model_keys,
    parallel_layout,
    set_rng_state,
    sharded_state,
    untie_adam_steps,
)
from megatron_forge.config import CheckpointConfig
from megatron_forge.errors import CheckpointError
from megatron_forge.utils import is_rank0


def _warn(message: str) -> None:
    if is_rank0():
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _requested_iteration(root: str | Path, ckpt_cfg: CheckpointConfig) -> Optional[int]:
    """checkpoint.load_iteration, which picks an iteration of checkpoint.load only (a
    rollback that reloads the run's own newest checkpoint from checkpoint.save ignores it)."""
    load = ckpt_cfg.load
    if load is None or Path(root).resolve() != Path(load).resolve():
        return None
    return ckpt_cfg.load_iteration


def iteration_to_load(root: str | Path, ckpt_cfg: CheckpointConfig) -> Optional[int]:
    """The iteration of ``root`` to load (``ckpt_cfg.load_iteration``, else the tracker's),
    or None when a run that saves into ``root`` has not saved yet."""
    save = ckpt_cfg.save
    resumes_itself = save is not None and Path(root).resolve() == Path(save).resolve()
    if not resumes_itself and not Path(root).is_dir():
        raise CheckpointError(
            f"checkpoint.load={root} does not exist; point it at a directory holding "
            f"{TRACKER} (or leave it unset to start from scratch)"
        )
    requested = _requested_iteration(root, ckpt_cfg)
    if resumes_itself:
        owner = read_owner(root)
        requested = effective_load_iteration(root, owner, requested)
    # Checkpoints a run kept when it took the directory over are not the directory's own.
    iteration = resolve_iteration(root, requested, kept_from_previous_owner(root))
    if iteration is None and not resumes_itself:
        raise CheckpointError(
            f"checkpoint.load={root} holds no checkpoint (no {TRACKER}, no complete iter_ "
            "directory); point it at a checkpoint directory, or leave it unset to start "
            "from scratch"
        )
    return iteration


def load_checkpoint(
    root: str | Path,
    model_chunks: list[Any],
    optimizer: Any,
    scheduler: Any,
    ckpt_cfg: CheckpointConfig,
) -> TrainState:
    """Load the latest checkpoint under ``root`` into the model chunks (and, per
    ``ckpt_cfg``, the optimizer, scheduler, RNG and callback states); return the state to resume
    from. Its step is 0 when only weights are loaded, or when a run that saves into
    ``root`` has not saved yet (the first job of one that resumes itself)."""
    from megatron.core import dist_checkpointing

    iteration = iteration_to_load(root, ckpt_cfg)
    if iteration is None:
        return TrainState()
    if _requested_iteration(root, ckpt_cfg) not in (None, iteration):
        _warn(
            f"checkpoint.load_iteration={ckpt_cfg.load_iteration}: an earlier job of this run "
            f"resumed from it and saved newer checkpoints since; resuming from the tracker's "
            f"{iteration}, as a requeued job should"
        )
    path = iteration_dir(root, iteration)
    # Every pickle of the iteration is read with an allowlist first (rank 0; the others
    # get its verdict), since megatron-core's load unpickles .metadata and the sharded
    # objects without restriction: a shared checkpoint must not run code.
    common = on_rank0(lambda: check_safe_to_load(path))
    with_optimizer = ckpt_cfg.load_optimizer and common.get("has_optimizer", True)
    saved_layout, layout = common.get("layout", {}), parallel_layout()
    # RNG states are per (PP, TP, CP, DP) rank; EP does not change that grid.
    same_layout = all(
        saved_layout.get(k) == layout[k] for k in ("pipeline", "tensor", "context", "data")
    )
    with_rng = ckpt_cfg.load_rng and with_optimizer and same_layout
    if ckpt_cfg.load_rng and with_optimizer and not same_layout:
        _warn(
            f"{path} was saved under layout {common.get('layout')}, this run is "
            f"{layout}: RNG states are not restored (reseeded from train.seed)"
        )
    sharded = sharded_state(model_chunks, optimizer, with_optimizer, with_rng, is_loading=True)
    try:
        state = dist_checkpointing.load(sharded, str(path))
    except read_errors() as err:
        problems = verify_iteration(path)
        if not problems:
            raise  # not a damaged file (e.g. a shape mismatch): megatron-core's message
        raise CheckpointError(
            f"{path} cannot be loaded: " + "; ".join(problems) + "; copy the checkpoint again "
            "from where it was written, or set checkpoint.load_iteration to an earlier one"
        ) from err
    for key, chunk in zip(model_keys(model_chunks), model_chunks):
        chunk.module.load_state_dict(state[key])
    # load_optimizer=false starts a new run from these weights (fine-tuning, a changed
    # recipe), so callbacks start afresh too (a new W&B run rather than the old one's id).
    callbacks = callback_states(common) if ckpt_cfg.load_optimizer else {}
    if not with_optimizer:
        return TrainState(callbacks=callbacks)
    resumed = TrainState(callbacks=callbacks)
    optimizer.load_state_dict(state["optimizer"])
    untie_adam_steps(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if with_rng:
        set_rng_state(state["rng_state"])
    resumed.step = int(common["iteration"])
    resumed.consumed_samples = int(common["consumed_samples"])
    return resumed
