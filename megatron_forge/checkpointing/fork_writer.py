"""Asynchronous torch_dist saves whose CPU tensors are staged by the fork of the writer.

megatron-core's async writer (FileSystemWriterAsync, 0.16.1) copies every CPU tensor that
is a view of a larger storage into a buffer of its own before the save returns, because
``torch.save`` of a view writes the view's whole storage. Such views are most of a CPU
checkpoint: the weights and fp32 main parameters are slices of the DDP parameter buffer.
That copy is not staging on CPU: the writer is a process forked when the save is
scheduled (TemporalAsyncCaller), so it already holds a copy-on-write snapshot of every
CPU tensor as it was at the fork, whatever training changes afterwards. Here the views
are made contiguous in the writer processes, one tensor at a time just before it is
written, and the training process only plans and forks.

What stays as in megatron-core: device tensors are copied to host memory before the fork
(its ``preload_tensors``, the device-to-host staging); CPU tensors in shared memory are
copied before the fork, views or not (a fork does not snapshot shared mappings);
files, write buckets, results and finalization are megatron-core's own. A writer that
does not fork (megatron-core's PersistentAsyncCaller, ``checkpoint.persistent_writer``)
receives its tensors through shared memory, so it keeps megatron-core's own strategy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies import torch as torch_strategies
from megatron.core.dist_checkpointing.strategies.filesystem_async import (
    FileSystemWriterAsync,
    _get_write_results_queue,
    _split_by_separation_hint,
    _split_by_size_and_type,
)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.planner import WriteItemType


def is_view(tensor: torch.Tensor) -> bool:
    """Whether ``torch.save`` of ``tensor`` would write more than its own elements
    (megatron-core's test in ``_clone_if_needed``)."""
    return tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()


def needs_copy_before_fork(tensor: torch.Tensor) -> bool:
    """A CPU tensor the fork would not snapshot: its storage is in shared memory."""
    return tensor.device.type == "cpu" and tensor.is_shared()


class ContiguousOnRead(list):
    """(write item, tensor) pairs whose views become contiguous tensors as they are read:
    in the writer process, one at a time, so it never holds more than one copy."""

    def __init__(self, pairs: list) -> None:
        super().__init__(pairs)
        self.created_in = os.getpid()

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        if os.getpid() != self.created_in:
            # A forked process: the OpenMP threads of the process it was forked from do
            # not exist here, and a copy that waits for them never returns (as in
            # PyTorch's DataLoader workers, one thread).
            torch.set_num_threads(1)
        for item, tensor in super().__iter__():
            yield item, tensor.clone() if is_view(tensor) else tensor


class ForkStagedWriter(FileSystemWriterAsync):
    """megatron-core's async writer, except that CPU views are not copied before the
    fork (see the module docstring); everything else is its own."""

    def prepare_write_data(self, plan: Any, planner: Any) -> None:
        """megatron-core's ``prepare_write_data`` (the same buckets, files and results
        queue) without copying CPU views: they reach the writer as they are."""
        bins = self.thread_count // 2 if self.separation_hint is not None else self.thread_count
        buckets = _split_by_size_and_type(bins, plan.items)
        self.write_buckets = []
        for group, group_buckets in _split_by_separation_hint(
            buckets, self.separation_hint
        ).items():
            for bucket in group_buckets:
                bytes_data = [
                    (item, planner.resolve_data(item))
                    for item in bucket
                    if item.type == WriteItemType.BYTE_IO
                ]
                tensor_data = [
                    (item, _detach(planner.resolve_data(item)))
                    for item in bucket
                    if item.type != WriteItemType.BYTE_IO
                ]
                if bytes_data or tensor_data:
                    name = f"{group}{plan.storage_data.prefix}{len(self.write_buckets)}{DEFAULT_SUFFIX}"
                    path = os.path.join(self.checkpoint_dir, name)
                    self.write_buckets.append((path, name, (bytes_data, tensor_data)))
        self.results_queue = _get_write_results_queue() if self.write_buckets else None

    def get_save_function_and_args(self) -> tuple[Any, Any, list]:
        """megatron-core's write function and device-to-host staging, the write function
        reading each bucket's tensors through :class:`ContiguousOnRead`."""
        write, preload, args = super().get_save_function_and_args()
        if write is None:
            return write, preload, args
        return partial(_write_contiguous, write), preload, args


def _detach(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.clone() if needs_copy_before_fork(tensor) else tensor


def _write_contiguous(write: Any, rank: int, write_buckets: list, results_queue: Any) -> None:
    """Runs in the forked writer, after any device-to-host staging: megatron-core's write
    of ``write_buckets``, their views made contiguous one at a time as they are written."""
    buckets = [
        (path, name, (bytes_data, ContiguousOnRead(tensor_data)))
        for path, name, (bytes_data, tensor_data) in write_buckets
    ]
    write(rank, buckets, results_queue)


class ForkStagedSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist save strategy (its cached plans and metadata included)
    writing through :class:`ForkStagedWriter`."""

    def async_save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> Any:
        with _writer_class(ForkStagedWriter):
            return super().async_save(sharded_state_dict, checkpoint_dir)

    def _get_save_and_finalize_callbacks(self, writer: Any, save_state_dict_ret: Any) -> Any:
        if not isinstance(writer, ForkStagedWriter):  # megatron-core builds it otherwise now
            raise RuntimeError(
                f"megatron-core wrote through {type(writer).__name__}, not ForkStagedWriter: "
                "megatron_forge/checkpointing/fork_writer.py needs updating for this "
                "megatron-core version"
            )
        return super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)


@contextmanager
def _writer_class(cls: type) -> Iterator[None]:
    """megatron-core 0.16.1 builds its writer inline in ``async_save`` from its module's
    ``FileSystemWriterAsync``, with no parameter for another class: that name is ``cls``
    for the duration of one ``async_save`` call (saves run on the training thread only)."""
    original = torch_strategies.FileSystemWriterAsync
    torch_strategies.FileSystemWriterAsync = cls
    try:
        yield
    finally:
        torch_strategies.FileSystemWriterAsync = original
