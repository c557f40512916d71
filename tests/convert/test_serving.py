"""check-serving is a real check: every tensor is read for NaN/inf, transformers loads the
directory and runs a prompt, and with --reference its logits are compared with the
checkpoint's own forward. It accepts what transformers 5 writes and rope-scaled configs.
Also: the export section's validation, and to-hf's refusal of non-finite weights."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_forge.config import ConfigError, from_dict
from megatron_forge.convert import hf as hf_export
from megatron_forge.convert.from_hf import generation_metadata
from megatron_forge.errors import ConvertError
from tests.convert.conftest import convert_in_process, worker

GATE = "model.layers.1.mlp.gate_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the Hugging Face directory ``src`` whose weights ``edit`` changed in place
    (names and shapes kept, so every header check still passes)."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return dst


def swap_gate_up(tensors: dict[str, torch.Tensor]) -> None:
    if GATE in tensors:
        tensors[GATE], tensors[UP] = tensors[UP], tensors[GATE]


def check(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    code = convert_in_process("check-serving", *args)
    return code, capsys.readouterr().out


# Fast: the export section and where its errors point -----------------------------------------
def test_export_section_is_checked():
    cfg = from_dict({"export": {"eos_token_id": [2, 7], "generation": {"temperature": 0.6}}})
    assert cfg.export.eos_token_id == [2, 7] and cfg.to_dict()["export"]["generation"]
    bad = {
        "eos_token_id": ([], "only eos_token_id may be a list, and not an empty one"),
        "bos_token_id": (-1, "export.bos_token_id=-1 must be a token id"),
        "pad_token_id": ([3], "export.pad_token_id=[3] must be an integer"),
        "generation": ([1], "export.generation=[1] must be a mapping"),
    }
    for field_name, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            from_dict({"export": {field_name: value}})
    cfg = from_dict(
        {
            "model": {"vocab_size": 8},
            "precision": {"params_dtype": "fp32"},
            "export": {"generation": {"eos_token_id": [2, 9]}},
        }
    )
    with pytest.raises(
        ConfigError, match=re.escape("export.generation.eos_token_id=[2, 9] has [9]")
    ):
        cfg.validate(1, cuda_available=False, te_available=False)


def test_from_hf_names_the_file_of_a_bad_token_id(tmp_path):
    hf = {"vocab_size": 2048, "bos_token_id": 1, "eos_token_id": [2, 5000]}
    with pytest.raises(ConvertError) as err:
        generation_metadata(tmp_path, hf)
    assert "config.json eos_token_id=[2, 5000] has [5000] outside the vocabulary" in str(err.value)
    assert "(config.json vocab_size=2048, ids 0..2047)" in str(err.value)
    (tmp_path / "generation_config.json").write_text('{"pad_token_id": "none"}')
    with pytest.raises(ConvertError, match="generation_config.json pad_token_id='none' must be"):
        generation_metadata(tmp_path, {**hf, "eos_token_id": [2, 7]})


# Slow: real exports and transformers-made directories ---------------------------------------
def test_reference_catches_what_shapes_cannot(exports, tmp_path):
    """An export with gate and up swapped in one layer passes every check of the files and
    a forward pass; only the comparison with the checkpoint's forward shows it computes
    another function. The faithful export passes it, difference and tolerance printed."""
    ckpt, hf_dir = exports["dense"]
    swapped = edited_copy(hf_dir, tmp_path / "swapped", swap_gate_up)
    jobs = [
        ["check-serving", hf_dir, "--reference", ckpt],
        ["check-serving", swapped, "--reference", ckpt],
    ]
    worker("check", tmp_path / "out.json", json.dumps([list(map(str, job)) for job in jobs]))
    (good_code, good), (bad_code, bad) = json.loads((tmp_path / "out.json").read_text())
    print(good, bad, sep="\n")
    assert good_code == 0 and "ready to serve" in good, good
    pattern = r"\[ok\] logits match .*: max \|diff\| = (\S+), tolerance (\S+) \("
    diff, limit = map(float, re.search(pattern, good).groups())
    assert diff < 1e-5 and limit == pytest.approx(1e-4, rel=0.5)
    assert bad_code == 1 and "NOT ready" in bad
    failed = [line for line in bad.splitlines() if "[FAIL]" in line]
    assert len(failed) == 1 and "[FAIL] logits match" in failed[0], bad
    assert "the export computes another function than the checkpoint" in failed[0]
    assert "[ok] transformers forward on a" in bad and re.search(
        r"\[ok\] all \d+ tensors finite", bad
    )


def test_scan_names_a_non_finite_tensor(exports, tmp_path, capsys):
    _, hf_dir = exports["qwen2"]

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        if Q_PROJ in tensors:
            tensors[Q_PROJ] = torch.full_like(tensors[Q_PROJ], float("nan"))

    broken = edited_copy(hf_dir, tmp_path / "nan", poison)
    code, out = check(capsys, broken)
    assert code == 1 and "NOT ready" in out, out
    fail = rf"\[FAIL\] all \d+ tensors finite \([\d.]+ MB read\): non-finite values in {Q_PROJ}"
    assert re.search(fail + r" \(4096 NaN, 0 inf of 4096\)", out), out
    assert "[skip] transformers' forward not run: fix the FAIL lines first" in out


def test_transformers5_directory_passes(transformers_llama, capsys):
    """save_pretrained of transformers 5 writes ``dtype`` and ``rope_parameters``, no
    ``torch_dtype`` nor ``rope_theta``."""
    config = json.loads((transformers_llama / "config.json").read_text())
    assert "torch_dtype" not in config and config["dtype"] == "float32"
    code, out = check(capsys, transformers_llama)
    assert code == 0 and "ready to serve" in out, out
    assert "[ok] dtype float32" in out and "[ok] transformers loads every weight" in out
    assert re.search(r"\[ok\] transformers forward on a \d+-token prompt: finite logits", out)


def test_llama31_style_config_passes(transformers_llama, tmp_path, capsys):
    """RoPE scaled as Llama 3.1 does, several eos ids (the tokenizer's among them)."""
    scaled = tmp_path / "llama31"
    shutil.copytree(transformers_llama, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 5000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    config["eos_token_id"] = [2, 7]
    (scaled / "config.json").write_text(json.dumps(config))
    code, out = check(capsys, scaled)
    assert code == 0 and "ready to serve" in out, out
    assert "[ok] the tokenizer's eos token is one config.json stops on" in out
    assert "[ok] transformers loads every weight" in out
    # For a model too big for host memory: everything but the forward.
    code, out = check(capsys, scaled, "--no-forward")
    assert code == 0 and "ready to serve" in out and "transformers loads" not in out, out
    assert "[skip] transformers' forward not run (--no-forward)" in out


def test_to_hf_refuses_non_finite_weights(dense_ckpt, tmp_path, monkeypatch):
    read = hf_export.MegatronCheckpoint.read

    def diverged(self, key, index=()):
        tensor = read(self, key, index)
        return tensor.fill_(float("inf")) if key.endswith("linear_fc2.weight") else tensor

    monkeypatch.setattr(hf_export.MegatronCheckpoint, "read", diverged)
    with pytest.raises(ConvertError) as err:
        hf_export.export_hf(dense_ckpt, tmp_path / "out")
    assert "model.layers.0.mlp.down_proj.weight would hold 0 NaN and 12288 inf values" in str(
        err.value
    )
    assert "--iteration N" in str(err.value)
    assert list(tmp_path.iterdir()) == []
