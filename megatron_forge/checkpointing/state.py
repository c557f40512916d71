"""What a checkpoint holds, built from the parts it stores (model chunks, optimizer,
scheduler, :class:`TrainState`), never from a training loop.

Sharded entries (written per rank by dist_checkpointing): ``model`` (``model0``,
``model1``, ... with virtual pipeline chunks), ``optimizer`` (megatron's distributed
optimizer in its 'fully_reshardable' form: stored per global parameter, so it reshards
with the model) and ``rng_state`` (one object per (PP, TP, CP, DP) rank). Common entries
(one copy): iteration, consumed samples, scheduler, config, the parallel layout it was
written under and the callbacks' resumable state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

CHECKPOINT_VERSION = 3.0
"""Megatron-LM's checkpoint_version (its QKV layout), which its loaders check."""
CALLBACK_STATES = "callback_states"
"""Common entry holding :attr:`TrainState.callbacks`."""
LEGACY_EXTRA_STATE = "extra_state"
"""Where checkpoints written before ``callback_states`` kept the W&B run id."""
# Optimizer state stored per parameter, so it reshards with the model (TP/PP/DP changes).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """Where a run stands, beyond the model, optimizer and scheduler: what a resume needs."""

    step: int = 0
    """Optimizer steps taken (the iteration a checkpoint is named after)."""
    consumed_samples: int = 0
    """Training samples read so far; the data stream resumes there."""
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Small resumable state of callbacks by their stable key (e.g. the W&B run id under
    ``wandb``). Must be the same on every rank: rank 0's copy is the one written."""


def callback_states(common: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The callbacks' states of a checkpoint's common entries, old checkpoints included."""
    states = {key: dict(value) for key, value in (common.get(CALLBACK_STATES) or {}).items()}
    legacy = common.get(LEGACY_EXTRA_STATE) or {}
    if "wandb_run_id" in legacy:
        states.setdefault("wandb", {"run_id": legacy["wandb_run_id"]})
    return states


def parallel_layout() -> dict[str, int]:
    """This run's parallel sizes, stored with each checkpoint to compare on load."""
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


def set_rng_state(state: dict[str, Any]) -> None:
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


def model_keys(model_chunks: list[Any]) -> list[str]:
    # Megatron-LM's names: 'model' for one chunk, 'model0', 'model1', ... for VPP chunks.
    if len(model_chunks) == 1:
        return ["model"]
    return [f"model{i}" for i in range(len(model_chunks))]


def sharded_state(
    model_chunks: list[Any], optimizer: Any, with_optimizer: bool, with_rng: bool, is_loading: bool
) -> dict[str, Any]:
    """The sharded entries to save, or to load into (``is_loading``)."""
    state: dict[str, Any] = {
        key: chunk.module.sharded_state_dict()
        for key, chunk in zip(model_keys(model_chunks), model_chunks)
    }
    if with_optimizer:
        if is_loading:
            _prepare_optimizer_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
    if with_rng:
        state["rng_state"] = _sharded_rng(parallel_layout())
    return state


# ---------------------------------------------------------------------------------------
# megatron-core 0.16.1 gaps on the torch-Adam path (no TE/apex: CPU, or GPUs without TE)


def _prepare_optimizer_for_load(optimizer: Any) -> None:
    """Two gaps when loading a 'fully_reshardable' distributed optimizer state:

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


def untie_adam_steps(optimizer: Any) -> None:
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
