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
                 router (MoE only)       2 * h * E
    once         lm head                 2 * h * V

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

    @property
    def forward(self) -> float:
        return (
            self.attention_projections + self.attention_scores + self.mlp + self.router
        ) + self.lm_head

    @property
    def training(self) -> float:
        """Forward + backward (3 x forward): what a training step spends per token."""
        return 3 * self.forward


def flops_per_token(model: ModelConfig, vocab_size: int) -> FlopsPerToken:
    """Forward FLOPs per token of ``model`` with a (padded) vocabulary of ``vocab_size``."""
    h, s, layers = model.hidden_size, model.seq_length, model.num_layers
    d = model.attention_head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    if model.num_experts is None:
        inner, topk, router = model.ffn_hidden_size, 1, 0
    else:
        inner, topk, router = model.moe_ffn_hidden_size, model.moe_router_topk, model.num_experts
    return FlopsPerToken(
        attention_projections=layers * 2 * (2 * h * q + 2 * h * kv),
        attention_scores=layers * 2 * 2 * q * s / 2,
        mlp=layers * 2 * 3 * h * inner * topk,
        router=layers * 2 * h * router,
        lm_head=2 * h * vocab_size,
    )


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
        f"{f.mlp:.4g} + router {f.router:.4g} + lm head {f.lm_head:.4g}\n"
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
