"""Config loading, overrides and every validation rule, with the exact error text."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_forge.config import ConfigError, load_config
from megatron_forge.models import check_model_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def _validate(cfg, world: int = 1, cuda: bool = False, te: bool = False) -> None:
    cfg.validate(world, cuda_available=cuda, te_available=te)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    p = cfg.parallel
    world = p.tensor * p.pipeline * p.context * max(p.expert, 2)
    on_gpu = cfg.precision.params_dtype != "fp32"
    _validate(cfg, world, cuda=on_gpu, te=on_gpu)


def test_configs_present() -> None:
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "tiny_moe.yaml", "llama_7b.yaml"} <= names


def test_overrides_parse_as_yaml() -> None:
    cfg = _cfg(
        "train.lr=1e-4",
        "parallel.sequence_parallel=true",
        "parallel.tensor=2",
        "data.blend=[0.3, a, 0.7, b]",
        "checkpoint.load=null",
    )
    assert cfg.train.lr == 1e-4 and cfg.parallel.sequence_parallel is True
    assert cfg.data.prefixes_and_weights() == (["a", "b"], [0.3, 0.7])
    assert cfg.checkpoint.load is None


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*'min_lr'|lr"):
        _cfg("train.learning_rat=1")
    with pytest.raises(
        ConfigError, match=r"unknown key 'model.num_layer'; did you mean 'num_layers'"
    ):
        _cfg("model.num_layer=4")
    with pytest.raises(ConfigError, match=r"unknown section 'modle'; did you mean 'model'"):
        _cfg("modle.num_layers=4")


def test_unknown_key_in_yaml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown key 'model.hiden_size'; did you mean 'hidden_size'"
    ):
        load_config(path)


def test_type_errors_name_field() -> None:
    with pytest.raises(ConfigError, match=r"train.lr='fast' must be a number"):
        _cfg("train.lr=fast")
    with pytest.raises(ConfigError, match=r"model.num_layers=2.5 must be an integer"):
        _cfg("model.num_layers=2.5")
    # The config layer knows no family: the model registry checks it, for every entry point.
    with pytest.raises(
        ConfigError,
        match=r"model.family='gpt' is not a registered family; known: \['llama', .*'qwen3_moe'",
    ):
        check_model_config(_cfg("model.family=gpt").model)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"must look like section.key=value"):
        _cfg("lr=1")


def test_world_size_must_factor() -> None:
    cfg = _cfg("parallel.tensor=2", "parallel.pipeline=2")
    with pytest.raises(
        ConfigError,
        match=r"world size 6 is not divisible by parallel.tensor x "
        r"pipeline x context = 2 x 2 x 1 = 4",
    ):
        _validate(cfg, 6)


def test_heads_and_groups_divisible_by_tp() -> None:
    cfg = _cfg("model.num_attention_heads=4", "model.hidden_size=96", "parallel.tensor=3")
    with pytest.raises(
        ConfigError,
        match=r"model.num_attention_heads=4 is not divisible by "
        r"parallel.tensor=3",
    ):
        _validate(cfg, 3)
    cfg = _cfg("model.num_attention_heads=4", "model.num_query_groups=1", "parallel.tensor=2")
    with pytest.raises(
        ConfigError,
        match=r"model.num_query_groups=1 is not divisible by "
        r"parallel.tensor=2",
    ):
        _validate(cfg, 2)


def test_layers_divisible_by_pipeline() -> None:
    cfg = _cfg("model.num_layers=3", "parallel.pipeline=2")
    with pytest.raises(
        ConfigError,
        match=r"model.num_layers=3 is not divisible by "
        r"parallel.pipeline=2",
    ):
        _validate(cfg, 2)
    cfg = _cfg("model.num_layers=6", "parallel.pipeline=2", "parallel.virtual_pipeline=2")
    with pytest.raises(
        ConfigError,
        match=r"model.num_layers=6 is not divisible by "
        r"parallel.pipeline x virtual_pipeline = 4",
    ):
        _validate(cfg, 2)


def test_experts_divisible_by_ep_and_layout() -> None:
    cfg = _cfg("model.family=mixtral", "model.num_experts=6", "parallel.expert=4")
    with pytest.raises(
        ConfigError,
        match=r"model.num_experts=6 is not divisible by "
        r"parallel.expert=4",
    ):
        _validate(cfg, 4)
    cfg = _cfg(
        "model.family=mixtral", "model.num_experts=4", "parallel.expert=4", "parallel.tensor=2"
    )
    with pytest.raises(
        ConfigError,
        match=r"parallel.expert=4 must divide data-parallel x "
        r"context size = 2 x 1",
    ):
        _validate(cfg, 4)
    cfg = _cfg("parallel.expert=2")
    with pytest.raises(ConfigError, match=r"parallel.expert=2 needs an MoE model"):
        _validate(cfg, 2)


def test_global_batch_divisible() -> None:
    cfg = _cfg("train.micro_batch_size=2", "train.global_batch_size=6")
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size=6 is not divisible by "
        r"train.micro_batch_size x data-parallel size = 2 x 2",
    ):
        _validate(cfg, 2)
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size=7 is not divisible by "
        r"train.micro_batch_size=2",
    ):
        _cfg("train.micro_batch_size=2", "train.global_batch_size=7")


def test_seq_length_within_positions() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.seq_length=256 exceeds "
        r"model.max_position_embeddings=128",
    ):
        _cfg("model.seq_length=256", "model.max_position_embeddings=128")


def test_sequence_parallel_needs_tp() -> None:
    with pytest.raises(
        ConfigError,
        match=r"parallel.sequence_parallel=true requires "
        r"parallel.tensor > 1",
    ):
        _cfg("parallel.sequence_parallel=true")


def test_fp8_needs_cuda_and_te() -> None:
    cfg = _cfg("precision.fp8=hybrid", "precision.params_dtype=bf16")
    with pytest.raises(
        ConfigError,
        match=r"precision.fp8=hybrid needs CUDA and Transformer "
        r"Engine \(CUDA available: False",
    ):
        _validate(cfg, 1)
    _validate(cfg, 1, cuda=True, te=True)


def test_cpu_needs_fp32() -> None:
    cfg = _cfg("precision.params_dtype=bf16")
    with pytest.raises(ConfigError, match=r"precision.params_dtype=bf16 is not supported on CPU"):
        _validate(cfg, 1)


def test_moe_fields_need_mixtral() -> None:
    with pytest.raises(ConfigError, match=r"model.num_experts=4 is set for family=llama"):
        check_model_config(_cfg("model.num_experts=4").model)


LLAMA31 = (
    "model.rope_scaling={type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4, "
    "original_max_position_embeddings: 8192}"
)


def test_rope_scaling_from_yaml_and_nested_overrides(tmp_path: Path) -> None:
    path = tmp_path / "llama3.yaml"
    path.write_text(
        "model:\n  rope_scaling:\n    type: llama3\n    factor: 8.0\n    low_freq_factor: 1.0\n"
        "    high_freq_factor: 4.0\n    original_max_position_embeddings: 8192\n"
    )
    scaling = load_config(path).model.rope_scaling
    assert scaling.to_dict() == {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert load_config(path, ["model.rope_scaling.factor=32"]).model.rope_scaling.factor == 32.0
    assert load_config(path, ["model.rope_scaling=null"]).model.rope_scaling is None
    assert _cfg(LLAMA31).model.rope_scaling == scaling
    assert _cfg().model.rope_scaling is None  # plain RoPE by default
    # The resolved config (stored in checkpoints) loads back to the same model.
    from megatron_forge.config import from_dict

    cfg = load_config(path)
    assert from_dict(cfg.to_dict()).model == cfg.model


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.rope_scaling.factor=32"],
            r"with command-line override 'model.rope_scaling.factor=32': "
            r"model.rope_scaling.type is not set; set it to one of \['llama3', 'yarn'\]",
        ),
        (
            ["model.rope_scaling={type: dynamic, factor: 4}"],
            r"model.rope_scaling.type='dynamic' must be one of \['llama3', 'yarn'\]",
        ),
        (
            ["model.rope_scaling={type: llama3, factor: 8}"],
            r"model.rope_scaling.low_freq_factor is required for model.rope_scaling.type=llama3",
        ),
        (
            [LLAMA31, "model.rope_scaling.factor=0.5"],
            r"model.rope_scaling.factor=0.5 must be >= 1",
        ),
        (
            [LLAMA31, "model.rope_scaling.high_freq_factor=1"],
            r"low_freq_factor=1.0 and high_freq_factor=1.0 must satisfy 0 < low_freq_factor < "
            r"high_freq_factor",
        ),
        (
            [LLAMA31, "model.rope_scaling.original_max_position_embeddings=0"],
            r"model.rope_scaling.original_max_position_embeddings=0 must be positive",
        ),
        (
            ["model.rope_scaling.fator=8"],
            r"unknown key 'model.rope_scaling.fator'; did you mean 'factor'",
        ),
        (["model.rope_scaling=[8]"], r"model.rope_scaling must be a mapping, got \[8\]"),
        (["model.head_dim.x=1"], r"'model.head_dim' is not a mapping"),
        (["model.head_dim=0"], r"model.head_dim=0 must be a positive even number"),
        (["model.head_dim=33"], r"model.head_dim=33 must be a positive even number"),
        (
            ["model.hidden_size=100", "model.num_attention_heads=8"],
            r"model.hidden_size=100 is not divisible by model.num_attention_heads=8; change "
            r"one, or set model.head_dim",
        ),
    ],
)
def test_rope_scaling_and_head_dim_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_head_dim_and_qk_layernorm() -> None:
    model = _cfg("model.hidden_size=100", "model.num_attention_heads=8", "model.head_dim=64").model
    assert model.attention_head_dim == 64  # heads x head_dim need not be hidden_size
    assert (
        _cfg("model.hidden_size=128", "model.num_attention_heads=8").model.attention_head_dim == 16
    )
    qwen3 = _cfg("model.family=qwen3", "model.qk_layernorm=true", "model.head_dim=128").model
    check_model_config(qwen3)
    with pytest.raises(ConfigError, match=r"model.family=qwen3 has QK-norm in every layer; set "):
        check_model_config(_cfg("model.family=qwen3").model)
    for family in ("llama", "qwen2"):
        with pytest.raises(
            ConfigError, match=rf"model.qk_layernorm=true is not part of model.family={family}"
        ):
            check_model_config(_cfg(f"model.family={family}", "model.qk_layernorm=true").model)


def test_derived_defaults() -> None:
    cfg = _cfg("model.hidden_size=4096", "model.num_attention_heads=32")
    assert cfg.model.ffn_hidden_size == 11008  # Llama-2-7B's rule
    assert cfg.model.num_query_groups == 32
    assert cfg.model.max_position_embeddings == cfg.model.seq_length
    assert cfg.num_microbatches(world_size := 2) == cfg.train.global_batch_size // (
        cfg.train.micro_batch_size * world_size
    )


def test_sequence_and_context_parallel_need_te() -> None:
    cfg = _cfg("parallel.sequence_parallel=true", "parallel.tensor=2")
    with pytest.raises(
        ConfigError,
        match=r"parallel.sequence_parallel=true needs Transformer "
        r"Engine's layer spec",
    ):
        _validate(cfg, 2)
    cfg = _cfg("parallel.context=2")
    with pytest.raises(
        ConfigError,
        match=r"parallel.context=2 needs Transformer Engine's "
        r"attention",
    ):
        _validate(cfg, 2)
    _validate(_cfg("parallel.context=2", "precision.params_dtype=bf16"), 2, cuda=True, te=True)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 1.0e-3\ntrain:\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml is not valid YAML: .*duplicate key 'train'"):
        load_config(path)


def test_time_must_be_a_quoted_slurm_limit() -> None:
    with pytest.raises(ConfigError, match=r"launch.time=14400 must be a string; quote it"):
        _cfg("launch.time=4:00:00")  # YAML reads unquoted 4:00:00 as 14400
    with pytest.raises(ConfigError, match=r"launch.time='4h' is not a Slurm time limit"):
        _cfg('launch.time="4h"')
    assert _cfg('launch.time="1-12:00:00"').launch.time == "1-12:00:00"


def test_override_with_bad_yaml_names_the_override() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.lr=[1,"])
    assert str(err.value) == (
        "command-line override 'train.lr=[1,': the value '[1,' is not valid YAML (expected the "
        "node content, but found '<stream end>' at column 4); close its brackets and quotes "
        "(e.g. data.blend=[a, b]), or quote a string value for YAML inside the shell's quotes "
        "(e.g. 'logging.dir=\"a: b\"')"
    )
    with pytest.raises(ConfigError, match=r"^command-line override 'logging.dir=\"a': the value"):
        _cfg('logging.dir="a')


def test_unknown_override_names_the_command_line_not_the_file() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.lrr=1"])
    assert str(err.value) == (
        "command-line override 'train.lrr=1': unknown key 'train.lrr'; did you mean 'lr'?"
    )
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["tran.lr=1"])
    assert str(err.value) == (
        "command-line override 'tran.lr=1': unknown section 'tran'; did you mean 'train'?"
    )
    with pytest.raises(ConfigError, match=r"^command-line override 'lr=1' must look like"):
        load_config(TINY, ["lr=1"])
    # A bad value names the file it was merged into and the override that set it.
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["data.full_check=maybe", "train.lr=1e-3"])
    assert str(err.value) == (
        f"{TINY} with command-line override 'data.full_check=maybe': "
        "data.full_check='maybe' must be true or false"
    )


def test_rule_broken_by_an_override_names_file_and_override(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.min_lr=0.01", "model.num_layers=4"])
    assert str(err.value) == (
        f"{path} with command-line override 'train.min_lr=0.01': train.min_lr=0.01 is above "
        "train.lr=0.001; min_lr must be in [0, train.lr]"
    )
    path.write_text("train:\n  lr: .nan\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.num_layers=4"])  # not named: the file's value is at fault
    assert str(err.value) == (
        f"{path}: train.lr=nan must be a finite number >= 0 (default: 0.0003)"
    )


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("train.lr=nan", "train.lr=nan"),
        ("train.lr=.nan", "train.lr=nan"),
        ("train.lr=-1e-4", "train.lr=-0.0001"),
        ("train.lr=inf", "train.lr=inf"),
        ("train.lr=1e400", "train.lr=inf"),  # YAML reads it as a float that overflows
        ("train.min_lr=nan", "train.min_lr=nan"),
        ("train.min_lr=-1", "train.min_lr=-1.0"),
        ("train.weight_decay=nan", "train.weight_decay=nan"),
        ("train.adam_eps=-1e-8", "train.adam_eps=-1e-08"),
        ("train.clip_grad=inf", "train.clip_grad=inf"),
    ],
)
def test_bad_float_fields_name_the_field(override: str, shown: str) -> None:
    name = shown.split("=")[0].split(".")[1]
    default = {"lr": 0.0003, "min_lr": 3e-05, "weight_decay": 0.1, "adam_eps": 1e-08}
    default["clip_grad"] = 1.0
    expected = f"{shown} must be a finite number >= 0 (default: {default[name]})"
    with pytest.raises(ConfigError) as err:
        _cfg(override)
    assert str(err.value) == expected
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert str(err.value) == f"{TINY} with command-line override {override!r}: {expected}"


def test_adam_betas_in_unit_interval() -> None:
    with pytest.raises(ConfigError) as err:
        _cfg("train.adam_beta2=1")
    assert str(err.value) == "train.adam_beta2=1.0 must be in [0, 1) (default: 0.95)"
    with pytest.raises(ConfigError, match=r"train.adam_beta1=nan must be in \[0, 1\)"):
        _cfg("train.adam_beta1=nan")
    cfg = _cfg("train.lr=0", "train.min_lr=0", "train.clip_grad=0", "train.weight_decay=0")
    assert cfg.train.lr == 0.0 and cfg.train.clip_grad == 0.0


def test_data_full_check_defaults_off() -> None:
    assert _cfg().data.full_check is False
    assert _cfg("data.full_check=true").data.full_check is True
