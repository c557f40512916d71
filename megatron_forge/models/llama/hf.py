"""The Llama block <-> Hugging Face: config fields and weight rules.

Llama (``LlamaForCausalLM``) is these rules as they are; qwen2/ adds the QKV bias and
mixtral/ swaps the MLP for routed experts. See megatron_forge/models/mapping.py for the
layouts they encode.
"""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.errors import ConvertError
from megatron_forge.models.mapping import (
    Rule,
    head_dim,
    merge_gate_up,
    merge_qkv,
    pad_rows,
    qkv_rows,
    split_gate_up,
    split_qkv,
)

QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"


# Config -----------------------------------------------------------------------------------------
def common_hf_config(model: ModelConfig, vocab_size: int, intermediate: int) -> dict[str, Any]:
    """Fields every Llama-block family writes the same way."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": intermediate,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": head_dim(model),
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "initializer_range": model.init_method_std,
        "rms_norm_eps": model.norm_epsilon,
        # rope_theta for older readers (vLLM, TRT-LLM, transformers 4.x); rope_parameters
        # is transformers 5's field.
        "rope_theta": model.rotary_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base},
        "attention_dropout": 0.0,
        "tie_word_embeddings": not model.untie_embeddings,
        "use_cache": True,
    }


def rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base from either config style; refuses scaled RoPE (our model has none)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if scaling or rope_type not in ("default", None):
        raise ConvertError(
            f"RoPE scaling {scaling or params} is not supported by megatron_forge's model "
            "config (plain RoPE only); converting would change the model's outputs"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def common_model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a Llama-block HF config (shared by every family here)."""
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ConvertError(
            f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads = "
            f"{hf['hidden_size'] // heads}; megatron_forge's model config cannot express it"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU/silu only)")
    max_positions = hf.get("max_position_embeddings", 4096)
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "seq_length": min(max_positions, 4096),
        "max_position_embeddings": max_positions,
        "rotary_base": rope_theta(hf),
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "vocab_size": hf["vocab_size"],
        "untie_embeddings": not hf.get("tie_word_embeddings", False),
        "init_method_std": hf.get("initializer_range", 0.02),
    }


# Weights ----------------------------------------------------------------------------------------
def dense_rules(
    model: ModelConfig, vocab_size: int, padded_vocab: int, qkv_bias: bool
) -> list[Rule]:
    """Every weight of a dense Llama-block model (with or without the QKV bias)."""
    layers = [
        r
        for layer in range(model.num_layers)
        for r in (attention_rule(model, layer, qkv_bias), dense_mlp_rule(model, layer))
    ]
    return [
        embedding_rule(model, vocab_size, padded_vocab),
        *layers,
        *final_rules(model, vocab_size, padded_vocab),
    ]


def embedding_rule(model: ModelConfig, vocab_size: int, padded_vocab: int) -> Rule:
    return _vocab_rule(EMBEDDING, "model.embed_tokens.weight", model, vocab_size, padded_vocab)


def final_rules(model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
    out = [_copy_rule(FINAL_NORM, "model.norm.weight", (model.hidden_size,))]
    if model.untie_embeddings:
        out.append(_vocab_rule(OUTPUT, "lm_head.weight", model, vocab_size, padded_vocab))
    return out


def _vocab_rule(
    key: str, name: str, model: ModelConfig, vocab_size: int, padded_vocab: int
) -> Rule:
    hidden = model.hidden_size
    return Rule(
        megatron={key: (padded_vocab, hidden)},
        hf={name: (vocab_size, hidden)},
        to_hf=lambda t: {name: t[key][:vocab_size].contiguous()},
        to_megatron=lambda t: {key: pad_rows(t[name], padded_vocab)},
    )


def _copy_rule(key: str, name: str, shape: tuple[int, ...], index: tuple[int, ...] = ()) -> Rule:
    return Rule(
        megatron={key: shape},
        hf={name: shape},
        to_hf=lambda t: {name: t[key]},
        to_megatron=lambda t: {key: t[name]},
        index=index,
    )


def attention_rule(model: ModelConfig, layer: int, qkv_bias: bool) -> Rule:
    """Input norm, fused QKV (and its bias) and the output projection of one layer."""
    p = f"model.layers.{layer}."
    hidden, d = model.hidden_size, head_dim(model)
    q_rows, kv_rows = model.num_attention_heads * d, model.num_query_groups * d
    megatron = {INPUT_NORM: (hidden,), QKV: (qkv_rows(model), hidden)}
    hf = {
        p + "input_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (q_rows, hidden),
        p + "self_attn.k_proj.weight": (kv_rows, hidden),
        p + "self_attn.v_proj.weight": (kv_rows, hidden),
    }
    if qkv_bias:
        megatron[QKV_BIAS] = (qkv_rows(model),)
        hf.update(
            {
                p + "self_attn.q_proj.bias": (q_rows,),
                p + "self_attn.k_proj.bias": (kv_rows,),
                p + "self_attn.v_proj.bias": (kv_rows,),
            }
        )
    megatron[PROJ] = (hidden, q_rows)
    hf[p + "self_attn.o_proj.weight"] = (hidden, q_rows)

    def to_hf(t: dict) -> dict:
        out = {p + "input_layernorm.weight": t[INPUT_NORM]}
        for kind, tensor in (("weight", t[QKV]), ("bias", t.get(QKV_BIAS))):
            if tensor is not None:
                q, k, v = split_qkv(tensor, model)
                out.update(
                    {
                        p + f"self_attn.q_proj.{kind}": q,
                        p + f"self_attn.k_proj.{kind}": k,
                        p + f"self_attn.v_proj.{kind}": v,
                    }
                )
        out[p + "self_attn.o_proj.weight"] = t[PROJ]
        return out

    def to_megatron(t: dict) -> dict:
        out = {INPUT_NORM: t[p + "input_layernorm.weight"]}
        for kind, key in (("weight", QKV), ("bias", QKV_BIAS)):
            if key in megatron:
                qkv = [t[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]
                out[key] = merge_qkv(*qkv, model)
        out[PROJ] = t[p + "self_attn.o_proj.weight"]
        return out

    return Rule(megatron=megatron, hf=hf, to_hf=to_hf, to_megatron=to_megatron, index=(layer,))


def dense_mlp_rule(model: ModelConfig, layer: int) -> Rule:
    """Post-attention norm and the SwiGLU MLP: fc1 = [gate; up], fc2 = down."""
    p = f"model.layers.{layer}."
    hidden, ffn = model.hidden_size, model.ffn_hidden_size
    names = {
        "norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }

    def to_hf(t: dict) -> dict:
        gate, up = split_gate_up(t[FC1], ffn)
        return {
            names["norm"]: t[MLP_NORM],
            names["gate"]: gate,
            names["up"]: up,
            names["down"]: t[FC2],
        }

    def to_megatron(t: dict) -> dict:
        return {
            MLP_NORM: t[names["norm"]],
            FC1: merge_gate_up(t[names["gate"]], t[names["up"]]),
            FC2: t[names["down"]],
        }

    return Rule(
        megatron={MLP_NORM: (hidden,), FC1: (2 * ffn, hidden), FC2: (hidden, ffn)},
        hf={
            names["norm"]: (hidden,),
            names["gate"]: (ffn, hidden),
            names["up"]: (ffn, hidden),
            names["down"]: (hidden, ffn),
        },
        to_hf=to_hf,
        to_megatron=to_megatron,
        index=(layer,),
    )
