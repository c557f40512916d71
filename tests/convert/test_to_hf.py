"""to-hf: transformers loads the export and its logits match our megatron model's.

Both sides run in fp32 on the same tokens: megatron's logits come from the checkpoint
loaded by dist_checkpointing into the model built from the stored config (one process,
whatever layout saved it), transformers' from the exported directory. The two only differ
in the order of floating-point operations; the measured max abs difference is about 2e-7
on logits of magnitude ~1, and the test allows LOGITS_ATOL = 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_forge.convert.files import SafetensorsReader
from tests.convert.conftest import LOGITS_ATOL, convert_in_process, hf_logits, sample_tokens

CASES = {
    "dense": "dense GQA (4 heads / 2 groups), TP=2 checkpoint",
    "qwen2": "Qwen2 QKV bias, tied embeddings",
    "moe": "MoE 4 experts top-2, EP=2 checkpoint",
}


@pytest.mark.parametrize("family", list(CASES))
def test_logits_match_megatron(family, exports, megatron_outputs):
    _, hf_dir = exports[family]
    tokens = sample_tokens()
    expected = megatron_outputs[family]
    got = hf_logits(hf_dir, tokens)
    assert got.shape == (*tokens.shape, 2048)
    diff = (got - expected[..., :2048]).abs().max().item()
    print(f"{CASES[family]}: max |logits diff| = {diff:.2e}")
    assert diff <= LOGITS_ATOL


def test_export_trims_padded_vocab_and_writes_config(exports):
    ckpt, hf_dir = exports["dense"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["vocab_size"] == 2048
    assert config["rope_theta"] == 5000 and config["rms_norm_eps"] == 1e-6
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    reader = SafetensorsReader(hf_dir)
    assert reader.shape("model.embed_tokens.weight") == (2048, 64)  # 2112 rows in the checkpoint
    assert reader.shape("lm_head.weight") == (2048, 64)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reader.entries)


def test_tied_and_bias_exports(exports):
    _, hf_dir = exports["qwen2"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"]
    reader = SafetensorsReader(hf_dir)
    assert "lm_head.weight" not in reader
    assert reader.shape("model.layers.0.self_attn.k_proj.bias") == (32,)
    assert torch.count_nonzero(reader.read("model.layers.0.self_attn.q_proj.bias")) > 0


def test_moe_export_uses_hub_names(exports):
    _, hf_dir = exports["moe"]
    reader = SafetensorsReader(hf_dir)
    assert reader.shape("model.layers.1.block_sparse_moe.gate.weight") == (4, 64)
    for w, shape in (("w1", (128, 64)), ("w2", (64, 128)), ("w3", (128, 64))):
        assert reader.shape(f"model.layers.1.block_sparse_moe.experts.3.{w}.weight") == shape


def test_tokenizer_loads_and_matches(exports, sample_data):
    from transformers import AutoTokenizer

    from megatron_forge.data.tokenizer import load_tokenizer

    _, hf_dir = exports["dense"]
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ours = load_tokenizer(sample_data / "tokenizer.model")
    text = "Return the number of items in a container."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)


def test_sharded_output(exports, tmp_path):
    ckpt, hf_dir = exports["dense"]
    out = tmp_path / "sharded"
    assert convert_in_process("to-hf", ckpt, out, "--max-shard-size", "300KB") == 0
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    a, b = SafetensorsReader(out), SafetensorsReader(hf_dir)
    assert all(torch.equal(a.read(n), b.read(n)) for n in b.entries)
