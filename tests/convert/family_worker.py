"""Megatron's side of tests/convert/test_families.py, in processes of its own (megatron's
process group and the CPU emulation patch torch for the life of a process):

    python -m tests.convert.family_worker from-hf '[[HF_DIR, CKPT_DIR], ...]'

runs ``forge-convert from-hf`` for each pair in one process, and :func:`layout_logits`
runs on two gloo ranks (tests/multiprocess.run_distributed): every checkpoint's logits
under TP=2, then, on the same ranks, under PP=2 through megatron-core's pipeline schedule
(forward only, the logits collected on the last stage).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")


def _build(cfg: Any, ckpt_dir: str) -> tuple[Any, int]:
    """This rank's GPTModel chunk of the checkpoint, weights loaded (resharded by
    dist_checkpointing to the current layout), in fp32; and the real vocabulary size."""
    from megatron.core import dist_checkpointing

    from megatron_forge.config import from_dict
    from megatron_forge.convert.reader import MegatronCheckpoint
    from megatron_forge.models import build_model, build_transformer_config

    ckpt = MegatronCheckpoint(ckpt_dir)
    run = from_dict(
        {
            "model": ckpt.raw_config["model"],
            "parallel": {
                "tensor": cfg.parallel.tensor,
                "pipeline": cfg.parallel.pipeline,
                "expert": cfg.parallel.expert,
                "expert_tensor": cfg.parallel.expert_tensor,
            },
            "precision": {"params_dtype": "fp32"},
        }
    )
    padded = ckpt.shape("embedding.word_embeddings.weight")[0]
    # Pad exactly as the saving run did, whatever this layout's TP.
    run.model.make_vocab_size_divisible_by = padded // cfg.parallel.tensor
    vocab = run.model.vocab_size
    (model,) = build_model(run, build_transformer_config(run), vocab)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.path))
    model.load_state_dict(state["model"])
    model.eval()
    return model, vocab


def _tp_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import tensor_parallel

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        local = model(tokens, positions, attention_mask=None)
        return tensor_parallel.gather_from_tensor_model_parallel_region(local)


def _tp_loss(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss through GPTModel's own labels path (vocab-parallel cross
    entropy over TP ranks, the padded vocabulary masked): what training reports."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    with torch.no_grad():
        return model(inputs, positions, attention_mask=None, labels=labels).double().mean()


def _pp_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor | None:
    """The pipeline schedule's forward over one microbatch; the last stage's logits."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)

    def step(data_iterator: Any, chunk: Any) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        output = chunk(batch, positions, attention_mask=None)
        return output, lambda out, non_loss_data=False: out

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    return collected[0] if collected else None


MOE_LAYOUTS = {"ep2": (1, 2, None), "tp2_etp1_ep2": (2, 2, 1)}
"""Layouts MoE checkpoints run under too: name -> (tensor, expert, expert_tensor)."""


def moe_layout_logits(cfg: Any, ckpts: dict[str, str], tokens: torch.Tensor, out_dir: str) -> None:
    """Each MoE checkpoint's logits and loss under every layout of MOE_LAYOUTS (experts
    spread over both ranks; with TP=2 ETP=1 each expert whole on its rank), saved as
    OUT/{name}_{layout}.pt and OUT/{name}_{layout}_loss.pt."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_forge.convert.reader import MegatronCheckpoint

    moe = {
        n: c
        for n, c in ckpts.items()
        if MegatronCheckpoint(c).raw_config["model"].get("num_experts")
    }
    for layout, (tp, ep, etp) in MOE_LAYOUTS.items() if moe else ():
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp or tp,
        )
        model_parallel_cuda_manual_seed(cfg.train.seed)
        cfg.parallel.tensor, cfg.parallel.pipeline = tp, 1
        cfg.parallel.expert, cfg.parallel.expert_tensor = ep, etp
        for name, ckpt_dir in moe.items():
            model, vocab = _build(cfg, ckpt_dir)
            logits, loss = _tp_logits(model, tokens), _tp_loss(model, tokens)
            if torch.distributed.get_rank() == 0:
                torch.save(logits[..., :vocab].contiguous(), Path(out_dir) / f"{name}_{layout}.pt")
                torch.save(loss, Path(out_dir) / f"{name}_{layout}_loss.pt")


def layout_logits(cfg: Any, ckpts: dict[str, str], tokens_path: str, out_dir: str) -> None:
    """On two ranks started with parallel.tensor=2: each checkpoint's logits (real
    vocabulary only) under TP=2, then under PP=2, saved as OUT/{name}_{tp2|pp2}.pt; MoE
    checkpoints then under :data:`MOE_LAYOUTS` too."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    tokens = torch.load(tokens_path)
    rank = torch.distributed.get_rank()
    for layout in ("tp2", "pp2"):
        if layout == "pp2":
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
            model_parallel_cuda_manual_seed(cfg.train.seed)
            cfg.parallel.tensor, cfg.parallel.pipeline = 1, 2
        for name, ckpt_dir in ckpts.items():
            model, vocab = _build(cfg, ckpt_dir)
            logits = _tp_logits(model, tokens) if layout == "tp2" else _pp_logits(model, tokens)
            if layout == "tp2":  # both TP ranks take part in the vocab-parallel loss
                loss = _tp_loss(model, tokens)
                if rank == 0:
                    torch.save(loss, Path(out_dir) / f"{name}_loss.pt")
            if logits is not None and (layout == "pp2" or rank == 0):
                assert logits.shape[:2] == tokens.shape, (name, layout, logits.shape)
                torch.save(logits[..., :vocab].contiguous(), Path(out_dir) / f"{name}_{layout}.pt")
    moe_layout_logits(cfg, ckpts, tokens, out_dir)


def main(argv: list[str]) -> int:
    from megatron_forge.convert.cli import main as convert

    assert argv[0] == "from-hf", argv
    for hf_dir, ckpt_dir in json.loads(argv[1]):
        code = convert(["from-hf", hf_dir, ckpt_dir])
        if code != 0:
            print(f"forge-convert from-hf {hf_dir} exited {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
