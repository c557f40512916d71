"""One 4-rank gloo run under torchrun (the checkpoint writer needs processes that may have
children) behind tests/training/test_tp_data.py and tests/models/test_attention.py, so the
slow tier starts megatron-core once for both:

    python -m torch.distributed.run --standalone --nproc_per_node=4 \\
        -m tests.training.backends_worker OUT_DIR

- per model (tiny: TP=2 x PP=2; tiny_moe: PP=2 x EP=2): a step-0 checkpoint saved under
  one attention backend, 10 steps from it under each backend, and the dataset reads;
- the broadcast batches against each rank's own reading;
- on rank 0, SDPAttention against megatron-core's DotProductAttention as modules: outputs
  and gradients, dropout, and peak CPU memory at seq 2048.

Each rank writes what the tests check to ``OUT_DIR/rank<N>.json``.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from tests.conftest import MOCK_TINY, REPO

STEPS = 10
WORLD = 4
TP2_PP2 = ("parallel.tensor=2", "parallel.pipeline=2")
# megatron-core trains MoE layers under TP only with sequence parallelism, which needs
# Transformer Engine: the MoE model runs PP=2 x EP=2 (DP=2) on CPU.
PP2_EP2 = ("parallel.pipeline=2", "parallel.expert=2")
CASES = {
    "tiny": ("configs/tiny.yaml", "sdpa", "local", TP2_PP2),
    "tiny_moe": ("configs/tiny_moe.yaml", "local", "sdpa", PP2_EP2),
}
"""name -> (config, backend that saves the step-0 checkpoint, backend that loads it,
layout)."""


def _config(root: Path, config: str, backend: str, *extra: str) -> Any:
    from megatron_forge.config import load_config

    return load_config(
        config,
        [
            *MOCK_TINY,
            f"train.train_iters={STEPS}",
            "train.eval_interval=0",
            "data.num_workers=0",
            "checkpoint.async_save=false",
            "checkpoint.save=null",
            "checkpoint.load=null",
            "logging.wandb_project=null",
            f"logging.dir={root}",
            f"model.attention_backend={backend}",
            *extra,
        ],
    )


def _same_batches(trainer: Any, cfg: Any, microbatches: int) -> bool:
    """The broadcast stream equals each rank's own reading of the same samples."""
    import torch

    from megatron_forge.data.broadcast import batches_on_this_tp_rank
    from megatron_forge.data.datasets import microbatch_iterator

    def stream(broadcast: bool) -> Any:
        read = lambda: microbatch_iterator(  # noqa: E731
            trainer.train_ds, cfg, trainer.dp_rank, trainer.dp_size, 0, 2
        )
        return batches_on_this_tp_rank(read, broadcast=broadcast)

    sent, own = stream(True), stream(False)
    for _ in range(microbatches):
        a, b = next(sent), next(own)
        for key in a:
            if (a[key] is None) != (b[key] is None):
                return False
            if a[key] is not None and not (
                a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
            ):
                return False
    return True


def _backends_and_reads(root: str, env: Any) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_forge import distributed
    from megatron_forge.checkpointing import Checkpointer
    from megatron_forge.training.trainer import Trainer

    reads = collections.Counter()
    getitem = GPTDataset.__getitem__

    def counted(self: Any, idx: Any) -> Any:
        reads["samples"] += 1
        return getitem(self, idx)

    GPTDataset.__getitem__ = counted
    out: dict[str, Any] = {}
    for name, (config, first, second, layout) in CASES.items():
        ckpt = Path(root) / name / "ckpt"
        cfg = _config(Path(root) / name, config, first, *layout, "model.init_method_std=0.05")
        ps.destroy_model_parallel()
        distributed.initialize(cfg, env)
        cfg.validate(WORLD, cuda_available=False, te_available=False)
        trainer = Trainer(cfg, WORLD, callbacks=[])
        Checkpointer(ckpt, cfg.checkpoint).save(
            trainer.model,
            trainer.optimizer,
            trainer.scheduler,
            trainer.train_state(),
            cfg.to_dict(),
            blocking=True,
        )
        keys = set(trainer.model[0].sharded_state_dict())
        reads.clear()
        out[f"{name}_{first}"] = [trainer.train_step()["loss"] for _ in range(STEPS)]
        out[f"{name}_reads"] = reads["samples"]
        del trainer
        cfg = _config(Path(root) / name, config, second, *layout, f"checkpoint.load={ckpt}")
        trainer = Trainer(cfg, WORLD, callbacks=[])
        out[f"{name}_same_keys"] = keys == set(trainer.model[0].sharded_state_dict())
        out[f"{name}_{second}"] = [trainer.train_step()["loss"] for _ in range(STEPS)]
        if name == "tiny":
            out["tp_rank"] = ps.get_tensor_model_parallel_rank()
            out["same_batches"] = _same_batches(trainer, cfg, cfg.num_microbatches(WORLD) * 2)
        del trainer
    GPTDataset.__getitem__ = getitem
    return out


