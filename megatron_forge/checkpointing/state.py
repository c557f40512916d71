"""What a checkpoint holds, built from the parts it stores (model chunks, optimizer,
scheduler, :class:`TrainState`), never from a training loop.

Sharded entries (written per rank by dist_checkpointing): ``model`` (``model0``,
``model1``, ... with virtual pipeline chunks), ``optimizer`` (megatron's distributed
optimizer in the format ``checkpoint.optimizer_format`` names, see
:data:`OPTIMIZER_FORMATS`), ``rng_state`` (Megatron-LM's layout: one list of RNG states
per (PP, TP) rank, or per (PP, TP, DP) rank with expert parallelism) and
``forge_rng_state`` (one object per (PP, TP, CP, DP) rank: every rank's own, which an
exact resume needs). Common entries (one copy): iteration, consumed samples, scheduler,
config, the parallel layout it was written under, the callbacks' resumable state, and
Megatron-LM's own common entries (``args``, ``opt_param_scheduler``,
``checkpoint_version``) beside ours; megatron-core's ``content_metadata`` records the
optimizer format under Megatron-LM's field names.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_VERSION = 3.0
"""Megatron-LM's checkpoint_version (its QKV layout), which its loaders check."""
CALLBACK_STATES = "callback_states"
"""Common entry holding :attr:`TrainState.callbacks`."""
LEGACY_EXTRA_STATE = "extra_state"
"""Where checkpoints written before ``callback_states`` kept the W&B run id."""
FORGE_RNG = "forge_rng_state"
"""Sharded entry holding every rank's own RNG states (Megatron-LM's ``rng_state`` keeps
only one data-parallel rank's)."""
FORGE_FORMAT = "forge_format"
"""Common entry: the version of this layout (absent: written before Megatron-LM's common
entries and content metadata were, when ``rng_state`` was ours)."""
FORMAT_VERSION = 2
OPTIMIZER_FORMATS = {
    "dp_reshardable": "the same tensor, pipeline and expert parallel sizes (and virtual "
    "pipeline chunks); data parallel may change",
    "fully_reshardable": "any tensor, pipeline, expert, context or data parallel sizes",
}
"""What each optimizer format loads under. ``dp_reshardable`` (Megatron-LM's default)
writes each rank's distributed-optimizer buckets as they are, with no gather: the
fastest save and load, tied to the bucket layout. ``fully_reshardable`` gathers each
parameter's state across data-parallel ranks into its global shape on save."""
FULLY_RESHARDABLE = frozenset({"fully_reshardable", "fully_sharded_model_space", "fsdp_dtensor"})
"""megatron-core's DistributedOptimizer.checkpoint_fully_reshardable_formats (0.16.1),
here so that checking a layout does not import the optimizer."""
LEGACY_OPTIMIZER_FORMAT = "fully_reshardable"
"""What checkpoints written before content metadata hold."""


