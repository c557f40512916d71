"""Mixtral's weight rules for Hugging Face MixtralForCausalLM, under the hub's
block_sparse_moe names, which vLLM, TensorRT-LLM and transformers 4.x and 5.x all read.

megatron-core stores the experts of every layer stacked on a leading expert axis
(``decoder.layers.mlp.experts.experts.linear_fc1.weight``: [layers, experts, 2*ffn, hidden],
whatever the EP layout); each expert's fc1 is [gate; up] = [w1; w3], fc2 is w2; the router
``decoder.layers.mlp.router.weight`` [layers, experts, hidden] is ``block_sparse_moe.gate``.
"""

from __future__ import annotations

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule, merge_gate_up, split_gate_up

ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"


def moe_rules(model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
    """Every weight: Llama's attention, embedding and norms, a router and the experts."""
    out = [llama.embedding_rule(model, vocab_size, padded_vocab)]
    for layer in range(model.num_layers):
        out.append(llama.attention_rule(model, layer, qkv_bias=False))
        out.append(router_rule(model, layer))
        out.extend(expert_rule(model, layer, e) for e in range(model.num_experts))
    return out + llama.final_rules(model, vocab_size, padded_vocab)


def router_rule(model: ModelConfig, layer: int) -> Rule:
    """Pre-MLP norm and router of one layer."""
    p = f"model.layers.{layer}."
    norm, gate = p + "post_attention_layernorm.weight", p + "block_sparse_moe.gate.weight"
    return Rule(
        megatron={
            llama.MLP_NORM: (model.hidden_size,),
            ROUTER: (model.num_experts, model.hidden_size),
        },
        hf={norm: (model.hidden_size,), gate: (model.num_experts, model.hidden_size)},
        to_hf=lambda t: {norm: t[llama.MLP_NORM], gate: t[ROUTER]},
        to_megatron=lambda t: {llama.MLP_NORM: t[norm], ROUTER: t[gate]},
        index=(layer,),
    )


def expert_rule(model: ModelConfig, layer: int, expert: int) -> Rule:
    """One expert's SwiGLU: fc1 = [w1 (gate); w3 (up)], fc2 = w2 (down)."""
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
    hidden, ffn = model.hidden_size, model.moe_ffn_hidden_size

    def to_hf(t: dict) -> dict:
        gate, up = split_gate_up(t[EXPERT_FC1], ffn)
        return {p + "w1.weight": gate, p + "w2.weight": t[EXPERT_FC2], p + "w3.weight": up}

    def to_megatron(t: dict) -> dict:
        return {
            EXPERT_FC1: merge_gate_up(t[p + "w1.weight"], t[p + "w3.weight"]),
            EXPERT_FC2: t[p + "w2.weight"],
        }

    return Rule(
        megatron={EXPERT_FC1: (2 * ffn, hidden), EXPERT_FC2: (hidden, ffn)},
        hf={
            p + "w1.weight": (ffn, hidden),
            p + "w2.weight": (hidden, ffn),
            p + "w3.weight": (ffn, hidden),
        },
        to_hf=to_hf,
        to_megatron=to_megatron,
        index=(layer, expert),
    )
