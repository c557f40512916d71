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


# YaRN as DeepSeek-V3 (rope dim 64, factor 40 over 4096), then shapes and values where the
# ramp, the mscale terms and the softmax scale all differ.
YARN = [
    (64, 10000.0, dict(factor=40.0, original=4096, fast=32.0, slow=1.0, mscale=1.0, all_dim=1.0)),
    (8, 10000.0, dict(factor=4.0, original=32, fast=32.0, slow=1.0, mscale=1.0, all_dim=1.0)),
    (16, 50000.0, dict(factor=8.0, original=64, fast=16.0, slow=2.0, mscale=0.707, all_dim=0.5)),
    (32, 10000.0, dict(factor=16.0, original=128, fast=32.0, slow=1.0, mscale=1.0, all_dim=0.0)),
]


@pytest.mark.parametrize(("rope_dim", "base", "v"), YARN)
def test_yarn_attention_logits_equal_transformers(
    rope_dim: int, base: float, v: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """megatron-core's MLA with our YaRN fields and transformers' DeepseekV3 give the same
    inverse frequencies, the same cos/sin scaling and the same softmax scale, so the same
    attention logits (transformers folds mscale_all_dim into its scaling, megatron-core into
    softmax_scale)."""
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding, _yarn_get_mscale
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    from megatron_forge.models.rope import yarn_fields

    # megatron-core moves YaRN's frequencies to torch.cuda.current_device() (cpu.py's
    # emulation, for this test only).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    scaling = RopeScalingConfig(
        type="yarn",
        factor=v["factor"],
        original_max_position_embeddings=v["original"],
        beta_fast=v["fast"],
        beta_slow=v["slow"],
        mscale=v["mscale"],
        mscale_all_dim=v["all_dim"],
    )
    fields = yarn_fields(scaling)
    rope = YarnRotaryEmbedding(
        rope_dim,
        rotary_base=base,
        scaling_factor=fields["rotary_scaling_factor"],
        original_max_position_embeddings=fields["original_max_position_embeddings"],
        beta_fast=fields["beta_fast"],
        beta_slow=fields["beta_slow"],
        mscale=fields["mscale"],
        mscale_all_dim=fields["mscale_all_dim"],
        use_cpu_initialization=True,
    )
    seq = 3 * v["original"]
    emb, cos_sin_scale = rope(seq)
    nope = 16
    ours_softmax = _yarn_get_mscale(v["factor"], v["all_dim"]) ** 2 / (nope + rope_dim) ** 0.5

    params = {k: val for k, val in scaling.to_dict().items() if k != "type"}
    hf = DeepseekV3Config(
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=nope,
        max_position_embeddings=seq,
        rope_parameters={"rope_type": "yarn", "rope_theta": base, **params},
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    hf_softmax = yarn_apply_mscale(hf.rope_parameters, (nope + rope_dim) ** -0.5)

    freqs = emb[:, 0, 0, : rope_dim // 2]
    expected = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    torch.testing.assert_close(freqs, expected, rtol=1e-6, atol=1e-5)
    assert cos_sin_scale == pytest.approx(attention_factor, rel=1e-12)
    assert ours_softmax == pytest.approx(hf_softmax, rel=1e-12)
