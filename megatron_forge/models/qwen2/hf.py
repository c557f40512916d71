"""Qwen2 <-> Hugging Face Qwen2ForCausalLM: Llama's rules with the QKV bias."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.convert.files import ConvertError
from megatron_forge.convert.mapping import Rule
from megatron_forge.models.llama import hf as llama

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPE = "qwen2"


def hf_config(model: ModelConfig, vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **llama.common_hf_config(model, vocab_size, model.ffn_hidden_size),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": model.num_layers,
    }


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise ConvertError(
            f"{ARCHITECTURE} with use_sliding_window=true is not supported (full attention only)"
        )
    return {"family": "qwen2", **llama.common_model_fields(hf)}


def rules(model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
    layers = [
        r
        for layer in range(model.num_layers)
        for r in (
            llama.attention_rule(model, layer, qkv_bias=True),
            llama.dense_mlp_rule(model, layer),
        )
    ]
    return [
        llama.embedding_rule(model, vocab_size, padded_vocab),
        *layers,
        *llama.final_rules(model, vocab_size, padded_vocab),
    ]
