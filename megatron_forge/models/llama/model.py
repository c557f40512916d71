"""Llama-style dense decoder: RMSNorm, SwiGLU, RoPE (rotate-half, optionally scaled: see
models/rope.py), GQA, no biases; the head size and a per-head QK-norm are config fields."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from megatron_forge.config import ModelConfig


def architecture(model: ModelConfig) -> dict[str, Any]:
    """megatron-core TransformerConfig fields that make a GPTModel a Llama."""
    return dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.attention_head_dim,
        qk_layernorm=model.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
    )
