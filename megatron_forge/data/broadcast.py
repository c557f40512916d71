"""Batches read once per tensor-parallel group (Megatron-LM's ``get_batch_on_this_tp_rank``).

The ranks of a tensor-parallel group train on the same microbatches. Only its rank 0
reads them (dataset, DataLoader workers, WebDataset shards) and broadcasts the tensors
over the group; the other ranks build no DataLoader at all. Each pipeline stage gets only
what it uses: the first stage the inputs (``tokens``, ``position_ids``), the last stage the
loss targets (``labels``, ``loss_mask``), a middle stage nothing (and reads nothing). The
tensors land on this rank's device (CUDA when present), as the model expects.

Per microbatch: one broadcast of a 2-element header (the batch shape; -1 at the end of the
stream, -2 when rank 0 failed to read), one of the integer tensors stacked, and one of the
loss mask on the last stage. The values are the ones rank 0 read, bit for bit; which
samples make a batch (and so consumed samples and resume) is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_forge.errors import DataError
from megatron_forge.utils import device

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_END, _FAILED = -1, -2


def stage_keys(first_stage: bool, last_stage: bool) -> tuple[str, ...]:
    """The batch tensors a pipeline stage uses: inputs on the first, targets on the last."""
    keys: tuple[str, ...] = ()
    if first_stage:
        keys += ("tokens", "position_ids")
    if last_stage:
        keys += ("labels", "loss_mask")
    return keys


def batches_on_this_tp_rank(
    read: Callable[[], Iterator[dict[str, Any]]], broadcast: bool = True
) -> Iterator[dict[str, Any]]:
    """This rank's microbatches: ``read()`` on tensor-parallel rank 0, broadcast to the rest
    of its group (``broadcast=False``: every rank calls ``read()`` itself, as before). Keys
    a stage does not use are None."""
    from megatron.core import parallel_state as ps

    keys = stage_keys(
        ps.is_pipeline_first_stage(ignore_virtual=True),
        ps.is_pipeline_last_stage(ignore_virtual=True),
    )
    if not keys:
        return _nothing()
    if not broadcast or ps.get_tensor_model_parallel_world_size() == 1:
        return (_keep(batch, keys) for batch in read())
    group = ps.get_tensor_model_parallel_group()
    src = ps.get_tensor_model_parallel_src_rank()
    if ps.get_tensor_model_parallel_rank() == 0:
        return _send(read(), keys, src, group)
    return _receive(keys, src, group)


def _nothing() -> Iterator[dict[str, Any]]:
    while True:
        yield dict.fromkeys(BATCH_KEYS)


def _keep(batch: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = dict.fromkeys(BATCH_KEYS)
    out.update({key: batch[key].to(device(), non_blocking=True) for key in keys})
    return out


def _int_keys(keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if key != "loss_mask"]


def _header(values: list[int], src: int, group: Any) -> list[int]:
    header = torch.tensor(values, dtype=torch.int64, device=device())
    dist.broadcast(header, src, group=group)
    return header.tolist()


def _exchange(
    keys: tuple[str, ...],
    shape: list[int],
    src: int,
    group: Any,
    batch: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """One microbatch's tensors from ``src`` (which passes ``batch``), the same on all ranks."""
    out = dict.fromkeys(BATCH_KEYS)
    ints = _int_keys(keys)
    if ints:
        if batch is None:
            packed = torch.empty((len(ints), *shape), dtype=torch.int64, device=device())
        else:
            packed = torch.stack([batch[key].to(torch.int64) for key in ints]).to(device())
        dist.broadcast(packed, src, group=group)
        out.update(zip(ints, packed.unbind(0)))
    if "loss_mask" in keys:
        if batch is None:
            mask = torch.empty(shape, dtype=torch.float32, device=device())
        else:
            mask = batch["loss_mask"].to(device(), torch.float32).contiguous()
        dist.broadcast(mask, src, group=group)
        out["loss_mask"] = mask
    return out


def _send(
    batches: Iterator[dict[str, Any]], keys: tuple[str, ...], src: int, group: Any
) -> Iterator[dict[str, Any]]:
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            _header([_END, _END], src, group)
            return
        except BaseException:
            _header([_FAILED, _FAILED], src, group)  # the group fails with this rank
            raise
        _header(list(batch[keys[0]].shape), src, group)
        yield _exchange(keys, list(batch[keys[0]].shape), src, group, batch)


def _receive(keys: tuple[str, ...], src: int, group: Any) -> Iterator[dict[str, Any]]:
    while True:
        shape = _header([0, 0], src, group)
        if shape[0] == _END:
            return
        if shape[0] == _FAILED:
            raise DataError(
                f"global rank {src}, which reads the data for its tensor-parallel group, failed "
                "to read a batch; its log has the error"
            )
        yield _exchange(keys, shape, src, group)
