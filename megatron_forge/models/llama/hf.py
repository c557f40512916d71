"""The Llama block <-> Hugging Face: config fields and weight rules.

Llama (``LlamaForCausalLM``) is these rules as they are; qwen2/ adds the QKV bias and
mixtral/ swaps the MLP for routed experts. See megatron_forge/models/mapping.py for the
layouts they encode.
"""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.config.schema import ROPE_SCALING_FIELDS
from megatron_forge.errors import ConfigError, ConvertError
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
        **rope_hf_config(model),
        "attention_dropout": 0.0,
        "tie_word_embeddings": not model.untie_embeddings,
        "use_cache": True,
    }


def rope_hf_config(model: ModelConfig) -> dict[str, Any]:
    """RoPE in both spellings: ``rope_theta`` and ``rope_scaling`` (the hub's Llama 3.1
    form, which transformers 4.x, vLLM and TensorRT-LLM read) and ``rope_parameters``
    (transformers 5, which prefers it and reads the 4.x form when it is absent)."""
    scaling = model.rope_scaling
    fields = {} if scaling is None else scaling.to_dict()
    rope_type = fields.pop("type", "default")
    return {
        "rope_theta": model.rotary_base,
        "rope_scaling": {"rope_type": rope_type, **fields} if scaling is not None else None,
        "rope_parameters": {"rope_type": rope_type, "rope_theta": model.rotary_base, **fields},
    }


def read_hf_config(config: dict[str, Any], model_type: str) -> Any:
    """config.json as transformers itself reads it for ``model_type``: the transformers
    config class fills what the file omits with that architecture's own defaults (Mixtral's
    rms_norm_eps is not Llama's) and turns either RoPE spelling (transformers 4's
    ``rope_scaling`` + ``rope_theta``, transformers 5's ``rope_parameters``) into
    ``rope_parameters``. ConvertError when transformers cannot read the file."""
    from transformers import CONFIG_MAPPING

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as err:  # transformers raises KeyError, ValueError, its own errors
        raise ConvertError(
            f"config.json: transformers cannot read it as a {model_type!r} config "
            f"({type(err).__name__}: {err}); fix the field it names"
        ) from None


def rope_fields(hf: Any) -> dict[str, Any]:
    """``rotary_base`` and ``rope_scaling`` of a transformers config; ConvertError for a
    RoPE type we do not implement (converting would change the model's outputs)."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:  # transformers 4.x: rope_theta beside rope_scaling
        params = {"rope_type": "default", **(hf.rope_scaling or {}), "rope_theta": hf.rope_theta}
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConvertError(
            f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']} is not "
            "supported (RoPE over the whole head only)"
        )
    if rope_type not in ("default", *ROPE_SCALING_FIELDS):
        raise ConvertError(
            f"RoPE scaling of type {rope_type!r} ({params}) is not supported; supported: "
            f"{['default', *ROPE_SCALING_FIELDS]}. Converting it as another type would "
            "change the model's outputs"
        )
    scaling = None
    if rope_type != "default":
        needed = ROPE_SCALING_FIELDS[rope_type]
        missing = [name for name in needed if params.get(name) is None]
        if missing:
            raise ConvertError(
                f"RoPE scaling of type {rope_type!r} lacks {', '.join(missing)} in config.json "
                f"(rope_scaling / rope_parameters: {params})"
            )
        scaling = {"type": rope_type, **{name: params[name] for name in needed}}
    return {"rotary_base": float(params["rope_theta"]), "rope_scaling": scaling}


def common_model_fields(hf: Any) -> dict[str, Any]:
    """ModelConfig fields of a Llama-block family's transformers config (see
    :func:`read_hf_config`), shared by every family here."""
    heads = hf.num_attention_heads
    if hf.hidden_act != "silu":
        raise ConvertError(f"hidden_act={hf.hidden_act!r} is not supported (SwiGLU/silu only)")
    # As the transformers attention modules size their heads.
    head_size = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    max_positions = hf.max_position_embeddings
    return {
        "num_layers": hf.num_hidden_layers,
        "hidden_size": hf.hidden_size,
        "ffn_hidden_size": hf.intermediate_size,
        "num_attention_heads": heads,
        "num_query_groups": getattr(hf, "num_key_value_heads", None) or heads,
        "head_dim": None if head_size * heads == hf.hidden_size else head_size,
        "seq_length": min(max_positions, 4096),
        "max_position_embeddings": max_positions,
        **rope_fields(hf),
        "norm_epsilon": hf.rms_norm_eps,
        "vocab_size": hf.vocab_size,
        "untie_embeddings": not hf.tie_word_embeddings,
        "init_method_std": hf.initializer_range,
    }


FULL_ATTENTION_ONLY = {"use_sliding_window": " (full attention only)"}
"""Flags whose refusal says why, beside the plain "is not supported"."""


def refuse_flags(family: Any, resolved: Any, flags: tuple[str, ...]) -> None:
    """ConvertError when a resolved HF config turns on one of ``flags`` (attention or MLP
    biases, sliding windows...) that the family's model cannot express."""
    for flag in flags:
        if getattr(resolved, flag, False):
            raise ConvertError(
                f"{family.hf_architecture} with {flag}=true is not supported"
                + FULL_ATTENTION_ONLY.get(flag, "")
            )


def refuse_qk_layernorm(family: Any, model: ModelConfig) -> None:
    """The rule of families whose Hugging Face architecture has no QK-norm."""
    if model.qk_layernorm:
        raise ConfigError(
            f"model.qk_layernorm=true is not part of model.family={family.name} "
            f"({family.hf_architecture} has no QK-norm, so its exports would lose it); use "
            "model.family=qwen3 for a dense model with QK-norm, or set model.qk_layernorm=false"
        )


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
