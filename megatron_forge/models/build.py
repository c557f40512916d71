"""Config -> megatron-core TransformerConfig, layer spec and GPTModel chunks."""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_forge.config import Config, ConfigError
from megatron_forge.models.registry import check_model_config, get_family
from megatron_forge.models.rope import apply_rope_scaling
from megatron_forge.utils import DTYPES, transformer_engine_available


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron-LM's padding: a multiple of divisible_by x TP, so each TP shard is even."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def mask_padded_vocab(chunk: Any, vocab_size: int, padded: int) -> None:
    """Give the vocabulary's padding rows no probability: their logits become the dtype's
    lowest value before the loss (training and evaluation alike), so the reported loss is
    the negative log-likelihood over the real vocabulary, equal to a Hugging Face export's
    on the same tokens, and the padding rows get no gradient. A forward hook on the output
    layer of a last-stage chunk; under TP each rank masks the columns of its own shard
    (the full width when the output is gathered)."""
    if padded == vocab_size or not getattr(chunk, "post_process", False):
        return
    from megatron.core import parallel_state

    def hook(module: Any, inputs: Any, output: tuple) -> tuple:
        logits, bias = output
        width = logits.shape[-1]
        start = 0 if width == padded else parallel_state.get_tensor_model_parallel_rank() * width
        if start + width <= vocab_size:
            return output
        padding = torch.arange(start, start + width, device=logits.device) >= vocab_size
        # In place: no second logits-sized tensor (the GEMM's output is not saved for its
        # backward, so autograd allows it and the masked columns get a zero gradient).
        return logits.masked_fill_(padding, torch.finfo(logits.dtype).min), bias

    chunk.output_layer.register_forward_hook(hook)


def build_transformer_config(cfg: Config) -> Any:
    """The megatron-core TransformerConfig for this run (architecture + layout + dtype).
    Raises ConfigError first when model.family is unknown or its rules are broken."""
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    check_model_config(cfg.model)
    on_gpu = torch.cuda.is_available()
    dtype = DTYPES[cfg.precision.params_dtype]
    p = cfg.parallel
    fields = get_family(cfg.model.family).transformer_fields(cfg.model)
    fields.update(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor_size,
        num_layers_in_first_pipeline_stage=p.layers_in_first_stage,
        num_layers_in_last_pipeline_stage=p.layers_in_last_stage,
        pipeline_model_parallel_layout=p.pipeline_layout,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Loss is summed over tokens and divided once by the global token count
        # (finalize_model_grads), so microbatches with different numbers of loss tokens
        # are weighted correctly across microbatches and data-parallel ranks.
        calculate_per_token_loss=True,
        # Fused CUDA kernels; the unfused paths compute the same math.
        persist_layer_norm=on_gpu,
        **fusion_fields(cfg),
        use_cpu_initialization=not on_gpu,
        # Over gloo, batch_isend_irecv of the interleaved schedule can pair a send to the
        # next stage with a receive from the previous one when both are the same peer
        # (PP=2), swapping activations of equal shape; megatron's unbatched even/odd
        # ordering is exact. NCCL keeps the batched (faster) path.
        batch_p2p_comm=on_gpu,
    )
    if cfg.model.num_experts is not None:
        fields["moe_grouped_gemm"] = grouped_gemm(cfg)
        fields.update(moe_fields(cfg.model))
    if cfg.parallel.context > 1:
        fields["cp_comm_type"] = cfg.parallel.cp_comm_type
    fields.update(performance_fields(cfg))
    if cfg.model.mtp_num_layers is not None:
        fields.update(
            mtp_num_layers=cfg.model.mtp_num_layers,
            mtp_loss_scaling_factor=cfg.model.mtp_loss_scaling_factor,
        )
    # Multi-Latent Attention's ranks, head dims and YaRN live in a config class of their own.
    if cfg.model.multi_latent_attention and not fields.get("multi_latent_attention"):
        raise ConfigError(
            f"model.multi_latent_attention=true is not implemented by model.family="
            f"{cfg.model.family}; use model.family=deepseek_v3 (or set it false)"
        )
    config_class = MLATransformerConfig if cfg.model.multi_latent_attention else TransformerConfig
    return config_class(**fields)


