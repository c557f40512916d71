"""Optimizer formats (dp_reshardable, fully_reshardable) and Megatron-LM interoperability
of checkpoints, on real gloo ranks with the real Trainer parts and megatron-core's
dist_checkpointing, without the training loop:

- what we write carries every common entry and content metadata Megatron-LM's loader
  reads (``megatron/training/checkpointing.py`` at core_v0.16.1: ``args`` with its
  fields, ``opt_param_scheduler``, ``rng_state`` in its layout, ``content_metadata``),
  and loading it the way that loader does (replayed here with megatron-core alone) gives
  back the same optimizer state;
- a checkpoint laid out as Megatron-LM writes it (its keys, no ``scheduler`` and no
  ``consumed_samples``) resumes in ours, in either optimizer format;
- dp_reshardable loads under another data-parallel size (Adam's step count comes back
  and the next step's loss matches the run that did not stop);
- loading into a scheduler that has run (a rollback) gives the checkpoint's schedule;
- ``checkpoint.load_mode``: ``no_optim`` (Megatron-LM's --no-load-optim) keeps the
  iteration, the consumed samples and the RNG with a fresh optimizer and schedule (its next
  step reads the next batch: the same loss as a full resume); ``finetune`` starts at step
  0; without the optimizer's state, bf16 main parameters are the loaded weights.

Refusals (an optimizer format that cannot follow a layout change, a padded vocabulary of
another size) are in test_checkpoint_rules.py; fully_reshardable under TP/PP changes in
test_checkpointing.py::test_resharding_keeps_eval_loss.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from megatron_forge.config import Config
from tests.conftest import MOCK_TINY
from tests.multiprocess import run_distributed

pytestmark = pytest.mark.slow

OVERRIDES = [*MOCK_TINY, "train.eval_interval=0", "checkpoint.async_save=false"]
# Non-daemon ranks: torch_dist writes through a multiprocessing Manager even when synchronous.
RANKS = {"overrides": OVERRIDES, "timeout_s": 300, "daemon": False}
MLM_RNG_KEYS = {
    "random_rng_state",
    "np_rng_state",
    "torch_rng_state",
    "cuda_rng_state",
    "rng_tracker_states",
}


def _cfg(cfg: Config, out: Path, name: str) -> Config:
    logging = dataclasses.replace(cfg.logging, dir=str(out / f"run_{name}"))
    return dataclasses.replace(cfg, logging=logging)


def _trainer(cfg: Config, world: int) -> Any:
    from megatron_forge.training.trainer import Trainer

    return Trainer(cfg, world, [])


def _save(trainer: Any, root: Path, fmt: str) -> Path:
    from megatron_forge.checkpointing import Checkpointer, iteration_dir

    ck = dataclasses.replace(trainer.cfg.checkpoint, optimizer_format=fmt, async_save=False)
    saver = Checkpointer(root, ck)
    saver.save(
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        trainer.train_state(),
        trainer.cfg.to_dict(),
        blocking=True,
    )
    saver.close()
    return iteration_dir(root, trainer.step)


def _load(trainer: Any, root: Path, **ck: Any) -> Any:
    from megatron_forge.checkpointing import load_checkpoint

    how = dataclasses.replace(trainer.cfg.checkpoint, load=str(root), **ck)
    return load_checkpoint(root, trainer.model, trainer.optimizer, trainer.scheduler, how)


def _optimizer_state(trainer: Any) -> list[Any]:
    """This rank's main parameters and Adam moments, in a fixed order."""
    opt = trainer.optimizer
    tensors = []
    for group in opt.optimizer.param_groups:
        for param in group["params"]:
            state = opt.optimizer.state[param]
            tensors += [param.detach().clone(), state["exp_avg"].clone()]
            tensors.append(state["exp_avg_sq"].clone())
    return tensors


