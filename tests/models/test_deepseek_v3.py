"""DeepSeek-V3's config fields (Multi-Latent Attention, YaRN, MTP) and family rules: every
invalid combination refused with a message naming the field, the valid ones reaching
megatron-core's MLATransformerConfig; config.json both ways; parameter and FLOP counts."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from megatron_forge.config import ConfigError, from_dict, load_config
from megatron_forge.models import build_transformer_config, check_model_config, get_family

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
MLA = {
    "multi_latent_attention": True,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_head_dim": 16,
    "qk_pos_emb_head_dim": 8,
    "v_head_dim": 16,
}


def tiny(**changes: Any) -> dict[str, Any]:
    """configs/tiny_deepseek_v3.yaml's model section, with ``changes``."""
    model = copy.deepcopy(load_config("configs/tiny_deepseek_v3.yaml", []).to_dict()["model"])
    model.update(changes)
    return model


def model_of(**changes: Any) -> Any:
    return from_dict({"model": tiny(**changes)}).model


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kv_lora_rank": None}, "needs model.kv_lora_rank"),
        ({"q_lora_rank": 0}, "model.q_lora_rank=0 must be positive"),
        ({"qk_pos_emb_head_dim": 7}, "qk_pos_emb_head_dim=7 must be even"),
        ({"num_query_groups": 2}, "do not apply to Multi-Latent Attention"),
        ({"head_dim": 32}, "do not apply to Multi-Latent Attention"),
        (
            {
                "rope_scaling": {
                    "type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
            "not available with Multi-Latent Attention",
        ),
        ({"rope_scaling": {**YARN, "mscale": 0.5, "mscale_all_dim": 0.0}}, "mscale=0.5"),
        ({"rope_scaling": {**YARN, "beta_slow": 64.0}}, "0 < beta_slow < beta_fast"),
        ({"rope_scaling": {**YARN, "mscale": None}}, "rope_scaling.mscale is required"),
        ({"mtp_num_layers": 0}, "model.mtp_num_layers=0 must be >= 1"),
        ({"mtp_loss_scaling_factor": -1.0}, "mtp_loss_scaling_factor=-1.0 must be >= 0"),
    ],
)
def test_invalid_latent_attention_yarn_and_mtp_fields(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model_of(**changes)


def test_mla_fields_and_yarn_need_multi_latent_attention() -> None:
    plain = {"family": "llama", "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match="model.kv_lora_rank is a Multi-Latent Attention"):
        from_dict({"model": {**plain, "kv_lora_rank": 16}})
    with pytest.raises(ConfigError, match="rope_scaling.type=yarn is implemented for Multi-Lat"):
        from_dict({"model": {**plain, "rope_scaling": YARN}})


def test_tensor_parallel_must_divide_the_latents() -> None:
    cfg = from_dict({"model": tiny(kv_lora_rank=15), "parallel": {"tensor": 2}})
    with pytest.raises(ConfigError, match=r"kv_lora_rank \+ model.qk_pos_emb_head_dim = 23"):
        cfg.validate(2, cuda_available=False, te_available=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {
                "multi_latent_attention": False,
                **{k: None for k in list(MLA)[1:]},
                "rope_scaling": None,
            },
            "set model.multi_latent_attention=true",
        ),
        ({"qk_layernorm": True}, "qk_layernorm=true does not apply"),
        (
            {"moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False},
            "sigmoid scores with an expert bias",
        ),
        ({"moe_router_topk": 2}, "moe_router_topk = 2 x moe_router_group_topk"),
        ({"moe_shared_expert_intermediate_size": None}, "moe_shared_expert_intermediate_size"),
        ({"moe_shared_expert_intermediate_size": 48}, "a multiple of it"),
        ({"moe_first_k_dense_replace": None, "moe_layer_freq": [1, 0, 1]}, "dense layers come"),
    ],
)
def test_family_rules(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_model_config(model_of(**changes))


def test_fields_reach_megatrons_mla_config() -> None:
    cfg = load_config("configs/tiny_deepseek_v3.yaml", ["model.vocab_size=2048"])
    tf = build_transformer_config(cfg)
    assert type(tf).__name__ == "MLATransformerConfig"
    expected = dict(
        multi_latent_attention=True,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        qk_layernorm=True,  # the latents' RMSNorms
        rope_type="yarn",
        rotary_scaling_factor=4.0,
        original_max_position_embeddings=32,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.1,
        moe_router_dtype="fp32",
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_shared_expert_intermediate_size=32,
        moe_layer_freq=[0, 1, 1],
    )
    assert {k: getattr(tf, k) for k in expected} == expected
    plain = build_transformer_config(
        load_config(
            "configs/tiny_deepseek_v3.yaml", ["model.vocab_size=2048", "model.rope_scaling=null"]
        )
    )
    assert plain.rope_type == "rope"


def test_mla_on_a_family_without_it_is_refused() -> None:
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=2048"])
    cfg.model.multi_latent_attention = True  # past the schema, as a stored config could be
    with pytest.raises(ConfigError, match="not implemented by model.family=llama"):
        build_transformer_config(cfg)


def test_hf_config_round_trip() -> None:
    family = get_family("deepseek_v3")
    model = model_of()
    config = family.hf_config(model, 2048)
    assert (config["first_k_dense_replace"], config["n_group"], config["topk_group"]) == (1, 4, 2)
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        **{k: v for k, v in YARN.items() if k != "type"},
    }
    assert config["num_nextn_predict_layers"] == 1 and config["rope_interleave"] is True
    back = from_dict({"model": family.model_fields(config)}).model
    for field in (
        *MLA,
        "rope_scaling",
        "num_experts",
        "moe_router_topk",
        "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size",
        "moe_router_num_groups",
        "moe_router_group_topk",
        "moe_router_topk_scaling_factor",
        "moe_layer_freq",
        "mtp_num_layers",
        "ffn_hidden_size",
        "num_layers",
        "untie_embeddings",
    ):
        assert getattr(back, field) == getattr(model, field), field


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_interleave": False}, "rope_interleave=false"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"norm_topk_prob": False}, "norm_topk_prob=false"),
    ],
)
def test_hf_configs_we_cannot_express_are_refused(changes: dict, message: str) -> None:
    from megatron_forge.errors import ConvertError

    family = get_family("deepseek_v3")
    config = {**family.hf_config(model_of(), 2048), **changes}
    with pytest.raises(ConvertError, match=message):
        family.model_fields(config)


