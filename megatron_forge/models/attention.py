"""Core attention backends: Transformer Engine's, megatron-core's local one, and
:class:`SDPAttention` on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` computes the full ``[b, heads, s, s]`` score
matrix (and its softmax) in memory: slow and memory-hungry at seq 4096+. SDPA runs torch's
flash / memory-efficient kernels on CUDA and its blockwise flash kernel on CPU, none of
which keeps an ``s x s`` tensor, and takes grouped-query keys and values as they are
(``enable_gqa``) instead of repeating them per query head. :class:`SDPAttention` is a
drop-in for ``DotProductAttention`` in megatron-core's local layer spec: same constructor,
same ``[s, b, heads, head_dim]`` inputs and ``[s, b, hidden per partition]`` output, same
(empty) state dict and sharded state dict, so checkpoints move between backends.

``model.attention_backend`` picks the backend (``ModelConfig.resolved_attention_backend``):
``te`` is Transformer Engine's layer spec, ``sdpa`` and ``local`` are megatron-core's local
layer spec with SDPA or the unfused softmax as core attention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_forge.errors import ConfigError


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` computed by ``scaled_dot_product_attention``.

    Subclassing keeps megatron-core's constructor checks (context parallel needs TE), its
    per-partition head counts and its state-dict layout; only the forward differs. The
    softmax scale is the local path's (``softmax_scale``, else 1/sqrt(kv_channels)); its
    ``apply_query_key_layer_scaling`` divides and multiplies back by the same factor, so
    the result is the same scale."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ) -> None:
        unsupported = {
            "softmax_type": (config.softmax_type != "vanilla", config.softmax_type),
            "window_size": (config.window_size is not None, config.window_size),
        }
        for field, (bad, value) in unsupported.items():
            if bad:
                raise ConfigError(
                    f"model.attention_backend=sdpa cannot compute attention with "
                    f"{field}={value} (torch's scaled_dot_product_attention has plain "
                    "softmax and no sliding window); set model.attention_backend to te or local"
                )
        super().__init__(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        self.dropout_p = self.attention_dropout.p
        self.sdpa_scale = softmax_scale
        if softmax_scale is None:
            self.sdpa_scale = self.hidden_size_per_attention_head**-0.5

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ConfigError(
                "model.attention_backend=sdpa supports neither packed sequences nor an "
                "attention bias; set model.attention_backend=te"
            )
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        mask = None
        causal = False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attends
        elif mask_type == AttnMaskType.causal and query.size(0) > 1:
            causal = True
        sq, b, heads, _ = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        attend = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=causal,
            scale=self.sdpa_scale,
            enable_gqa=heads != k.size(1),
        )
        if dropout_p and not self.config.sequence_parallel:
            # As the local path: dropout under the model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, n, sq, d] -> [sq, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def walk_spec(spec: Any, visit: Callable[[Any], bool]) -> None:
    """Call ``visit`` once on every dataclass node of a (nested) megatron-core module spec;
    a node for which it returns True is not descended into."""
    seen: set[int] = set()

    def walk(node: Any) -> None:
        if isinstance(node, (list, tuple)):
            for child in node:
                walk(child)
            return
        if not dataclasses.is_dataclass(node) or isinstance(node, type) or id(node) in seen:
            return
        seen.add(id(node))
        if visit(node):
            return
        for field in dataclasses.fields(node):
            walk(getattr(node, field.name))

    walk(spec)


def use_sdpa(spec: Any) -> Any:
    """``spec`` (a layer or block spec built from megatron-core's local specs, for any
    family) with every ``DotProductAttention`` core attention replaced by
    :class:`SDPAttention`, in place."""

    def visit(node: Any) -> bool:
        for field in dataclasses.fields(node):
            if getattr(node, field.name) is DotProductAttention:
                setattr(node, field.name, SDPAttention)
        return False

    walk_spec(spec, visit)
    return spec
