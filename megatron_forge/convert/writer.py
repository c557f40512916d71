"""Streaming writes of a torch_dist checkpoint that megatron_forge.train loads under any
TP/PP/EP layout, without holding the model in memory.

What to write comes from megatron-core itself: a GPTModel built on the meta device (no
memory) in a one-process world lists its sharded state: every tensor's global key,
shape and chunk (one per layer, per expert, and per half of a SwiGLU fc1), and the
``_extra_state`` objects a load expects. torch.distributed.checkpoint then writes those
chunks through a planner that computes each one only when it is written, from the
source tensors of one conversion rule at a time.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_forge.config import Config
from megatron_forge.utils import free_port

# (key, index) -> that item of the global tensor without its leading index axes
ProduceFn = Callable[[str, tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a global tensor: ``global[offset : offset + shape]``."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    num_index_axes: int
    """Leading axes that select a layer (and expert); the rest is one item's tensor."""

    @property
    def index(self) -> tuple[int, ...]:
        return self.offset[: self.num_index_axes]


def megatron_layout(cfg: Config, vocab_size: int) -> tuple[list[Chunk], dict[str, Any]]:
    """The chunks and sharded objects (unique key -> data) of ``cfg``'s model, as
    megatron-core's sharded_state_dict describes them, from a model on the meta device.

    Starts (and tears down) a one-process gloo world for megatron's parallel state.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
    )

    from megatron_forge import distributed
    from megatron_forge.models import build_model, build_transformer_config

    env = distributed.DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    distributed.initialize(cfg, env)
    try:
        tf_config = build_transformer_config(cfg)
        # Transformer Engine layers take their device from here; local layers follow the
        # default device below (use_cpu_initialization allocates without naming one).
        tf_config.init_model_with_meta_device = True
        tf_config.use_cpu_initialization = not torch.cuda.is_available()
        with torch.device("meta"):
            (model,) = build_model(cfg, tf_config, vocab_size)
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        chunks, objects = [], {}
        for item in nested_values(sharded):
            if isinstance(item, ShardedTensor):
                prepend = item.prepend_axis_num
                chunks.append(
                    Chunk(
                        key=item.key,
                        global_shape=tuple(item.global_shape),
                        offset=tuple(item.global_offset),
                        shape=(1,) * prepend + tuple(item.local_shape),
                        num_index_axes=prepend,
                    )
                )
            elif isinstance(item, ShardedObject):
                objects[item.unique_key] = item.data
        return chunks, objects
    finally:
        distributed.shutdown()


def _chunk_planner(
    chunks: list[Chunk], objects: dict[str, Any], dtype: torch.dtype, produce: ProduceFn
) -> Any:
    """A SavePlanner whose tensor data is produced lazily, chunk by chunk, as written."""
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        SavePlanner,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    by_index = {(c.key, c.offset): c for c in chunks}

    class ChunkPlanner(SavePlanner):
        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
            pass

        def create_local_plan(self) -> SavePlan:
            items = [
                WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects
            ]
            for c in chunks:
                items.append(
                    WriteItem(
                        index=MetadataIndex(c.key, torch.Size(c.offset)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(torch.Size(c.offset), torch.Size(c.shape)),
                            properties=TensorProperties(dtype=dtype),
                            size=torch.Size(c.global_shape),
                        ),
                    )
                )
            return SavePlan(items)

        def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Any]:
            return create_default_global_save_plan(all_plans)

        def finish_plan(self, new_plan: SavePlan) -> SavePlan:
            return new_plan

        def resolve_data(self, write_item: WriteItem) -> Any:
            fqn = write_item.index.fqn
            if write_item.type == WriteItemType.BYTE_IO:
                # megatron-core stores a ShardedObject as torch.save([data]).
                buffer = io.BytesIO()
                torch.save([objects[fqn]], buffer)
                buffer.seek(0)
                return buffer
            c = by_index[(fqn, tuple(write_item.index.offset))]
            item = produce(c.key, c.index)
            region = item
            for axis, (start, size) in enumerate(
                zip(c.offset[c.num_index_axes :], c.shape[c.num_index_axes :])
            ):
                region = region.narrow(axis, start, size)
            return region.reshape(c.shape).to(dtype).contiguous()

    return ChunkPlanner()


def write_torch_dist(
    path: Path,
    chunks: list[Chunk],
    objects: dict[str, Any],
    common: dict[str, Any],
    dtype: torch.dtype,
    produce: ProduceFn,
) -> None:
    """Write one iteration directory: the chunks (computed by ``produce``), the sharded
    objects, common.pt and metadata.json, as megatron-core's torch_dist backend does."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import FileSystemWriter

    path.mkdir(parents=True, exist_ok=True)
    # One file per chunk: torch's writer keeps every tensor of a file alive until the
    # file is closed, so per-chunk files bound the memory to one chunk.
    writer = FileSystemWriter(str(path), single_file_per_rank=False, sync_files=False)
    planner = _chunk_planner(chunks, objects, dtype, produce)
    dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    torch.save(common, path / "common.pt")
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(path))
