"""A model trained by the real entry point and exported to Hugging Face scores held-out text
exactly as megatron does: transformers' loss on the export equals the loss megatron
computes with its own labels path on the same tokens. The vocabulary is padded (2048 ->
2112 rows), so this also shows the padding rows take no probability in megatron's loss.

One run per newer dense shape (configs/tiny_llama3.yaml: scaled RoPE, tied embeddings,
head_dim != hidden/heads; configs/tiny_qwen3.yaml: QK-norm as well), and the DeepSeek-V3
shape (configs/tiny_deepseek_v3.yaml: MLA, YaRN, shared expert, sigmoid group routing with
an expert bias that aux-loss-free balancing moved, one dense layer first, MTP), whose run
is the one tests/training/test_expert_bias.py trains."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import data_overrides, run_training
from tests.convert.conftest import TRAIN, convert_in_process
from tests.multiprocess import run_distributed
from tests.training.test_expert_bias import balancing_run

LOSS_RTOL = 1e-5
FAMILIES = {"llama3": "configs/tiny_llama3.yaml", "qwen3": "configs/tiny_qwen3.yaml"}
VOCAB = 2048
# 2048 tokens pad to 2112 rows (a multiple of 96): megatron's logits have 64 columns the
# Hugging Face model does not.
PADDED = ["model.make_vocab_size_divisible_by=96"]


def held_out_tokens(sample_data: Path, batch: int = 2, length: int = 129) -> torch.Tensor:
    """Token ids of the corpus's last documents: the validation end of the 98/2 split,
    which training never reads."""
    from megatron_forge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(sample_data / "tokenizer.model")
    lines = (sample_data / "corpus.jsonl").read_text().splitlines()
    ids: list[int] = []
    for line in reversed(lines):
        ids += tok.tokenize(json.loads(line)["text"]) + [tok.eod]
        if len(ids) >= batch * length:
            break
    return torch.tensor(ids[: batch * length]).view(batch, length)


def _megatron_loss(cfg: Any, ckpt_dir: str, tokens: torch.Tensor) -> float:
    """Mean per-token loss of the checkpoint's model through GPTModel's own labels path
    (the loss training and evaluation report), fp32, one rank."""
    from megatron.core import dist_checkpointing

    from megatron_forge.config import from_dict
    from megatron_forge.convert.reader import MegatronCheckpoint
    from megatron_forge.models import build_model, build_transformer_config

    ckpt = MegatronCheckpoint(ckpt_dir)
    run = from_dict({"model": ckpt.raw_config["model"], "precision": {"params_dtype": "fp32"}})
    # The multi-token prediction layer is not part of Hugging Face's causal-LM loss
    # (DeepseekV3ForCausalLM ignores it); megatron-core adds its loss in the backward only,
    # so the main model alone gives the number to compare.
    run.model = dataclasses.replace(run.model, mtp_num_layers=None)
    (model,) = build_model(run, build_transformer_config(run), VOCAB)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.path))
    model.load_state_dict(state["model"])
    model.eval()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    with torch.no_grad():
        losses = model(inputs, positions, attention_mask=None, labels=labels)
    return losses.double().mean().item()


def _hf_loss(hf_dir: Path, tokens: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens, labels=tokens).loss.item()


def _assert_export_loss_equals_megatron(family: str, ckpt: Path, sample_data, tmp_path) -> None:
    hf_dir = tmp_path / "hf"
    assert convert_in_process("to-hf", ckpt, hf_dir) == 0
    tokens = held_out_tokens(sample_data)
    hf = _hf_loss(hf_dir, tokens)
    (megatron,) = run_distributed(_megatron_loss, 1, str(ckpt), tokens)
    print(f"{family}: HF loss {hf:.7f}, megatron loss {megatron:.7f}")
    assert abs(hf - megatron) <= LOSS_RTOL * megatron, (hf, megatron)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_export_loss_equals_megatron(family, sample_data, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    overrides = TRAIN + PADDED + data_overrides(sample_data)
    run_training(1, FAMILIES[family], [*overrides, f"checkpoint.save={ckpt}"], tmp_path / "run")
    _assert_export_loss_equals_megatron(family, ckpt, sample_data, tmp_path)


def test_trained_deepseek_v3_export_loss_equals_megatron(
    sample_data, tmp_path_factory, tmp_path
) -> None:
    """20 steps of tiny_deepseek_v3 (padded vocabulary, moved expert biases), exported
    with its MTP layer; transformers' DeepseekV3ForCausalLM ignores that layer."""
    ckpt = balancing_run(sample_data, tmp_path_factory) / "ckpt"
    _assert_export_loss_equals_megatron("deepseek_v3", ckpt, sample_data, tmp_path)
