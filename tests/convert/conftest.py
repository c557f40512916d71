"""Checkpoints trained by the real entry point (once per session) and helpers that run
the converter, our megatron model and transformers on the same tokens."""

from __future__ import annotations

import json
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


def worker(*args: str) -> None:
    """tests/convert/worker.py in its own process (see there)."""
    cmd = [sys.executable, "-m", "tests.convert.worker", *map(str, args)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def sample_tokens(vocab: int = 2048, seed: int = 0) -> torch.Tensor:
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


@pytest.fixture(scope="session")
def transformers_llama(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised transformers LlamaForCausalLM (GQA, untied, RoPE base 5000)
    saved by save_pretrained, with our tokenizer's files beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_forge.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    out = tmp_path_factory.mktemp("transformers_llama") / "hf"
    LlamaForCausalLM(config).save_pretrained(str(out))
    load_tokenizer(sample_data / "tokenizer.model").save_pretrained_files(out)
    return out


INSTRUCT_EOS = [2, 7]
INSTRUCT_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}


@pytest.fixture(scope="session")
def transformers_instruct(transformers_llama: Path, tmp_path_factory) -> Path:
    """transformers_llama as an instruct model ships: it stops on several eos ids and its
    generation_config.json (written by transformers) samples."""
    import shutil

    from transformers import GenerationConfig

    out = tmp_path_factory.mktemp("transformers_instruct") / "hf"
    shutil.copytree(transformers_llama, out)
    config = json.loads((out / "config.json").read_text())
    config["eos_token_id"] = INSTRUCT_EOS
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = GenerationConfig(bos_token_id=1, eos_token_id=INSTRUCT_EOS, **INSTRUCT_GENERATION)
    generation.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def imported(
    exports, transformers_llama, transformers_instruct, tmp_path_factory
) -> dict[str, Path]:
    """from-hf of each export (with the layout it came from) and of the transformers
    Llamas, in one worker process."""
    root = tmp_path_factory.mktemp("imported")
    sources = {
        "dense": (exports["dense"][1], ["--tp", "2"]),
        "qwen2": (exports["qwen2"][1], []),
        "moe": (exports["moe"][1], ["--ep", "2"]),
        "llama": (transformers_llama, []),
        "instruct": (transformers_instruct, []),
    }
    jobs = [
        ["from-hf", str(src), str(root / name), *flags] for name, (src, flags) in sources.items()
    ]
    worker("convert", json.dumps(jobs))
    return {name: root / name for name in sources}


@pytest.fixture(scope="session")
def megatron_outputs(exports, imported, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Our model's logits on sample_tokens() for each trained checkpoint and for the
    transformers Llama imported by from-hf, computed in one worker process."""
    root = tmp_path_factory.mktemp("logits")
    torch.save(sample_tokens(), root / "tokens.pt")
    ckpts = {name: ckpt for name, (ckpt, _) in exports.items()}
    ckpts["llama"] = imported["llama"]
    worker(
        "logits",
        root / "tokens.pt",
        json.dumps([[str(c), str(root / n)] for n, c in ckpts.items()]),
    )
    return {name: torch.load(root / name) for name in ckpts}
