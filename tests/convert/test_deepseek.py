"""DeepSeek-V3 from a transformers-built random model (Multi-Latent Attention with a
query latent, YaRN RoPE, the first layer dense, 8 routed experts + 1 shared, sigmoid
routing with an expert bias, 4 groups top-2, routed scaling 2.5) with one multi-token
prediction layer added as DeepSeek-V3's checkpoints carry it: ``from-hf``, megatron's
logits under EP=2 and under TP=2 with ETP=1 equal to transformers' (fp32), its loss (the
MTP layer running) equal to transformers', and ``to-hf`` giving back every tensor, the MTP
layer's included."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO
from tests.convert.conftest import convert_in_process
from tests.multiprocess import run_distributed

pytestmark = pytest.mark.slow

ATOL = 1e-4
HIDDEN, LAYERS, VOCAB = 64, 2, 2048
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=96,
    moe_intermediate_size=16,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    v_head_dim=12,
    qk_nope_head_dim=8,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,  # the sample tokenizer's (DeepseekV3Config's defaults are 0 and 1)
    eos_token_id=2,
    rope_theta=10000.0,
    # YaRN as DeepSeek-V3 (factor 40 over 4096 there): original context 32 < 48 tokens.
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
)


def _random_deepseek(out: Path) -> None:
    """transformers' DeepseekV3ForCausalLM with random weights (norms and the expert bias
    away from their 1 and 0), plus an MTP layer at index num_hidden_layers (transformers
    does not model it and ignores it on load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("deepseek_v3", **json.loads(json.dumps(CONFIG)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.05, 0.05)
    model.save_pretrained(str(out))
    weights = load_file(str(out / "model.safetensors"))
    last, mtp = f"model.layers.{LAYERS - 1}.", f"model.layers.{LAYERS}."
    for name, tensor in list(weights.items()):
        if name.startswith(last):
            weights[mtp + name[len(last) :]] = torch.randn_like(tensor) * 0.02
    for name, shape in (
        ("enorm.weight", (HIDDEN,)),
        ("hnorm.weight", (HIDDEN,)),
        ("shared_head.norm.weight", (HIDDEN,)),
        ("eh_proj.weight", (HIDDEN, 2 * HIDDEN)),
    ):
        weights[mtp + name] = torch.rand(shape) + 0.5 if "norm" in name else torch.randn(shape)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config_json = json.loads((out / "config.json").read_text())
    config_json["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(config_json, indent=2))


@pytest.fixture(scope="module")
def deepseek_run(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from megatron_forge.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("deepseek")
    hf_dir, ckpt, export = root / "hf", root / "ckpt", root / "export"
    _random_deepseek(hf_dir)
    load_tokenizer(sample_data / "tokenizer.model").save_pretrained_files(hf_dir)
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    jobs = json.dumps([[str(hf_dir), str(ckpt)]])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.convert.family_worker", "from-hf", jobs],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tests.convert.deepseek_worker import layout_outputs

    run_distributed(
        layout_outputs,
        2,
        str(ckpt),
        str(root / "tokens.pt"),
        str(root),
        overrides=["precision.params_dtype=fp32"],
        timeout_s=600,
    )
    assert convert_in_process("to-hf", ckpt, export) == 0
    return {"root": root, "hf": hf_dir, "ckpt": ckpt, "export": export, "tokens": tokens}


def _transformers(hf_dir: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits, model(tokens, labels=tokens).loss.item()


@pytest.mark.parametrize("layout", ["ep2", "tp2_etp1"])
def test_megatron_equals_transformers(deepseek_run: dict, layout: str) -> None:
    logits, loss = _transformers(deepseek_run["hf"], deepseek_run["tokens"])
    ours = torch.load(deepseek_run["root"] / f"{layout}_logits.pt")
    assert ours.shape == logits.shape
    diff = (ours - logits).abs().max().item()
    assert diff < ATOL, f"{layout}: max |megatron - transformers| = {diff:.3g}"
    ours_loss = torch.load(deepseek_run["root"] / f"{layout}_loss.pt").item()
    assert abs(ours_loss - loss) <= 1e-5 * loss, (layout, ours_loss, loss)


def test_mtp_loss_metric(deepseek_run: dict) -> None:
    """The MTP layer's loss as the trainer reports it (under EP=2: one microbatch, averaged
    over the two data-parallel ranks): a per-token cross entropy, near ln(vocabulary) for
    random weights (twice that if the average over ranks were a sum)."""
    mtp = torch.load(deepseek_run["root"] / "ep2_mtp.pt")
    assert list(mtp) == ["mtp_1_loss"]
    assert abs(mtp["mtp_1_loss"] - math.log(VOCAB)) < 1.0, mtp


def test_to_hf_gives_back_every_tensor_and_the_config(deepseek_run: dict) -> None:
    from transformers import AutoConfig

    original = load_file(str(deepseek_run["hf"] / "model.safetensors"))
    exported = {}
    for path in sorted(deepseek_run["export"].glob("*.safetensors")):
        exported.update(load_file(str(path)))
    assert sorted(exported) == sorted(original)
    assert f"model.layers.{LAYERS}.eh_proj.weight" in exported  # the MTP layer
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    before, after = (
        AutoConfig.from_pretrained(str(d)) for d in (deepseek_run["hf"], deepseek_run["export"])
    )
    # transformers keeps the legacy "type" key of the original's rope_scaling beside rope_type.
    rope = {k: v for k, v in before.rope_parameters.items() if k != "type"}
    assert after.rope_parameters == rope
    for field in (
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "first_k_dense_replace",
        "n_shared_experts",
        "moe_intermediate_size",
        "intermediate_size",
        "num_nextn_predict_layers",
        "rope_interleave",
    ):
        assert getattr(after, field) == getattr(before, field), field


def test_bf16_export_keeps_the_router_in_fp32(deepseek_run: dict, tmp_path: Path) -> None:
    """--dtype bf16 narrows every weight but those DeepseekV3ForCausalLM keeps in fp32 (its
    _keep_in_fp32_modules_strict): the router's weight and the expert bias that picks the
    top-k, written exactly as the checkpoint holds them (fp32 here)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert convert_in_process("to-hf", deepseek_run["ckpt"], out, "--dtype", "bf16") == 0
    original = load_file(str(deepseek_run["hf"] / "model.safetensors"))
    exported = {}
    for path in sorted(out.glob("*.safetensors")):
        exported.update(load_file(str(path)))
    fp32 = sorted(k for k, t in exported.items() if t.dtype == torch.float32)
    routers = [f"model.layers.{i}.mlp.gate." for i in range(1, LAYERS + 1)]  # MTP's too
    assert fp32 == sorted(r + n for r in routers for n in ("e_score_correction_bias", "weight"))
    for key in fp32:
        assert torch.equal(exported[key], original[key]), key
    assert {t.dtype for k, t in exported.items() if k not in fp32} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, original["model.layers.1.mlp.gate.e_score_correction_bias"])


def test_to_trtllm_is_refused(deepseek_run: dict, tmp_path: Path, capsys) -> None:
    assert convert_in_process("to-trtllm", deepseek_run["ckpt"], tmp_path / "trt", "--tp", 1) != 0
    assert "deepseek_v3" in capsys.readouterr().err
