"""The vocabulary of weight mappings: a :class:`Rule` converts the megatron tensors of one
layer (or one expert of one layer) to Hugging Face tensors and back.

Each family lists its rules beside its definition (``megatron_forge/models/<family>/hf.py``)
with the helpers below, which encode megatron-core's layouts (see attention.py and mlp.py
in megatron-core):

- fused QKV: rows grouped per query group, [q heads of the group, k head, v head], each
  head ``head_dim`` rows; with TP each rank holds whole groups, so the global tensor has
  the same grouped layout;
- SwiGLU fc1: [gate; up] over the full ffn size (dist_checkpointing stores each TP rank's
  [gate_r; up_r] as two chunks placed at r and tp + r, which reassembles [gate; up]);
- the vocabulary is padded (to a multiple of make_vocab_size_divisible_by x TP); HF has
  exactly vocab_size rows;
- megatron's RoPE is rotate-half (not interleaved) like HF's, so q/k rows are not permuted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_forge.config import ModelConfig

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """Megatron tensors at one index <-> HF tensors.

    ``megatron`` maps global keys to the shape of one item, i.e. without the leading
    layer (and expert) axes that ``index`` selects: () for unstacked tensors, (layer,)
    or (layer, expert). ``hf`` maps HF names to shapes. Both dicts are in write order.
    """

    megatron: dict[str, tuple[int, ...]]
    hf: dict[str, tuple[int, ...]]
    to_hf: Callable[[Tensors], Tensors]
    to_megatron: Callable[[Tensors], Tensors]
    index: tuple[int, ...] = ()
    index_sizes: Optional[tuple[int, ...]] = None
    """Sizes of the axes ``index`` selects; default (num_layers, num_experts)[:len(index)]
    (set it for per-layer keys, ``decoder.layers.N.…``, whose only index is the expert)."""


def head_dim(model: ModelConfig) -> int:
    """Channels per head: model.head_dim, or hidden_size / num_attention_heads."""
    return model.attention_head_dim


# QKV ------------------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """megatron's per-group interleaved QKV rows (weight [rows, hidden] or bias [rows])
    -> HF's separate q, k, v."""
    groups, d = model.num_query_groups, head_dim(model)
    per_group = model.num_attention_heads // groups
    grouped = qkv.reshape(groups, per_group + 2, d, *qkv.shape[1:])
    q, k, v = grouped.split([per_group, 1, 1], dim=1)
    tail = qkv.shape[1:]
    return (
        q.reshape(groups * per_group * d, *tail).contiguous(),
        k.reshape(groups * d, *tail).contiguous(),
        v.reshape(groups * d, *tail).contiguous(),
    )


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig
) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    groups, d = model.num_query_groups, head_dim(model)
    per_group = model.num_attention_heads // groups
    tail = q.shape[1:]
    grouped = torch.cat(
        [
            q.reshape(groups, per_group, d, *tail),
            k.reshape(groups, 1, d, *tail),
            v.reshape(groups, 1, d, *tail),
        ],
        dim=1,
    )
    return grouped.reshape(-1, *tail)


def qkv_rows(model: ModelConfig) -> int:
    return (model.num_attention_heads + 2 * model.num_query_groups) * head_dim(model)


# SwiGLU -----------------------------------------------------------------------------------------
def split_gate_up(fc1: torch.Tensor, ffn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's fused SwiGLU fc1 [gate; up] (2*ffn rows) -> HF's gate and up."""
    gate, up = fc1.split(ffn)
    return gate.contiguous(), up.contiguous()


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_gate_up`."""
    return torch.cat([gate, up])


# Shapes -----------------------------------------------------------------------------------------
def stacked_shapes(rules: list[Rule], model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Global shape of every megatron key the rules touch (leading layer/expert axes added)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        lead = rule.index_sizes or (model.num_layers, model.num_experts)[: len(rule.index)]
        for key, shape in rule.megatron.items():
            shapes[key] = tuple(lead) + tuple(shape)
    return shapes


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to ``rows`` (megatron's vocabulary padding)."""
    if tensor.shape[0] == rows:
        return tensor
    pad = torch.zeros((rows - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad])
