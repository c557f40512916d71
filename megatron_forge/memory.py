"""GPU memory of a config at a world size: the arithmetic behind the estimates in configs/.

:func:`estimate_memory` counts, for the most loaded GPU (the first or last pipeline stage):

- weights: this GPU's share of the parameters (layers split over PP, dense matrices over
  TP, experts over EP x expert-TP (``parallel.expert_tensor``, TP by default), shared
  experts over TP, vocabulary over TP; the embedding on the first stage, the output layer
  and final norm on the last; an MoE model's dense layers as dense), at
  ``precision.params_dtype``. With uneven stages (``parallel.layers_in_first_stage`` /
  ``layers_in_last_stage``, or ``parallel.pipeline_layout``) every stage is counted with
  its own layers, a middle stage
  ``i`` holding ``min(PP - i, microbatches)`` microbatches in flight;
- gradients: megatron DDP's gradient buffer, fp32 (``grad_reduce_in_fp32``);
- optimizer state: Adam's m and v plus an fp32 master copy for 16-bit params (12 bytes per
  parameter; 8 for fp32 params, which are their own master), sharded over the
  data-parallel ranks (x context parallel; expert-data-parallel for experts) when
  ``parallel.use_distributed_optimizer`` (ZeRO-1);
- activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"), without recomputation ``s*b*h*(34 + 5*a*s/h)`` bytes per layer and
  microbatch (16-bit activations), divided by TP with sequence parallelism, else
  ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``; ``s`` is the sequence per context-parallel rank.
  Attention's 8 of the 34 (Q, K, V, the output projection's input) scale with the heads'
  width, heads x head_dim, when ``model.head_dim`` makes it differ from h.
  Fused (flash) attention, Transformer Engine's on the GPUs these recipes target, stores
  no ``s x s`` scores, so the ``5*a*s/h`` term is counted only for the unfused attention of
  megatron-core's local layer spec (``--unfused-attention``; e.g. without TE).
  The first stage holds ``min(PP, microbatches)`` microbatches in flight under 1F1B
  (x ``1 + (PP-1)/(PP*VP)`` when interleaved). ``recompute`` reduces this: selective
  recompute of core attention drops the score term, of the MLP (``mlp`` or ``moe``) its
  16 bytes per token of fc1 and activation outputs; full recompute keeps a layer's input;
  the last stage adds one microbatch of logits and fp32 softmax (6 bytes x tokens x vocab/TP).

It is an estimate, not a bound: SwiGLU and top-k MoE MLPs store more than the paper's GPT
MLP, and the CUDA context, NCCL buffers, logits and fragmentation come on top
(keep several GB free on an 80 GB GPU). Sizes are in GB of 2**30 bytes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

from megatron_forge.config import Config, ConfigError, ModelConfig, load_config
from megatron_forge.models import check_model_config, padded_vocab_size

GB = 2**30
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}
GRAD_BYTES = 4  # megatron DDP's grad buffer is fp32 (training/optim.py: grad_reduce_in_fp32)


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of the most loaded GPU, in GB (2**30 bytes)."""

    world_size: int
    num_params: int
    """Parameters of the whole model (padded vocabulary)."""
    params_per_gpu: int
    """Parameters held by the most loaded GPU."""
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    stage: str
    """Which pipeline stage this is: 'first', 'last' or 'only' (PP=1)."""

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb

    def __str__(self) -> str:
        return (
            f"{self.total_gb:.1f} GB/GPU = weights {self.weights_gb:.1f} + grads "
            f"{self.grads_gb:.1f} + optimizer {self.optimizer_gb:.1f} + activations "
            f"{self.activations_gb:.1f} ({self.params_per_gpu / 1e9:.2f}B of "
            f"{self.num_params / 1e9:.2f}B params, {self.stage} pipeline stage, "
            f"world size {self.world_size})"
        )


@dataclass(frozen=True)
class _LayerParams:
    dense: int
    """Matrices split over TP (attention, dense MLP)."""
    experts: int
    """Expert MLPs, split over EP x expert-TP."""
    replicated: int
    """Norms and the router, whole on every TP rank."""


def _layer_params(cfg: Config, moe: bool = True) -> _LayerParams:
    """One layer's parameters: an MoE layer when ``moe`` and the model has experts, else a
    dense one (an MoE model's dense layers: model.moe_layer_freq / first_k_dense)."""
    m = cfg.model
    h, d = m.hidden_size, m.attention_head_dim
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    attention = 2 * h * q + 2 * h * kv  # Q and output projections, K and V (GQA)
    norms = 2 * h  # RMSNorm before attention and before the MLP, no biases
    if m.multi_latent_attention:
        attention, latent_norms = _latent_attention_params(m)
        norms += latent_norms
    if m.qk_layernorm:
        norms += 2 * d  # one RMSNorm weight over a head of queries, one over keys
    if m.num_experts is None or not moe:
        return _LayerParams(attention + 3 * h * m.ffn_hidden_size, 0, norms)  # SwiGLU
    experts = m.num_experts * 3 * h * m.moe_ffn_hidden_size
    # Shared experts are a SwiGLU split over TP like a dense MLP; their gate is whole.
    shared = 3 * h * (m.moe_shared_expert_intermediate_size or 0)
    gate = h if m.moe_shared_expert_gate else 0
    return _LayerParams(attention + shared, experts, norms + h * m.num_experts + gate)


