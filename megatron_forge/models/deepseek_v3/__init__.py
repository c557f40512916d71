"""DeepSeek-V3: Multi-Latent Attention with YaRN RoPE, dense layers first, then sigmoid-
routed experts with an expert bias, group-limited top-k and a shared expert, and optional
multi-token prediction <-> DeepseekV3ForCausalLM."""

from __future__ import annotations

from typing import Any

from megatron_forge.config import ModelConfig
from megatron_forge.errors import ConfigError, ConvertError
from megatron_forge.models.deepseek_v3.hf import deepseek_rules
from megatron_forge.models.deepseek_v3.model import architecture
from megatron_forge.models.llama import hf as llama
from megatron_forge.models.mapping import Rule
from megatron_forge.models.registry import ModelFamily, Serving, register


@register
class DeepseekV3(ModelFamily):
    name = "deepseek_v3"
    moe = True
    hf_architecture = "DeepseekV3ForCausalLM"
    hf_model_type = "deepseek_v3"
    # vLLM and TensorRT-LLM's PyTorch backend serve DeepseekV3ForCausalLM directories;
    # TensorRT-LLM's engine builder (trtllm-build) has no DeepSeek-V3 model.
    serving = Serving(vllm=True, trtllm=True, trtllm_checkpoint=False)
    # DeepseekV3ForCausalLM's _keep_in_fp32_modules_strict: the router's weight and the
    # expert bias that picks the top-k (megatron-core also keeps that bias in fp32).
    hf_fp32_modules = ("e_score_correction_bias", "gate.weight")

    def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
        return architecture(model)

    def check_config(self, model: ModelConfig) -> None:
        super().check_config(model)
        check_deepseek(model)

    def hf_config(self, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
        return hf_config(self, model, vocab_size)

    def model_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        return model_fields(self, config)

    def weight_rules(self, model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
        return deepseek_rules(model, vocab_size, padded_vocab)


def _fail(message: str) -> None:
    raise ConfigError(f"model.family=deepseek_v3: {message}")


def check_deepseek(model: ModelConfig) -> None:
    """What DeepseekV3ForCausalLM can express (so an export is the trained model)."""
    if not model.multi_latent_attention:
        _fail(
            "set model.multi_latent_attention=true (with q_lora_rank, kv_lora_rank, "
            "qk_head_dim, qk_pos_emb_head_dim, v_head_dim): its attention is MLA"
        )
    if model.qk_layernorm:
        _fail(
            "model.qk_layernorm=true does not apply (MLA always normalizes the q and kv "
            "latents, q_a_layernorm and kv_a_layernorm); remove it"
        )
    if model.moe_router_score_function != "sigmoid" or not model.moe_router_enable_expert_bias:
        _fail(
            "routing is sigmoid scores with an expert bias (e_score_correction_bias); set "
            "model.moe_router_score_function=sigmoid and "
            "model.moe_router_enable_expert_bias=true (moe_router_bias_update_rate=0 "
            "keeps the bias fixed)"
        )
    if model.moe_router_topk > 1 and not model.moe_router_norm_topk_prob:
        _fail(
            "the top-k weights are renormalized (norm_topk_prob); set "
            "model.moe_router_norm_topk_prob=true"
        )
    groups, group_k = model.moe_router_num_groups, model.moe_router_group_topk
    if groups is not None and model.moe_router_topk != 2 * group_k:
        _fail(
            f"group-limited routing ranks each group by its top-2 expert scores, as "
            f"megatron-core does when moe_router_topk = 2 x moe_router_group_topk; got "
            f"moe_router_topk={model.moe_router_topk} and moe_router_group_topk={group_k}"
        )
    shared, expert = model.moe_shared_expert_intermediate_size, model.moe_ffn_hidden_size
    if shared is None or shared % expert:
        _fail(
            f"it has n_shared_experts >= 1 shared experts of model.moe_ffn_hidden_size="
            f"{expert}; set model.moe_shared_expert_intermediate_size to a multiple of it "
            f"(got {shared})"
        )
    if model.moe_shared_expert_gate:
        _fail("its shared experts have no gate; set model.moe_shared_expert_gate=false")
    pattern = model.moe_layer_pattern()
    dense = pattern.index(1)
    if pattern != [0] * dense + [1] * (len(pattern) - dense):
        _fail(
            f"dense layers come first, then MoE layers only (model.moe_first_k_dense_replace);"
            f" model.moe_layer_freq gives {pattern}"
        )


def hf_config(family: ModelFamily, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
    common = llama.common_hf_config(model, vocab_size, model.ffn_hidden_size)
    del common["head_dim"]  # transformers derives it (qk_rope_head_dim)
    groups = model.moe_router_num_groups
    return {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        **common,
        "moe_intermediate_size": model.moe_ffn_hidden_size,
        "n_shared_experts": model.moe_shared_expert_intermediate_size // model.moe_ffn_hidden_size,
        "n_routed_experts": model.num_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "routed_scaling_factor": model.moe_router_topk_scaling_factor or 1.0,
        "n_group": groups or 1,
        "topk_group": model.moe_router_group_topk or 1,
        "norm_topk_prob": True,
        "first_k_dense_replace": model.moe_layer_pattern().index(1),
        "kv_lora_rank": model.kv_lora_rank,
        "q_lora_rank": model.q_lora_rank,
        "qk_rope_head_dim": model.qk_pos_emb_head_dim,
        "qk_nope_head_dim": model.qk_head_dim,
        "v_head_dim": model.v_head_dim,
        "rope_interleave": True,
        "attention_bias": False,
        "num_nextn_predict_layers": model.mtp_num_layers or 0,
        # DeepSeek's own config.json fields, which vLLM and SGLang read.
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "aux_loss_alpha": model.moe_aux_loss_coeff,
    }


def model_fields(family: ModelFamily, config: dict[str, Any]) -> dict[str, Any]:
    resolved = llama.read_hf_config(config, family.hf_model_type)
    llama.refuse_flags(family, resolved, ("attention_bias",))
    where = f"{family.hf_architecture}:"
    if not resolved.rope_interleave:
        raise ConvertError(
            f"{where} rope_interleave=false is not supported (DeepSeek-V3 checkpoints keep "
            "their rotary channels interleaved, the layout this mapping converts)"
        )
    for name, wanted in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        value = config.get(name, wanted)
        if value != wanted:
            raise ConvertError(f"{where} {name}={value!r} is not supported (only {wanted!r})")
    if not resolved.norm_topk_prob and resolved.num_experts_per_tok > 1:
        raise ConvertError(f"{where} norm_topk_prob=false is not supported")
    params = dict(resolved.rope_parameters or {})
    extra = sorted(set(params) & {"attention_factor", "truncate"})
    if extra:
        raise ConvertError(
            f"{where} rope_parameters {', '.join(f'{k}={params[k]}' for k in extra)} are not "
            "supported (YaRN with attention_factor derived from mscale, truncated ramp)"
        )
    resolved.head_dim = None  # transformers sets it to qk_rope_head_dim; MLA has no head_dim
    resolved.intermediate_size = resolved.intermediate_size
    fields = llama.common_model_fields(resolved)
    fields.pop("num_query_groups")
    if resolved.num_key_value_heads != resolved.num_attention_heads:
        raise ConvertError(f"{where} num_key_value_heads must equal num_attention_heads (MLA)")
    experts, groups = resolved.n_routed_experts, resolved.n_group or 1
    mtp = getattr(resolved, "num_nextn_predict_layers", 0) or 0
    return {
        "family": family.name,
        **fields,
        "multi_latent_attention": True,
        "q_lora_rank": resolved.q_lora_rank,
        "kv_lora_rank": resolved.kv_lora_rank,
        "qk_head_dim": resolved.qk_nope_head_dim,
        "qk_pos_emb_head_dim": resolved.qk_rope_head_dim,
        "v_head_dim": resolved.v_head_dim,
        "num_experts": experts,
        "moe_router_topk": resolved.num_experts_per_tok,
        "moe_ffn_hidden_size": resolved.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": resolved.moe_intermediate_size
        * resolved.n_shared_experts,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_norm_topk_prob": True,
        "moe_router_topk_scaling_factor": resolved.routed_scaling_factor,
        "moe_router_num_groups": groups if groups > 1 else None,
        "moe_router_group_topk": resolved.topk_group if groups > 1 else None,
        "moe_router_load_balancing_type": "seq_aux_loss",
        "moe_aux_loss_coeff": float(config.get("aux_loss_alpha", 0.0001)),
        "moe_first_k_dense_replace": resolved.first_k_dense_replace,
        "mtp_num_layers": mtp or None,
    }
