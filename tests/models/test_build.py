"""Every model/performance option lands in the megatron-core object that implements it:
TransformerConfig, the DDP config, the layer spec. (No processes are started.)"""

from __future__ import annotations

import pytest

from megatron_forge.config import load_config
from megatron_forge.models import build_transformer_config, padded_vocab_size
from megatron_forge.models.build import layer_spec, performance_fields
from megatron_forge.training.optim import ddp_config


def _cfg(*overrides: str):
    return load_config(None, ["precision.params_dtype=fp32", *overrides])


def test_llama_architecture_fields() -> None:
    tc = build_transformer_config(
        _cfg(
            "model.hidden_size=128",
            "model.num_attention_heads=8",
            "model.num_query_groups=2",
            "model.ffn_hidden_size=344",
            "model.norm_epsilon=1e-6",
            "model.num_layers=4",
        )
    )
    assert (tc.hidden_size, tc.num_attention_heads, tc.num_query_groups) == (128, 8, 2)
    assert tc.ffn_hidden_size == 344 and tc.num_layers == 4
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.gated_linear_unit and not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.calculate_per_token_loss  # token-weighted loss across microbatches and DP
    assert tc.activation_func.__name__ == "silu"


def test_mixtral_moe_fields() -> None:
    tc = build_transformer_config(
        _cfg(
            "model.family=mixtral",
            "model.num_experts=8",
            "model.moe_router_topk=2",
            "model.moe_aux_loss_coeff=0.02",
            "model.moe_token_dispatcher=allgather",
        )
    )
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_aux_loss_coeff) == (8, 2, 0.02)
    assert tc.moe_router_load_balancing_type == "aux_loss"
    assert tc.moe_token_dispatcher_type == "allgather"
    assert tc.moe_grouped_gemm is False  # no Transformer Engine here


def test_layout_fields() -> None:
    tc = build_transformer_config(
        _cfg(
            "parallel.tensor=2",
            "parallel.pipeline=2",
            "parallel.virtual_pipeline=2",
            "model.num_layers=8",
        )
    )
    assert tc.tensor_model_parallel_size == 2 and tc.pipeline_model_parallel_size == 2
    assert tc.virtual_pipeline_model_parallel_size == 2


def test_recompute_selective_and_full() -> None:
    tc = build_transformer_config(
        _cfg("recompute.granularity=selective", "recompute.modules=[core_attn, mlp]")
    )
    assert tc.recompute_granularity == "selective"
    assert tc.recompute_modules == ["core_attn", "mlp"]
    tc = build_transformer_config(
        _cfg("recompute.granularity=full", "recompute.method=block", "recompute.num_layers=1")
    )
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        "full",
        "block",
        1,
    )


def test_ddp_overlap_options() -> None:
    cfg = _cfg(
        "parallel.overlap_grad_reduce=true",
        "parallel.overlap_param_gather=true",
        "parallel.grad_bucket_size_mb=40",
    )
    dc = ddp_config(cfg)
    assert dc.overlap_grad_reduce and dc.overlap_param_gather and dc.use_distributed_optimizer
    assert dc.bucket_size == 40 * 2**20 and dc.grad_reduce_in_fp32
    assert not ddp_config(_cfg()).overlap_grad_reduce


def test_fp8_fields() -> None:
    cfg = load_config(
        None,
        [
            "precision.params_dtype=bf16",
            "precision.fp8=hybrid",
            "precision.fp8_recipe=tensorwise",
            "precision.fp8_param_gather=true",
            "precision.first_last_layers_bf16=true",
            "precision.num_layers_at_end_in_bf16=2",
        ],
    )
    fields = performance_fields(cfg)
    assert fields["fp8"] == "hybrid" and fields["fp8_recipe"] == "tensorwise"
    assert fields["fp8_param"] is True and fields["first_last_layers_bf16"] is True
    assert fields["num_layers_at_end_in_bf16"] == 2
    assert ddp_config(cfg).fp8_param_gather is True
    assert "fp8" not in performance_fields(_cfg())


def test_local_spec_without_te() -> None:
    spec = layer_spec(_cfg())
    assert "TE" not in repr(spec.submodules.self_attention.submodules.linear_qkv)


def test_vocab_padding() -> None:
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(32001, 128, 8) == 32768  # next multiple of 128 x TP = 1024
    assert padded_vocab_size(2048, 128, 2) == 2048


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["parallel.overlap_param_gather=true"],
            "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true and "
            "parallel.overlap_grad_reduce=true",
        ),
        (
            ["parallel.tp_comm_overlap=true"],
            "parallel.tp_comm_overlap=true needs parallel.sequence_parallel=true",
        ),
        (
            ["recompute.granularity=full"],
            "recompute.granularity=full needs recompute.method (uniform or block)",
        ),
        (
            ["recompute.method=block"],
            "recompute.method and recompute.num_layers apply only to granularity=full",
        ),
        (["recompute.modules=[attention]"], "recompute.modules has unknown entries ['attention']"),
        (
            ["precision.fp8_param_gather=true"],
            "precision.fp8_param_gather=true needs precision.fp8",
        ),
        (
            [
                "precision.params_dtype=bf16",
                "precision.fp8=e4m3",
                "precision.first_last_layers_bf16=true",
            ],
            "precision.first_last_layers_bf16 is not supported with precision.fp8_recipe=delayed",
        ),
        (
            ["precision.params_dtype=fp32", "precision.fp8=e4m3"],
            "precision.fp8=e4m3 needs precision.params_dtype=bf16",
        ),
    ],
)
def test_incompatible_options_rejected(overrides: list[str], message: str) -> None:
    from megatron_forge.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (
            [
                "model.num_layers=4",
                "parallel.pipeline=2",
                "recompute.granularity=full",
                "recompute.method=block",
                "recompute.num_layers=3",
            ],
            2,
            "recompute.num_layers=3 exceeds the 2 layers per pipeline stage",
        ),
        (
            ["model.family=mixtral", "model.num_experts=4", "model.moe_token_dispatcher=flex"],
            1,
            "model.moe_token_dispatcher=flex needs CUDA, Transformer Engine and DeepEP",
        ),
        (
            ["model.family=mixtral", "model.num_experts=4", "model.moe_grouped_gemm=true"],
            1,
            "model.moe_grouped_gemm=true needs Transformer Engine",
        ),
        (
            [
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "parallel.tp_comm_overlap=true",
            ],
            2,
            "parallel.sequence_parallel=true needs Transformer Engine's layer spec",
        ),
        (
            ["parallel.context=2", "parallel.cp_comm_type=a2a"],
            2,
            "parallel.context=2 needs Transformer Engine's attention",
        ),
    ],
)
def test_incompatible_with_this_machine(overrides: list[str], world: int, message: str) -> None:
    from megatron_forge.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(*overrides).validate(world, cuda_available=False, te_available=False)
    assert message in str(err.value)