def _latent_attention_params(m: ModelConfig) -> tuple[int, int]:
    """Multi-Latent Attention's matrices (split over TP) and latent RMSNorms (whole):
    q through its latent (or one projection), the kv latent with the shared rotary key,
    its up projection to per-head keys and values, the output projection."""
    h, n = m.hidden_size, m.num_attention_heads
    qk = m.qk_head_dim + m.qk_pos_emb_head_dim
    q = h * n * qk if m.q_lora_rank is None else h * m.q_lora_rank + m.q_lora_rank * n * qk
    kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim)
    kv += m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim)
    return q + kv + n * m.v_head_dim * h, m.kv_lora_rank + (m.q_lora_rank or 0)


def _mtp_params(cfg: Config, last: _LayerParams) -> _LayerParams:
    """The multi-token prediction layers (on the last pipeline stage): each a decoder
    layer like the last one, its [embedding; hidden] projection and three RMSNorms."""
    m, h = cfg.model, cfg.model.hidden_size
    k = m.mtp_num_layers or 0
    return _LayerParams(
        k * (last.dense + 2 * h * h), k * last.experts, k * (last.replicated + 3 * h)
    )


def _stage_layers(cfg: Config) -> list[list[int]]:
    """The decoder layers of each pipeline stage (uneven first/last stages included; as
    ``parallel.pipeline_layout`` places them, group ``i`` on stage ``i mod PP``)."""
    p = cfg.parallel
    if p.pipeline_layout is not None:
        stages: list[list[int]] = [[] for _ in range(p.pipeline)]
        start = 0
        for index, group in enumerate(p.layout_groups()):
            count = group.count("t")
            stages[index % p.pipeline] += range(start, start + count)
            start += count
        return stages
    bounds, start = [], 0
    for count in cfg.parallel.layers_per_stage(cfg.model.num_layers):
        bounds.append(list(range(start, start + count)))
        start += count
    return bounds


def _activation_bytes_per_stage(cfg: Config, layers: int, flash_attention: bool) -> float:
    """Korthikanti et al.'s activation bytes of ``layers`` layers and one microbatch on one
    GPU, after activation recomputation (``recompute``): selective recompute of core
    attention drops the ``5*a*s/h`` score term; a fully recomputed layer keeps only its
    input (``2*s*b*h`` bytes, / TP with sequence parallelism)."""
    m, p, r = cfg.model, cfg.parallel, cfg.recompute
    s = m.seq_length / p.context  # each context-parallel rank holds a slice of the sequence
    b, h, a, t = cfg.train.micro_batch_size, m.hidden_size, m.num_attention_heads, p.tensor
    scores = 5 * a * s / h
    if flash_attention or (r.granularity == "selective" and "core_attn" in r.modules):
        scores = 0.0
    # 8 of the 34 (Q, K, V and the output projection's input, 2 bytes each) are as wide as
    # the heads (heads x head_dim), which need not be the hidden size.
    attention = 8 * m.num_attention_heads * m.attention_head_dim / h
    if m.multi_latent_attention:  # Q and K of qk + rope channels, V and its output of v
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        attention = 4 * m.num_attention_heads * (qk + m.v_head_dim) / h
    if p.sequence_parallel or t == 1:
        per_token = (26 + attention + scores) / t
    else:
        per_token = 10 + (16 + attention) / t + scores / t
    if r.granularity == "selective" and {"mlp", "moe"} & set(r.modules):
        per_token -= 16 / t  # the MLP's fc1 and activation outputs; its input is kept
    scale = BYTES_PER_PARAM[cfg.precision.params_dtype] / 2  # the formula counts 16-bit
    full_layer = s * b * h * per_token * scale
    if r.granularity != "full":
        return layers * full_layer
    recomputed = layers if r.method == "uniform" else min(r.num_layers, layers)
    input_only = 2 * s * b * h * scale / (t if p.sequence_parallel else 1)
    return recomputed * input_only + (layers - recomputed) * full_layer


def _microbatches_in_flight(cfg: Config, world_size: int, stage: int = 0) -> float:
    """Microbatches whose activations pipeline stage ``stage`` holds at once under 1F1B:
    PP - stage (the warm-up), at most the microbatches of a step."""
    p = cfg.parallel
    in_flight = min(p.pipeline - stage, cfg.num_microbatches(world_size))
    if p.virtual_pipeline:
        in_flight *= 1 + (p.pipeline - 1) / (p.pipeline * p.virtual_pipeline)
    return in_flight