def _same(a: list[Any], b: list[Any]) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _megatron_lm_load(trainer: Any, path: Path) -> dict[str, Any]:
    """Megatron-LM's load_checkpoint for torch_dist (core_v0.16.1), replayed with
    megatron-core alone: the content metadata picks the optimizer format, the request
    holds its keys, its RNG layout and its metadata, and it reads args, iteration,
    opt_param_scheduler and rng_state back as it does."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_forge.checkpointing.state import prepare_optimizer_for_load

    common = dist_checkpointing.load_common_state_dict(str(path))
    args = common["args"]
    assert isinstance(args, argparse.Namespace)
    ckpt_tp_pp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    run_tp_pp = (
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_pipeline_model_parallel_world_size(),
    )
    assert ckpt_tp_pp == run_tp_pp
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    assert metadata is not None  # else Megatron-LM assumes dp_zero_gather_scatter
    metadata = {**metadata, "dp_cp_group": mpu.get_data_parallel_group(with_context_parallel=True)}
    model = trainer.model[0].module
    request: dict[str, Any] = {"args": None, "checkpoint_version": 3.0}
    request["model"] = model.sharded_state_dict(metadata=metadata)
    # (what TE/apex's Adam gives Megatron-LM on GPUs: see state.prepare_optimizer_for_load)
    prepare_optimizer_for_load(trainer.optimizer)
    request["optimizer"] = trainer.optimizer.sharded_state_dict(
        request, metadata=metadata, is_loading=True
    )
    request["opt_param_scheduler"] = trainer.scheduler.state_dict()
    dp = mpu.get_data_parallel_rank(with_context_parallel=True)
    request["rng_state"] = ShardedObject("rng_state", [], (1, 1), (0, 0), replica_id=dp)
    state = dist_checkpointing.load(request, str(path))
    # check_checkpoint_args: these must equal the run's own args
    cfg = trainer.cfg.model
    for name, value in {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings or cfg.seq_length,
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
    }.items():
        assert getattr(args, name) == value, name
    # a RoPE run of Megatron-LM (--position-embedding-type rope) has add_position_embedding
    # True; without --no-position-embedding (deprecated) it refuses a checkpoint with False
    assert getattr(args, "add_position_embedding", True) is True
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.num_steps = 0  # Megatron-LM loads into a fresh scheduler
    trainer.scheduler.load_state_dict(state["opt_param_scheduler"])
    (rng,) = state["rng_state"]  # the list of one (no --data-parallel-random-init)
    assert set(rng) == MLM_RNG_KEYS and rng["rng_tracker_states"]
    return {
        "iteration": state["iteration"],
        "consumed": args.consumed_train_samples,
        "sharding": metadata["distrib_optim_sharding_type"],
        "content": {k: v for k, v in metadata.items() if k != "dp_cp_group"},
    }


def _write_as_megatron_lm(trainer: Any, path: Path, sharding: str) -> None:
    """A checkpoint with exactly the entries Megatron-LM's save_checkpoint writes
    (generate_state_dict + content_metadata), none of ours."""
    import random

    import numpy as np
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    metadata = {
        "distrib_optim_sharding_type": sharding,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }
    if sharding == "fully_reshardable":
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    group = mpu.get_data_parallel_group(with_context_parallel=True)
    cfg = trainer.cfg
    args = argparse.Namespace(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        data_parallel_size=mpu.get_data_parallel_world_size(),
        world_size=torch.distributed.get_world_size(),
        num_layers=cfg.model.num_layers,
        hidden_size=cfg.model.hidden_size,
        num_attention_heads=cfg.model.num_attention_heads,
        consumed_train_samples=trainer.consumed_samples,
        consumed_valid_samples=0,
        ckpt_format="torch_dist",
        use_distributed_optimizer=True,
        no_save_optim=None,
        no_save_rng=None,
    )
    rng = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }
    state: dict[str, Any] = {"args": args, "checkpoint_version": 3.0, "iteration": trainer.step}
    state["model"] = trainer.model[0].module.sharded_state_dict(
        metadata={**metadata, "dp_cp_group": group}
    )
    state["optimizer"] = trainer.optimizer.sharded_state_dict(
        state, metadata={**metadata, "dp_cp_group": group}
    )
    state["opt_param_scheduler"] = trainer.scheduler.state_dict()
    dp = mpu.get_data_parallel_rank(with_context_parallel=True)
    state["rng_state"] = ShardedObject("rng_state", [rng], (1, 1), (0, 0), replica_id=dp)
    state["num_floating_point_operations_so_far"] = 0
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, str(path), content_metadata=metadata)
    if torch.distributed.get_rank() == 0:
        (path.parent / "latest_checkpointed_iteration.txt").write_text(str(trainer.step))
    torch.distributed.barrier()


def _single_rank_run(cfg: Config, out: Path) -> float:
    """DP=1: two steps, a dp_reshardable save, then the loss of step 3."""
    trainer = _trainer(_cfg(cfg, out, "dp1"), 1)
    for _ in range(2):
        trainer.train_step()
    _save(trainer, out / "dp1", "dp_reshardable")
    return trainer.train_step()["loss"]


def _scramble(trainer: Any) -> None:
    """Zero the optimizer state and weights, so that a load has to bring them back."""
    import torch

    with torch.no_grad():
        for tensor in _optimizer_state_refs(trainer):
            tensor.zero_()


def _optimizer_state_refs(trainer: Any) -> list[Any]:
    opt = trainer.optimizer
    refs = []
    for group in opt.optimizer.param_groups:
        for param in group["params"]:
            state = opt.optimizer.state[param]
            refs += [param, state["exp_avg"], state["exp_avg_sq"]]
    return refs


def _two_rank_run(cfg: Config, out: Path) -> dict[str, Any]:
    import torch

    from megatron_forge.checkpointing.files import load_common_state
    from megatron_forge.checkpointing.loader import saved_vocab_rows

    rank = torch.distributed.get_rank()
    results: dict[str, Any] = {}
    # DP=2: a dp_reshardable checkpoint of one rank's run resumes under two ranks
    resume = _cfg(cfg, out, "dp2")
    resume.checkpoint = dataclasses.replace(resume.checkpoint, load=str(out / "dp1"))
    trainer = _trainer(resume, 2)  # loads it
    results["adam_steps"] = sorted(
        {float(s["step"]) for s in trainer.optimizer.optimizer.state.values()}
    )
    results["dp_change"] = (trainer.step, trainer.train_step()["loss"])

    mine = _optimizer_state(trainer)
    scheduler = trainer.scheduler.state_dict()
    dp_path = _save(trainer, out / "dp", "dp_reshardable")
    full_path = _save(trainer, out / "full", "fully_reshardable")
    if rank == 0:
        common = load_common_state(dp_path)
        results["common_keys"] = sorted(k for k in common if not k.startswith("model"))
        results["scheduler_same"] = common["opt_param_scheduler"] == common["scheduler"]
        results["vocab_rows"] = saved_vocab_rows(dp_path)
    # what Megatron-LM's loader reads, in both formats: the same optimizer state back
    for name, path in (("dp", dp_path), ("full", full_path)):
        _scramble(trainer)
        results[f"mlm_{name}"] = _megatron_lm_load(trainer, path)
        results[f"mlm_{name}_same"] = _same(_optimizer_state(trainer), mine)
    # checkpoints written as Megatron-LM writes them resume in ours
    for sharding in ("dp_reshardable", "fully_reshardable"):
        root = out / f"megatron_lm_{sharding}"
        _write_as_megatron_lm(trainer, root / "iter_0000003", sharding)
        _scramble(trainer)
        state = _load(trainer, root)
        results[f"ours_{sharding}"] = (state.step, state.consumed_samples)
        results[f"ours_{sharding}_same"] = _same(_optimizer_state(trainer), mine)
        # (into a scheduler that has run, as a rollback does: num_steps must not add up)
        results[f"ours_{sharding}_scheduler"] = trainer.scheduler.state_dict() == scheduler
    results.update(_weights_only_loads(cfg, out, dp_path))
    return results


def _weights_only_loads(cfg: Config, out: Path, path: Path) -> dict[str, Any]:
    """Trainers that load ``path`` (step 3, 12 samples) with each load_mode: where they
    stand, their optimizer, schedule and RNG, and their first step."""
    import torch

    from megatron_forge.training.optim import lr_curve

    # (bf16 parameters, the default, whose main parameters are separate fp32 copies)
    assert cfg.precision.params_dtype == "bf16"
    results: dict[str, Any] = {"fresh_lr": lr_curve(cfg)[0]}
    for mode in ("full", "no_optim", "finetune"):
        run = _cfg(cfg, out, mode)
        run.checkpoint = dataclasses.replace(run.checkpoint, load=str(path.parent), load_mode=mode)
        trainer = _trainer(run, 2)
        scheduler_steps = trainer.scheduler.num_steps
        before = [p.detach().clone() for p in trainer.model[0].module.parameters()]
        # (the RNG as the trainer leaves it: after the load, its data loaders draw from it)
        rng = torch.get_rng_state()
        metrics = trainer.train_step()  # at lr 0 when the schedule starts afresh (warmup)
        after = list(trainer.model[0].module.parameters())
        results[mode] = {
            "start": (trainer.step - 1, trainer.consumed_samples - 4),
            "adam_state_was_empty": _adam_steps(trainer) == [1.0],
            "scheduler_steps": scheduler_steps,
            "lr": metrics["lr"],
            "loss": metrics["loss"],
            "rng": rng,
            "weights_kept": all(torch.equal(a, b) for a, b in zip(before, after)),
        }
    return results


def _adam_steps(trainer: Any) -> list[float]:
    return sorted({float(s["step"]) for s in trainer.optimizer.optimizer.state.values()})


def test_optimizer_formats_and_megatron_lm_checkpoints(tmp_path: Path) -> None:
    (loss_dp1,) = run_distributed(_single_rank_run, 1, tmp_path, **RANKS)
    r0, _ = run_distributed(_two_rank_run, 2, tmp_path, **RANKS)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_forge.checkpointing.state import FULLY_RESHARDABLE

    assert DistributedOptimizer.checkpoint_fully_reshardable_formats == FULLY_RESHARDABLE

    step, loss_dp2 = r0["dp_change"]
    assert step == 2
    assert loss_dp2 == pytest.approx(loss_dp1, rel=1e-5)  # DP=1 -> DP=2 resumes exactly
    assert r0["vocab_rows"] == 2048
    assert r0["adam_steps"] == [2.0]  # Adam's bias correction continues at step 3

    for key in ("args", "opt_param_scheduler", "rng_state", "iteration", "checkpoint_version"):
        assert key in r0["common_keys"] or key == "rng_state", key  # rng_state is sharded
    assert "content_metadata" in r0["common_keys"] and r0["scheduler_same"]
    for name, sharding in (("dp", "dp_reshardable"), ("full", "fully_reshardable")):
        loaded = r0[f"mlm_{name}"]
        assert loaded["iteration"] == 3 and loaded["consumed"] == 12
        assert loaded["sharding"] == sharding
        assert loaded["content"]["singleton_local_shards"] is False
        assert loaded["content"]["chained_optim_avoid_prefix"] is True
        assert r0[f"mlm_{name}_same"], name

    for sharding in ("dp_reshardable", "fully_reshardable"):
        assert r0[f"ours_{sharding}"] == (3, 12)  # from args.consumed_train_samples
        assert r0[f"ours_{sharding}_same"] and r0[f"ours_{sharding}_scheduler"], sharding

    # load_mode=no_optim: step 3 and 12 samples kept, RNG restored; a fresh optimizer (Adam
    # at its first step) and schedule (warmup from the start, as Megatron-LM's); the next
    # batch gives the loss a full resume gets at step 4
    import torch

    full, no_optim = r0["full"], r0["no_optim"]
    assert full["start"] == no_optim["start"] == (3, 12)
    assert torch.equal(no_optim["rng"], full["rng"])
    assert no_optim["adam_state_was_empty"] and no_optim["scheduler_steps"] == 0
    assert not full["adam_state_was_empty"] and full["scheduler_steps"] == 12
    assert no_optim["lr"] == r0["fresh_lr"]
    assert no_optim["loss"] == pytest.approx(full["loss"], rel=1e-6)
    # load_mode=finetune: a new run at step 0 from the same weights (samples 0-3), RNG
    # from train.seed
    finetune = r0["finetune"]
    assert finetune["start"] == (0, 0) and finetune["adam_state_was_empty"]
    assert finetune["loss"] != pytest.approx(full["loss"], rel=1e-6)
    assert not torch.equal(finetune["rng"], full["rng"])
    # the optimizer's fp32 main parameters are the loaded weights, so a step at lr 0 leaves
    # the bf16 weights as loaded (else they would go back to the initialisation)
    assert no_optim["weights_kept"] and finetune["weights_kept"]
