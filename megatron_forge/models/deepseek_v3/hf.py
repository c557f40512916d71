"""DeepSeek-V3's weight rules for Hugging Face DeepseekV3ForCausalLM, under the hub's
on-disk names (what transformers 5 save_pretrained writes and vLLM/SGLang read):

- Multi-Latent Attention: ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or ``q_proj``
  without a query latent) <-> megatron-core's ``linear_q_down_proj`` / ``q_layernorm`` /
  ``linear_q_up_proj`` (``linear_q_proj``); ``kv_a_proj_with_mqa`` (the kv latent, then the
  rotary key part) / ``kv_a_layernorm`` / ``kv_b_proj`` <-> ``linear_kv_down_proj`` /
  ``kv_layernorm`` / ``linear_kv_up_proj`` (the same row order); ``o_proj`` <-> ``linear_proj``.
  DeepSeek's rotary channels are interleaved pairs (x0, x1), (x2, x3)... (transformers'
  ``rope_interleave``); megatron-core's MLA reads them the same way (its RoPE takes the
  even channels, then the odd ones, when multi_latent_attention is set), so every weight
  is copied as it is.
- the first ``first_k_dense_replace`` layers: a SwiGLU ``mlp.{gate,up,down}_proj``;
- the MoE layers: ``mlp.gate.weight`` and ``mlp.gate.e_score_correction_bias`` (megatron's
  router weight and expert_bias), ``mlp.shared_experts.{gate,up,down}_proj`` and the routed
  experts ``mlp.experts.E.{gate,up,down}_proj``;
- each multi-token prediction layer k as layer ``num_hidden_layers + k``: ``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` and a full decoder layer, as DeepSeek-V3's
  checkpoints carry it (the MTP layer's embedding and head are the model's own, so
  ``embed_tokens`` / ``shared_head.head`` copies are not written; transformers ignores the
  layer, vLLM and SGLang read it for speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule, merge_gate_up, split_gate_up

SA = "self_attention."
Q_DOWN = "linear_q_down_proj.weight"
Q_NORM = "q_layernorm.weight"
Q_UP = "linear_q_up_proj.weight"
Q_PROJ = "linear_q_proj.weight"
KV_DOWN = "linear_kv_down_proj.weight"
KV_NORM = "kv_layernorm.weight"
KV_UP = "linear_kv_up_proj.weight"
PROJ = "linear_proj.weight"
ROUTER = "mlp.router.weight"
EXPERT_BIAS = "mlp.router.expert_bias"
SHARED_FC1 = "mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = "mlp.shared_experts.linear_fc2.weight"
EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"
DENSE_FC1 = "mlp.linear_fc1.weight"
DENSE_FC2 = "mlp.linear_fc2.weight"
INPUT_NORM = "self_attention.linear_qkv.layer_norm_weight"
MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
"""The pre-attention and pre-MLP norms under their canonical keys (convert/reader.py maps
megatron-core's input_layernorm / pre_mlp_layernorm onto them)."""


# Rules ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Place:
    """Where one layer's tensors are in megatron's checkpoint: stacked on a leading layer
    axis under ``decoder.layers.`` (every layer alike), or under a per-layer prefix
    (``decoder.layers.N.`` when dense and MoE layers mix, ``mtp.layers.K.transformer_layer.``)
    with no layer axis."""

    prefix: str
    index: tuple[int, ...]
    stacked: bool

    def norm(self, canonical: str, literal: str) -> str:
        # Stacked norms go by their canonical keys (convert/reader.py's aliases).
        return self.prefix + (canonical if self.stacked else literal)


def place_of(model: ModelConfig, layer: int) -> Place:
    if len(set(model.moe_layer_pattern())) == 1:
        return Place("decoder.layers.", (layer,), True)
    return Place(f"decoder.layers.{layer}.", (), False)


def _copy_rule(pairs: dict[str, tuple[str, tuple[int, ...]]], index: tuple[int, ...]) -> Rule:
    """Plain copies: {megatron key: (hf name, shape)}."""
    return Rule(
        megatron={k: s for k, (_, s) in pairs.items()},
        hf={n: s for n, s in pairs.values()},
        to_hf=lambda t: {n: t[k] for k, (n, _) in pairs.items()},
        to_megatron=lambda t: {k: t[n] for k, (n, _) in pairs.items()},
        index=index,
    )


def attention_rule(model: ModelConfig, at: Place, hf: str) -> Rule:
    """Input norm and Multi-Latent Attention of one layer (HF names under ``hf``)."""
    hidden, heads, mg = model.hidden_size, model.num_attention_heads, at.prefix + SA
    q_rows = heads * (model.qk_head_dim + model.qk_pos_emb_head_dim)
    kv_down = model.kv_lora_rank + model.qk_pos_emb_head_dim
    kv_up = heads * (model.qk_head_dim + model.v_head_dim)
    norm = at.norm(INPUT_NORM, "input_layernorm.weight")
    pairs = {norm: (hf + "input_layernorm.weight", (hidden,))}
    if model.q_lora_rank is None:
        pairs[mg + Q_PROJ] = (hf + "self_attn.q_proj.weight", (q_rows, hidden))
    else:
        rank = model.q_lora_rank
        pairs[mg + Q_DOWN] = (hf + "self_attn.q_a_proj.weight", (rank, hidden))
        pairs[mg + Q_NORM] = (hf + "self_attn.q_a_layernorm.weight", (rank,))
        pairs[mg + Q_UP] = (hf + "self_attn.q_b_proj.weight", (q_rows, rank))
    pairs[mg + KV_DOWN] = (hf + "self_attn.kv_a_proj_with_mqa.weight", (kv_down, hidden))
    pairs[mg + KV_NORM] = (hf + "self_attn.kv_a_layernorm.weight", (model.kv_lora_rank,))
    pairs[mg + KV_UP] = (hf + "self_attn.kv_b_proj.weight", (kv_up, model.kv_lora_rank))
    pairs[mg + PROJ] = (hf + "self_attn.o_proj.weight", (hidden, heads * model.v_head_dim))
    return _copy_rule(pairs, at.index)


def _swiglu_rule(
    keys: tuple[str, str],
    prefix: str,
    ffn: int,
    hidden: int,
    index: tuple[int, ...],
    index_sizes: Optional[tuple[int, ...]] = None,
    norm: Optional[tuple[str, str]] = None,
) -> Rule:
    """A SwiGLU MLP: megatron fc1 = [gate; up], fc2 = down (``keys``) <-> HF
    ``prefix{gate,up,down}_proj`` (and the pre-MLP norm when ``norm`` = (key, HF name))."""
    fc1, fc2 = keys
    gate, up, down = (prefix + f"{n}_proj.weight" for n in ("gate", "up", "down"))
    megatron = {fc1: (2 * ffn, hidden), fc2: (hidden, ffn)}
    hf = {gate: (ffn, hidden), up: (ffn, hidden), down: (hidden, ffn)}
    if norm is not None:
        megatron = {norm[0]: (hidden,), **megatron}
        hf = {norm[1]: (hidden,), **hf}

    def to_hf(t: dict) -> dict:
        g, u = split_gate_up(t[fc1], ffn)
        out = {gate: g, up: u, down: t[fc2]}
        if norm is not None:
            out[norm[1]] = t[norm[0]]
        return out

    def to_megatron(t: dict) -> dict:
        out = {fc1: merge_gate_up(t[gate], t[up]), fc2: t[down]}
        if norm is not None:
            out[norm[0]] = t[norm[1]]
        return out

    return Rule(megatron, hf, to_hf, to_megatron, index, index_sizes)


def mlp_rules(model: ModelConfig, at: Place, hf: str, moe: bool) -> list[Rule]:
    """The pre-MLP norm and the MLP of one layer: dense SwiGLU, or router (+ expert bias),
    shared expert and routed experts."""
    hidden, mg = model.hidden_size, at.prefix
    norm = (at.norm(MLP_NORM, "pre_mlp_layernorm.weight"), hf + "post_attention_layernorm.weight")
    if not moe:
        keys = (mg + DENSE_FC1, mg + DENSE_FC2)
        return [_swiglu_rule(keys, hf + "mlp.", model.ffn_hidden_size, hidden, at.index, norm=norm)]
    experts = model.num_experts
    router = _copy_rule(
        {
            norm[0]: (norm[1], (hidden,)),
            mg + ROUTER: (hf + "mlp.gate.weight", (experts, hidden)),
            mg + EXPERT_BIAS: (hf + "mlp.gate.e_score_correction_bias", (experts,)),
        },
        at.index,
    )
    shared = _swiglu_rule(
        (mg + SHARED_FC1, mg + SHARED_FC2),
        hf + "mlp.shared_experts.",
        model.moe_shared_expert_intermediate_size,
        hidden,
        at.index,
    )
    sizes = (model.num_layers, experts) if at.stacked else (experts,)
    routed = [
        _swiglu_rule(
            (mg + EXPERT_FC1, mg + EXPERT_FC2),
            hf + f"mlp.experts.{e}.",
            model.moe_ffn_hidden_size,
            hidden,
            (*at.index, e),
            sizes,
        )
        for e in range(experts)
    ]
    return [router, shared, *routed]


def decoder_layer_rules(model: ModelConfig, layer: int) -> list[Rule]:
    moe = model.moe_layer_pattern()[layer] == 1
    at, hf = place_of(model, layer), f"model.layers.{layer}."
    return [attention_rule(model, at, hf), *mlp_rules(model, at, hf, moe)]


def mtp_rules(model: ModelConfig, k: int) -> list[Rule]:
    """MTP layer k as DeepSeek-V3's layer num_hidden_layers + k: its norms of the embedding
    (enorm) and of the previous hidden state (hnorm), the projection of both (eh_proj,
    [embedding; hidden] as megatron-core concatenates them), a decoder layer like the last
    one, and its output norm (shared_head.norm)."""
    hidden, mg = model.hidden_size, f"mtp.layers.{k}."
    hf = f"model.layers.{model.num_layers + k}."
    own = _copy_rule(
        {
            mg + "enorm.weight": (hf + "enorm.weight", (hidden,)),
            mg + "hnorm.weight": (hf + "hnorm.weight", (hidden,)),
            mg + "eh_proj.weight": (hf + "eh_proj.weight", (hidden, 2 * hidden)),
            mg + "final_layernorm.weight": (hf + "shared_head.norm.weight", (hidden,)),
        },
        (),
    )
    at = Place(mg + "transformer_layer.", (), False)
    moe = model.moe_layer_pattern()[-1] == 1
    return [own, attention_rule(model, at, hf), *mlp_rules(model, at, hf, moe)]


def deepseek_rules(model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
    """Every weight: embedding, each layer, final norm, output layer (when untied), then
    the MTP layers."""
    layers = [r for layer in range(model.num_layers) for r in decoder_layer_rules(model, layer)]
    return [
        llama.embedding_rule(model, vocab_size, padded_vocab),
        *layers,
        *llama.final_rules(model, vocab_size, padded_vocab),
        *[r for k in range(model.mtp_num_layers or 0) for r in mtp_rules(model, k)],
    ]
