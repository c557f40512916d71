"""torch_dist checkpoints in Megatron-LM's layout, through megatron-core dist_checkpointing.

``<save>/iter_0000100/`` holds one checkpoint; ``<save>/latest_checkpointed_iteration.txt``
names the newest COMPLETE one. Saves are asynchronous by default: the step blocks only
while the state is staged, a background process writes, and when every rank has
finished (megatron-core's AsyncCallsQueue agrees on that with an all-reduce) rank 0
writes the tracker and applies retention. A checkpoint interrupted mid-write is
therefore never the one resumed from, and retention never deletes the newest complete one.

What a checkpoint holds: model (sharded per parameter), distributed-optimizer state in
megatron's 'fully_reshardable' form, scheduler, iteration, consumed samples, per-rank RNG
states, the resolved config and the parallel layout it was written under.

Resharding (load under another layout): TP, PP (with or without virtual pipeline), DP and
EP may all change, for weights and optimizer state, because both are stored per global
parameter. RNG states are restored only when the TP/PP/CP/DP layout is unchanged (they
are per rank); otherwise a warning says they were reseeded from train.seed. Changing the
model's shape, family or padded vocabulary is refused by dist_checkpointing's shape
validation, naming the tensor.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_forge.config import CheckpointConfig, ConfigError
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


def saved_iterations(root: str | Path) -> list[int]:
    """Iterations with an iter_NNNNNNN directory (complete or not), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("iter_*"):
        suffix = path.name[len("iter_") :]
        if path.is_dir() and suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / f".{TRACKER}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, root / TRACKER)


def iterations_to_delete(
    iterations: list[int], latest: int, keep_last: Optional[int], keep_every: Optional[int]
) -> list[int]:
    """Complete checkpoints (<= latest) that retention removes; never ``latest`` itself."""
    if keep_last is None:
        return []
    complete = [i for i in iterations if i <= latest]
    kept = set(complete[-keep_last:]) | {latest}
    if keep_every:
        kept |= {i for i in complete if i % keep_every == 0}
    return [i for i in complete if i not in kept]


