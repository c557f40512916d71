"""Resuming: :func:`load_checkpoint` reads the newest complete checkpoint of a root (or
``checkpoint.load_iteration``) into the parts it is given and returns the
:class:`~.state.TrainState` to continue from. :func:`iteration_to_load` says which, and
refuses rather than guesses when the tracker is lost, unreadable or names a missing
iteration (the entry point calls it at startup, before building anything).

Checkpoints written by Megatron-LM (torch_dist, either optimizer format) load too: the
optimizer format comes from the checkpoint's ``content_metadata``, the scheduler from
``opt_param_scheduler`` and the consumed samples from ``args.consumed_train_samples``
where our own entries are missing (:func:`describe_checkpoint`).

``checkpoint.load_mode`` says what is taken, as Megatron-LM's flags do: ``full``
(everything), ``no_optim`` (its --no-load-optim: the weights, iteration, consumed samples,
RNG and callback states; the optimizer and the scheduler as built, i.e. fresh) and
``finetune`` (its --finetune: the weights only, a new run at step 0). Without the
optimizer's state, its main parameters are set from the loaded weights (Megatron-LM's
``reload_model_params``), since with bf16/fp16 parameters they are separate fp32 copies.

Resharding (load under another layout): weights reshard under any TP, PP (with or without
virtual pipeline), DP and EP change. The optimizer state follows its format
(:data:`~.state.OPTIMIZER_FORMATS`): ``fully_reshardable`` reshards like the weights,
``dp_reshardable`` only across data-parallel sizes; any other change is refused with the
command that re-saves the checkpoint in the other format. RNG states are restored only
when the TP/PP/CP/DP layout is unchanged (they are per rank); otherwise a warning says
they were reseeded from train.seed. A model of another shape or family is refused by
dist_checkpointing's shape validation, naming the tensor; a vocabulary of another padded
size (which megatron-core would load silently, leaving rows untrained) by
:func:`check_vocab`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_forge.checkpointing.collective import on_rank0
from megatron_forge.checkpointing.directory import TRACKER, iteration_dir, resolve_iteration
from megatron_forge.checkpointing.files import (
    check_safe_to_load,
    load_metadata,
    read_errors,
    verify_iteration,
)
from megatron_forge.checkpointing.ownership import (
    effective_load_iteration,
    kept_from_previous_owner,
    read_owner,
)
from megatron_forge.checkpointing.state import (
    FORGE_FORMAT,
    FORGE_RNG,
    FULLY_RESHARDABLE,
    LEGACY_OPTIMIZER_FORMAT,
    OPTIMIZER_FORMATS,
    TrainState,
    callback_states,
    model_keys,
    optimizer_metadata,
    parallel_layout,
    set_megatron_rng_state,
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


@dataclass
class SavedCheckpoint:
    """What a checkpoint's common entries say about how to load it."""

    writer: str
    """"megatron-forge" or "Megatron-LM"."""
    sharding: str
    """The distributed optimizer's format (megatron-core's distrib_optim_sharding_type)."""
    content: Optional[dict[str, Any]]
    """Its content metadata (None: written before megatron-core stored any)."""
    layout: dict[str, int]
    """tensor/pipeline/context/data/expert sizes and model_chunks it was written under."""
    has_optimizer: bool
    rng: Optional[str]
    """Which RNG entry it holds: "forge", "legacy" (ours, older), "megatron" or None."""


def describe_checkpoint(common: dict[str, Any]) -> SavedCheckpoint:
    """How a checkpoint with these common entries was written (ours or Megatron-LM's)."""
    content = common.get("content_metadata")
    if "layout" in common:  # ours
        layout = {**common["layout"], "model_chunks": int(common.get("model_chunks", 0))}
        sharding = (content or {}).get("distrib_optim_sharding_type", LEGACY_OPTIMIZER_FORMAT)
        rng = "forge" if FORGE_FORMAT in common else "legacy"
        return SavedCheckpoint(
            "megatron-forge", sharding, content, layout, common.get("has_optimizer", True), rng
        )
    args = common.get("args")
    layout = {
        "tensor": int(getattr(args, "tensor_model_parallel_size", 1)),
        "pipeline": int(getattr(args, "pipeline_model_parallel_size", 1)),
        "context": int(getattr(args, "context_parallel_size", 1) or 1),
        "data": int(getattr(args, "data_parallel_size", 0) or 0),
        "expert": int(getattr(args, "expert_model_parallel_size", 1) or 1),
        "model_chunks": int(getattr(args, "virtual_pipeline_model_parallel_size", None) or 1),
    }
    if content is None:  # Megatron-LM's own fallback for checkpoints of megatron-core < 0.13
        parallel = getattr(args, "ckpt_fully_parallel_save", False)
        sharding = "fully_sharded_model_space" if parallel else "dp_zero_gather_scatter"
    else:
        sharding = content.get("distrib_optim_sharding_type", LEGACY_OPTIMIZER_FORMAT)
    has_optimizer = "optimizer" in common or not getattr(args, "no_save_optim", False)
    rng = None if getattr(args, "no_save_rng", False) else "megatron"
    return SavedCheckpoint("Megatron-LM", sharding, content, layout, has_optimizer, rng)


