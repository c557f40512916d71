"""Streaming reads of a torch_dist checkpoint: one layer's (or one expert's) slice of a
global tensor at a time, whatever TP/PP/EP layout wrote it.

megatron-core stores each parameter under a global key with its full (unsharded) shape;
per-layer parameters are stacked along a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight``: [num_layers, rows, hidden]) and
expert parameters along a second, expert axis
(``decoder.layers.mlp.experts.experts.linear_fc1.weight``: [layers, experts, 2*ffn, hidden]).
Each rank saved its own chunk of those global tensors; torch.distributed.checkpoint's
planner reads any region of the global tensor from the chunks that overlap it, so a
region read here never depends on the layout, and no model is instantiated.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_forge.checkpointing import (
    TRACKER,
    iteration_dir,
    latest_iteration,
    saved_iterations,
)
from megatron_forge.checkpointing.files import (
    damaged_files,
    describe_error,
    load_common_state,
    load_metadata,
    open_reader,
    read_errors,
    verify_iteration,
)
from megatron_forge.config import ConfigError, ExportConfig, ModelConfig, from_dict
from megatron_forge.errors import CheckpointError, ConvertError
from megatron_forge.models import check_model_config

# The same parameter under megatron-core's local spec (first name) and Transformer
# Engine's MoE spec, whose pre-MLP norm is a separate module.
KEY_ALIASES = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (
        "decoder.layers.input_layernorm.weight",
    ),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": ("decoder.layers.pre_mlp_layernorm.weight",),
}


def _region_planner(requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> Any:
    """A LoadPlanner that fills ``dest`` with the region of global tensor ``key`` starting at
    ``offsets`` (one entry per key), reading only the stored chunks that overlap it."""
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(LoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
            self.metadata = metadata

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, dest) in requests.items():
                region = ChunkStorageMetadata(torch.Size(offsets), dest.shape)
                md = self.metadata.state_dict_metadata[key]
                items += create_read_items_for_chunk_list(key, md, [region])
            return LoadPlan(items)

        def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
            return global_plan

        def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
            return central_plan

        def load_bytes(self, read_item, value) -> None:
            raise RuntimeError(f"unexpected non-tensor read of {read_item.dest_index.fqn}")

        def resolve_tensor(self, read_item) -> torch.Tensor:
            dest = requests[read_item.dest_index.fqn][1]
            return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)

        def commit_tensor(self, read_item, tensor) -> None:
            pass

    return RegionPlanner()


class MegatronCheckpoint:
    """One iteration of a megatron-forge torch_dist checkpoint, opened for reading."""

    def __init__(self, root: str | Path, iteration: Optional[int] = None) -> None:
        self.root = Path(root)
        self.iteration = self._resolve_iteration(iteration)
        self.path = iteration_dir(self.root, self.iteration)
        # Every pickle is read with an allowlist of types (a shared checkpoint runs no
        # code), and missing or truncated shards are named before any output is written.
        try:
            metadata = load_metadata(self.path)
        except CheckpointError as err:
            raise self._broken([str(err)]) from None
        problems = verify_iteration(self.path, metadata=metadata)
        if problems:
            raise self._broken(problems)
        self.common = load_common_state(self.path)
        if "config" not in self.common:
            raise ConvertError(
                f"{self.path} has no 'config' in its common state: not a megatron-forge "
                "checkpoint (it stores the resolved config with every save)"
            )
        self.raw_config: dict[str, Any] = self.common["config"]
        try:
            # Only the model section matters here; other sections may come from another
            # version of megatron-forge.
            self.model: ModelConfig = from_dict({"model": self.raw_config["model"]}).model
            check_model_config(self.model)
        except (ConfigError, KeyError) as err:
            raise ConvertError(f"{self.path}: stored model config is invalid: {err}") from None

        self._metadata = metadata
        self._reader = open_reader(self.path, metadata)
        self.tensors = {
            key: md
            for key, md in metadata.state_dict_metadata.items()
            if hasattr(md, "chunks") and not key.startswith(("optimizer.", "chained_"))
        }

    def _broken(self, problems: list[str], reading: str = "") -> ConvertError:
        """The error for a damaged iteration: each problem, how to check, what to do."""
        others = [i for i in saved_iterations(self.root) if i != self.iteration]
        return ConvertError(
            f"{self.path} cannot be converted{reading}:\n  "
            + "\n  ".join(problems)
            + f"\nCheck it with: python tools/inspect_checkpoint.py {self.root} --iteration "
            f"{self.iteration} --verify; copy the checkpoint again from where it was written, "
            f"or convert another iteration with --iteration N (present: {others or 'none'})"
        )

    def _resolve_iteration(self, iteration: Optional[int]) -> int:
        if not self.root.is_dir():
            raise ConvertError(f"checkpoint directory {self.root} does not exist")
        available = saved_iterations(self.root)
        if iteration is None:
            iteration = latest_iteration(self.root)
            if iteration is None:
                raise ConvertError(
                    f"{self.root} has no {TRACKER}: not a checkpoint directory, or no save "
                    f"finished (iterations present: {available or 'none'}); pass --iteration N "
                    "to convert a specific one"
                )
        if not iteration_dir(self.root, iteration).is_dir():
            raise ConvertError(
                f"{self.root} has no iteration {iteration} (iterations present: "
                f"{available or 'none'})"
            )
        return iteration

    def resolve(self, key: str) -> str:
        """The name ``key`` (or one of its aliases) has in this checkpoint."""
        for name in (key, *KEY_ALIASES.get(key, ())):
            if name in self.tensors:
                return name
        raise ConvertError(
            f"{self.path} has no tensor {key}; its model tensors are: "
            + ", ".join(sorted(k for k in self.tensors if "." in k)[:40])
        )

    def has(self, key: str) -> bool:
        return any(name in self.tensors for name in (key, *KEY_ALIASES.get(key, ())))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[self.resolve(key)].size)

    @property
    def export(self) -> ExportConfig:
        """The stored export section (generation metadata); empty for a checkpoint saved
        before it existed."""
        try:
            return from_dict({"export": self.raw_config.get("export") or {}}).export
        except ConfigError as err:
            raise ConvertError(
                f"{self.path}: stored export metadata is invalid: {err}; fix it with "
                "export.* overrides in a training run that saves a new checkpoint"
            ) from None

    @property
    def tokenizer_path(self) -> Optional[str]:
        """data.tokenizer of the run that saved this checkpoint, if any."""
        return (self.raw_config.get("data") or {}).get("tokenizer")

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[self.resolve(key)].properties.dtype

    def read(self, key: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        """The slice ``tensor[index]`` of a global tensor: e.g. index (layer,) of a stacked
        per-layer parameter, (layer, expert) of an expert parameter, () for the whole."""
        import torch.distributed.checkpoint as dcp

        name = self.resolve(key)
        shape = self.shape(key)
        dest = torch.empty((1,) * len(index) + shape[len(index) :], dtype=self.dtype(key))
        offsets = tuple(index) + (0,) * (len(shape) - len(index))
        planner = _region_planner({name: (offsets, dest)})
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore")
                dcp.load({}, storage_reader=self._reader, planner=planner, no_dist=True)
        except read_errors() as err:  # a corrupt shard raises whatever torch hits
            files = ", ".join(map(str, damaged_files(self.path, self._metadata, name)))
            problem = f"{name} is unreadable from {files} ({describe_error(err)})"
            raise self._broken([problem], f" (reading {name})") from None
        return dest.reshape(shape[len(index) :])
