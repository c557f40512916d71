"""Llama 3 RoPE scaling with any values, as transformers computes it, installed on every
chunk megatron builds; head_dim and QK-norm reach megatron-core's modules."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_forge.config.schema import RopeScalingConfig
from megatron_forge.models.rope import scaled_inv_freq
from tests.multiprocess import run_distributed

SCALINGS = [
    # Llama 3.1 and 3.2 as released, then values megatron-core 0.16.1 cannot express
    # (it fixes low 1, high 4, original 8192).
    (128, 500000.0, dict(factor=8.0, low=1.0, high=4.0, original=8192)),
    (64, 500000.0, dict(factor=32.0, low=1.0, high=4.0, original=8192)),
    (16, 10000.0, dict(factor=8.0, low=1.0, high=4.0, original=32)),
    (32, 10000.0, dict(factor=4.0, low=2.0, high=16.0, original=64)),
]


def _scaling(factor: float, low: float, high: float, original: int) -> RopeScalingConfig:
    return RopeScalingConfig(
        type="llama3",
        factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=original,
    )


def _plain(head_dim: int, base: float) -> torch.Tensor:
    """megatron-core RotaryEmbedding's inverse frequencies."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


@pytest.mark.parametrize(("head_dim", "base", "values"), SCALINGS)
def test_llama3_frequencies_equal_transformers(head_dim: int, base: float, values: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        max_position_embeddings=4 * values["original"],
        rope_theta=base,
        rope_scaling={
            "rope_type": "llama3",
            "factor": values["factor"],
            "low_freq_factor": values["low"],
            "high_freq_factor": values["high"],
            "original_max_position_embeddings": values["original"],
        },
    )
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = scaled_inv_freq(_plain(head_dim, base), _scaling(**values))
    assert attention_factor == 1.0
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, _plain(head_dim, base))


def _built(cfg: Any, variants: list[list[str]]) -> list[dict[str, Any]]:
    """What build_model makes of each variant of the default config (one process)."""
    from megatron_forge.config import load_config
    from megatron_forge.models import build_model, build_transformer_config

    out = []
    for overrides in variants:
        run = load_config(None, ["precision.params_dtype=fp32", *overrides])
        (chunk,) = build_model(run, build_transformer_config(run), 512)
        attention = chunk.decoder.layers[0].self_attention
        norms = [getattr(attention, f"{x}_layernorm") for x in "qk"]
        out.append(
            {
                "inv_freq": chunk.rotary_pos_emb.inv_freq.clone(),
                "table": chunk.rotary_pos_emb(8).clone(),
                "qkv_rows": attention.linear_qkv.weight.shape[0],
                "proj_cols": attention.linear_proj.weight.shape[1],
                "qk_norms": [tuple(getattr(n, "weight", torch.empty(0)).shape) for n in norms],
            }
        )
    return out


@pytest.mark.slow  # one process of its own
def test_build_model_installs_the_config() -> None:
    scaling = (
        "{type: llama3, factor: 4.0, low_freq_factor: 2.0, high_freq_factor: 16.0, "
        "original_max_position_embeddings: 64}"
    )
    variants = [
        # hidden 64 / 4 heads = 16 channels a head; head_dim 32 instead
        ["model.family=qwen3", "model.qk_layernorm=true", "model.head_dim=32"],
        [f"model.rope_scaling={scaling}", "model.head_dim=32", "model.num_query_groups=2"],
    ]
    qwen3, llama = run_distributed(_built, 1, variants)[0]
    # heads x head_dim, not hidden: (4 + 2 x 4) x 32 rows and 4 x 32 columns; GQA (4 + 2 x 2)
    assert (qwen3["qkv_rows"], qwen3["proj_cols"]) == (12 * 32, 4 * 32)
    assert llama["qkv_rows"] == 8 * 32
    assert qwen3["qk_norms"] == [(32,), (32,)]
    assert llama["qk_norms"] == [(0,), (0,)]  # no QK-norm modules
    assert torch.equal(qwen3["inv_freq"], _plain(32, 10000.0))
    expected = scaled_inv_freq(_plain(32, 10000.0), _scaling(4.0, 2.0, 16.0, 64))
    assert torch.equal(llama["inv_freq"], expected)
    angles = torch.arange(8.0)[:, None] * expected
    assert torch.allclose(llama["table"].flatten(1), torch.cat([angles, angles], -1))
