"""Qwen3-MoE's weight rules for Hugging Face Qwen3MoeForCausalLM, under the per-expert
names hub checkpoints use on disk (``mlp.experts.E.{gate,up,down}_proj.weight``,
``mlp.gate.weight``). transformers 5 holds each layer's experts fused in memory
(``experts.gate_up_proj`` [experts, 2*ffn, hidden], ``experts.down_proj``) but reads and
writes these per-expert names (its conversion mapping), as vLLM and TensorRT-LLM do.

megatron-core stores the experts stacked (see mixtral/hf.py): fc1 = [gate; up] of each
expert, fc2 = down; the router ``decoder.layers.mlp.router.weight`` is ``mlp.gate``.
"""

from __future__ import annotations

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule, merge_gate_up, split_gate_up
from megatron_forge.models.mixtral.hf import EXPERT_FC1, EXPERT_FC2, ROUTER
from megatron_forge.models.qwen3.hf import qk_norm_rule

STACKED = "decoder.layers."


def qwen3_moe_rules(model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
    """Every weight: embedding; per layer attention, QK-norm, and router and experts (or,
    in a dense layer, ``mlp_only_layers``, a SwiGLU of ffn_hidden_size); the final norm (and
    the output layer when untied). When dense and MoE layers mix, megatron-core saves each
    layer under its own prefix (``decoder.layers.N.``), not stacked: see :func:`per_layer`."""
    pattern = model.moe_layer_pattern()
    mixed = len(set(pattern)) > 1
    out = [llama.embedding_rule(model, vocab_size, padded_vocab)]
    for layer, is_moe in enumerate(pattern):
        rules = [llama.attention_rule(model, layer, qkv_bias=False), qk_norm_rule(model, layer)]
        if is_moe:
            rules.append(router_rule(model, layer))
            rules.extend(expert_rule(model, layer, e) for e in range(model.num_experts))
        else:
            rules.append(llama.dense_mlp_rule(model, layer))
        out.extend(per_layer(rule, model) if mixed else rule for rule in rules)
    return out + llama.final_rules(model, vocab_size, padded_vocab)


def per_layer(rule: Rule, model: ModelConfig) -> Rule:
    """``rule`` (stacked keys, index (layer, ...)) for a checkpoint that keeps each layer
    under ``decoder.layers.N.``: the same tensors under per-layer keys, the layer axis gone
    from the index (megatron-core's non-homogeneous layers, transformer_block.py). The
    norms keep their fused names (``self_attention.linear_qkv.layer_norm_weight``,
    ``mlp.linear_fc1.layer_norm_weight``): the local spec saves them so, as TE's fused
    layers do."""
    layer = rule.index[0]
    keys = {key: f"{STACKED}{layer}.{key[len(STACKED) :]}" for key in rule.megatron}
    stacked = {v: k for k, v in keys.items()}
    return Rule(
        megatron={keys[k]: shape for k, shape in rule.megatron.items()},
        hf=rule.hf,
        to_hf=lambda t: rule.to_hf({stacked[k]: v for k, v in t.items()}),
        to_megatron=lambda t: {keys[k]: v for k, v in rule.to_megatron(t).items()},
        index=rule.index[1:],
        index_sizes=(model.num_experts,)[: len(rule.index) - 1] or None,
    )


def router_rule(model: ModelConfig, layer: int) -> Rule:
    """Pre-MLP norm and router (``mlp.gate``) of one layer."""
    p = f"model.layers.{layer}."
    norm, gate = p + "post_attention_layernorm.weight", p + "mlp.gate.weight"
    h, n = model.hidden_size, model.num_experts
    return Rule(
        megatron={llama.MLP_NORM: (h,), ROUTER: (n, h)},
        hf={norm: (h,), gate: (n, h)},
        to_hf=lambda t: {norm: t[llama.MLP_NORM], gate: t[ROUTER]},
        to_megatron=lambda t: {llama.MLP_NORM: t[norm], ROUTER: t[gate]},
        index=(layer,),
    )


def expert_rule(model: ModelConfig, layer: int, expert: int) -> Rule:
    """One expert's SwiGLU: fc1 = [gate_proj; up_proj], fc2 = down_proj."""
    p = f"model.layers.{layer}.mlp.experts.{expert}."
    gate, up, down = p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"
    hidden, ffn = model.hidden_size, model.moe_ffn_hidden_size

    def to_hf(t: dict) -> dict:
        g, u = split_gate_up(t[EXPERT_FC1], ffn)
        return {gate: g, up: u, down: t[EXPERT_FC2]}

    def to_megatron(t: dict) -> dict:
        return {EXPERT_FC1: merge_gate_up(t[gate], t[up]), EXPERT_FC2: t[down]}

    return Rule(
        megatron={EXPERT_FC1: (2 * ffn, hidden), EXPERT_FC2: (hidden, ffn)},
        hf={gate: (ffn, hidden), up: (ffn, hidden), down: (hidden, ffn)},
        to_hf=to_hf,
        to_megatron=to_megatron,
        index=(layer, expert),
    )
