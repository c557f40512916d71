"""Config loading, overrides and every validation rule, with the exact error text."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_forge.config import ConfigError, load_config
from megatron_forge.models import check_model_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


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
        match=r"model.family='gpt' is not a registered family; known: \['llama', 'mixtral', 'qwen2'\]",
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
