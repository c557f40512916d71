"""The reference forward of a checkpoint: our own model, built from the checkpoint's stored
model config on one rank in fp32, with its weights loaded by megatron-core's
dist_checkpointing (which reshards whatever TP/PP/EP layout saved them).

What an export's logits are compared with (``forge-convert check-serving --reference``).
It starts a one-process world for megatron's parallel state and tears it down again; on a
machine without CUDA that installs the CPU emulation for the rest of the process, so run
it after anything that must see plain torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from megatron_forge.convert.reader import MegatronCheckpoint
from megatron_forge.utils import free_port

EMBEDDING = "embedding.word_embeddings.weight"


def megatron_logits(
    ckpt_dir: str | Path, tokens: torch.Tensor, iteration: Optional[int] = None
) -> torch.Tensor:
    """fp32 logits [batch, seq, padded vocabulary] of the checkpoint's model on ``tokens``
    ([batch, seq] token ids), padding columns included (as stored, not masked)."""
    from megatron.core import dist_checkpointing

    from megatron_forge import distributed
    from megatron_forge.config import from_dict
    from megatron_forge.models import build_model, build_transformer_config

    ckpt = MegatronCheckpoint(ckpt_dir, iteration)
    cfg = from_dict({"model": ckpt.raw_config["model"], "precision": {"params_dtype": "fp32"}})
    cfg.model = cfg.model.for_this_machine()  # e.g. trained with TE attention, read on a CPU
    # Logits are the main model's: megatron-core's MTP layers need labels in the forward
    # (and are not loaded without them).
    cfg.model = dataclasses.replace(cfg.model, mtp_num_layers=None)
    padded = ckpt.shape(EMBEDDING)[0]
    cfg.model.make_vocab_size_divisible_by = padded  # pad exactly as the saving run did
    env = distributed.DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    distributed.initialize(cfg, env)
    try:
        (model,) = build_model(cfg, build_transformer_config(cfg), padded)
        device = next(model.parameters()).device
        sharded = {"model": model.sharded_state_dict()}
        state = dist_checkpointing.load(sharded, str(ckpt.path))
        model.load_state_dict(state["model"])
        model.eval()
        tokens = tokens.to(device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        with torch.no_grad():
            return model(tokens, positions, attention_mask=None).float().cpu()
    finally:
        distributed.shutdown()
