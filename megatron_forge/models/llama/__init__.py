"""Llama: the dense decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases) <-> LlamaForCausalLM;
Llama 3.x: RoPE scaling (model.rope_scaling), tied embeddings (3.2), explicit head_dim."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama import hf
from megatron_forge.models.llama.model import architecture
from megatron_forge.models.mapping import Rule
from megatron_forge.models.registry import ModelFamily, Serving, register


@register
class Llama(ModelFamily):
    name = "llama"
    moe = False
    hf_architecture = "LlamaForCausalLM"
    hf_model_type = "llama"
    serving = Serving(vllm=True, trtllm=True, trtllm_checkpoint=True)

    def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
        return architecture(model)

    def hf_config(self, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.hf_model_type,
            **hf.common_hf_config(model, vocab_size, model.ffn_hidden_size),
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
        }

    def model_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        resolved = hf.read_hf_config(config, self.hf_model_type)
        hf.refuse_flags(self, resolved, ("attention_bias", "mlp_bias"))
        return {"family": self.name, **hf.common_model_fields(resolved)}

    def check_config(self, model: ModelConfig) -> None:
        super().check_config(model)
        hf.refuse_qk_layernorm(self, model)

    def weight_rules(self, model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
        return hf.dense_rules(model, vocab_size, padded_vocab, qkv_bias=False)
