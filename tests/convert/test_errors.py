"""Bad inputs fail with a message naming the problem and the fix, before anything is
written, and an interrupted conversion leaves no directory behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_forge.convert import hf as hf_export
from tests.convert.conftest import convert_in_process


def fails_with(capsys: pytest.CaptureFixture, *args: object) -> str:
    assert convert_in_process(*args) == 2
    return capsys.readouterr().err


def copy_hf(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unknown_family(transformers_llama, tmp_path, capsys):
    bad = copy_hf(transformers_llama, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    err = fails_with(capsys, "from-hf", bad, tmp_path / "out")
    assert "unknown architecture 'GPT2LMHeadModel'" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_hf_shapes_must_match_config(transformers_llama, tmp_path, capsys):
    bad = copy_hf(transformers_llama, tmp_path / "bad", intermediate_size=192)
    err = fails_with(capsys, "from-hf", bad, tmp_path / "out")
    assert "does not match its config.json" in err
    assert "model.layers.0.mlp.gate_proj.weight has shape [160, 64], expected [192, 64]" in err


def test_unsupported_rope_scaling(transformers_llama, tmp_path, capsys):
    scaling = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}
    bad = copy_hf(transformers_llama, tmp_path / "bad", rope_parameters=scaling)
    assert "RoPE scaling" in fails_with(capsys, "from-hf", bad, tmp_path / "out")


def test_layout_names_the_field(transformers_llama, tmp_path, capsys):
    err = fails_with(capsys, "from-hf", transformers_llama, tmp_path / "out", "--tp", "3")
    assert "num_attention_heads=8 is not divisible by parallel.tensor=3" in err


def test_missing_iteration(dense_ckpt, tmp_path, capsys):
    err = fails_with(capsys, "to-hf", dense_ckpt, tmp_path / "out", "--iteration", "7")
    assert "has no iteration 7 (iterations present: [3])" in err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = fails_with(capsys, "to-hf", tmp_path / "empty", tmp_path / "out")
    assert "latest_checkpointed_iteration.txt" in err and "--iteration" in err
    err = fails_with(capsys, "to-hf", tmp_path / "missing", tmp_path / "out")
    assert "does not exist" in err


def test_shapes_must_match_stored_config(dense_ckpt, tmp_path, capsys):
    """A checkpoint whose stored config disagrees with its tensors (ffn 192 stored as 256)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(dense_ckpt, ckpt)
    common_path = ckpt / "iter_0000003" / "common.pt"
    common = torch.load(common_path, weights_only=False)
    common["config"]["model"]["ffn_hidden_size"] = 256
    torch.save(common, common_path)
    err = fails_with(capsys, "to-hf", ckpt, tmp_path / "out")
    assert "does not match its stored config" in err
    assert (
        "decoder.layers.mlp.linear_fc1.weight is [4, 384, 64], the config implies [4, 512, 64]"
        in err
    )


def test_refuses_non_empty_output(exports, tmp_path, capsys):
    ckpt, _ = exports["dense"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in fails_with(capsys, "to-hf", ckpt, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert "--overwrite" in fails_with(capsys, "to-trtllm", ckpt, out, "--tp", "1")
    assert convert_in_process("to-hf", ckpt, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_interrupted_export_leaves_nothing(exports, tmp_path, monkeypatch):
    ckpt, _ = exports["dense"]
    written = []

    def failing_write(self, name, tensor):
        written.append(name)
        if len(written) == 5:
            raise KeyboardInterrupt  # e.g. the job was killed mid-write

    monkeypatch.setattr(hf_export.ShardedSafetensorsWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        hf_export.export_hf(ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither out/ nor its .partial staging dir


def test_missing_tokenizer(moe_ckpt, tmp_path, capsys):
    err = fails_with(capsys, "to-hf", moe_ckpt, tmp_path / "out", "--tokenizer", tmp_path / "nope")
    assert "does not exist" in err and "--tokenizer" in err


def test_check_serving_flags_a_broken_directory(exports, tmp_path, capsys):
    _, hf_dir = exports["qwen2"]
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    for name in ("tokenizer.json", "tokenizer.model"):
        (broken / name).unlink()
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    assert convert_in_process("check-serving", broken) == 1
    out = capsys.readouterr().out
    assert "[FAIL] tokenizer files" in out and "missing ['model.layers.2." in out
    assert "NOT ready" in out and "vllm serve" not in out
