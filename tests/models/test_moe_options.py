"""Router/MoE options, expert-tensor parallelism and uneven pipeline stages: every bad value
or combination is refused with its field named (before anything is built), and every
option reaches the megatron-core TransformerConfig field that implements it."""

from __future__ import annotations

import pytest

from megatron_forge.config import ConfigError, load_config
from megatron_forge.models import build_transformer_config, check_model_config, get_family
from megatron_forge.models.build import mixed_layers, moe_fields

MOE = [
    "model.family=mixtral",
    "model.num_layers=4",
    "model.num_experts=8",
    "model.moe_router_topk=2",
    "precision.params_dtype=fp32",
]
QWEN3_MOE = [*MOE, "model.family=qwen3_moe", "model.qk_layernorm=true"]


def _cfg(*overrides: str):
    return load_config(None, [*MOE, *overrides])


def _validate(cfg, world: int) -> None:
    cfg.validate(world, cuda_available=False, te_available=False)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.moe_router_load_balancing_type=none"],
            r"model.moe_aux_loss_coeff=0.01 has no effect with "
            r"model.moe_router_load_balancing_type=none; set moe_aux_loss_coeff=0",
        ),
        (
            ["model.moe_router_load_balancing_type=sinkhorn"],
            r"model.moe_router_load_balancing_type='sinkhorn' must be one of \['aux_loss', "
            r"'seq_aux_loss', 'global_aux_loss', 'none'\]",
        ),
        (["model.moe_aux_loss_coeff=-0.1"], r"model.moe_aux_loss_coeff=-0.1 must be >= 0"),
        (
            ["model.moe_router_score_function=relu"],
            r"model.moe_router_score_function='relu' must be one of \['softmax', 'sigmoid'\]",
        ),
        (
            ["model.moe_router_topk=1"],
            r"model.moe_router_topk=1 with model.moe_router_norm_topk_prob=true gives every "
            r"token the weight 1 and the router no gradient; set moe_router_norm_topk_prob=false",
        ),
        (
            ["model.moe_router_score_function=sigmoid", "model.moe_router_norm_topk_prob=false"],
            r"model.moe_router_score_function=sigmoid always renormalizes the top-k weights "
            r"\(megatron-core\); set model.moe_router_norm_topk_prob=true",
        ),
        (
            ["model.moe_router_enable_expert_bias=true"],
            r"model.moe_router_enable_expert_bias=true \(aux-loss-free balancing\) needs "
            r"model.moe_router_score_function=sigmoid",
        ),
        (
            ["model.moe_router_bias_update_rate=-1"],
            r"model.moe_router_bias_update_rate=-1.0 must be >= 0",
        ),
        (
            ["model.moe_router_topk_scaling_factor=0"],
            r"model.moe_router_topk_scaling_factor=0.0 must be positive \(DeepSeek-V3: 2.5\)",
        ),
        (["model.moe_z_loss_coeff=0"], r"model.moe_z_loss_coeff=0.0 must be positive, or null"),
        (
            ["model.moe_router_num_groups=4"],
            r"group-limited routing needs both model.moe_router_num_groups and "
            r"model.moe_router_group_topk \(got 4 and None\); set both or neither",
        ),
        (
            ["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"],
            r"model.moe_router_num_groups=3 does not divide model.num_experts=8",
        ),
        (
            ["model.moe_router_num_groups=4", "model.moe_router_group_topk=5"],
            r"model.moe_router_group_topk=5 must be in \[1, model.moe_router_num_groups=4\]",
        ),
        (
            [
                "model.moe_router_num_groups=4",
                "model.moe_router_group_topk=1",
                "model.moe_router_topk=4",
            ],
            r"model.moe_router_topk=4 must be a multiple of model.moe_router_group_topk=1 and "
            r"pick at most the 2 experts of each group",
        ),
        (
            ["model.moe_expert_capacity_factor=0"],
            r"model.moe_expert_capacity_factor=0.0 must be positive",
        ),
        (
            ["model.moe_pad_expert_input_to_capacity=true"],
            r"model.moe_pad_expert_input_to_capacity=true needs model.moe_expert_capacity_factor",
        ),
        (
            ["model.moe_token_drop_policy=random"],
            r"model.moe_token_drop_policy='random' must be one of \['probs', 'position'\]",
        ),
        (
            ["model.moe_shared_expert_intermediate_size=0"],
            r"model.moe_shared_expert_intermediate_size=0 must be positive",
        ),
        (
            ["model.moe_shared_expert_gate=true"],
            r"model.moe_shared_expert_gate=true needs model.moe_shared_expert_intermediate_size",
        ),
        (
            ["model.moe_layer_freq=[1, 0]"],
            r"model.moe_layer_freq=\[1, 0\] must list 0 \(dense\) or 1 \(MoE\) for each of the "
            r"model.num_layers=4 layers, with at least one 1",
        ),
        (
            ["model.moe_layer_freq=[0, 0, 0, 0]"],
            r"model.moe_layer_freq=\[0, 0, 0, 0\] must list 0 \(dense\) or 1",
        ),
        (
            ["model.moe_layer_freq=5"],
            r"model.moe_layer_freq=5 must be an int in \[1, model.num_layers=4\]",
        ),
        (
            ["model.moe_first_k_dense_replace=4"],
            r"model.moe_first_k_dense_replace=4 must be in \[0, model.num_layers=4\) \(at "
            r"least one MoE layer\)",
        ),
        (
            ["model.moe_first_k_dense_replace=1", "model.moe_layer_freq=2"],
            r"model.moe_first_k_dense_replace=1 and model.moe_layer_freq=2 both choose the "
            r"dense layers; set only one",
        ),
    ],
)
def test_bad_moe_options_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_a_dense_model_refuses_moe_options() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.moe_router_score_function is an MoE option but model.num_experts is not "
        r"set; set model.num_experts or remove it",
    ):
        load_config(None, ["model.moe_router_score_function=sigmoid"])
    with pytest.raises(ConfigError, match=r"model.moe_first_k_dense_replace is an MoE option"):
        load_config(None, ["model.moe_first_k_dense_replace=1"])


