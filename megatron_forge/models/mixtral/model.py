"""Mixtral-style MoE decoder: the Llama block with a top-k routed SwiGLU expert MLP."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama.model import architecture as llama_architecture


def architecture(model: ModelConfig) -> dict[str, Any]:
    """Llama's fields plus megatron-core's MoE fields (aux-loss load balancing)."""
    return dict(
        llama_architecture(model),
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss",
        moe_token_dispatcher_type=model.moe_token_dispatcher,
    )
