"""Work that needs a process of its own (megatron's process group, and the CPU emulation,
which patches torch for the life of the process), batched to pay the start-up once:

    python -m tests.convert.worker convert '[["from-hf", HF_DIR, CKPT_DIR], ...]'
    python -m tests.convert.worker logits TOKENS.pt '[[CKPT_DIR, OUT.pt], ...]'

``convert`` runs forge-convert once per argument list and fails on the first non-zero exit.
``logits`` builds our model from each checkpoint's stored model config (one rank, fp32),
loads the weights with dist_checkpointing (which reshards whatever TP/PP/EP layout saved
them) and saves the logits of a forward pass over the token ids ([batch, seq]), padded
vocabulary rows included.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def megatron_logits(ckpt_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import dist_checkpointing

    from megatron_forge import distributed
    from megatron_forge.config import from_dict
    from megatron_forge.convert.reader import MegatronCheckpoint
    from megatron_forge.models import build_model, build_transformer_config
    from megatron_forge.utils import free_port

    ckpt = MegatronCheckpoint(ckpt_dir)
    cfg = from_dict({"model": ckpt.raw_config["model"], "precision": {"params_dtype": "fp32"}})
    padded = ckpt.shape("embedding.word_embeddings.weight")[0]
    cfg.model.make_vocab_size_divisible_by = padded  # pad exactly as the saving run did
    distributed.initialize(cfg, distributed.DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    try:
        (model,) = build_model(cfg, build_transformer_config(cfg), padded)
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.path))
        model.load_state_dict(state["model"])
        model.eval()
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            return model(tokens, positions, attention_mask=None).float()
    finally:
        distributed.shutdown()


def main(argv: list[str]) -> int:
    if argv[0] == "convert":
        from megatron_forge.convert.cli import main as convert

        for args in json.loads(argv[1]):
            code = convert(args)
            if code != 0:
                print(f"forge-convert {args} exited {code}", file=sys.stderr)
                return code
        return 0
    tokens = torch.load(argv[1])
    for ckpt_dir, out in json.loads(argv[2]):
        torch.save(megatron_logits(ckpt_dir, tokens), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
