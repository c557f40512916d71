"""Model FLOPs per token, peak FLOP/s of GPUs by name, and MFU.

Model FLOPs count the matrix multiplications one token goes through, 2 FLOPs per
multiply-add. Forward pass, with h = hidden size, d = channels per head (model.head_dim,
h / heads by default), q = heads x d (the query width, h unless head_dim says otherwise),
kv = num_query_groups x d (the K/V width under GQA), f = (expert) MLP inner size, s =
sequence length, E = experts, k = experts per token (moe_router_topk; 1 for a dense model)
and V = the padded vocabulary:

    per layer    attention projections   2 * (2*h*q + 2*h*kv)   Q and output; K and V
                 attention scores        2 * 2 * q * s / 2      Q K^T and softmax x V,
                                                                causal: s/2 keys per query
                 MLP (SwiGLU)            2 * 3 * h * f * k      gate, up and down
                 shared experts (MoE)    2 * 3 * h * f_s        f_s: their total inner size,
                                         (+ 2 * h with a gate)  every token runs them
                 router (MoE only)       2 * h * E

In an MoE model the dense layers (model.moe_layer_freq, moe_first_k_dense_replace) count
a dense SwiGLU of ffn_hidden_size (k = 1) and no router or shared experts; only the top-k
routed experts run per token, whatever the capacity factor drops or pads.
    once         lm head                 2 * h * V

Multi-Latent Attention (model.multi_latent_attention) replaces the attention rows by its
own (see :func:`latent_attention_flops`): the q and kv latents' down and up projections,
and scores over keys of qk_head_dim + qk_pos_emb_head_dim and values of v_head_dim
channels. Each multi-token prediction layer (model.mtp_num_layers) adds its projection of
[embedding; hidden] (2 * 2h * h), a decoder layer like the last one and the lm head again.

Training FLOPs = 3 x forward: the backward pass computes the gradients of the inputs and of
the weights, each a matmul as large as the forward one. Not counted: embedding lookups,
norms, softmax, rotary embeddings, activation functions (a fraction of a percent at any
useful size), and activation recomputation, because MFU counts model FLOPs (PaLM's
definition), not hardware FLOPs. For dense models this equals Megatron-LM's
``num_floating_point_operations`` (SwiGLU, GQA, causal attention); for MoE it adds the
router, which Megatron-LM leaves out.

MFU = achieved model TFLOP/s per GPU / the GPU's peak dense TFLOP/s (:data:`GPU_PEAKS`,
BF16, or FP8 when ``precision.fp8`` is set; fp16 and fp32 runs are measured against the
BF16 peak). ``logging.peak_tflops`` overrides the table.

    python -m megatron_forge.monitoring.flops configs/llama_7b.yaml [--gpu "NVIDIA H100 80GB HBM3"]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Optional

from megatron_forge.config import Config, ConfigError, ModelConfig, load_config
from megatron_forge.models import check_model_config, padded_vocab_size


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward-pass FLOPs of one token, by part of the model (see the module doc)."""

    attention_projections: float
    attention_scores: float
    mlp: float
    router: float
    lm_head: float
    mtp: float = 0.0
    """Multi-token prediction layers (model.mtp_num_layers), all their parts together."""

    @property
    def forward(self) -> float:
        return (
            (self.attention_projections + self.attention_scores + self.mlp + self.router)
            + self.lm_head
            + self.mtp
        )

    @property
    def training(self) -> float:
        """Forward + backward (3 x forward): what a training step spends per token."""
        return 3 * self.forward


def flops_per_token(model: ModelConfig, vocab_size: int) -> FlopsPerToken:
    """Forward FLOPs per token of ``model`` with a (padded) vocabulary of ``vocab_size``."""
    h, s, layers = model.hidden_size, model.seq_length, model.num_layers
    d = model.attention_head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    moe_layers = sum(model.moe_layer_pattern())
    dense_layers = layers - moe_layers
    mlp = dense_layers * 2 * 3 * h * model.ffn_hidden_size
    router = 0
    if moe_layers:
        # Only the top-k routed experts run for a token; shared experts run for every token.
        routed = model.moe_ffn_hidden_size * model.moe_router_topk
        shared = model.moe_shared_expert_intermediate_size or 0
        gate = h if model.moe_shared_expert_gate else 0  # the shared experts' sigmoid gate
        mlp += moe_layers * (2 * 3 * h * (routed + shared) + 2 * gate)
        router = moe_layers * 2 * h * model.num_experts
    projections, scores = layers * 2 * (2 * h * q + 2 * h * kv), layers * 2 * 2 * q * s / 2
    if model.multi_latent_attention:
        projections, scores = (layers * x for x in latent_attention_flops(model))
    mtp = 0.0
    if model.mtp_num_layers:
        # Each MTP layer: eh_proj ([embedding; hidden] -> hidden), a decoder layer like the
        # last one, and the output layer again for its own prediction.
        if model.moe_layer_pattern()[-1] == 1:
            last_mlp = (mlp - dense_layers * 2 * 3 * h * model.ffn_hidden_size + router) / (
                moe_layers
            )
        else:
            last_mlp = 2 * 3 * h * model.ffn_hidden_size
        layer = (projections + scores) / layers + last_mlp
        mtp = model.mtp_num_layers * (2 * 2 * h * h + layer + 2 * h * vocab_size)
    return FlopsPerToken(
        attention_projections=projections,
        attention_scores=scores,
        mlp=mlp,
        router=router,
        lm_head=2 * h * vocab_size,
        mtp=mtp,
    )


