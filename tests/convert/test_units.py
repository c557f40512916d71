"""The layout helpers and the streaming safetensors writer, without checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_forge.config import ModelConfig
from megatron_forge.convert.files import (
    SafetensorsFileWriter,
    SafetensorsReader,
    TensorSpec,
    parse_size,
)
from megatron_forge.convert.trtllm import check_trt_family, trtllm_config
from megatron_forge.errors import ConfigError, ConvertError
from megatron_forge.models import Serving, check_model_config, get_family
from megatron_forge.models.mapping import merge_qkv, split_qkv


def test_qkv_is_grouped_per_query_group():
    """Rows of megatron's fused QKV, 4 heads in 2 groups of head_dim 2:
    [q0 q1 k0 v0 | q2 q3 k1 v1]."""
    model = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2)
    labels = ["q0", "q1", "k0", "v0", "q2", "q3", "k1", "v1"]
    rows = torch.tensor([[float(i)] for i, _ in enumerate(labels) for _ in range(2)])
    q, k, v = split_qkv(rows, model)

    def heads(t: torch.Tensor) -> list[str]:
        return [labels[int(x)] for x in t[::2, 0]]

    assert heads(q) == ["q0", "q1", "q2", "q3"]
    assert heads(k) == ["k0", "k1"] and heads(v) == ["v0", "v1"]
    assert torch.equal(merge_qkv(q, k, v, model), rows)
    bias = rows[:, 0]
    assert torch.equal(merge_qkv(*split_qkv(bias, model), model), bias)


def test_streaming_writer_rows_in_any_order(tmp_path):
    specs = [
        TensorSpec("a", (3, 2), torch.bfloat16),
        TensorSpec("b", (5,), torch.float32),
    ]
    a = torch.randn(3, 2).to(torch.bfloat16)
    b = torch.arange(5.0)
    writer = SafetensorsFileWriter(tmp_path / "x.safetensors", specs)
    writer.write("b", b)
    for row in (2, 0, 1):
        writer.write("a", a[row], row=row)
    writer.close()
    loaded = load_file(str(tmp_path / "x.safetensors"))  # the reference implementation
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)
    ours = SafetensorsReader(tmp_path)
    assert torch.equal(ours.read("a"), a) and ours.shape("b") == (5,)


def test_writer_refuses_incomplete_or_wrong_tensors(tmp_path):
    writer = SafetensorsFileWriter(
        tmp_path / "y.safetensors", [TensorSpec("a", (2, 2), torch.float32)]
    )
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("a", torch.zeros(2, 3))
    writer.write("a", torch.zeros(2), row=0)
    with pytest.raises(RuntimeError, match="never received"):
        writer.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("300KB") == 300_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234


def test_trtllm_config_takes_family_fields_from_the_registry():
    qwen2 = trtllm_config(ModelConfig(family="qwen2"), 1000, 1, 1, torch.float32)
    assert (qwen2["architecture"], qwen2["attn_bias"], qwen2["qwen_type"]) == (
        "Qwen2ForCausalLM",
        True,
        "qwen2",
    )
    assert qwen2["seq_length"] == 128
    llama = trtllm_config(ModelConfig(), 1000, 1, 1, torch.float32)
    assert (llama["architecture"], llama["attn_bias"]) == ("LlamaForCausalLM", False)
    assert "qwen_type" not in llama


def test_to_trtllm_refuses_a_family_the_registry_marks_unsupported(monkeypatch):
    qwen2 = type(get_family("qwen2"))
    monkeypatch.setattr(qwen2, "serving", Serving(vllm=True, trtllm=True, trtllm_checkpoint=False))
    with pytest.raises(
        ConvertError,
        match=r"to-trtllm does not support model.family=qwen2 \(supported: "
        r"\['llama', 'mixtral', 'qwen3'\]\)",
    ):
        check_trt_family(ModelConfig(family="qwen2"))
    check_trt_family(ModelConfig())


# Hugging Face config.json -> model fields ------------------------------------------------------
LLAMA31_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
BASE = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
}


def _model_fields(config: dict) -> dict:
    from megatron_forge.models import family_for_architecture

    return family_for_architecture(config["architectures"][0]).model_fields(config)


def _llama(**fields) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **BASE, **fields}


@pytest.mark.parametrize(
    "rope",
    [
        # transformers 4.x and the hub's Llama 3.1 files
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA31_SCALING}},
        # older 4.x spelling
        {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA31_SCALING}},
        # transformers 5
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA31_SCALING}},
        # what to-hf writes: both
        {
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", **LLAMA31_SCALING},
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA31_SCALING},
        },
    ],
)
def test_both_transformers_spellings_import_to_one_model_config(rope: dict) -> None:
    fields = _model_fields(_llama(**rope))
    assert fields["rotary_base"] == 500000.0
    assert fields["rope_scaling"] == {"type": "llama3", **LLAMA31_SCALING}
    model = ModelConfig(**fields)
    assert model.rope_scaling.to_dict() == {"type": "llama3", **LLAMA31_SCALING}


def test_omitted_fields_take_the_architectures_own_defaults() -> None:
    """What transformers' config class of the architecture uses, not Llama's fallbacks: a
    Mixtral config.json without rms_norm_eps and rope_theta is Mixtral's 1e-5 and 1e6."""
    mixtral = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **{k: v for k, v in BASE.items() if k != "rms_norm_eps"},
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    fields = _model_fields(mixtral)
    assert (fields["norm_epsilon"], fields["rotary_base"]) == (1e-5, 1e6)
    assert fields["moe_aux_loss_coeff"] == 0.001  # MixtralConfig's router_aux_loss_coef
    llama = _model_fields({k: v for k, v in _llama().items() if k != "rms_norm_eps"})
    assert (llama["norm_epsilon"], llama["rotary_base"]) == (1e-6, 10000.0)
    assert llama["rope_scaling"] is None and llama["head_dim"] is None
    # Qwen3Config's head_dim is 128 whatever the hidden size
    qwen3 = _model_fields({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **BASE})
    assert (qwen3["head_dim"], qwen3["qk_layernorm"], qwen3["family"]) == (128, True, "qwen3")
    check_model_config(ModelConfig(**qwen3))


