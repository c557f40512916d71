"""Qwen3-MoE decoder: Qwen3's attention block (QK-norm, a head size of its own) with a
top-k softmax-routed SwiGLU expert MLP in every layer and no shared expert."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama.model import architecture as llama_architecture


def architecture(model: ModelConfig) -> dict[str, Any]:
    """Llama's TransformerConfig fields (kv_channels and qk_layernorm from the config); the
    router and MoE fields come from models.build.moe_fields, as for every MoE family."""
    return llama_architecture(model)
