"""Qwen3-MoE: Qwen3's QK-norm attention with a top-k softmax-routed SwiGLU expert MLP
(no shared expert; dense SwiGLU layers where ``mlp_only_layers`` / ``decoder_sparse_step``
say, model.moe_layer_freq here) <-> Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B)."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.errors import ConfigError, ConvertError
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule
from megatron_forge.models.qwen3_moe.hf import qwen3_moe_rules
from megatron_forge.models.qwen3_moe.model import architecture
from megatron_forge.models.registry import ModelFamily, Serving, register

# ModelConfig options Qwen3MoeForCausalLM has no place for: (field, its plain value, why).
NOT_IN_QWEN3_MOE = (
    ("moe_router_score_function", "softmax", "its router is a softmax"),
    ("moe_router_enable_expert_bias", False, "it has no expert bias"),
    ("moe_router_num_groups", None, "it has no group-limited routing"),
    ("moe_router_topk_scaling_factor", None, "it has no routed scaling factor"),
    ("moe_shared_expert_intermediate_size", None, "it has no shared expert"),
)


@register
class Qwen3Moe(ModelFamily):
    name = "qwen3_moe"
    moe = True
    hf_architecture = "Qwen3MoeForCausalLM"
    hf_model_type = "qwen3_moe"
    # vLLM and TensorRT-LLM's PyTorch backend load Qwen3MoeForCausalLM directories.
    # to-trtllm places Mixtral's expert layout only, and TensorRT-LLM's legacy QWen builder
    # (QWenConfig.from_hugging_face) sets no top-k renormalization for qwen3_moe whatever
    # norm_topk_prob says, so engines of Qwen3-30B-A3B-style routing would differ.
    serving = Serving(vllm=True, trtllm=True, trtllm_checkpoint=False)

    def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
        return architecture(model)

    def check_config(self, model: ModelConfig) -> None:
        super().check_config(model)
        if not model.qk_layernorm:
            raise ConfigError(
                "model.family=qwen3_moe has QK-norm in every layer; set "
                "model.qk_layernorm=true (or use model.family=mixtral for an MoE without it)"
            )
        for field, plain, why in NOT_IN_QWEN3_MOE:
            value = getattr(model, field)
            if value != plain:
                raise ConfigError(
                    f"model.{field}={value!r} cannot be exported as {self.hf_architecture} "
                    f"({why}); set model.{field}={plain!r} or use model.family=deepseek_v3"
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
            "num_experts": model.num_experts,
            "num_experts_per_tok": model.moe_router_topk,
            "moe_intermediate_size": model.moe_ffn_hidden_size,
            "norm_topk_prob": model.moe_router_norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, moe in enumerate(model.moe_layer_pattern()) if not moe],
            "router_aux_loss_coef": model.moe_aux_loss_coeff,
            "output_router_logits": False,
        }

    def model_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        resolved = llama.read_hf_config(config, self.hf_model_type)
        llama.refuse_flags(self, resolved, ("attention_bias", "use_sliding_window"))
        n = resolved.num_hidden_layers
        step = resolved.decoder_sparse_step or 1
        # As Qwen3MoeDecoderLayer decides: dense when listed, or off the sparse step.
        pattern = [int(i not in resolved.mlp_only_layers and (i + 1) % step == 0) for i in range(n)]
        if 1 not in pattern:
            raise ConvertError(
                f"{self.hf_architecture} with no MoE layer (mlp_only_layers="
                f"{list(resolved.mlp_only_layers)}, decoder_sparse_step={step}) is not "
                "supported; convert it as model.family=qwen3"
            )
        return {
            "family": self.name,
            **llama.common_model_fields(resolved),
            "qk_layernorm": True,
            "num_experts": resolved.num_experts,
            "moe_router_topk": resolved.num_experts_per_tok,
            "moe_ffn_hidden_size": resolved.moe_intermediate_size,
            "moe_router_norm_topk_prob": bool(resolved.norm_topk_prob),
            "moe_aux_loss_coeff": resolved.router_aux_loss_coef,
            "moe_layer_freq": 1 if all(pattern) else pattern,
        }

    def weight_rules(self, model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
        return qwen3_moe_rules(model, vocab_size, padded_vocab)
