"""from-hf: a transformers model becomes a checkpoint our model reproduces exactly, and
from-hf then to-hf gives back the same bytes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from megatron_forge.config import load_config
from megatron_forge.convert.files import SafetensorsReader
from megatron_forge.convert.reader import MegatronCheckpoint
from tests.conftest import run_training
from tests.convert.conftest import (
    INSTRUCT_EOS,
    INSTRUCT_GENERATION,
    LOGITS_ATOL,
    convert_in_process,
    hf_logits,
    sample_tokens,
)


def test_transformers_llama_logits_match(transformers_llama, megatron_outputs):
    """transformers' own save_pretrained output (8 heads / 2 kv heads, RoPE base 5000)."""
    expected = hf_logits(transformers_llama, sample_tokens())
    got = megatron_outputs["llama"][..., :2048]
    diff = (got - expected).abs().max().item()
    print(f"from-hf of a transformers LlamaForCausalLM: max |logits diff| = {diff:.2e}")
    assert diff <= LOGITS_ATOL


@pytest.mark.parametrize("family", ["dense", "qwen2", "moe"])
def test_round_trip_is_byte_identical(family, exports, imported, tmp_path):
    _, hf_dir = exports[family]
    out = tmp_path / "again"
    assert convert_in_process("to-hf", imported[family], out) == 0
    a, b = SafetensorsReader(hf_dir), SafetensorsReader(out)
    assert sorted(a.entries) == sorted(b.entries)
    for name in a.entries:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def test_imported_checkpoint_is_weights_only_with_config(imported, transformers_llama):
    ckpt = MegatronCheckpoint(imported["llama"])
    assert ckpt.iteration == 0
    assert ckpt.common["has_optimizer"] is False
    model = ckpt.model
    assert (model.family, model.num_layers, model.num_query_groups) == ("llama", 3, 2)
    assert model.rotary_base == 5000.0 and model.norm_epsilon == 1e-6
    assert ckpt.shape("embedding.word_embeddings.weight") == (2048, 64)
    cfg = load_config(imported["llama"] / "config.yaml")
    assert cfg.checkpoint.load == str(imported["llama"])
    assert cfg.data.tokenizer == str(transformers_llama)
    assert cfg.model.ffn_hidden_size == 160


def test_tp_sets_vocab_padding(imported):
    # --tp 2 pads for TP=2 (2048 is a multiple of 128 x 2: no padding rows needed)
    cfg = load_config(imported["dense"] / "config.yaml")
    assert cfg.parallel.tensor == 2 and cfg.model.vocab_size == 2048
    moe = load_config(imported["moe"] / "config.yaml")
    assert moe.parallel.expert == 2 and moe.model.num_experts == 4


def test_generation_metadata_survives_training(imported, transformers_instruct, tmp_path):
    """from-hf of an instruct model, two training steps that load it and save elsewhere,
    to-hf: the eos id list, bos and generation_config.json (sampling settings) come back,
    stored in the trained checkpoint's config with where the model came from."""
    from transformers import GenerationConfig

    source, saved, out = imported["instruct"], tmp_path / "trained", tmp_path / "hf"
    overrides = [
        f"checkpoint.load={source}",
        f"checkpoint.save={saved}",
        "data.format=mock",
        "data.blend=[]",
        "data.tokenizer=null",
        "model.seq_length=32",
        "train.train_iters=2",
        "train.warmup_iters=1",
        "train.global_batch_size=2",
        "train.micro_batch_size=1",
    ]
    # The run's own YAML sets no export section (as a user's recipe would not): the
    # metadata comes from the checkpoint it loads.
    run_config = yaml.safe_load((source / "config.yaml").read_text())
    assert run_config.pop("export")["eos_token_id"] == INSTRUCT_EOS
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    run_training(1, str(tmp_path / "run.yaml"), overrides, tmp_path / "run")
    trained = MegatronCheckpoint(saved)
    assert trained.iteration == 2
    assert trained.export.converted_from == str(transformers_instruct.resolve())
    assert trained.export.eos_token_id == INSTRUCT_EOS

    assert convert_in_process("to-hf", saved, out, "--tokenizer", transformers_instruct) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, INSTRUCT_EOS)
    written = json.loads((out / "generation_config.json").read_text())
    original = json.loads((transformers_instruct / "generation_config.json").read_text())
    original.pop("transformers_version")
    assert written == original
    generation = GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == INSTRUCT_EOS and generation.do_sample is True
    for key, value in INSTRUCT_GENERATION.items():
        assert getattr(generation, key) == value, key