def test_first_k_dense_replace_sets_the_layer_pattern_and_survives_a_reload() -> None:
    cfg = _cfg("model.moe_first_k_dense_replace=1")
    assert cfg.model.moe_layer_freq == [0, 1, 1, 1] == cfg.model.moe_layer_pattern()
    # A checkpoint stores the resolved config; loading it again must not conflict.
    again = load_config(
        None, [*MOE, "model.moe_first_k_dense_replace=1", "model.moe_layer_freq=[0,1,1,1]"]
    )
    assert again.model.moe_layer_freq == [0, 1, 1, 1]
    assert _cfg("model.moe_layer_freq=2").model.moe_layer_pattern() == [1, 0, 1, 0]
    assert _cfg().model.moe_layer_pattern() == [1, 1, 1, 1]
    assert load_config(None, []).model.moe_layer_pattern() == [0, 0]


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (
            ["parallel.expert_tensor=0"],
            1,
            r"parallel.expert_tensor=0 must be >= 1 or null",
        ),
        (
            ["model.num_experts=null", "model.family=llama", "parallel.expert_tensor=1"],
            1,
            r"parallel.expert_tensor=1 needs an MoE model \(model.num_experts\); remove it",
        ),
        (
            ["parallel.expert_tensor=2", "parallel.expert=2"],
            2,
            r"world size 2 is not divisible by parallel.expert_tensor x expert x pipeline = "
            r"2 x 2 x 1 = 4; the expert layers need ETP x EP x PP x expert-data-parallel ranks",
        ),
        (
            ["parallel.expert_tensor=3"],
            3,
            r"model.moe_ffn_hidden_size=256 is not divisible by parallel.expert_tensor=3",
        ),
        (
            ["parallel.tensor=2"],
            2,
            r"parallel.tensor=2 with an MoE model needs parallel.sequence_parallel=true",
        ),
        (
            ["model.num_layers=5", "parallel.pipeline=2"],
            2,
            r"model.num_layers=5 is not divisible by parallel.pipeline=2; or set "
            r"parallel.layers_in_first_stage / layers_in_last_stage",
        ),
        (
            ["model.num_layers=5", "parallel.pipeline=3", "parallel.layers_in_first_stage=2"],
            3,
            r"model.num_layers=5 with parallel.layers_in_first_stage=2 and "
            r"layers_in_last_stage=None leaves 3 layers for the 2 middle stage\(s\) of "
            r"parallel.pipeline=3, not divisible by 2; change the first/last stage sizes",
        ),
        (
            [
                "model.num_layers=4",
                "parallel.pipeline=2",
                "parallel.layers_in_first_stage=2",
                "parallel.layers_in_last_stage=1",
            ],
            2,
            r"leaves 1 layers for the 0 middle stage\(s\) of parallel.pipeline=2; every stage "
            r"needs layers",
        ),
        (
            ["model.num_layers=4", "parallel.pipeline=2", "parallel.layers_in_first_stage=4"],
            2,
            r"leaves 0 layers for the 1 middle stage\(s\) of parallel.pipeline=2; every stage "
            r"needs layers",
        ),
        (
            [
                "model.num_layers=6",
                "parallel.pipeline=2",
                "parallel.virtual_pipeline=2",
                "parallel.layers_in_first_stage=3",
                "train.global_batch_size=16",
            ],
            2,
            r"parallel.layers_in_first_stage=3 is not divisible by parallel.virtual_pipeline=2",
        ),
        (
            ["parallel.layers_in_first_stage=1"],
            1,
            r"parallel.layers_in_first_stage / layers_in_last_stage need parallel.pipeline > 1",
        ),
        (
            [
                "model.num_layers=5",
                "parallel.pipeline=2",
                "parallel.layers_in_first_stage=1",
                "recompute.granularity=full",
                "recompute.method=block",
                "recompute.num_layers=2",
            ],
            2,
            r"recompute.num_layers=2 exceeds the 1 layers of the smallest pipeline stage",
        ),
        (
            ["model.num_layers=4", "parallel.pipeline=2", "parallel.pipeline_layout=Ett|tL"],
            2,
            r"parallel.pipeline_layout='Ett\|tL' places 3 decoder layers \(t\), "
            r"model.num_layers is 4",
        ),
        (
            ["model.num_layers=4", "parallel.pipeline=2", "parallel.pipeline_layout=Et|t|t|tL"],
            2,
            r"has 4 stage groups, but parallel.pipeline=2 x virtual_pipeline=None needs 2; "
            r"set parallel.virtual_pipeline=2",
        ),
        (
            ["model.num_layers=4", "parallel.pipeline=2", "parallel.pipeline_layout=tEt|ttL"],
            2,
            r"the embedding \(E\) must open the first group",
        ),
        (
            ["model.num_layers=4", "parallel.pipeline=2", "parallel.pipeline_layout=Ett|tLt"],
            2,
            r"the loss \(L\) must close the last group",
        ),
        (
            ["model.num_layers=4", "parallel.pipeline=2", "parallel.pipeline_layout=Ett|ttmL"],
            2,
            r"places 1 MTP layers \(m\), model.mtp_num_layers is None",
        ),
        (
            ["model.num_layers=4", "parallel.pipeline=2", "parallel.pipeline_layout=Ett|tx|L"],
            2,
            r"parallel.pipeline_layout='Ett\|tx\|L' cannot be read: .*Invalid layer character",
        ),
        (
            [
                "model.num_layers=4",
                "parallel.pipeline=2",
                "parallel.layers_in_first_stage=1",
                "parallel.pipeline_layout=Et|tttL",
            ],
            2,
            r"parallel.pipeline_layout places every layer itself: remove "
            r"parallel.layers_in_first_stage / layers_in_last_stage",
        ),
        (
            ["parallel.pipeline_layout=EttL"],
            1,
            r"parallel.pipeline_layout needs parallel.pipeline > 1",
        ),
        (
            [
                "model.num_layers=3",
                "parallel.pipeline=2",
                "parallel.pipeline_layout=Et|ttL",
                "recompute.granularity=full",
                "recompute.method=block",
                "recompute.num_layers=2",
            ],
            2,
            r"recompute.num_layers=2 exceeds the 1 decoder layers of the smallest group",
        ),
        (
            ["recompute.granularity=selective", "recompute.modules=[mla_up_proj]"],
            1,
            r"recompute.modules=\[mla_up_proj\] .* needs model.multi_latent_attention=true",
        ),
    ],
)
def test_bad_layouts_are_refused(overrides: list[str], world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _validate(_cfg(*overrides), world)


def test_good_layouts_pass_and_split_as_megatron_does() -> None:
    """ETP=1 under TP=2 x EP=2 on 2 ranks (each expert whole, experts over both ranks);
    61 layers over PP=8 as DeepSeek-V3 splits them: 61 = 5 + 6 x 8 + 8."""
    cfg = _cfg("parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2")
    cfg.parallel.expert_tensor = 1
    cfg.validate(2, cuda_available=True, te_available=True)
    assert cfg.parallel.expert_tensor_size == 1
    assert cfg.describe_layout(2).startswith("TP=2 PP=1 CP=1 EP=2 ETP=1 DP=1 ")
    assert _cfg().parallel.expert_tensor_size == 1 == _cfg().parallel.tensor
    cfg = _cfg(
        "model.num_layers=61",
        "parallel.pipeline=8",
        "parallel.layers_in_first_stage=5",
        "parallel.layers_in_last_stage=8",
        "train.global_batch_size=16",
        "train.micro_batch_size=1",
    )
    _validate(cfg, 8)
    assert cfg.parallel.layers_per_stage(61) == [5, 8, 8, 8, 8, 8, 8, 8]
    assert cfg.describe_layout(8) == (
        "TP=1 PP=8 CP=1 EP=1 DP=1 stages=5+8+8+8+8+8+8+8 microbatches=16"
    )
    cfg = _cfg("model.num_layers=3", "parallel.pipeline=2", "parallel.layers_in_first_stage=1")
    _validate(cfg, 2)
    assert cfg.parallel.layers_per_stage(3) == [1, 2]
    tc = build_transformer_config(cfg)
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (
        1,
        None,
    )


def test_pipeline_layout_places_layers_as_megatron_does() -> None:
    """DeepSeek-V3's layout from Megatron-Bridge's 1,024-GPU recipe: 32 groups over PP 8 x
    virtual 4; our per-stage layer counts, the memory estimate's stages and megatron-core's
    own placement (PipelineParallelLayerLayout, through TransformerConfig) agree."""
    from megatron.core.transformer.enums import LayerType

    from megatron_forge.memory import _stage_layers

    cfg = load_config("configs/deepseek_v3.yaml", [])
    cfg.validate(1024, cuda_available=True, te_available=True)
    assert cfg.parallel.layers_per_stage(61) == [7, 8, 8, 8, 8, 8, 8, 6]
    assert "stages=7+8+8+8+8+8+8+6 " in cfg.describe_layout(1024)
    stages = _stage_layers(cfg)
    assert stages[0] == [0, 15, 16, 31, 32, 47, 48] and sorted(sum(stages, [])) == list(range(61))
    layout = build_transformer_config(cfg).pipeline_model_parallel_layout
    assert layout.virtual_pipeline_model_parallel_size == 4
    for rank in range(8):
        chunks = layout.layout[rank]
        assert sum(c.count(LayerType.decoder) for c in chunks) == len(stages[rank])
        first = layout.get_layer_offset(vp_stage=0, pp_rank=rank)
        assert stages[rank][0] == first
    assert LayerType.mtp in layout.layout[7][3] and LayerType.loss in layout.layout[7][3]


def _megatron_config(cfg):
    """megatron-core's TransformerConfig of an MoE model whose options no registered
    HF-exportable family takes (sigmoid, groups, shared experts, dense layers): the llama
    block's fields and :func:`moe_fields`, as build_transformer_config combines them."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = get_family("llama").transformer_fields(cfg.model)
    return TransformerConfig(**fields, **moe_fields(cfg.model), expert_model_parallel_size=2)


def test_every_option_reaches_transformer_config() -> None:
    cfg = _cfg(
        "model.moe_router_load_balancing_type=seq_aux_loss",
        "model.moe_aux_loss_coeff=0.0001",
        "model.moe_router_score_function=sigmoid",
        "model.moe_router_topk_scaling_factor=2.5",
        "model.moe_router_enable_expert_bias=true",
        "model.moe_router_bias_update_rate=0.002",
        "model.moe_router_num_groups=4",
        "model.moe_router_group_topk=2",
        "model.moe_z_loss_coeff=0.001",
        "model.moe_expert_capacity_factor=1.25",
        "model.moe_pad_expert_input_to_capacity=true",
        "model.moe_token_drop_policy=position",
        "model.moe_shared_expert_intermediate_size=96",
        "model.moe_shared_expert_gate=true",
        "model.moe_first_k_dense_replace=1",
        "model.moe_ffn_hidden_size=48",
        "model.moe_token_dispatcher=allgather",
    )
    tc = _megatron_config(cfg)
    assert tc.num_moe_experts == 8 and tc.moe_router_topk == 2 and tc.moe_ffn_hidden_size == 48
    assert tc.moe_router_load_balancing_type == "seq_aux_loss" and tc.moe_aux_loss_coeff == 1e-4
    assert tc.moe_router_score_function == "sigmoid" and not tc.moe_router_pre_softmax
    assert tc.moe_router_topk_scaling_factor == 2.5
    assert tc.moe_router_enable_expert_bias and tc.moe_router_bias_update_rate == 0.002
    assert (tc.moe_router_num_groups, tc.moe_router_group_topk) == (4, 2)
    assert tc.moe_z_loss_coeff == 0.001
    assert tc.moe_expert_capacity_factor == 1.25 and tc.moe_pad_expert_input_to_capacity
    assert tc.moe_token_drop_policy == "position"
    assert tc.moe_shared_expert_intermediate_size == 96 and tc.moe_shared_expert_gate
    assert tc.moe_layer_freq == [0, 1, 1, 1] and mixed_layers(cfg)
    assert tc.moe_token_dispatcher_type == "allgather"
    # Through build_transformer_config, with a family that takes them.
    tc = build_transformer_config(
        load_config(
            None,
            [
                *QWEN3_MOE,
                "model.moe_router_load_balancing_type=global_aux_loss",
                "model.moe_z_loss_coeff=0.01",
                "model.moe_expert_capacity_factor=1.0",
                "parallel.expert=2",
                "parallel.expert_tensor=1",
            ],
        )
    )
    assert tc.moe_router_load_balancing_type == "global_aux_loss" and tc.moe_z_loss_coeff == 0.01
    assert tc.moe_expert_capacity_factor == 1.0 and tc.qk_layernorm
    assert (tc.expert_model_parallel_size, tc.expert_tensor_parallel_size) == (2, 1)
    # Defaults: ETP = TP; softmax with norm_topk_prob is a softmax after the top-k.
    tc = build_transformer_config(_cfg())
    assert tc.expert_tensor_parallel_size == tc.tensor_model_parallel_size == 1
    assert tc.moe_router_score_function == "softmax" and not tc.moe_router_pre_softmax
    assert tc.moe_layer_freq == 1 and tc.moe_router_load_balancing_type == "aux_loss"
    # norm_topk_prob=false: the top-k of the softmax over all experts (pre-softmax).
    tc = build_transformer_config(
        load_config(None, [*QWEN3_MOE, "model.moe_router_norm_topk_prob=false"])
    )
    assert tc.moe_router_pre_softmax


def test_a_dense_first_model_builds_dense_and_moe_layers() -> None:
    """megatron-core's decoder block spec gives layer 0 a dense SwiGLU and the rest
    experts (the local spec on CPU, one process, no parallel state needed)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    tc = _megatron_config(_cfg("model.moe_first_k_dense_replace=1"))
    spec = get_gpt_decoder_block_spec(
        tc, use_transformer_engine=False, normalization="RMSNorm", pp_rank=0
    )
    names = [layer.submodules.mlp.module.__name__ for layer in spec.layer_specs]
    assert names == ["MLP", "MoELayer", "MoELayer", "MoELayer"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.moe_router_score_function=sigmoid"],
            r"model.moe_router_score_function='sigmoid' cannot be exported as Qwen3MoeForCausalLM \(its router is a softmax\)",
        ),
        (
            ["model.moe_shared_expert_intermediate_size=64"],
            r"model.moe_shared_expert_intermediate_size=64 cannot be exported as Qwen3MoeForCausalLM \(it has no shared expert\)",
        ),
        (
            ["model.moe_router_num_groups=4", "model.moe_router_group_topk=2"],
            r"model.moe_router_num_groups=4 cannot be exported as Qwen3MoeForCausalLM \(it has "
            r"no group-limited routing\)",
        ),
        (
            ["model.qk_layernorm=false"],
            r"model.family=qwen3_moe has QK-norm in every layer; set model.qk_layernorm=true",
        ),
    ],
)
def test_qwen3_moe_refuses_what_its_hf_format_cannot_hold(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_model_config(load_config(None, [*QWEN3_MOE, *overrides]).model)
    check_model_config(load_config(None, QWEN3_MOE).model)
    check_model_config(
        load_config(None, [*QWEN3_MOE, "model.moe_router_norm_topk_prob=false"]).model
    )


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "model.moe_router_norm_topk_prob=false",
            r"model.moe_router_norm_topk_prob=False cannot be exported as MixtralForCausalLM \(it always renormalizes",
        ),
        (
            "model.moe_router_topk_scaling_factor=2.0",
            r"model.moe_router_topk_scaling_factor=2.0 cannot be exported as MixtralForCausalLM",
        ),
        (
            "model.moe_layer_freq=2",
            r"model.moe_layer_freq=2 cannot be exported as MixtralForCausalLM \(every layer is MoE\)",
        ),
    ],
)
def test_mixtral_refuses_what_its_hf_format_cannot_hold(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_model_config(_cfg(override).model)


def test_qwen3_moe_dense_layers_round_trip_through_hf_config() -> None:
    """model.moe_layer_freq <-> mlp_only_layers, and decoder_sparse_step read as
    Qwen3MoeDecoderLayer reads it (layer i is MoE when (i + 1) % step == 0); such models
    are saved per layer by megatron-core, so their rules use decoder.layers.N. keys."""
    family = get_family("qwen3_moe")
    model = load_config(None, [*QWEN3_MOE, "model.moe_first_k_dense_replace=1"]).model
    hf = family.hf_config(model, 1000)
    assert (hf["mlp_only_layers"], hf["decoder_sparse_step"]) == ([0], 1)
    assert family.model_fields(hf)["moe_layer_freq"] == [0, 1, 1, 1]
    stepped = family.model_fields({**hf, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert stepped["moe_layer_freq"] == [0, 1, 0, 1]
    all_moe = family.model_fields({**hf, "mlp_only_layers": []})
    assert all_moe["moe_layer_freq"] == 1
    rules = family.weight_rules(model, 1000, 1024)
    keys = {key: rule.index for rule in rules for key in rule.megatron}
    assert keys["decoder.layers.0.mlp.linear_fc1.weight"] == ()
    assert keys["decoder.layers.3.mlp.linear_fc1.layer_norm_weight"] == ()
    assert keys["decoder.layers.3.mlp.experts.experts.linear_fc1.weight"] == (7,)
    assert not [k for k in keys if k.startswith("decoder.layers.mlp")]
