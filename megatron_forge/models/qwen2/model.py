"""Qwen2-style dense decoder: the Llama block with a bias on the fused QKV projection."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama.model import architecture as llama_architecture


def architecture(model: ModelConfig) -> dict[str, Any]:
    """Llama's TransformerConfig fields with add_qkv_bias (q/k/v biases, none elsewhere)."""
    return dict(llama_architecture(model), add_qkv_bias=True)
