"""The model family registry: a family is checked when it registers, a config naming an
unknown family or breaking its family's rules fails with the field and the fix, and every
registered family's Hugging Face config and weight rules round-trip."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import megatron_forge.models as models
from megatron_forge.config import ConfigError, ModelConfig, from_dict, load_config
from megatron_forge.errors import ConvertError
from megatron_forge.models import (
    FAMILY_PACKAGES,
    ModelFamily,
    Serving,
    build_transformer_config,
    check_model_config,
    families,
    family_for_architecture,
    family_names,
    get_family,
    register,
)
from megatron_forge.models.registry import Registry

SERVED = Serving(vllm=True, trtllm=True, trtllm_checkpoint=True)


class Complete(ModelFamily):
    """A family with every piece (registered only into throwaway registries)."""

    name = "toy"
    moe = False
    hf_architecture = "ToyForCausalLM"
    hf_model_type = "toy"
    serving = SERVED

    def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
        return {}

    def hf_config(self, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
        return {}

    def model_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"family": self.name}

    def weight_rules(self, model: ModelConfig, vocab_size: int, padded_vocab: int) -> list:
        return []


# Registration ------------------------------------------------------------------------------------
def test_a_complete_family_registers() -> None:
    registry = Registry()
    assert registry.register(Complete) is Complete
    assert registry.names() == ["toy"]
    assert isinstance(registry.get("toy"), Complete)
    assert registry.for_architecture("ToyForCausalLM") is registry.get("toy")


def test_a_family_missing_a_method_fails_to_register() -> None:
    class NoRules(ModelFamily):
        name = "norules"
        moe = False
        hf_architecture = "NoRulesForCausalLM"
        hf_model_type = "norules"
        serving = SERVED

        def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
            return {}

        def hf_config(self, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
            return {}

    registry = Registry()
    with pytest.raises(
        TypeError, match=r"NoRules cannot be registered: lacks model_fields, weight_rules"
    ):
        registry.register(NoRules)
    assert registry.names() == []


def test_a_family_missing_an_attribute_fails_to_register() -> None:
    methods = {m: getattr(Complete, m) for m in ModelFamily.__abstractmethods__}
    attributes = {"name": "x", "moe": False, "hf_architecture": "X", "hf_model_type": "x"}
    bare = type("Bare", (ModelFamily,), {**attributes, **methods})  # no serving
    registry = Registry()
    with pytest.raises(TypeError, match=r"Bare cannot be registered: lacks serving"):
        registry.register(bare)
    wrong = type("Wrong", (Complete,), {"moe": "no", "serving": (True, True, True)})
    with pytest.raises(TypeError, match=r"moe='no' is not a bool; serving=\(True, True, True\)"):
        registry.register(wrong)
    with pytest.raises(ValueError, match=r"name='Toy 2' must be lowercase"):
        registry.register(type("BadName", (Complete,), {"name": "Toy 2"}))
    with pytest.raises(TypeError, match="is not a ModelFamily subclass"):
        registry.register(Complete())  # an instance, not the class
    assert registry.names() == []


def test_a_duplicate_name_or_architecture_fails_to_register() -> None:
    before = family_names()
    with pytest.raises(
        ValueError,
        match=r"name='llama' is already registered by megatron_forge\.models\.llama\.Llama",
    ):
        register(type("OtherLlama", (Complete,), {"name": "llama"}))
    with pytest.raises(ValueError, match=r"hf_architecture='MixtralForCausalLM' is already"):
        register(type("Clone", (Complete,), {"hf_architecture": "MixtralForCausalLM"}))
    with pytest.raises(ValueError, match=r"hf_model_type='qwen2' is already"):
        register(type("Clone", (Complete,), {"hf_model_type": "qwen2"}))
    assert family_names() == before  # nothing was added
    assert {"llama", "mixtral", "qwen2", "qwen3", "qwen3_moe"} <= set(before)


def test_every_family_folder_is_registered() -> None:
    """A folder under models/ that FAMILY_PACKAGES does not name would never register."""
    root = Path(models.__file__).parent
    folders = {p.parent.name for p in root.glob("*/__init__.py")}
    assert {p.__name__.rsplit(".", 1)[1] for p in FAMILY_PACKAGES} == folders
    by_module = {type(f).__module__: f.name for f in families()}
    assert sorted(by_module) == sorted(p.__name__ for p in FAMILY_PACKAGES)


def test_models_never_import_convert() -> None:
    """convert/ depends on models/ (the mappings live here), never the reverse."""
    root = Path(models.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"megatron_forge\.convert|from megatron_forge import convert", p.read_text())
    ]
    assert offenders == []


# Configs -------------------------------------------------------------------------------------------
def test_unknown_family_names_the_field_and_the_known_ones() -> None:
    cfg = load_config(None, ["model.family=foo", "precision.params_dtype=fp32"])
    message = f"model.family='foo' is not a registered family; known: {family_names()}"
    with pytest.raises(ConfigError) as err:
        check_model_config(cfg.model)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_transformer_config(cfg)
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_family("foo")


def test_family_rules() -> None:
    with pytest.raises(ConfigError, match=r"model.family=mixtral needs model.num_experts >= 2"):
        check_model_config(ModelConfig(family="mixtral"))
    with pytest.raises(ConfigError, match=r"model.family=mixtral needs model.num_experts >= 2"):
        check_model_config(ModelConfig(family="mixtral", num_experts=1, moe_router_topk=1))
    for dense in ("llama", "qwen2"):
        with pytest.raises(
            ConfigError,
            match=rf"model.num_experts=4 is set for family={dense}, a dense family; use an MoE "
            r"family \(.*mixtral.*qwen3_moe.*\) or remove model.num_experts",
        ):
            check_model_config(ModelConfig(family=dense, num_experts=4))
    check_model_config(ModelConfig(family="mixtral", num_experts=4))
    check_model_config(ModelConfig(family="qwen2"))


def test_shipped_configs_follow_their_family_rules() -> None:
    root = Path(models.__file__).parents[2] / "configs"
    for path in sorted(root.glob("*.yaml")):
        check_model_config(load_config(path).model)


def test_unknown_architecture() -> None:
    with pytest.raises(ConvertError, match=r"unknown architecture 'GPT2LMHeadModel'; supported"):
        family_for_architecture("GPT2LMHeadModel")


# Round trips -------------------------------------------------------------------------------------
def _deepseek_model() -> ModelConfig:
    """DeepSeek-V3's shape (Multi-Latent Attention, YaRN, shared expert, group routing,
    dense first layer, MTP), no field at its default."""
    return ModelConfig(
        family="deepseek_v3",
        num_layers=3,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=8,
        seq_length=256,
        max_position_embeddings=512,
        rotary_base=5000.0,
        norm_epsilon=1e-6,
        vocab_size=1000,
        untie_embeddings=False,
        init_method_std=0.01,
        multi_latent_attention=True,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_head_dim=12,
        qk_pos_emb_head_dim=4,
        v_head_dim=8,
        rope_scaling={
            "type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 0.9,
            "mscale_all_dim": 0.8,
        },
        num_experts=4,
        moe_router_topk=2,
        moe_aux_loss_coeff=0.02,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=64,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_first_k_dense_replace=1,
        mtp_num_layers=1,
    )


def _model(family: ModelFamily) -> ModelConfig:
    """A model of ``family`` with no field at its default, so a dropped field shows."""
    if family.name == "deepseek_v3":
        return _deepseek_model()
    moe = {"num_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.02} if family.moe else {}
    return ModelConfig(
        family=family.name,
        num_layers=3,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=8,
        num_query_groups=2,
        seq_length=256,
        max_position_embeddings=512,
        rotary_base=5000.0,
        norm_epsilon=1e-6,
        vocab_size=1000,
        untie_embeddings=False,
        init_method_std=0.01,
        head_dim=16,  # not hidden_size / num_attention_heads
        rope_scaling={
            "type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 128,
        },
        qk_layernorm=family.name in ("qwen3", "qwen3_moe"),
        **moe,
    )


EXPRESSED_IN_HF = (
    "family",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "max_position_embeddings",
    "rotary_base",
    "norm_epsilon",
    "vocab_size",
    "untie_embeddings",
    "init_method_std",
    "num_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_aux_loss_coeff",
    "head_dim",
    "rope_scaling",
    "qk_layernorm",
)


@pytest.mark.parametrize("name", family_names())
def test_hf_config_round_trips_through_model_fields(name: str) -> None:
    family = get_family(name)
    model = _model(family)
    check_model_config(model)
    hf = family.hf_config(model, model.vocab_size)
    assert hf["architectures"] == [family.hf_architecture]
    assert hf["model_type"] == family.hf_model_type
    assert family_for_architecture(hf["architectures"][0]) is family
    back = from_dict({"model": family.model_fields(hf)}).model
    check_model_config(back)
    assert {f: getattr(back, f) for f in EXPRESSED_IN_HF} == {
        f: getattr(model, f) for f in EXPRESSED_IN_HF
    }
    assert family.transformer_fields(back) == family.transformer_fields(model)


@pytest.mark.parametrize("name", family_names())
def test_weight_rules_round_trip(name: str) -> None:
    """to_megatron(to_hf(x)) == x for every rule, every HF name is written once, and the
    shapes the rules declare are the shapes they produce."""
    family = get_family(name)
    model = _model(family)
    rules = family.weight_rules(model, 1024, 1024)
    hf_names = [n for rule in rules for n in rule.hf]
    assert len(hf_names) == len(set(hf_names))
    generator = torch.Generator().manual_seed(0)
    for rule in rules:
        megatron = {k: torch.randn(s, generator=generator) for k, s in rule.megatron.items()}
        hf = rule.to_hf(megatron)
        assert {n: tuple(t.shape) for n, t in hf.items()} == rule.hf
        back = rule.to_megatron(hf)
        assert back.keys() == megatron.keys()
        assert all(torch.equal(back[k], megatron[k]) for k in megatron)
