"""Logits of our megatron model for a checkpoint, in a process of its own (megatron needs a
process group, and the CPU emulation patches torch for the life of the process):

    python -m tests.convert.megatron_logits CKPT_DIR TOKENS.pt OUT.pt

Builds the model from the checkpoint's stored model config (one rank, fp32), loads the
weights with dist_checkpointing (which reshards whatever TP/PP/EP layout saved them) and
writes the logits of a forward pass over TOKENS.pt ([batch, seq] ids), all padded rows
included, to OUT.pt.
"""

from __future__ import annotations

import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main(ckpt_dir: str, tokens_path: str, out_path: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_forge import distributed
    from megatron_forge.config import from_dict
    from megatron_forge.convert.reader import MegatronCheckpoint
    from megatron_forge.convert.writer import _free_port
    from megatron_forge.models import build_model, build_transformer_config

    ckpt = MegatronCheckpoint(ckpt_dir)
    cfg = from_dict({"model": ckpt.raw_config["model"], "precision": {"params_dtype": "fp32"}})
    padded = ckpt.shape("embedding.word_embeddings.weight")[0]
    cfg.model.make_vocab_size_divisible_by = padded  # pad exactly as the saving run did
    distributed.initialize(cfg, distributed.DistEnv(0, 1, 0, "127.0.0.1", _free_port(), "single"))
    (model,) = build_model(cfg, build_transformer_config(cfg), padded)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.path))
    model.load_state_dict(state["model"])
    model.eval()
    tokens = torch.load(tokens_path)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=None)
    torch.save(logits.float().contiguous(), out_path)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
