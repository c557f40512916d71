"""Qwen3 (dense): the Llama block with QK-norm and a head size independent of the hidden
size, no QKV bias, tied embeddings for the small sizes <-> Qwen3ForCausalLM."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.errors import ConfigError
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule
from megatron_forge.models.qwen3.hf import qwen3_rules
from megatron_forge.models.qwen3.model import architecture
from megatron_forge.models.registry import ModelFamily, Serving, register


@register
class Qwen3(ModelFamily):
    name = "qwen3"
    moe = False
    hf_architecture = "Qwen3ForCausalLM"
    hf_model_type = "qwen3"
    # TensorRT-LLM's QWenForCausalLM builds Qwen3 (qwen_type qwen3: QK-norm, no QKV bias).
    serving = Serving(vllm=True, trtllm=True, trtllm_checkpoint=True)

    def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
        return architecture(model)

    def check_config(self, model: ModelConfig) -> None:
        super().check_config(model)
        if not model.qk_layernorm:
            raise ConfigError(
                "model.family=qwen3 has QK-norm in every layer; set model.qk_layernorm=true "
                "(or use model.family=llama for a model without it)"
            )

    def hf_config(self, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.hf_model_type,
            **llama.common_hf_config(model, vocab_size, model.ffn_hidden_size),
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": model.num_layers,
        }

    def model_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        resolved = llama.read_hf_config(config, self.hf_model_type)
        llama.refuse_flags(self, resolved, ("attention_bias", "use_sliding_window"))
        return {"family": self.name, **llama.common_model_fields(resolved), "qk_layernorm": True}

    def weight_rules(self, model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
        return qwen3_rules(model, vocab_size, padded_vocab)

    def trtllm_config(self, model: ModelConfig) -> dict[str, Any]:
        # TensorRT-LLM's QWenForCausalLM: qwen_type qwen3 turns on its RMSNorm QK-norm.
        return {"attn_bias": False, "qwen_type": "qwen3", "seq_length": model.seq_length}