def moe_fields(model: Any) -> dict[str, Any]:
    """megatron-core's router and MoE-layer fields for model.moe_* (every MoE family).

    megatron-core expresses Hugging Face's norm_topk_prob through where the softmax goes:
    after the top-k (over the chosen logits: weights sum to 1) or before it (pre-softmax:
    the top-k of the full softmax, unnormalized). Sigmoid scores are always renormalized."""
    pre_softmax = model.moe_router_score_function == "softmax" and not (
        model.moe_router_norm_topk_prob
    )
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type=model.moe_token_dispatcher,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_router_score_function=model.moe_router_score_function,
        moe_router_pre_softmax=pre_softmax,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_router_num_groups=model.moe_router_num_groups,
        moe_router_group_topk=model.moe_router_group_topk,
        moe_z_loss_coeff=model.moe_z_loss_coeff,
        moe_expert_capacity_factor=model.moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=model.moe_pad_expert_input_to_capacity,
        moe_token_drop_policy=model.moe_token_drop_policy,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_layer_freq=model.moe_layer_freq,
    )


def grouped_gemm(cfg: Config) -> bool:
    """model.moe_grouped_gemm, or on whenever Transformer Engine's layer spec is in use."""
    choice = cfg.model.moe_grouped_gemm
    return attention_backend(cfg) == "te" if choice is None else choice


def attention_backend(cfg: Config) -> str:
    """te, sdpa or local: model.attention_backend, or the automatic choice on this machine."""
    return cfg.model.resolved_attention_backend(
        transformer_engine_available(), torch.cuda.is_available()
    )


def fusion_fields(cfg: Config) -> dict[str, bool]:
    """The fused kernels of this machine: :func:`choose_fusions` with what imports here,
    checked the way megatron-core checks (its linear layers for apex's
    fused_weight_gradient_mlp_cuda, rope_utils for TE's fused RoPE)."""
    import importlib.util

    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import layers

    on_gpu = torch.cuda.is_available()
    return choose_fusions(
        cfg.model,
        on_gpu=on_gpu,
        grad_accum_kernel=on_gpu and layers._grad_accum_fusion_available,
        rope_kernel=on_gpu and rope_utils.fused_apply_rotary_pos_emb is not None,
        softmax_kernel=on_gpu
        and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
    )


def choose_fusions(
    model: Any, *, on_gpu: bool, grad_accum_kernel: bool, rope_kernel: bool, softmax_kernel: bool
) -> dict[str, bool]:
    """TransformerConfig's fusion flags. A null model.* fusion field is on where its kernel
    exists: bias-dropout-add and bias-activation (megatron-core's jit-scripted kernels) on
    CUDA, RoPE fusion with Transformer Engine, gradient-accumulation fusion with apex's
    fused_weight_gradient_mlp_cuda (the output layer is a megatron-core linear under every
    spec). The local attention's masked-softmax fusion needs megatron's compiled softmax
    kernels (apex / the fused-kernels build): without them the local backend would fail at
    its first step on CUDA. All off on CPU."""
    if model.gradient_accumulation_fusion and not grad_accum_kernel:
        raise ConfigError(
            "model.gradient_accumulation_fusion=true needs CUDA and apex's "
            "fused_weight_gradient_mlp_cuda extension, which does not import here; set it "
            "null (on when available)"
        )

    # megatron-core fuses MLA's RoPE only for YaRN (MLATransformerConfig refuses the rest).
    yarn = model.rope_scaling is not None and model.rope_scaling.type == "yarn"
    if model.multi_latent_attention and not yarn:
        if model.apply_rope_fusion:
            raise ConfigError(
                "model.apply_rope_fusion=true: megatron-core fuses Multi-Latent Attention's "
                "RoPE only with model.rope_scaling.type=yarn; set it null"
            )
        rope_kernel = False

    def choose(value: Optional[bool], available: bool) -> bool:
        return available if value is None else value

    return {
        "bias_activation_fusion": choose(model.bias_activation_fusion, on_gpu),
        "bias_dropout_fusion": choose(model.bias_dropout_fusion, on_gpu),
        "apply_rope_fusion": choose(model.apply_rope_fusion, rope_kernel),
        "gradient_accumulation_fusion": choose(
            model.gradient_accumulation_fusion, grad_accum_kernel
        ),
        "masked_softmax_fusion": softmax_kernel,
    }