def _peak_mib(run: Any) -> float:
    """Peak CPU memory allocated by torch while ``run()`` executes (torch.profiler's
    allocation records: each op's own allocations, and the frees, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    changes = sorted(
        (
            e.time_range.start,
            e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage,
        )
        for e in prof.events()
    )
    current = peak = 0
    for _, change in changes:
        current += change
        peak = max(peak, current)
    return peak / 2**20


def _module_checks() -> dict[str, Any]:
    """SDPAttention vs DotProductAttention on the same query/key/value (GQA: 8 query heads,
    2 key/value groups), with causal masks, as megatron-core calls them."""
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_forge.models.attention import SDPAttention

    def config(dropout: float) -> Any:
        return TransformerConfig(
            num_layers=1,
            hidden_size=64,
            num_attention_heads=8,
            num_query_groups=2,
            kv_channels=16,
            attention_dropout=dropout,
            use_cpu_initialization=True,
        )

    def build(cls: Any, dropout: float = 0.0) -> Any:
        return cls(config(dropout), 1, AttnMaskType.causal, "self")

    def qkv(seq: int, batch: int) -> list[Any]:
        shapes = [(seq, batch, 8, 16), (seq, batch, 2, 16), (seq, batch, 2, 16)]
        return [torch.randn(shape, requires_grad=True) for shape in shapes]

    def forward_backward(module: Any, inputs: list[Any]) -> list[Any]:
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        output = module(*inputs, None)
        output.square().sum().backward()
        return [output.detach()] + [t.grad for t in inputs]

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    # Memory first, while megatron's score buffer is still the small one of the trainers.
    long = qkv(2048, 1)
    local, sdpa = build(DotProductAttention), build(SDPAttention)
    out["peak_mib_local"] = _peak_mib(lambda: forward_backward(local, long))
    out["peak_mib_sdpa"] = _peak_mib(lambda: forward_backward(sdpa, long))
    out["scores_mib"] = 8 * 2048 * 2048 * 4 / 2**20  # one fp32 [b, heads, s, s] tensor
    short = qkv(64, 2)
    ref, got = forward_backward(local, short), forward_backward(sdpa, short)
    out["max_abs_diff"] = [(a - b).abs().max().item() for a, b in zip(ref, got)]
    out["max_abs"] = [a.abs().max().item() for a in ref]
    dropped = build(SDPAttention, dropout=0.5)
    dropped.eval()
    out["eval_ignores_dropout"] = torch.equal(forward_backward(dropped, short)[0], got[0])
    dropped.train()
    out["train_applies_dropout"] = not torch.equal(forward_backward(dropped, short)[0], got[0])
    return out


def main(out: Path) -> int:
    warnings.filterwarnings("ignore")
    from megatron_forge import distributed

    env = distributed.read_environment()
    distributed.initialize(_config(out / "init", "configs/tiny.yaml", "local"), env)
    try:
        result = _backends_and_reads(str(out), env)
        if env.rank == 0:
            result["module"] = _module_checks()
        (out / f"rank{env.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.shutdown()
    return 0


@functools.cache
def results() -> list[dict[str, Any]]:
    """Run once per test session; one dict per rank."""
    out = Path(tempfile.mkdtemp(prefix="backends_worker_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={WORLD}", "-m", "tests.training.backends_worker", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
