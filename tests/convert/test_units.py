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
from megatron_forge.errors import ConvertError
from megatron_forge.models import Serving, get_family
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
        match=r"to-trtllm does not support model.family=qwen2 \(supported: \['llama', 'mixtral'\]\)",
    ):
        check_trt_family(ModelConfig(family="qwen2"))
    check_trt_family(ModelConfig())