def test_moe_imported_for_tensor_parallel_gets_sequence_parallel(tmp_path) -> None:
    """from-hf --tp 2 of an MoE model plans the layout it can train in (megatron-core trains
    MoE layers under TP only with sequence parallelism); a dense model's TP needs none."""
    from megatron_forge.convert.from_hf import config_from_hf

    mixtral = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **BASE,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    cfg, _ = config_from_hf(tmp_path, mixtral, 2, 1, 2, torch.float32)
    assert cfg.parallel.sequence_parallel and cfg.parallel.expert == 2
    cfg, _ = config_from_hf(tmp_path, _llama(), 2, 1, 1, torch.float32)
    assert not cfg.parallel.sequence_parallel


def test_explicit_head_dim_imports() -> None:
    assert _model_fields(_llama(head_dim=32))["head_dim"] == 32  # 64 / 4 = 16
    assert _model_fields(_llama(head_dim=16))["head_dim"] is None  # = hidden / heads


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            _llama(rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
            r"RoPE scaling of type 'dynamic' .* is not supported; supported: "
            r"\['default', 'llama3', 'yarn'\]",
        ),
        (
            _llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            r"RoPE scaling of type 'dynamic'",
        ),
        (
            _llama(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            r"config.json: transformers cannot read it as a 'llama' config \(KeyError: .*"
            r"high_freq_factor",
        ),
        (_llama(attention_bias=True), r"LlamaForCausalLM with attention_bias=true"),
        (
            {
                "architectures": ["Qwen3ForCausalLM"],
                "model_type": "qwen3",
                **BASE,
                "attention_bias": True,
            },
            r"Qwen3ForCausalLM with attention_bias=true is not supported",
        ),
        (_llama(mlp_bias=True), r"LlamaForCausalLM with mlp_bias=true is not supported$"),
        *(
            (
                {
                    "architectures": [f"{name}ForCausalLM"],
                    "model_type": name.lower(),
                    **BASE,
                    "use_sliding_window": True,
                    "sliding_window": 16,
                },
                rf"{name}ForCausalLM with use_sliding_window=true is not supported "
                r"\(full attention only\)",
            )
            for name in ("Qwen2", "Qwen3")
        ),
    ],
)
def test_what_the_model_cannot_express_is_refused(config: dict, message: str) -> None:
    with pytest.raises(ConvertError, match=message):
        _model_fields(config)


def test_hf_config_writes_both_rope_spellings() -> None:
    scaling = {"type": "llama3", **LLAMA31_SCALING}
    model = ModelConfig(rotary_base=500000.0, rope_scaling=scaling, head_dim=32)
    hf = get_family("llama").hf_config(model, 1000)
    assert hf["rope_theta"] == 500000.0 and hf["head_dim"] == 32
    assert hf["rope_scaling"] == {"rope_type": "llama3", **LLAMA31_SCALING}
    assert hf["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        **LLAMA31_SCALING,
    }
    plain = get_family("llama").hf_config(ModelConfig(), 1000)
    assert plain["rope_scaling"] is None
    assert plain["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_trtllm_config_of_llama3_and_qwen3() -> None:
    scaling = {"type": "llama3", **LLAMA31_SCALING}
    llama3 = trtllm_config(
        ModelConfig(rope_scaling=scaling, head_dim=32), 1000, 1, 1, torch.float32
    )
    assert llama3["rotary_scaling"] == scaling and llama3["head_size"] == 32
    qwen3_model = ModelConfig(family="qwen3", qk_layernorm=True, head_dim=128)
    qwen3 = trtllm_config(qwen3_model, 1000, 2, 1, torch.float32)
    assert (qwen3["architecture"], qwen3["qwen_type"], qwen3["attn_bias"]) == (
        "Qwen3ForCausalLM",
        "qwen3",
        False,
    )
    assert qwen3["head_size"] == 128 and qwen3["rotary_scaling"] is None
    check_trt_family(qwen3_model)


def test_stored_kernel_choices_are_left_to_the_converting_machine() -> None:
    """A checkpoint trained with Transformer Engine attention and fusions is rebuilt on a
    CPU for conversion with its kernel choices automatic (same weights, same function)."""
    from megatron_forge.config import from_dict
    from megatron_forge.models.build import attention_backend

    stored = {"attention_backend": "te", "apply_rope_fusion": True, "bias_dropout_fusion": True}
    cfg = from_dict({"model": {**stored, "num_layers": 2}, "precision": {"params_dtype": "fp32"}})
    with pytest.raises(ConfigError, match="model.attention_backend=te needs Transformer Engine"):
        cfg.validate(1, cuda_available=False, te_available=False)
    cfg.model = cfg.model.for_this_machine()
    cfg.validate(1, cuda_available=False, te_available=False)
    assert attention_backend(cfg) == "local" and cfg.model.num_layers == 2
    assert all(getattr(cfg.model, name) is None for name in cfg.model.MACHINE_CHOICES)
