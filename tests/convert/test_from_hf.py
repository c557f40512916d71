"""from-hf: a transformers model becomes a checkpoint our model reproduces exactly, and
from-hf then to-hf gives back the same bytes."""

from __future__ import annotations

import pytest
import torch

from megatron_forge.config import load_config
from megatron_forge.convert.files import SafetensorsReader
from megatron_forge.convert.reader import MegatronCheckpoint
from tests.convert.conftest import LOGITS_ATOL, convert_in_process, hf_logits, sample_tokens


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
