"""Qwen2: the Llama block with a bias on the fused QKV projection <-> Qwen2ForCausalLM."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule
from megatron_forge.models.qwen2.model import architecture
from megatron_forge.models.registry import ModelFamily, Serving, register


@register
class Qwen2(ModelFamily):
    name = "qwen2"
    moe = False
    hf_architecture = "Qwen2ForCausalLM"
    hf_model_type = "qwen2"
    serving = Serving(vllm=True, trtllm=True, trtllm_checkpoint=True)

    def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
        return architecture(model)

    def hf_config(self, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.hf_model_type,
            **llama.common_hf_config(model, vocab_size, model.ffn_hidden_size),
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": model.num_layers,
        }

    def model_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        resolved = llama.read_hf_config(config, self.hf_model_type)
        llama.refuse_flags(self, resolved, ("use_sliding_window",))
        return {"family": self.name, **llama.common_model_fields(resolved)}

    def check_config(self, model: ModelConfig) -> None:
        super().check_config(model)
        llama.refuse_qk_layernorm(self, model)

    def weight_rules(self, model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
        return llama.dense_rules(model, vocab_size, padded_vocab, qkv_bias=True)

    def trtllm_config(self, model: ModelConfig) -> dict[str, Any]:
        # TensorRT-LLM's QWenForCausalLM reads the variant and the trained context length.
        return {"attn_bias": True, "qwen_type": "qwen2", "seq_length": model.seq_length}