def estimate_memory(
    cfg: Config,
    world_size: int,
    vocab_size: Optional[int] = None,
    flash_attention: bool = True,
) -> MemoryEstimate:
    """Memory per GPU of training ``cfg`` on ``world_size`` GPUs (see the module doc);
    ``flash_attention=False`` counts the attention scores the unfused path stores.

    ``vocab_size`` defaults to ``model.vocab_size``; one of them must be set (the
    tokenizer is not read here). The layout must divide the world size.
    """
    m, p = cfg.model, cfg.parallel
    vocab = vocab_size or m.vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size is unset; pass vocab_size to estimate memory")
    if world_size % p.model_parallel_size:
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP x CP")
    vocab = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, p.tensor)
    h = m.hidden_size
    pattern = m.moe_layer_pattern()
    kinds = {True: _layer_params(cfg, moe=True), False: _layer_params(cfg, moe=False)}
    layers = [kinds[bool(is_moe)] for is_moe in pattern]
    mtp = _mtp_params(cfg, layers[-1])
    embedding = vocab * h
    output = embedding if m.untie_embeddings or p.pipeline > 1 else 0  # tied + PP: a copy
    num_params = (
        sum(layer.dense + layer.experts + layer.replicated for layer in [*layers, mtp])
        + embedding
        + (embedding if m.untie_embeddings else 0)
        + h
    )
    etp = p.expert_tensor_size
    dp_cp = world_size // (p.tensor * p.pipeline)  # data-parallel x context-parallel ranks
    expert_dp = world_size // (p.pipeline * etp * p.expert)
    stage_layers = _stage_layers(cfg)
    last = p.pipeline - 1
    stages = []  # (name, index, params outside the experts, expert params, in flight)
    for index, held in enumerate(stage_layers):
        dense = sum(layers[i].dense / p.tensor + layers[i].replicated for i in held)
        experts = sum(layers[i].experts for i in held) / (p.expert * etp)
        if p.pipeline == 1:
            name, dense = "only", dense + (embedding + output) / p.tensor + h
        elif index == 0:
            name, dense = "first", dense + embedding / p.tensor
        elif index == last:
            name, dense = "last", dense + output / p.tensor + h
        else:
            name = "middle"
        in_flight = _microbatches_in_flight(cfg, world_size, index) if index < last else 1.0
        if index == last:  # the MTP layers sit on the last stage
            dense += mtp.dense / p.tensor + mtp.replicated
            experts += mtp.experts / (p.expert * etp)
            held = [*held, *[len(layers) - 1] * (m.mtp_num_layers or 0)]
        stages.append((name, len(held), dense, experts, in_flight))
    if not p.uneven_pipeline:  # even stages: the first and last are the most loaded
        stages = [stages[0], stages[-1]] if p.pipeline > 1 else stages

    weight_bytes = BYTES_PER_PARAM[cfg.precision.params_dtype]
    optim_bytes = 8 if cfg.precision.params_dtype == "fp32" else 12
    shard = p.use_distributed_optimizer
    # The loss stage also holds one microbatch's logits (16-bit) and megatron's fp32
    # vocab-parallel softmax: 6 bytes per (token, vocab entry / TP); large for 128k vocabs.
    tokens = m.seq_length / p.context * cfg.train.micro_batch_size
    logits = tokens * (m.vocab_size or 0) / p.tensor * 6
    estimates = []
    for stage, num_layers, dense, experts, in_flight in stages:
        params = dense + experts
        optimizer = optim_bytes * (
            dense / (dp_cp if shard else 1) + experts / (expert_dp if shard else 1)
        )
        activations = _activation_bytes_per_stage(cfg, num_layers, flash_attention) * in_flight
        estimates.append(
            MemoryEstimate(
                world_size=world_size,
                num_params=int(num_params),
                params_per_gpu=int(params),
                weights_gb=params * weight_bytes / GB,
                grads_gb=params * GRAD_BYTES / GB,
                optimizer_gb=optimizer / GB,
                activations_gb=(activations + logits * (stage in ("last", "only"))) / GB,
                stage=stage,
            )
        )
    return max(estimates, key=lambda e: e.total_gb)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m megatron_forge.memory CONFIG [--world-size N] [key=value ...]``"""
    parser = argparse.ArgumentParser(description="Estimate GPU memory per GPU of a config.")
    parser.add_argument("config")
    parser.add_argument(
        "--world-size", type=int, help="GPUs in the job (default: launch.nodes x gpus_per_node)"
    )
    parser.add_argument(
        "--unfused-attention",
        action="store_true",
        help="count the s x s attention scores that unfused attention stores (megatron-core's "
        "local layer spec, e.g. without Transformer Engine); default: fused/flash attention",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_model_config(cfg.model)
        world_size = args.world_size or cfg.launch.world_size
        cfg.validate(world_size, cuda_available=True, te_available=True)
        print(estimate_memory(cfg, world_size, flash_attention=not args.unfused_attention))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
