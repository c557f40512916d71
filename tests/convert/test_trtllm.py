"""to-trtllm against an independent reconstruction from the Hugging Face export.

The reference below re-derives every rank's tensors from the exported HF weights with
TensorRT-LLM's documented rules (its models/llama/convert.py, load_weights_from_hf_safetensors,
and models/qwen/convert.py): it shares no code with megatron_forge.convert.trtllm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.convert.conftest import convert_in_process


def hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


def reference_rank(hf_dir: Path, tp: int, pp: int, rank: int) -> dict[str, torch.Tensor]:
    """TensorRT-LLM's per-rank weights for an HF Llama / Qwen2 / Qwen3 / Mixtral directory."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = hf_weights(hf_dir)
    tp_rank, pp_rank = rank % tp, rank // tp
    layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]

    def split(t: torch.Tensor, dim: int, size: int = tp, idx: int = tp_rank) -> torch.Tensor:
        n = t.shape[dim]
        return t.narrow(dim, n * idx // size, n // size)

    def split_kv(t: torch.Tensor) -> torch.Tensor:
        if kv_heads < tp:  # TRT-LLM: kv_tp_size = kv heads, kv_tp_rank = rank * kv // tp
            return split(t, 0, kv_heads, tp_rank * kv_heads // tp)
        return split(t, 0)

    out = {}
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = w["model.embed_tokens.weight"]
    if pp_rank == pp - 1:
        lm = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        vocab = cfg["vocab_size"]
        padded = (vocab + tp - 1) // tp * tp
        lm = torch.nn.functional.pad(lm, (0, 0, 0, padded - vocab))
        out["lm_head.weight"] = split(lm, 0)
        out["transformer.ln_f.weight"] = w["model.norm.weight"]
    per_stage = layers // pp
    for layer in range(pp_rank * per_stage, (pp_rank + 1) * per_stage):
        src, dst = f"model.layers.{layer}.", f"transformer.layers.{layer - pp_rank * per_stage}."
        attn = src + "self_attn."
        for kind in ("weight", "bias"):
            if attn + f"q_proj.{kind}" in w:
                out[dst + f"attention.qkv.{kind}"] = torch.cat(
                    [
                        split(w[attn + f"q_proj.{kind}"], 0),
                        split_kv(w[attn + f"k_proj.{kind}"]),
                        split_kv(w[attn + f"v_proj.{kind}"]),
                    ]
                )
        out[dst + "attention.dense.weight"] = split(w[attn + "o_proj.weight"], 1)
        for x in "qk":  # Qwen3's QK-norm (models/qwen/convert.py): whole on every rank
            if attn + f"{x}_norm.weight" in w:
                out[dst + f"attention.{x}_layernorm.weight"] = w[attn + f"{x}_norm.weight"]
        out[dst + "input_layernorm.weight"] = w[src + "input_layernorm.weight"]
        out[dst + "post_layernorm.weight"] = w[src + "post_attention_layernorm.weight"]
        if "num_local_experts" in cfg:
            moe = src + "block_sparse_moe."
            out[dst + "mlp.router.weight"] = w[moe + "gate.weight"].float()
            experts = range(cfg["num_local_experts"])
            stacked = {
                i: torch.stack(
                    [
                        split(w[moe + f"experts.{e}.w{i}.weight"], 1 if i == 2 else 0)
                        for e in experts
                    ]
                )
                for i in (1, 2, 3)
            }
            out[dst + "mlp.fc.weight"] = torch.cat([stacked[3], stacked[1]], dim=-2)
            out[dst + "mlp.proj.weight"] = stacked[2]
        else:
            out[dst + "mlp.fc.weight"] = split(w[src + "mlp.gate_proj.weight"], 0)
            out[dst + "mlp.gate.weight"] = split(w[src + "mlp.up_proj.weight"], 0)
            out[dst + "mlp.proj.weight"] = split(w[src + "mlp.down_proj.weight"], 1)
    return out


CASES = {
    "dense": (2, 2),  # TP=2 x PP=2: local layer names per stage
    "qwen2": (4, 1),  # TP=4 > 2 kv heads: each kv head repeated on two ranks; QKV bias
    "moe": (2, 1),
}


@pytest.mark.parametrize("family", list(CASES))
def test_matches_reference(family, exports, tmp_path):
    ckpt, hf_dir = exports[family]
    tp, pp = CASES[family]
    out = tmp_path / "trt"
    assert convert_in_process("to-trtllm", ckpt, out, "--tp", tp, "--pp", pp) == 0
    config = json.loads((out / "config.json").read_text())
    hf = json.loads((hf_dir / "config.json").read_text())
    assert config["architecture"] == hf["architectures"][0]
    assert config["mapping"] == {
        "world_size": tp * pp,
        "tp_size": tp,
        "pp_size": pp,
        "moe_tp_size": tp,
        "moe_ep_size": 1,
    }
    assert config["position_embedding_type"] == "rope_gpt_neox"
    assert (
        config["rotary_base"] == hf["rope_theta"] and config["norm_epsilon"] == hf["rms_norm_eps"]
    )
    assert config["vocab_size"] == hf["vocab_size"] and config["dtype"] == "float32"
    assert config["num_key_value_heads"] == hf["num_key_value_heads"]
    assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    if family == "moe":
        assert config["moe"]["num_experts"] == 4 and config["moe"]["top_k"] == 2
    for rank in range(tp * pp):
        got = load_file(str(out / f"rank{rank}.safetensors"))
        expected = reference_rank(hf_dir, tp, pp, rank)
        assert sorted(got) == sorted(expected), rank
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor.contiguous()), (rank, name)
    assert convert_in_process("check-serving", out) == 0