def optimizer_metadata(sharding_type: str, content: Optional[dict[str, Any]] = None) -> dict:
    """The metadata Megatron-LM passes to ``sharded_state_dict`` (its
    ``_build_sharded_state_dict_metadata``): ``content`` (a checkpoint's content
    metadata) when loading one, else Megatron-LM's defaults for ``sharding_type``."""
    from megatron.core import parallel_state as ps

    if content is None:
        content = {
            "distrib_optim_sharding_type": sharding_type,
            "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True,
        }
        if sharding_type == "fully_reshardable":
            content["distrib_optim_fully_reshardable_mem_efficient"] = False
    if not ps.model_parallel_is_initialized():  # (megatron-core then uses its default)
        return dict(content)
    return {**content, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def content_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """What megatron-core stores as the checkpoint's ``content_metadata`` (no groups)."""
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization

    return _clean_metadata_for_serialization(metadata)


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


def megatron_args(
    config: dict[str, Any], state: TrainState, layout: dict[str, int], with_optimizer: bool
) -> argparse.Namespace:
    """Megatron-LM's ``args`` entry: what its loader reads back (the TP/PP sizes for its
    resharding checks, the consumed samples, the fields ``check_checkpoint_args``
    compares) with Megatron-LM's names."""
    model, train = config.get("model", {}), config.get("train", {})
    parallel = config.get("parallel", {})
    heads = model.get("num_attention_heads")
    layout = {k: layout.get(k, 1) for k in ("tensor", "pipeline", "context", "data", "expert")}
    return argparse.Namespace(
        tensor_model_parallel_size=layout["tensor"],
        pipeline_model_parallel_size=layout["pipeline"],
        virtual_pipeline_model_parallel_size=parallel.get("virtual_pipeline"),
        context_parallel_size=layout["context"],
        expert_model_parallel_size=layout["expert"],
        data_parallel_size=layout["data"],
        world_size=layout["tensor"] * layout["pipeline"] * layout["context"] * layout["data"],
        iteration=state.step,
        consumed_train_samples=state.consumed_samples,
        skipped_train_samples=0,
        consumed_valid_samples=0,
        num_layers=model.get("num_layers"),
        hidden_size=model.get("hidden_size"),
        ffn_hidden_size=model.get("ffn_hidden_size"),
        num_attention_heads=heads,
        num_query_groups=model.get("num_query_groups") or heads,
        seq_length=model.get("seq_length"),
        max_position_embeddings=model.get("max_position_embeddings") or model.get("seq_length"),
        position_embedding_type="rope",
        # What a Megatron-LM RoPE run has (--position-embedding-type rope; its deprecated
        # --no-position-embedding would make it False) and check_checkpoint_args compares.
        add_position_embedding=True,
        make_vocab_size_divisible_by=model.get("make_vocab_size_divisible_by"),
        num_experts=model.get("num_experts"),
        micro_batch_size=train.get("micro_batch_size"),
        global_batch_size=train.get("global_batch_size"),
        train_iters=train.get("train_iters"),
        seed=train.get("seed"),
        use_distributed_optimizer=True,
        ckpt_format="torch_dist",
        no_save_optim=not with_optimizer,
        no_save_rng=False,
        data_parallel_random_init=False,
    )


def megatron_rng_state() -> dict[str, Any]:
    """This rank's RNG states under Megatron-LM's names (its ``get_rng_state``). The CUDA
    state is there when CUDA is (a CPU run has none to store)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }
    try:  # (on CPU, megatron_forge.cpu's emulation answers for CUDA)
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    except (AssertionError, RuntimeError):  # no CUDA and no emulation: nothing to store
        pass
    return state


def set_megatron_rng_state(states: list[dict[str, Any]]) -> None:
    """Restore the first of a list of Megatron-LM RNG states (as its loader does without
    ``--data-parallel-random-init``)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    if state.get("rng_tracker_states"):
        get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def megatron_sharded_rng(layout: dict[str, int]) -> Any:
    """Megatron-LM's ``rng_state`` entry for this rank (its ``get_rng_state`` for
    torch_dist): a (PP, TP) grid replicated over data parallel, or (PP, TP, DP) with
    expert parallelism."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dp = ps.get_data_parallel_rank(with_context_parallel=True)
    states = [megatron_rng_state()]
    if layout["expert"] > 1:
        dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
        shape = (layout["pipeline"], layout["tensor"], dp_size)
        return ShardedObject("rng_state", states, shape, (pp, tp, dp), replica_id=0)
    shape = (layout["pipeline"], layout["tensor"])
    return ShardedObject("rng_state", states, shape, (pp, tp), replica_id=dp)


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


def _sharded_rng(layout: dict[str, int], key: str = FORGE_RNG) -> Any:
    """This rank's RNG states as one entry of a (PP, TP, CP, DP) grid of objects (under
    ``rng_state`` in checkpoints older than :data:`FORGE_FORMAT`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (layout["pipeline"], layout["tensor"], layout["context"], layout["data"])
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_context_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject(key, _rng_state(), shape, offset, replica_id=0)


def model_keys(model_chunks: list[Any]) -> list[str]:
    # Megatron-LM's names: 'model' for one chunk, 'model0', 'model1', ... for VPP chunks.
    if len(model_chunks) == 1:
        return ["model"]
    return [f"model{i}" for i in range(len(model_chunks))]


def sharded_state(
    model_chunks: list[Any],
    optimizer: Any,
    with_optimizer: bool,
    rng: Optional[str],
    is_loading: bool,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """The sharded entries to save, or to load into (``is_loading``). ``metadata`` is
    :func:`optimizer_metadata`'s; ``rng`` says which RNG entries: ``"save"`` (both),
    ``"forge"``, ``"megatron"`` or ``"legacy"`` (one, to load), None (none)."""
    state: dict[str, Any] = {
        key: chunk.module.sharded_state_dict(metadata=metadata)
        for key, chunk in zip(model_keys(model_chunks), model_chunks)
    }
    if with_optimizer:
        if is_loading:
            prepare_optimizer_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=metadata
        )
    layout = parallel_layout()
    if rng in ("save", "megatron"):
        state["rng_state"] = megatron_sharded_rng(layout)
    if rng in ("save", "forge"):
        state[FORGE_RNG] = _sharded_rng(layout)
    if rng == "legacy":
        state["rng_state"] = _sharded_rng(layout, key="rng_state")
    return state


# ---------------------------------------------------------------------------------------
# megatron-core 0.16.1 gaps on the torch-Adam path (no TE/apex: CPU, or GPUs without TE)


def prepare_optimizer_for_load(optimizer: Any) -> None:
    """Two gaps when loading a 'fully_reshardable' distributed optimizer state:

    - sharded_state_dict(is_loading=True) reads Adam's 'step' first, which a never-stepped
      optimizer lacks; megatron's own dummy initialisation (replaced by the load) fills it.
    - load_parameter_state_from_fully_reshardable copies every key of the live state,
      including torch Adam's 'step', from a source that (by design) omits it, raising
      KeyError. 'step' is restored separately from param_groups by load_state_dict, so
      the per-parameter copy only has to skip keys the source does not carry (and, in
      the dp_reshardable format, the source's keys that are not state).
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
    with torch.no_grad():  # fp32 training: the main parameter is a view of the model's
        for key, value in tensors.items():
            # dp_reshardable entries also carry their bucket offsets, a padding flag and
            # 'step': the live optimizer's tensor from before the load (a non-persistent
            # entry), whose copy would undo the step load_state_dict restored.
            if key != "step" and key in destination and torch.is_tensor(value):
                destination[key].copy_(value)