def check_optimizer_layout(
    saved: SavedCheckpoint, layout: dict[str, int], path: Path, root: str | Path
) -> None:
    """Refuse to load optimizer state in a format that cannot follow this layout change,
    with the command that re-saves the checkpoint in the format that can."""
    if saved.sharding in FULLY_RESHARDABLE:
        return
    fixed = ("tensor", "pipeline", "expert", "model_chunks")
    changed = [
        f"{key} {saved.layout[key]} -> {layout[key]}"
        for key in fixed
        if saved.layout.get(key) and saved.layout[key] != layout[key]
    ]
    if not changed:
        return
    names = {"tensor": "tensor", "pipeline": "pipeline", "expert": "expert"}
    own_layout = " ".join(
        f"parallel.{names[key]}={saved.layout[key]}" for key in names if key in saved.layout
    )
    supports = OPTIMIZER_FORMATS.get(saved.sharding, "its own layout only")
    raise CheckpointError(
        f"{path} holds the optimizer state in the {saved.sharding} format, which loads "
        f"only under {supports}; this run changes {', '.join(changed)}. Re-save it once in "
        f"the fully_reshardable format under its own layout, then load that copy under any "
        f"layout: python -m megatron_forge.train --config <its config> {own_layout} "
        f"checkpoint.load={root} checkpoint.save=<new directory> "
        f"checkpoint.optimizer_format=fully_reshardable train.train_iters=<its iteration + 1>; "
        "or set checkpoint.load_mode=no_optim to load the weights and continue at its "
        "iteration with a fresh optimizer and schedule (load_mode=finetune: from step 0)"
    )


def saved_vocab_rows(path: Path) -> Optional[int]:
    """Rows of the (padded) embedding table in a checkpoint, from its index (None: no
    embedding, e.g. not a GPT model)."""
    index = load_metadata(path).state_dict_metadata
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        entry = index.get(key)
        if entry is not None and hasattr(entry, "size"):
            return int(entry.size[0])
    return None


def _model_vocab_rows(model_chunks: list[Any]) -> Optional[int]:
    for chunk in model_chunks:
        rows = getattr(chunk.module, "vocab_size", None)
        if rows is not None:
            return int(rows)
    return None


def check_vocab(
    saved_rows: Optional[int],
    rows: Optional[int],
    saved: SavedCheckpoint,
    layout: dict[str, int],
    path: Path,
) -> None:
    """Refuse a checkpoint whose padded vocabulary differs from this model's.

    megatron-core loads an embedding of another size without a word (it allows a shape
    mismatch there for padding), leaving rows untrained or dropping them. The one
    difference that is only padding is our own checkpoint under another tensor-parallel
    size (the padding rounds to make_vocab_size_divisible_by x TP)."""
    if saved_rows is None or rows is None or saved_rows == rows:
        return
    if saved.writer == "megatron-forge" and saved.layout.get("tensor") != layout["tensor"]:
        return
    raise CheckpointError(
        f"{path} has a vocabulary of {saved_rows} rows (padded), this model {rows}: token "
        "ids would not match their embeddings (megatron-core would load it silently and "
        "leave rows untrained). Make the padded sizes equal: model.vocab_size (default: the "
        "tokenizer's size) rounded up to a multiple of model.make_vocab_size_divisible_by x "
        "parallel.tensor. For a Megatron-LM checkpoint, count the ids its tokenizer adds "
        "(its SentencePiece tokenizer adds 4: <CLS>, <SEP>, <EOD>, <MASK>) and set "
        "model.vocab_size and model.make_vocab_size_divisible_by to its values"
    )


def loaded_parts(load_mode: str, has_optimizer: bool) -> tuple[bool, bool]:
    """What a load under ``checkpoint.load_mode`` takes from a checkpoint (with or without
    optimizer state): (the optimizer and scheduler, the step, samples and RNG)."""
    with_optimizer = load_mode == "full" and has_optimizer
    return with_optimizer, with_optimizer or load_mode == "no_optim"