def performance_fields(cfg: Config) -> dict[str, Any]:
    """TransformerConfig fields of the GPU fast path: FP8, recompute, TP comm overlap."""
    fields: dict[str, Any] = {"tp_comm_overlap": cfg.parallel.tp_comm_overlap}
    pr = cfg.precision
    if pr.fp8 is not None:
        fields.update(
            fp8=pr.fp8,
            fp8_recipe=pr.fp8_recipe,
            fp8_amax_history_len=pr.fp8_amax_history_len,
            fp8_amax_compute_algo=pr.fp8_amax_compute_algo,
            fp8_param=pr.fp8_param_gather,
            first_last_layers_bf16=pr.first_last_layers_bf16,
            num_layers_at_start_in_bf16=pr.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=pr.num_layers_at_end_in_bf16,
        )
    r = cfg.recompute
    if r.granularity is not None:
        fields.update(
            recompute_granularity=r.granularity,
            recompute_method=r.method,
            recompute_num_layers=r.num_layers,
            recompute_modules=list(r.modules) if r.granularity == "selective" else None,
        )
    return fields


def latent_norms(cfg: Config) -> bool:
    """The spec's qk_layernorm: QK-norm, or with Multi-Latent Attention the RMSNorms of
    the q and kv latents (which megatron-core's MLA spec builds under the same flag)."""
    return cfg.model.qk_layernorm or cfg.model.multi_latent_attention


def local_attention(cfg: Config, spec: Any, backend: str) -> Any:
    """``spec`` with the core attention of backend sdpa, and for Multi-Latent Attention
    off Transformer Engine the SDPA that takes its head sizes (see models/mla.py)."""
    from megatron_forge.models.attention import use_sdpa
    from megatron_forge.models.mla import use_latent_attention

    if backend == "sdpa":
        spec = use_sdpa(spec)
    if backend != "te" and cfg.model.multi_latent_attention:
        spec = use_latent_attention(spec)
    return spec


def mtp_spec(cfg: Config, tf_config: Any, spec: Any, vp_stage: Any) -> Any:
    """The multi-token prediction block of this pipeline stage (the last one holds it),
    from the spec of the decoder's last layer; None without model.mtp_num_layers."""
    if cfg.model.mtp_num_layers is None:
        return None
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.get_gpt_mtp_block_spec(
        tf_config, spec, use_transformer_engine=attention_backend(cfg) == "te", vp_stage=vp_stage
    )


def layer_spec(cfg: Config) -> Any:
    """Transformer Engine's layer spec for attention backend te; megatron-core's local spec
    for local, and for sdpa with SDPAttention as its core attention."""
    from megatron.core.models.gpt import gpt_layer_specs

    num_experts = cfg.model.num_experts
    backend = attention_backend(cfg)
    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=num_experts is not None and grouped_gemm(cfg),
            qk_layernorm=latent_norms(cfg),
            multi_latent_attention=cfg.model.multi_latent_attention,
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=latent_norms(cfg),
        multi_latent_attention=cfg.model.multi_latent_attention,
        normalization="RMSNorm",
    )
    return local_attention(cfg, spec, backend)


def mixed_layers(cfg: Config) -> bool:
    """Whether dense and MoE layers alternate (model.moe_layer_freq / first_k_dense)."""
    return len(set(cfg.model.moe_layer_pattern())) > 1


def block_spec(cfg: Config, tf_config: Any, vp_stage: Optional[int]) -> Any:
    """The decoder block spec of this rank's pipeline stage when dense and MoE layers
    alternate: megatron-core picks each layer's spec from tf_config.moe_layer_freq."""
    from megatron.core.models.gpt import gpt_layer_specs

    backend = attention_backend(cfg)
    spec = gpt_layer_specs.get_gpt_decoder_block_spec(
        tf_config,
        use_transformer_engine=backend == "te",
        normalization="RMSNorm",
        vp_stage=vp_stage,
    )
    return local_attention(cfg, spec, backend)


def build_model(cfg: Config, tf_config: Any, vocab_size: int) -> list[Any]:
    """GPTModel chunks held by this rank: one, or one per virtual pipeline stage."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    check_model_config(cfg.model)
    spec = None if mixed_layers(cfg) else layer_spec(cfg)
    padded = padded_vocab_size(
        vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor
    )
    vp_stages = range(cfg.parallel.virtual_pipeline) if cfg.parallel.virtual_pipeline else [None]
    chunks = []
    for vp_stage in vp_stages:
        decoder_spec = spec or block_spec(cfg, tf_config, vp_stage)
        chunk = GPTModel(
            config=tf_config,
            transformer_layer_spec=decoder_spec,
            mtp_block_spec=mtp_spec(cfg, tf_config, decoder_spec, vp_stage),
            vocab_size=padded,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            vp_stage=vp_stage,
        )
        apply_rope_scaling(chunk, cfg.model)
        mask_padded_vocab(chunk, vocab_size, padded)
        chunks.append(chunk)
    return chunks
