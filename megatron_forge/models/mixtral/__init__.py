"""Mixtral: the Llama block with a top-k routed SwiGLU expert MLP <-> MixtralForCausalLM."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.errors import ConfigError, ConvertError
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule
from megatron_forge.models.mixtral.hf import moe_rules
from megatron_forge.models.mixtral.model import architecture
from megatron_forge.models.registry import ModelFamily, Serving, register

# ModelConfig options MixtralForCausalLM has no place for: (field, its plain value, why).
NOT_IN_MIXTRAL = (
    ("moe_router_score_function", "softmax", "its router is a softmax"),
    ("moe_router_norm_topk_prob", True, "it always renormalizes the top-k weights"),
    ("moe_router_enable_expert_bias", False, "it has no expert bias"),
    ("moe_router_num_groups", None, "it has no group-limited routing"),
    ("moe_router_topk_scaling_factor", None, "it has no routed scaling factor"),
    ("moe_shared_expert_intermediate_size", None, "it has no shared expert"),
    ("moe_layer_freq", 1, "every layer is MoE"),
)


@register
class Mixtral(ModelFamily):
    name = "mixtral"
    moe = True
    hf_architecture = "MixtralForCausalLM"
    hf_model_type = "mixtral"
    serving = Serving(vllm=True, trtllm=True, trtllm_checkpoint=True)

    def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
        return architecture(model)

    def hf_config(self, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.hf_model_type,
            **llama.common_hf_config(model, vocab_size, model.moe_ffn_hidden_size),
            "num_local_experts": model.num_experts,
            "num_experts_per_tok": model.moe_router_topk,
            "router_aux_loss_coef": model.moe_aux_loss_coeff,
            "output_router_logits": False,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        }

    def model_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        resolved = llama.read_hf_config(config, self.hf_model_type)
        fields = llama.common_model_fields(resolved)
        window = resolved.sliding_window
        if window and window < fields["max_position_embeddings"]:
            raise ConvertError(
                f"{self.hf_architecture} with sliding_window={window} is not supported "
                "(full attention only)"
            )
        return {
            "family": self.name,
            **fields,
            "num_experts": resolved.num_local_experts,
            "moe_router_topk": resolved.num_experts_per_tok,
            "moe_ffn_hidden_size": resolved.intermediate_size,
            "moe_aux_loss_coeff": resolved.router_aux_loss_coef,
        }

    def check_config(self, model: ModelConfig) -> None:
        super().check_config(model)
        llama.refuse_qk_layernorm(self, model)
        for field, plain, why in NOT_IN_MIXTRAL:
            value = getattr(model, field)
            if value != plain:
                raise ConfigError(
                    f"model.{field}={value!r} cannot be exported as {self.hf_architecture} "
                    f"({why}); set model.{field}={plain!r}, or use a family that has it"
                )

    def weight_rules(self, model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
        return moe_rules(model, vocab_size, padded_vocab)
