"""Megatron's side of tests/convert/test_deepseek.py, on two gloo ranks
(tests/multiprocess.run_distributed): a DeepSeek-V3 checkpoint's logits and loss under
EP=2, then, on the same ranks, under TP=2 with ETP=1, saved for the test to compare with
transformers'. One process group runs both layouts (megatron's parallel state is
re-initialized between them)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")

LAYOUTS = {"ep2": dict(expert=2), "tp2_etp1": dict(tensor=2, expert_tensor=1)}


def _build(layout: dict, ckpt_dir: str, mtp: bool = True) -> tuple[Any, int]:
    """This rank's GPTModel of the checkpoint, resharded by dist_checkpointing, fp32;
    without its MTP layers when ``mtp`` is false (megatron-core 0.16.1's GPTModel with MTP
    needs labels: it returns losses, never logits)."""
    from megatron.core import dist_checkpointing

    from megatron_forge.config import from_dict
    from megatron_forge.convert.reader import MegatronCheckpoint
    from megatron_forge.models import build_model, build_transformer_config

    ckpt = MegatronCheckpoint(ckpt_dir)
    run = from_dict(
        {
            "model": ckpt.raw_config["model"],
            "parallel": layout,
            "precision": {"params_dtype": "fp32"},
        }
    )
    if not mtp:
        run.model.mtp_num_layers = None
    padded = ckpt.shape("embedding.word_embeddings.weight")[0]
    run.model.make_vocab_size_divisible_by = padded // run.parallel.tensor
    (model,) = build_model(run, build_transformer_config(run), run.model.vocab_size)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.path))
    model.load_state_dict(state["model"])
    model.eval()
    return model, run.model.vocab_size


def layout_outputs(cfg: Any, ckpt_dir: str, tokens_path: str, out_dir: str) -> None:
    """Logits (real vocabulary), the mean next-token loss and the MTP metrics of a training-
    mode forward under each layout, saved as OUT/{layout}_{logits,loss,mtp}.pt by rank 0."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_forge.training.step import mtp_loss_metrics

    tokens = torch.load(tokens_path)
    rank = torch.distributed.get_rank()
    for name, layout in LAYOUTS.items():
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.get("tensor", 1),
            expert_model_parallel_size=layout.get("expert", 1),
            expert_tensor_parallel_size=layout.get("expert_tensor"),
        )
        model_parallel_cuda_manual_seed(cfg.train.seed)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        model, vocab = _build(layout, ckpt_dir, mtp=False)
        with torch.no_grad():
            local = model(tokens, positions, attention_mask=None)
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(local)
        model, _ = _build(layout, ckpt_dir)  # the MTP layer runs (its loss is not returned)
        with torch.no_grad():
            loss = model(inputs, positions[:, :-1], attention_mask=None, labels=labels)
        mtp = None
        if layout.get("tensor", 1) == 1:  # MoE training under TP needs sequence parallelism
            model.train()  # megatron-core records the MTP loss in training mode only
            with torch.no_grad():
                model(inputs, positions[:, :-1], attention_mask=None, labels=labels)
            mtp = mtp_loss_metrics(1, num_microbatches=1)
        if rank == 0:
            torch.save(logits[..., :vocab].contiguous(), Path(out_dir) / f"{name}_logits.pt")
            torch.save(loss.double().mean(), Path(out_dir) / f"{name}_loss.pt")
            if mtp is not None:
                torch.save(mtp, Path(out_dir) / f"{name}_mtp.pt")