def latent_attention_flops(model: ModelConfig) -> tuple[float, float]:
    """Multi-Latent Attention's projections and scores per layer and token: q through its
    latent (or one projection), the kv latent with the shared rotary key, its up projection
    to per-head keys (no RoPE part) and values, the output; scores over keys of
    qk_head_dim + qk_pos_emb_head_dim and values of v_head_dim channels, causal."""
    h, n, s = model.hidden_size, model.num_attention_heads, model.seq_length
    qk = model.qk_head_dim + model.qk_pos_emb_head_dim
    q_rank = model.q_lora_rank
    q = h * n * qk if q_rank is None else h * q_rank + q_rank * n * qk
    kv = h * (model.kv_lora_rank + model.qk_pos_emb_head_dim)
    kv += model.kv_lora_rank * n * (model.qk_head_dim + model.v_head_dim)
    out = n * model.v_head_dim * h
    return 2 * (q + kv + out), 2 * n * (qk + model.v_head_dim) * s / 2


def run_flops_per_token(cfg: Config, vocab_size: int) -> FlopsPerToken:
    """FLOPs per token of the model a run builds: the vocabulary padded as megatron pads it."""
    padded = padded_vocab_size(
        vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor
    )
    return flops_per_token(cfg.model, padded)


@dataclass(frozen=True)
class GpuPeak:
    """Datasheet peak tensor-core TFLOP/s of one GPU, dense (without 2:4 sparsity)."""

    name: str
    pattern: str
    """Regular expression matched (case-insensitively) against torch.cuda.get_device_name()."""
    bf16: float
    fp8: Optional[float]
    """None where the GPU has no FP8 tensor cores."""


GPU_PEAKS: tuple[GpuPeak, ...] = (
    # First match wins: the more specific names come before the names they contain.
    GpuPeak("GH200", r"GH200", 989.4, 1978.9),
    GpuPeak("GB200", r"GB200", 2500.0, 5000.0),
    GpuPeak("B200", r"B200", 2250.0, 4500.0),
    GpuPeak("H200 NVL", r"H200 NVL", 835.5, 1670.5),
    GpuPeak("H200 SXM", r"H200", 989.4, 1978.9),
    GpuPeak("H100 PCIe", r"H100.*PCIe", 756.5, 1513.0),
    GpuPeak("H100 NVL", r"H100 NVL", 835.5, 1670.5),
    GpuPeak("H100 SXM", r"H100", 989.4, 1978.9),  # "NVIDIA H100 80GB HBM3"
    GpuPeak("A100 80GB", r"A100.*80GB", 312.0, None),
    GpuPeak("A100 40GB", r"A100", 312.0, None),
    GpuPeak("L40S", r"L40S", 362.05, 733.0),
)


def find_gpu(device_name: str) -> Optional[GpuPeak]:
    """The table entry of a CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), if any."""
    return next((g for g in GPU_PEAKS if re.search(g.pattern, device_name, re.IGNORECASE)), None)


@dataclass(frozen=True)
class Peak:
    """The MFU denominator of a run, or why there is none."""

    tflops: Optional[float]
    """Peak dense TFLOP/s of one GPU; None when unknown (MFU is then n/a)."""
    note: str
    """Where the number came from, or a hint naming the config field to set."""


def resolve_peak(device_name: Optional[str], fp8: bool, override: Optional[float] = None) -> Peak:
    """Peak TFLOP/s of one GPU: ``override`` (``logging.peak_tflops``) or the table entry of
    ``device_name`` (None on CPU) for BF16, or FP8 when ``fp8``. Never raises."""
    dtype = "fp8" if fp8 else "bf16"
    if override is not None:
        return Peak(override, f"{override:g} TFLOP/s from logging.peak_tflops")
    if device_name is None:
        return Peak(
            None,
            "MFU: n/a on CPU (TFLOP/s is reported); set logging.peak_tflops to compare "
            "against a peak",
        )
    gpu = find_gpu(device_name)
    peak = getattr(gpu, dtype) if gpu else None
    if peak is None:
        why = "has no FP8 peak in the table" if gpu else "is not in the table"
        return Peak(
            None,
            f"MFU: n/a: GPU {device_name!r} {why} (megatron_forge/monitoring/flops.py); set "
            f"logging.peak_tflops to its dense {dtype.upper()} TFLOP/s per GPU",
        )
    return Peak(peak, f"{peak:g} TFLOP/s ({gpu.name}, dense {dtype.upper()})")


def mfu(tflops_per_gpu: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization as a fraction, or None when the peak is unknown."""
    return tflops_per_gpu / peak_tflops if peak_tflops else None


def main(argv: Optional[list[str]] = None) -> int:
    """Print the FLOPs per token of a config (and its peak on a GPU given by name)."""
    parser = argparse.ArgumentParser(description="Model FLOPs per token of a config.")
    parser.add_argument("config")
    parser.add_argument("--gpu", help='CUDA device name, e.g. "NVIDIA H100 80GB HBM3"')
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_model_config(cfg.model)
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is unset; pass model.vocab_size=N")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    f = run_flops_per_token(cfg, cfg.model.vocab_size)
    print(
        f"forward FLOPs/token {f.forward:.4g} = attention projections "
        f"{f.attention_projections:.4g} + attention scores {f.attention_scores:.4g} + MLP "
        f"{f.mlp:.4g} + router {f.router:.4g} + lm head {f.lm_head:.4g}"
        + (f" + MTP {f.mtp:.4g}" if f.mtp else "")
        + "\n"
        f"training FLOPs/token (3 x forward): {f.training:.4g}"
    )
    if args.gpu:
        peak = resolve_peak(args.gpu, cfg.precision.fp8 is not None, cfg.logging.peak_tflops)
        print(f"peak: {peak.note}")
        if peak.tflops:
            tokens = peak.tflops * 1e12 / f.training
            print(f"tokens/s/GPU at 100% MFU: {tokens:.0f}; at 40%: {0.4 * tokens:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
