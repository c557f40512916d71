"""RoPE frequency scaling (``model.rope_scaling``) on megatron-core's RotaryEmbedding.

megatron-core 0.16.1 applies Llama 3 scaling only with low_freq_factor 1, high_freq_factor
4 and original_max_position_embeddings 8192 fixed (GPTModel passes just the factor), so
the scaled inverse frequencies are computed here for any values, exactly as transformers
computes them (``_compute_llama3_parameters`` in its modeling_rope_utils), and installed
on each chunk's ``rotary_pos_emb`` before its first forward. They are a plain attribute of
the module, not a buffer: checkpoints do not carry them, every build recomputes them
from the config.

YaRN (``type: yarn``, DeepSeek-V3) is megatron-core's own: Multi-Latent Attention builds a
YarnRotaryEmbedding per layer from MLATransformerConfig fields (:func:`yarn_fields`). It
computes the same inverse frequencies as transformers' ``_compute_yarn_parameters``; of
the attention scaling, both scale the rotary cos/sin by mscale(factor, mscale) /
mscale(factor, mscale_all_dim) and the attention logits by mscale(factor,
mscale_all_dim)^2 (transformers in DeepseekV3Attention.scaling, megatron-core in its
softmax_scale), so the logits agree (tests/models/test_rope.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_forge.config import ModelConfig
from megatron_forge.config.schema import RopeScalingConfig


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    """Llama 3.1's scaled inverse frequencies from the plain ones: low frequencies (long
    wavelengths) divided by ``factor``, high ones kept, the band between interpolated."""
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_fields(scaling: RopeScalingConfig) -> dict[str, Any]:
    """megatron-core MLATransformerConfig fields for ``model.rope_scaling`` of type yarn."""
    return dict(
        rope_type="yarn",
        rotary_scaling_factor=scaling.factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
        beta_fast=scaling.beta_fast,
        beta_slow=scaling.beta_slow,
        mscale=scaling.mscale,
        mscale_all_dim=scaling.mscale_all_dim,
    )


SCALINGS = {"llama3": llama3_inv_freq}
"""``model.rope_scaling.type`` -> plain inverse frequencies to scaled ones."""


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    return SCALINGS[scaling.type](inv_freq, scaling)


def apply_rope_scaling(chunk: Any, model: ModelConfig) -> None:
    """Replace ``chunk.rotary_pos_emb.inv_freq`` (megatron's plain frequencies, on the
    device they were made on; megatron moves them to the GPU at the first forward) by the
    scaled ones, and drop RoPE tables cached from the plain ones."""
    if model.rope_scaling is None or model.rope_scaling.type not in SCALINGS:
        return  # none, or built into the attention layers by megatron-core (yarn)
    rope = chunk.rotary_pos_emb
    plain = rope.inv_freq
    rope.inv_freq = scaled_inv_freq(plain.float(), model.rope_scaling).to(plain.device, plain.dtype)
    type(rope).forward.cache_clear()  # forward's lru_cache holds tables per (module, length)
