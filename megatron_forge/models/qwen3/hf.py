"""Qwen3's weight rules for Hugging Face Qwen3ForCausalLM: Llama's, plus the per-head
QK-norm weights of each layer, megatron-core's ``self_attention.q_layernorm`` /
``k_layernorm`` ([head_dim], the same on every TP rank) <-> ``self_attn.q_norm`` /
``k_norm``."""

from __future__ import annotations

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule, head_dim

Q_NORM = "decoder.layers.self_attention.q_layernorm.weight"
K_NORM = "decoder.layers.self_attention.k_layernorm.weight"


def qk_norm_rule(model: ModelConfig, layer: int) -> Rule:
    p = f"model.layers.{layer}.self_attn."
    q, k, shape = p + "q_norm.weight", p + "k_norm.weight", (head_dim(model),)
    return Rule(
        megatron={Q_NORM: shape, K_NORM: shape},
        hf={q: shape, k: shape},
        to_hf=lambda t: {q: t[Q_NORM], k: t[K_NORM]},
        to_megatron=lambda t: {Q_NORM: t[q], K_NORM: t[k]},
        index=(layer,),
    )


def qwen3_rules(model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
    """Every weight: embedding, per layer attention + QK-norm + SwiGLU MLP, final norm
    (and the output layer when untied)."""
    layers = [
        rule
        for layer in range(model.num_layers)
        for rule in (
            llama.attention_rule(model, layer, qkv_bias=False),
            qk_norm_rule(model, layer),
            llama.dense_mlp_rule(model, layer),
        )
    ]
    return [
        llama.embedding_rule(model, vocab_size, padded_vocab),
        *layers,
        *llama.final_rules(model, vocab_size, padded_vocab),
    ]
