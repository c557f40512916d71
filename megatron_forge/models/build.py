"""Config -> megatron-core TransformerConfig, layer spec and GPTModel chunks."""

from __future__ import annotations

from typing import Any

import torch

from megatron_forge.config import Config
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
    from megatron.core.transformer.transformer_config import TransformerConfig

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
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=on_gpu,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        # Over gloo, batch_isend_irecv of the interleaved schedule can pair a send to the
        # next stage with a receive from the previous one when both are the same peer
        # (PP=2), swapping activations of equal shape; megatron's unbatched even/odd
        # ordering is exact. NCCL keeps the batched (faster) path.
        batch_p2p_comm=on_gpu,
    )
    if cfg.model.num_experts is not None:
        fields["moe_grouped_gemm"] = grouped_gemm(cfg)
    if cfg.parallel.context > 1:
        fields["cp_comm_type"] = cfg.parallel.cp_comm_type
    fields.update(performance_fields(cfg))
    return TransformerConfig(**fields)


def grouped_gemm(cfg: Config) -> bool:
    """model.moe_grouped_gemm, or on whenever Transformer Engine is usable."""
    choice = cfg.model.moe_grouped_gemm
    return transformer_engine_available() if choice is None else choice


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


def layer_spec(cfg: Config) -> Any:
    """Transformer Engine's layer spec when TE is usable, megatron-core's local spec else."""
    from megatron.core.models.gpt import gpt_layer_specs

    num_experts = cfg.model.num_experts
    if transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=num_experts is not None and grouped_gemm(cfg),
            qk_layernorm=cfg.model.qk_layernorm,
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=cfg.model.qk_layernorm,
        normalization="RMSNorm",
    )


def build_model(cfg: Config, tf_config: Any, vocab_size: int) -> list[Any]:
    """GPTModel chunks held by this rank: one, or one per virtual pipeline stage."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    check_model_config(cfg.model)
    spec = layer_spec(cfg)
    padded = padded_vocab_size(
        vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor
    )
    vp_stages = range(cfg.parallel.virtual_pipeline) if cfg.parallel.virtual_pipeline else [None]
    chunks = []
    for vp_stage in vp_stages:
        chunk = GPTModel(
            config=tf_config,
            transformer_layer_spec=spec,
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
