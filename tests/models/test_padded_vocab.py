"""megatron pads the vocabulary (a multiple of make_vocab_size_divisible_by x TP); the
padding rows must take no probability, so the loss megatron reports is the negative
log-likelihood over the real vocabulary, as a Hugging Face model computes it."""

from __future__ import annotations

from typing import Any

import torch

from tests.multiprocess import run_distributed

VOCAB = 1000  # pads to 1024 under TP=1 (x128) and TP=2 (x256)
TOKENS = (2, 24)


def _losses(cfg: Any) -> dict[str, Any]:
    """Per-token loss of the model's own labels path, the NLL recomputed from the
    gathered logits over the first VOCAB columns, and the padded columns' logits."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_forge.models import build_model, build_transformer_config

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    (model,) = build_model(cfg, build_transformer_config(cfg), VOCAB)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, TOKENS, generator=generator)
    labels = torch.randint(0, VOCAB, TOKENS, generator=generator)
    positions = torch.arange(TOKENS[1]).expand_as(tokens)
    loss = model(tokens, positions, attention_mask=None, labels=labels)  # [b, s]
    logits = model(tokens, positions, attention_mask=None)  # [b, s, padded / TP]
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    reference = torch.nn.functional.cross_entropy(
        logits[..., :VOCAB].reshape(-1, VOCAB).float(), labels.reshape(-1), reduction="none"
    ).view(TOKENS)
    loss.sum().backward()
    embedding = model.output_layer.weight.grad
    rows = embedding.shape[0]
    start = ps.get_tensor_model_parallel_rank() * rows
    padding_rows = [r - start for r in range(max(start, VOCAB), start + rows)]
    return {
        "loss": loss.detach(),
        "reference": reference.detach(),
        "padded_logits_max": logits[..., VOCAB:].max().item(),
        "padding_grad": embedding[padding_rows].abs().sum().item() if padding_rows else 0.0,
        "width": logits.shape[-1],
    }


def _check(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["width"] == 1024
        torch.testing.assert_close(r["loss"], r["reference"], rtol=1e-5, atol=1e-6)
        assert r["padded_logits_max"] == torch.finfo(torch.float32).min
        assert r["padding_grad"] == 0.0


FP32 = ["precision.params_dtype=fp32", "model.vocab_size=1000", "data.format=mock"]


def test_padded_vocabulary_takes_no_probability() -> None:
    _check(run_distributed(_losses, 1, overrides=FP32))


def test_padded_vocabulary_masked_on_each_tensor_parallel_shard() -> None:
    results = run_distributed(_losses, 2, overrides=[*FP32, "parallel.tensor=2"])
    _check(results)
    torch.testing.assert_close(results[0]["loss"], results[1]["loss"])
