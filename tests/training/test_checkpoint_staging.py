"""An asynchronous save is the state at the save, whatever training does meanwhile.

On CPU the background writer is forked when the save is scheduled and makes the tensor
views contiguous itself (megatron_forge/checkpointing/fork_writer.py): the training
process copies nothing. Two gloo ranks (DP=2, dp_reshardable: the weights and main
parameters are views of the DDP buffers) save asynchronously and at once change every
parameter and optimizer state in place and train a step, while the writer writes. The
checkpoint must load back as the state at the save, bit for bit, each tensor written as
its own elements (not its whole buffer, which ``torch.save`` of a view writes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from megatron_forge.config import Config
from tests.conftest import MOCK_TINY
from tests.multiprocess import run_distributed

pytestmark = pytest.mark.slow

OVERRIDES = [*MOCK_TINY, "train.eval_interval=0"]


def _tensors(trainer: Any) -> list[Any]:
    """This rank's weights, main parameters and Adam moments (live tensors)."""
    opt = trainer.optimizer
    tensors = [p for chunk in trainer.model for p in chunk.parameters()]
    for group in opt.optimizer.param_groups:
        for param in group["params"]:
            state = opt.optimizer.state[param]
            tensors += [param, state["exp_avg"], state["exp_avg_sq"]]
    return tensors


def _snapshot(trainer: Any) -> list[Any]:
    return [t.detach().clone() for t in _tensors(trainer)]


def _same(a: list[Any], b: list[Any]) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _largest_overhead(path: Path) -> int:
    """The most bytes any tensor of the checkpoint takes beyond its own elements (a view
    saved as it is would take its whole buffer)."""
    import math

    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    overheads = []
    for index, info in metadata.storage_data.items():
        tensor = metadata.state_dict_metadata[index.fqn]
        if not isinstance(tensor, TensorStorageMetadata):
            continue
        (chunk,) = [c for c in tensor.chunks if torch.Size(c.offsets) == index.offset]
        itemsize = torch.empty((), dtype=tensor.properties.dtype).element_size()
        overheads.append(info.length - math.prod(chunk.sizes) * itemsize)
    return max(overheads)


def _save_and_train(cfg: Config, out: Path) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from megatron_forge.checkpointing import Checkpointer, iteration_dir, load_checkpoint
    from megatron_forge.checkpointing.fork_writer import is_view
    from megatron_forge.training.trainer import Trainer

    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, dir=str(out / "run")))
    trainer = Trainer(cfg, 2, [])
    trainer.train_step()
    state = (trainer.model, trainer.optimizer, trainer.scheduler)
    result: dict[str, Any] = {"views": sum(is_view(t) for t in _tensors(trainer))}
    saver = Checkpointer(out / "async", dataclasses.replace(cfg.checkpoint, async_save=True))
    saver.save(*state, trainer.train_state(), cfg.to_dict())
    at_save = _snapshot(trainer)
    step = trainer.step
    with torch.no_grad():  # training goes on while the writer writes
        for tensor in _tensors(trainer):
            tensor.add_(1.0)
    trainer.train_step()
    result["pending_while_training"] = saver.pending_iteration == step
    saver.finalize(blocking=True)
    saver.close()
    result["changed"] = not _same(_snapshot(trainer), at_save)
    dist.barrier()
    if dist.get_rank() == 0:
        result["overhead"] = _largest_overhead(iteration_dir(out / "async", step))

    how = dataclasses.replace(cfg.checkpoint, load=str(out / "async"))
    loaded = load_checkpoint(out / "async", *state, how)
    result["loaded_step"] = loaded.step
    result["same_as_at_save"] = _same(_snapshot(trainer), at_save)
    return result


def test_async_save_is_the_state_at_the_save_while_training_goes_on(tmp_path: Path) -> None:
    r0, r1 = run_distributed(
        _save_and_train, 2, tmp_path, overrides=OVERRIDES, timeout_s=300, daemon=False
    )
    assert r0["views"] > 0  # the case megatron-core copies before the fork
    for r in (r0, r1):
        assert r["pending_while_training"] and r["changed"]
        assert r["loaded_step"] == 1
        assert r["same_as_at_save"]
    # views written as their own elements (and torch.save's header), not their buffers
    assert 0 < r0["overhead"] < 4096
