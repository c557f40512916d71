"""Qwen3-style dense decoder: the Llama block with QK-norm (an RMSNorm over each query and
key head, before RoPE) and a head size of its own (128, whatever the hidden size)."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama.model import architecture as llama_architecture


def architecture(model: ModelConfig) -> dict[str, Any]:
    """Llama's TransformerConfig fields; kv_channels and qk_layernorm come from the config
    (the family's rule makes qk_layernorm true)."""
    return llama_architecture(model)
