"""DeepSeek-V3-style decoder: Multi-Latent Attention (low-rank q and kv latents, a rotary
part of each head shared by its key across heads, YaRN RoPE), dense SwiGLU layers first,
then routed experts with sigmoid scores, an expert bias for aux-loss-free balancing,
group-limited top-k and one shared expert; optional multi-token prediction layers."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama.model import architecture as llama_architecture
from megatron_forge.models.rope import yarn_fields


def latent_attention_fields(model: ModelConfig) -> dict[str, Any]:
    """megatron-core MLATransformerConfig fields of model.multi_latent_attention and its
    RoPE: plain (rope_type rope) or YaRN. ``qk_layernorm`` turns on the RMSNorms of the q
    and kv latents (megatron-core's MLA specs build them under that flag)."""
    scaling = model.rope_scaling
    rope = yarn_fields(scaling) if scaling is not None else {"rope_type": "rope"}
    return dict(
        multi_latent_attention=True,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        qk_layernorm=True,
        rotary_base=model.rotary_base,
        **rope,
    )


def architecture(model: ModelConfig) -> dict[str, Any]:
    """megatron-core TransformerConfig fields that make a GPTModel a DeepSeek-V3: Llama's
    RMSNorm/SwiGLU block with Multi-Latent Attention in place of its grouped-query heads
    (the router and MoE-layer fields come from model.moe_* in models.build)."""
    fields = llama_architecture(model)
    for gqa_only in ("num_query_groups", "kv_channels", "qk_layernorm"):
        del fields[gqa_only]
    return dict(
        fields,
        # As transformers' DeepseekV3TopkRouter: router logits and scores in fp32.
        moe_router_dtype="fp32",
        **latent_attention_fields(model),
    )