def test_parameters_and_flops_of_the_671b_recipe() -> None:
    from megatron_forge.memory import estimate_memory
    from megatron_forge.monitoring.flops import flops_per_token

    cfg = load_config("configs/deepseek_v3.yaml", [])
    total = estimate_memory(cfg, 1024).num_params
    main = load_config("configs/deepseek_v3.yaml", ["model.mtp_num_layers=null"])
    assert round(estimate_memory(main, 1024).num_params / 1e9) == 671  # DeepSeek-V3's figure
    # The MTP layer: a MoE layer like the last one plus eh_proj and three norms (~11.6B;
    # DeepSeek's 14B also counts its copies of the embedding and output layer).
    assert 11e9 < total - estimate_memory(main, 1024).num_params < 12e9

    m = cfg.model
    f = flops_per_token(m, 129280)
    per_layer = 2 * (
        7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    )
    assert f.attention_projections == 61 * per_layer
    assert f.attention_scores == 61 * 2 * 128 * (192 + 128) * 4096 / 2
    without = flops_per_token(main.model, 129280)
    assert without.mtp == 0 and f.mtp > 0
    moe_layer = 2 * 3 * 7168 * (2048 * 8 + 2048) + 2 * 7168 * 256
    expected_mtp = 2 * 2 * 7168 * 7168 + per_layer + 2 * 128 * 320 * 4096 / 2 + moe_layer
    assert f.mtp == pytest.approx(expected_mtp + 2 * 7168 * 129280)


def test_rope_fusion_for_mla_only_with_yarn() -> None:
    """megatron-core fuses MLA's RoPE only for YaRN: with the kernel present the automatic
    choice is on for YaRN and off for plain RoPE; asking for it there is refused."""
    from megatron_forge.models.build import choose_fusions

    kernels = dict(on_gpu=True, grad_accum_kernel=True, rope_kernel=True, softmax_kernel=True)
    yarn = from_dict({"model": tiny()}).model
    assert choose_fusions(yarn, **kernels)["apply_rope_fusion"]
    plain = from_dict({"model": tiny(rope_scaling=None)}).model
    assert not choose_fusions(plain, **kernels)["apply_rope_fusion"]
    asked = from_dict({"model": tiny(rope_scaling=None, apply_rope_fusion=True)}).model
    with pytest.raises(ConfigError, match="model.apply_rope_fusion=true: megatron-core fuses"):
        choose_fusions(asked, **kernels)
