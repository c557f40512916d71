"""Side concerns hook into the train loop through these named hooks, not ``if`` branches.

A callback overrides any of ``on_train_start``, ``on_step_end``, ``on_eval_end`` and
``on_train_end``. Callbacks run in list order on every rank; those that write files
decide themselves which rank writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer


def is_logging_rank() -> bool:
    """Global rank 0 (the loss is all-reduced to every rank, so rank 0 has it)."""
    return not dist.is_initialized() or dist.get_rank() == 0


class Callback:
    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        pass

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass


class MetricsLogger(Callback):
    """One JSON line per logged step in ``<logging.dir>/metrics.jsonl``, and a console line
    in Megatron-LM's format (readable in Slurm .out files)."""

    def __init__(self, log_dir: str | Path, log_interval: int) -> None:
        self.path = Path(log_dir) / "metrics.jsonl"
        self.log_interval = log_interval
        self.started = time.time()

    def _write(self, record: dict[str, Any]) -> None:
        if not is_logging_rank():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        if step % self.log_interval and step != trainer.cfg.train.train_iters:
            return
        self._write(metrics)
        if is_logging_rank():
            print(
                f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {step:>8d}/"
                f"{trainer.cfg.train.train_iters:>8d} | consumed samples: "
                f"{metrics['consumed_samples']:>10d} | elapsed time per iteration (ms): "
                f"{metrics['step_time_s'] * 1000:.1f} | learning rate: {metrics['lr']:.3E} | "
                f"global batch size: {trainer.cfg.train.global_batch_size:>4d} | "
                f"lm loss: {metrics['loss']:.6E} | grad norm: {metrics['grad_norm']:.3f} | "
                f"tokens/s: {metrics['tokens_per_s']:.1f}",
                flush=True,
            )

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write(metrics)
        if is_logging_rank():
            print(
                f"validation at iteration {metrics['step']} | lm loss: "
                f"{metrics['val_loss']:.6E} | lm loss PPL: {metrics['val_ppl']:.3f}",
                flush=True,
            )