def _rng_to_load(
    ckpt_cfg: CheckpointConfig, keeps_progress: bool, saved: SavedCheckpoint, path: Path
) -> Optional[str]:
    if not (ckpt_cfg.load_rng and keeps_progress and saved.rng):
        return None
    layout = parallel_layout()
    # RNG states are per (PP, TP, CP, DP) rank; EP does not change that grid (except in
    # Megatron-LM's layout, which adds DP with expert parallelism).
    keys = ("pipeline", "tensor", "context", "data")
    if saved.rng == "megatron":
        keys += ("expert",)
    if all(saved.layout.get(k) == layout[k] for k in keys):
        return saved.rng
    shown = {k: v for k, v in saved.layout.items() if k != "model_chunks"}
    _warn(
        f"{path} was saved under layout {shown}, this run is {layout}: RNG states are not "
        "restored (reseeded from train.seed)"
    )
    return None


def _load_strategy(ckpt_cfg: CheckpointConfig, path: Path) -> Any:
    """megatron-core's default reader, spread over data-parallel (+context) ranks with
    ``checkpoint.fully_parallel_load``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    strategy = get_default_load_sharded_strategy(str(path))
    group = ps.get_data_parallel_group(with_context_parallel=True)
    if ckpt_cfg.fully_parallel_load and dist.get_world_size(group) > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, group)
    return strategy


def load_checkpoint(
    root: str | Path,
    model_chunks: list[Any],
    optimizer: Any,
    scheduler: Any,
    ckpt_cfg: CheckpointConfig,
) -> TrainState:
    """Load the latest checkpoint under ``root`` into the model chunks (and, per
    ``ckpt_cfg``, the optimizer, scheduler, RNG and callback states); return the state to resume
    from. Its step is 0 with ``load_mode=finetune``, for a checkpoint without optimizer
    state (a converted model) unless ``load_mode=no_optim``, and when a run that saves into
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
    common, saved_rows = on_rank0(lambda: (check_safe_to_load(path), saved_vocab_rows(path)))
    saved = describe_checkpoint(common)
    layout = {**parallel_layout(), "model_chunks": len(model_chunks)}
    check_vocab(saved_rows, _model_vocab_rows(model_chunks), saved, layout, path)
    mode = ckpt_cfg.load_mode
    with_optimizer, keeps_progress = loaded_parts(mode, saved.has_optimizer)
    if with_optimizer:
        check_optimizer_layout(saved, layout, path, root)
    rng = _rng_to_load(ckpt_cfg, keeps_progress, saved, path)
    metadata = optimizer_metadata(saved.sharding, saved.content)
    if saved.content is None:  # written without content metadata: its exact keys
        metadata = {k: v for k, v in metadata.items() if k != "chained_optim_avoid_prefix"}
        metadata["distrib_optim_sharding_type"] = saved.sharding
    sharded = sharded_state(model_chunks, optimizer, with_optimizer, rng, True, metadata)
    try:
        state = dist_checkpointing.load(sharded, str(path), _load_strategy(ckpt_cfg, path))
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
    # finetune starts a new run from these weights (fine-tuning, a changed recipe), so
    # callbacks start afresh too (a new W&B run rather than the old one's id).
    callbacks = callback_states(common) if mode != "finetune" else {}
    if with_optimizer:
        optimizer.load_state_dict(state["optimizer"])
        untie_adam_steps(optimizer)
        # megatron-core's load_state_dict steps the scheduler by the saved num_steps from
        # where it stands: a load into a scheduler that has run (a rollback) must start at 0.
        scheduler.num_steps = 0
        scheduler.load_state_dict(scheduler_state(state))
    elif optimizer is not None:
        # The optimizer steps its main parameters and copies them into the model's: with
        # bf16/fp16 parameters those are fp32 copies of the initial weights, which would
        # replace the loaded ones at the first step.
        optimizer.reload_model_params()
    if not keeps_progress:
        return TrainState(callbacks=callbacks)
    resumed = TrainState(callbacks=callbacks)
    if rng == "megatron":
        set_megatron_rng_state(state["rng_state"])
    elif rng is not None:
        set_rng_state(state[FORGE_RNG if rng == "forge" else "rng_state"])
    resumed.step = int(common["iteration"])
    resumed.consumed_samples = consumed_samples(common)
    return resumed


def scheduler_state(common: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's state: ours, else Megatron-LM's (``opt_param_scheduler``, or
    ``lr_scheduler`` in its older checkpoints)."""
    for key in ("scheduler", "opt_param_scheduler", "lr_scheduler"):
        if key in common:
            return common[key]
    raise CheckpointError(
        "the checkpoint holds no scheduler state (scheduler or opt_param_scheduler); set "
        "checkpoint.load_mode=no_optim to load its weights and continue at its iteration "
        "with a fresh optimizer and schedule (or load_mode=finetune to start at step 0)"
    )


def consumed_samples(common: dict[str, Any]) -> int:
    """Training samples read before the checkpoint: ours, else Megatron-LM's
    ``args.consumed_train_samples``."""
    if "consumed_samples" in common:
        return int(common["consumed_samples"])
    return int(getattr(common.get("args"), "consumed_train_samples", 0) or 0)