# ---------------------------------------------------------------------------------------
# What goes into a checkpoint


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor": ps.get_tensor_model_parallel_world_size(),
        "pipeline": ps.get_pipeline_model_parallel_world_size(),
        "context": ps.get_context_parallel_world_size(),
        "data": ps.get_data_parallel_world_size(),
        "expert": ps.get_expert_model_parallel_world_size(),
    }


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng(layout: dict[str, int]) -> Any:
    """This rank's RNG states as one entry of a (PP, TP, CP, DP) grid of objects."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (layout["pipeline"], layout["tensor"], layout["context"], layout["data"])
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_context_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", _rng_state(), shape, offset, replica_id=0)


def _model_keys(model: list[Any]) -> list[str]:
    # Megatron-LM's names: 'model' for one chunk, 'model0', 'model1', ... for VPP chunks.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _prepare_optimizer_for_load(optimizer: Any) -> None:
    """Work around megatron-core 0.16.1 gaps on the torch-Adam path (no TE/apex: CPU,
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


def _untie_adam_steps(optimizer: Any) -> None:
    """Third gap, same path: DistributedOptimizer.load_state_dict gives every parameter's
    Adam state the SAME 'step' tensor; torch's foreach Adam then increments it once per
    parameter per step, so bias correction is wrong from the first step after a resume.
    Each parameter gets its own copy back."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _copy_present_states(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        destination[key].copy_(value)


def _sharded_state(
    trainer: Trainer, with_optimizer: bool, with_rng: bool, is_loading: bool
) -> dict[str, Any]:
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
    if with_rng:
        state["rng_state"] = _sharded_rng(_layout())
    return state


# ---------------------------------------------------------------------------------------
# Saving


class Checkpointer:
    """Saves (async or not) into ``root`` and finalizes: tracker, retention.

    One save is in flight at a time: a new save first waits for the previous one, as
    Megatron-LM does, so the write bandwidth never competes with itself.
    """

    def __init__(self, root: str | Path, cfg: CheckpointConfig) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.root = Path(root)
        self.cfg = cfg
        self.queue = AsyncCallsQueue() if cfg.async_save else None
        self.last_save_time = time.monotonic()
        self.last_blocked_s = 0.0
        """Seconds the last save held up training (staging, or the whole write if sync)."""
        self.pending_iteration: Optional[int] = None
        """Iteration being written in the background, if any."""

    def save(self, trainer: Trainer, blocking: bool = False) -> None:
        """Checkpoint ``trainer`` at its current step (no-op if already saved)."""
        step = trainer.step
        if latest_iteration(self.root) == step or self.pending_iteration == step:
            if blocking:
                self.finalize(blocking=True)
            return
        self.finalize(blocking=True)
        start = time.perf_counter()
        target = self._prepare_dir(step)
        # Before the first step the optimizer holds no state to save (megatron's
        # distributed optimizer refuses); such a checkpoint is an initialization.
        with_optimizer = step > 0
        with trainer.params_synced():
            state = _sharded_state(trainer, with_optimizer, with_rng=True, is_loading=False)
        state.update(
            iteration=step,
            consumed_samples=trainer.consumed_samples,
            has_optimizer=with_optimizer,
            scheduler=trainer.scheduler.state_dict(),
            config=trainer.cfg.to_dict(),
            layout=_layout(),
            extra_state=dict(trainer.extra_state),
            checkpoint_version=3.0,
        )
        from megatron.core import dist_checkpointing

        request = dist_checkpointing.save(
            state, str(target), async_sharded_save=self.queue is not None
        )
        finish = partial(self._finish, step)
        if request is None:
            finish()
        else:
            request.add_finalize_fn(finish)
            self.queue.schedule_async_request(request)
            self.pending_iteration = step
        self.last_save_time = time.monotonic()
        if blocking:
            self.finalize(blocking=True)
        self.last_blocked_s = time.perf_counter() - start

    def _prepare_dir(self, step: int) -> Path:
        target = iteration_dir(self.root, step)
        latest = latest_iteration(self.root)
        if target.exists() and latest is not None and step <= latest:
            raise ConfigError(
                f"{target} already holds a complete checkpoint (the tracker is at {latest}); "
                "refusing to overwrite it. Point checkpoint.save at a new directory, or set "
                "checkpoint.load to it to resume from there"
            )
        if _is_rank0():
            if target.exists():  # newer than the tracker: left by a save that never finished
                shutil.rmtree(target)
            target.mkdir(parents=True)
        _barrier()
        return target

    def _finish(self, step: int) -> None:
        """Runs on every rank once all ranks finished writing ``step``."""
        if _is_rank0():
            _write_tracker(self.root, step)
            doomed = iterations_to_delete(
                saved_iterations(self.root), step, self.cfg.keep_last, self.cfg.keep_every
            )
            for iteration in doomed:
                shutil.rmtree(iteration_dir(self.root, iteration), ignore_errors=True)
        self.pending_iteration = None

    def finalize(self, blocking: bool) -> None:
        """Complete finished background saves (all ranks must call this together)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def due(self, step: int) -> bool:
        """Whether the interval or the wall-clock budget asks for a save at ``step``."""
        by_steps = bool(self.cfg.save_interval) and step % self.cfg.save_interval == 0
        minutes = self.cfg.save_interval_minutes
        by_time = minutes is not None and time.monotonic() - self.last_save_time >= minutes * 60
        if minutes is not None and dist.is_initialized() and dist.get_world_size() > 1:
            # Clocks differ slightly across ranks; everyone follows rank 0's decision.
            flag = torch.tensor([int(by_time)])
            dist.broadcast(flag, src=0)
            by_time = bool(flag.item())
        return by_steps or by_time

    def close(self) -> None:
        if self.queue is not None:
            self.finalize(blocking=True)
            self.queue.close()


class CheckpointSaver(Callback):
    """Saves when due, finalizes background saves each step, and saves at the end."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.checkpointer.finalize(blocking=False)
        if self.checkpointer.due(trainer.step):
            self.checkpointer.save(trainer)
            metrics["checkpoint_blocked_s"] = self.checkpointer.last_blocked_s

    def on_train_end(self, trainer: Trainer) -> None:
        self.checkpointer.save(trainer, blocking=True)
        self.checkpointer.close()


# ---------------------------------------------------------------------------------------
# Loading


def _warn(message: str) -> None:
    if _is_rank0():
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


def load(trainer: Trainer, root: str | Path) -> int:
    """Load the latest checkpoint under ``root`` into the trainer; return the step to
    resume from (0 when only weights are loaded, or when there is no checkpoint yet)."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        save = trainer.cfg.checkpoint.save
        resumes_itself = save is not None and Path(root).resolve() == Path(save).resolve()
        if not resumes_itself and not Path(root).is_dir():
            raise ConfigError(
                f"checkpoint.load={root} does not exist; point it at a directory holding "
                f"{TRACKER} (or leave it unset to start from scratch)"
            )
        return 0  # nothing saved yet: the first run of a job that resumes itself
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise ConfigError(f"{root}/{TRACKER} names iteration {iteration} but {path} is missing")
    common = dist_checkpointing.load_common_state_dict(str(path))
    ckpt_cfg = trainer.cfg.checkpoint
    with_optimizer = ckpt_cfg.load_optimizer and common.get("has_optimizer", True)
    saved_layout, layout = common.get("layout", {}), _layout()
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
    sharded = _sharded_state(trainer, with_optimizer, with_rng, is_loading=True)
    state = dist_checkpointing.load(sharded, str(path))
    for key, chunk in zip(_model_keys(trainer.model), trainer.model):
        chunk.module.load_state_dict(state[key])
    trainer.extra_state.update(common.get("extra_state", {}))
    if not with_optimizer:
        return 0
    trainer.optimizer.load_state_dict(state["optimizer"])
    _untie_adam_steps(trainer.optimizer)
    trainer.scheduler.load_state_dict(state["scheduler"])
    if with_rng:
        _set_rng_state(state["rng_state"])
    trainer.consumed_samples = int(common["consumed_samples"])
    return int(common["iteration"])
