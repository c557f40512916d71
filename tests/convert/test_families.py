"""Llama 3.x, Qwen3 and Qwen3-MoE from transformers-built random models: ``from-hf``,
megatron's forward under TP=2 and PP=2 (MoE: also EP=2, and TP=2 with ETP=1) equal to
transformers' logits (fp32), ``to-hf`` giving back the very tensors (Qwen3-MoE: under the
per-expert names hub checkpoints and transformers 5's save_pretrained use) and the RoPE,
head size, QK-norm and routing of the original config."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.convert.conftest import convert_in_process
from tests.multiprocess import run_distributed

pytestmark = pytest.mark.slow

TOKENS = (2, 48)
ATOL = 1e-4
# original_max_position_embeddings 32 with head_dim 16/32 and rope_theta 10000: the
# wavelengths fall in all three bands of Llama 3's scaling (kept < 8 <= smoothed <= 32 <
# divided by factor) within 48 positions.
LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
QWEN3_MOE = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=1000000.0,
)
SHAPES = {
    # Llama 3.1: scaled RoPE (factor 8), untied, GQA.
    "llama3_1": (
        "llama",
        dict(
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, **LLAMA3},
            tie_word_embeddings=False,
        ),
    ),
    # Llama 3.2: tied, factor 32, head_dim 32 != 64 / 4 (explicit head_dim).
    "llama3_2": (
        "llama",
        dict(
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, **LLAMA3},
            tie_word_embeddings=True,
        ),
    ),
    # Qwen3: QK-norm, head_dim 128 != 64 / 4, tied, a vocabulary megatron pads.
    "qwen3": (
        "qwen3",
        dict(
            vocab_size=2100,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=128,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen3-MoE as Qwen3-30B-A3B routes: top-k weights renormalized (norm_topk_prob),
    # untied; QK-norm, head_dim 32 != 64 / 4. Also under EP=2 and TP=2 with ETP=1.
    "qwen3_moe": ("qwen3_moe", dict(QWEN3_MOE, norm_topk_prob=True, tie_word_embeddings=False)),
    # transformers' default routing: the top-k of the full softmax as they are; tied; the
    # first layer dense (mlp_only_layers: megatron-core then saves each layer on its own).
    "qwen3_moe_plain": (
        "qwen3_moe",
        dict(QWEN3_MOE, norm_topk_prob=False, tie_word_embeddings=True, mlp_only_layers=[0]),
    ),
}
MOE_LAYOUTS = ("ep2", "tp2_etp1_ep2")
"""tests/convert/family_worker.MOE_LAYOUTS, which MoE shapes run under too."""


def _random_model(model_type: str, fields: dict, out: Path, seed: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        num_hidden_layers=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        **copy.deepcopy(fields),  # transformers adds rope_theta to rope_scaling in place
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # QK-norm and RMSNorm weights start at 1: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):  # MoE router: no near-tie picks experts
                p.normal_(0.0, 1.0)
    model.save_pretrained(str(out))


def _hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def families_run(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each shape built by transformers, imported by from-hf (one process), run by megatron
    under TP=2 and PP=2 (two gloo ranks, both layouts), exported again by to-hf."""
    from megatron_forge.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("families")
    tokenizer = load_tokenizer(sample_data / "tokenizer.model")
    tokens = torch.randint(0, 2048, TOKENS, generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    dirs = {}
    for seed, (name, (model_type, fields)) in enumerate(SHAPES.items()):
        hf_dir = root / name / "hf"
        _random_model(model_type, fields, hf_dir, seed)
        tokenizer.save_pretrained_files(hf_dir)
        dirs[name] = (hf_dir, root / name / "ckpt", root / name / "export")
    jobs = json.dumps([[str(h), str(c)] for h, c, _ in dirs.values()])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.convert.family_worker", "from-hf", jobs],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tests.convert.family_worker import layout_logits

    ckpts = {name: str(c) for name, (_, c, _) in dirs.items()}
    run_distributed(
        layout_logits,
        2,
        ckpts,
        str(root / "tokens.pt"),
        str(root),
        overrides=["parallel.tensor=2", "precision.params_dtype=fp32"],
        timeout_s=600,
    )
    for _, ckpt, export in dirs.values():
        assert convert_in_process("to-hf", ckpt, export) == 0
    return {"root": root, "dirs": dirs, "tokens": tokens}


@pytest.mark.parametrize("name", list(SHAPES))
def test_megatron_equals_transformers_under_tp2_and_pp2(families_run: dict, name: str) -> None:
    hf_dir = families_run["dirs"][name][0]
    expected = _hf_logits(hf_dir, families_run["tokens"])
    moe = SHAPES[name][0] == "qwen3_moe"
    for layout in ("tp2", "pp2", *(MOE_LAYOUTS if moe else ())):
        ours = torch.load(families_run["root"] / f"{name}_{layout}.pt")
        assert ours.shape == expected.shape, layout
        diff = (ours - expected).abs().max().item()
        assert diff < ATOL, f"{name} under {layout}: max |megatron - transformers| = {diff:.3g}"


@pytest.mark.parametrize("name", list(SHAPES))
def test_megatron_loss_equals_transformers_loss(families_run: dict, name: str) -> None:
    """The loss megatron reports (TP=2; for qwen3 over a vocabulary padded 2100 -> 2304)
    is the negative log-likelihood over the real vocabulary, as transformers computes it:
    the padding rows take no probability."""
    from transformers import AutoModelForCausalLM

    hf_dir, tokens = families_run["dirs"][name][0], families_run["tokens"]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(tokens, labels=tokens).loss.item()
    ours = torch.load(families_run["root"] / f"{name}_loss.pt").item()
    assert abs(ours - expected) <= 1e-5 * expected, (name, ours, expected)
    for layout in MOE_LAYOUTS if SHAPES[name][0] == "qwen3_moe" else ():
        ours = torch.load(families_run["root"] / f"{name}_{layout}_loss.pt").item()
        assert abs(ours - expected) <= 1e-5 * expected, (name, layout, ours, expected)


@pytest.mark.parametrize("name", list(SHAPES))
def test_to_hf_gives_back_the_original(families_run: dict, name: str) -> None:
    from transformers import AutoConfig

    hf_dir, _, export = families_run["dirs"][name]
    original = load_file(str(hf_dir / "model.safetensors"))
    exported = {}
    for path in sorted(export.glob("*.safetensors")):
        exported.update(load_file(str(path)))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    before, after = (AutoConfig.from_pretrained(str(d)) for d in (hf_dir, export))
    for field in ("rope_parameters", "head_dim", "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(after, field) == getattr(before, field), field
    # The transformers-4 spelling too, which vLLM and TensorRT-LLM read.
    written = json.loads((export / "config.json").read_text())
    scaling = SHAPES[name][1].get("rope_scaling")
    assert written["rope_scaling"] == scaling
    assert written["rope_theta"] == SHAPES[name][1]["rope_theta"]
    if SHAPES[name][0] == "qwen3_moe":  # per-expert names on disk, routing kept
        assert "model.layers.1.mlp.experts.3.gate_proj.weight" in original
        for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            assert getattr(after, field) == getattr(before, field), field
        for field in ("norm_topk_prob", "mlp_only_layers", "decoder_sparse_step"):
            assert getattr(after, field) == getattr(before, field), field


# TensorRT-LLM checkpoints (trtllm-build's input) of the new shapes: Llama 3 with its
# rotary scaling and head size, Qwen3 with its QK-norm (qwen_type qwen3).
TRT_CASES = {"llama3_1": (1, 2), "llama3_2": (2, 1), "qwen3": (2, 1)}


@pytest.mark.parametrize("name", list(TRT_CASES))
def test_to_trtllm(families_run: dict, name: str, tmp_path: Path) -> None:
    from tests.convert.test_trtllm import reference_rank

    hf_dir, ckpt, _ = families_run["dirs"][name]
    tp, pp = TRT_CASES[name]
    out = tmp_path / "trt"
    assert convert_in_process("to-trtllm", ckpt, out, "--tp", tp, "--pp", pp) == 0
    config = json.loads((out / "config.json").read_text())
    hf = json.loads((hf_dir / "config.json").read_text())
    assert config["architecture"] == hf["architectures"][0]
    assert config["head_size"] == hf["head_dim"]
    rope = hf["rope_parameters"]  # as transformers 5 saved the original
    assert config["rotary_base"] == rope["rope_theta"]
    if rope["rope_type"] != "default":  # TensorRT-LLM reads "type" and the factors by name
        expected = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
        assert config["rotary_scaling"] == {"type": rope["rope_type"], **expected}
    else:
        assert config["rotary_scaling"] is None
    if name == "qwen3":
        assert (config["qwen_type"], config["attn_bias"]) == ("qwen3", False)
    assert config["tie_word_embeddings"] == hf["tie_word_embeddings"]
    for rank in range(tp * pp):
        got = load_file(str(out / f"rank{rank}.safetensors"))
        expected_rank = reference_rank(hf_dir, tp, pp, rank)
        assert sorted(got) == sorted(expected_rank), rank
        for key, tensor in expected_rank.items():
            assert torch.equal(got[key], tensor.contiguous()), (rank, key)


def test_to_trtllm_refuses_qwen3_moe(
    families_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """to-trtllm places Mixtral's expert names only: Qwen3-MoE is refused, with the way
    to serve it (its Hugging Face export with TensorRT-LLM's PyTorch backend)."""
    _, ckpt, _ = families_run["dirs"]["qwen3_moe"]
    assert convert_in_process("to-trtllm", ckpt, tmp_path / "trt", "--tp", "1") == 2
    err = capsys.readouterr().err
    assert "model.family=qwen3_moe" in err and "trtllm-serve" in err, err
    assert not (tmp_path / "trt").exists()
