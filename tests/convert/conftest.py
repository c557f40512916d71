"""Checkpoints trained by the real entry point (once per session) and helpers that run
the converter, our megatron model and transformers on the same tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, data_overrides, run_training

# Three steps with a small batch: enough to move the weights off their initialization.
TRAIN = [
    "train.train_iters=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "checkpoint.save_interval=0",
]
# Not the defaults, so a field the export drops or misnames changes the logits:
# 2048 tokens pad to 2112 rows under TP=1 and TP=2 alike (96 and 192 both divide 2112).
DENSE = [
    "model.make_vocab_size_divisible_by=96",
    "model.rotary_base=5000",
    "model.norm_epsilon=1.0e-6",
]
LOGITS_ATOL = 1e-4


def convert_in_process(*args: str) -> int:
    """forge-convert in this process (to-hf, to-trtllm, check-serving start no process group)."""
    from megatron_forge.convert.cli import main

    return main([str(a) for a in args])


def convert_subprocess(*args: str) -> subprocess.CompletedProcess:
    """forge-convert in its own process (from-hf starts a process group)."""
    cmd = [sys.executable, "tools/convert_checkpoint.py", *map(str, args)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def megatron_logits(ckpt: Path, tokens: torch.Tensor, tmp: Path) -> torch.Tensor:
    torch.save(tokens, tmp / "tokens.pt")
    cmd = [
        sys.executable,
        "-m",
        "tests.convert.megatron_logits",
        str(ckpt),
        str(tmp / "tokens.pt"),
        str(tmp / "logits.pt"),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(tmp / "logits.pt")


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def sample_tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 48), generator=generator)


def _train(sample_data: Path, root: Path, nprocs: int, config: str, extra: list[str]) -> Path:
    ckpt = root / "ckpt"
    overrides = TRAIN + data_overrides(sample_data) + extra + [f"checkpoint.save={ckpt}"]
    run_training(nprocs, config, overrides, root / "run")
    return ckpt


@pytest.fixture(scope="session")
def dense_ckpt(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with GQA (4 heads, 2 query groups), saved under TP=2, padded vocabulary."""
    root = tmp_path_factory.mktemp("dense_tp2")
    return _train(sample_data, root, 2, "configs/tiny.yaml", DENSE + ["parallel.tensor=2"])


@pytest.fixture(scope="session")
def qwen2_ckpt(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 (QKV bias) with tied embeddings, one process."""
    root = tmp_path_factory.mktemp("qwen2")
    extra = DENSE + ["model.family=qwen2", "model.untie_embeddings=false", "model.num_layers=2"]
    return _train(sample_data, root, 1, "configs/tiny.yaml", extra)


@pytest.fixture(scope="session")
def moe_ckpt(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixtral-style MoE, 4 experts, top-2, saved under EP=2."""
    root = tmp_path_factory.mktemp("moe_ep2")
    return _train(sample_data, root, 2, "configs/tiny_moe.yaml", ["parallel.expert=2"])


@pytest.fixture(scope="session")
def exports(dense_ckpt, qwen2_ckpt, moe_ckpt, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (checkpoint, its Hugging Face export)."""
    out = {}
    for name, ckpt in (("dense", dense_ckpt), ("qwen2", qwen2_ckpt), ("moe", moe_ckpt)):
        hf_dir = tmp_path_factory.mktemp(f"{name}_hf") / "hf"
        assert convert_in_process("to-hf", ckpt, hf_dir) == 0
        out[name] = (ckpt, hf_dir)
    return out
