"""torch_dist checkpoints in Megatron-LM's layout, through megatron-core dist_checkpointing.

``<save>/iter_0000100/`` holds one checkpoint; ``<save>/latest_checkpointed_iteration.txt``
names the newest COMPLETE one and is written only after every rank finished writing, so
an interrupted save is never the one resumed from. Sharded state dicts make a checkpoint
loadable under another TP/PP/DP/EP layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch.distributed as dist

from megatron_forge.config import ConfigError
from megatron_forge.training.callbacks import Callback

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer

TRACKER = "latest_checkpointed_iteration.txt"
# Optimizer state stored per parameter, so it reshards with the model (TP/PP/DP changes).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{tracker} holds {text!r}, not an iteration number")
    return int(text)


def _model_keys(model: list[Any]) -> list[str]:
    # Megatron-LM's names: 'model' for one chunk, 'model0', 'model1', ... for VPP chunks.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _prepare_optimizer_for_load(optimizer: Any) -> None:
    """Work around two megatron-core 0.16.1 gaps on the torch-Adam path (no TE/apex: CPU,
    or GPUs without TE) when loading a 'fully_reshardable' distributed optimizer state:

    - sharded_state_dict(is_loading=True) reads Adam's 'step' first, which a never-stepped
      optimizer lacks; megatron's own dummy initialisation (replaced by the load) fills it.
    - load_parameter_state_from_fully_reshardable copies every key of the live state,
      including torch Adam's 'step', from a source that (by design) omits it, raising
      KeyError. 'step' is restored separately from param_groups by load_state_dict, so
      the per-parameter copy only has to skip keys the source does not carry.
    """
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
        if not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            opt._set_main_param_and_optimizer_states = _copy_present_states.__get__(opt)


def _copy_present_states(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        destination[key].copy_(value)


def _sharded_state(trainer: Trainer, with_optimizer: bool, is_loading: bool) -> dict[str, Any]:
    state: dict[str, Any] = {
        key: chunk.module.sharded_state_dict()
        for key, chunk in zip(_model_keys(trainer.model), trainer.model)
    }
    if with_optimizer:
        if is_loading:
            _prepare_optimizer_for_load(trainer.optimizer)
        state["optimizer"] = trainer.optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / f".{TRACKER}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, root / TRACKER)


def save(trainer: Trainer, root: str | Path) -> None:
    """Save model, optimizer, scheduler and iteration at ``trainer.step`` (synchronous)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    target = iteration_dir(root, trainer.step)
    latest = latest_iteration(root)
    if target.exists() and latest is not None and trainer.step <= latest:
        raise ConfigError(
            f"{target} already holds a complete checkpoint (the tracker is at {latest}); "
            "refusing to overwrite it. Point checkpoint.save at a new directory, or set "
            "checkpoint.load to it to resume from there"
        )
    if not dist.is_initialized() or dist.get_rank() == 0:
        if target.exists():  # newer than the tracker: left by a save that never finished
            shutil.rmtree(target)
        target.mkdir(parents=True)
    _barrier()
    # Before the first step the optimizer holds no state to save (megatron's distributed
    # optimizer refuses); such a checkpoint is an initialization: weights only.
    with_optimizer = trainer.step > 0
    state = _sharded_state(trainer, with_optimizer=with_optimizer, is_loading=False)
    state.update(
        iteration=trainer.step,
        has_optimizer=with_optimizer,
        scheduler=trainer.scheduler.state_dict(),
        config=trainer.cfg.to_dict(),
        checkpoint_version=3.0,
    )
    dist_checkpointing.save(state, str(target))
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        _write_tracker(root, trainer.step)
    _barrier()


def load(trainer: Trainer, root: str | Path) -> int:
    """Load the latest checkpoint under ``root`` into the trainer; return the step to
    resume from (0 when only weights are loaded, or when there is no checkpoint yet)."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        resumes_itself = trainer.cfg.checkpoint.save is not None and Path(root).resolve() == (
            Path(trainer.cfg.checkpoint.save).resolve()
        )
        if not resumes_itself and not Path(root).is_dir():
            raise ConfigError(
                f"checkpoint.load={root} does not exist; point it at a directory holding "
                f"{TRACKER} (or leave it unset to start from scratch)"
            )
        return 0  # nothing saved yet: the first run of a job that resumes itself
    path = iteration_dir(root, iteration)
    common = dist_checkpointing.load_common_state_dict(str(path))
    with_optimizer = trainer.cfg.checkpoint.load_optimizer and common.get("has_optimizer", True)
    sharded = _sharded_state(trainer, with_optimizer=with_optimizer, is_loading=True)
    state = dist_checkpointing.load(sharded, str(path))
    for key, chunk in zip(_model_keys(trainer.model), trainer.model):
        chunk.module.load_state_dict(state[key])
    if not with_optimizer:
        return 0
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])


class CheckpointSaver(Callback):
    """Saves every ``checkpoint.save_interval`` steps and at the end of training."""

    def __init__(self, root: str, interval: int) -> None:
        self.root = root
        self.interval = interval

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.interval and trainer.step % self.interval == 0:
            save(trainer, self.root)

    def on_train_end(self, trainer: Trainer) -> None:
        if latest_iteration(self.root) != trainer.step:
            save(trainer, self.root)
