"""Metrics of every logged step and evaluation in ``<logging.dir>/metrics.jsonl``, and the
console line in Megatron-LM's format (readable in Slurm .out files).

Events (a skipped non-finite step, a rollback, a stop on non-finite steps, a refused
checkpoint save) are records of their own in the same file, with an ``event`` key: read
``[r for r in records if "event" not in r]`` for the step and evaluation metrics.

Global rank 0 writes: the trainer all-reduces the loss and the timing, so it holds every
metric.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_forge.training.callback import Callback
from megatron_forge.utils import is_rank0

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer


class MetricsLogger(Callback):
    """One JSON line per logged step in ``<logging.dir>/metrics.jsonl``, and a console line
    in Megatron-LM's format (readable in Slurm .out files)."""

    def __init__(self, log_dir: str | Path, log_interval: int) -> None:
        self.path = Path(log_dir) / "metrics.jsonl"
        self.log_interval = log_interval
        self.started = time.time()

    def _write(self, record: dict[str, Any]) -> None:
        if not is_rank0():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        logged = not step % self.log_interval or step == trainer.cfg.train.train_iters
        if not logged and not metrics.get("nonfinite"):  # a non-finite step always shows
            return
        self._write(metrics)
        if is_rank0():
            print(self.console_line(trainer, metrics), flush=True)

    @staticmethod
    def console_line(trainer: Trainer, m: dict[str, Any]) -> str:
        """Megatron-LM's iteration line (so tools that parse its logs keep working), plus
        MFU, tokens/s, memory and, when there are any, MoE and skipped/NaN counts."""
        t = trainer.cfg.train
        parts = [
            f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {m['step']:>8d}/{t.train_iters:>8d}",
            f"consumed samples: {m['consumed_samples']:>10d}",
            f"elapsed time per iteration (ms): {m['step_time_s'] * 1000:.1f}",
        ]
        if "tflops_per_gpu" in m:
            mfu = f"{m['mfu'] * 100:.1f}%" if "mfu" in m else "n/a"
            parts.append(f"throughput per GPU (TFLOP/s/GPU): {m['tflops_per_gpu']:.4g}")
            parts.append(f"MFU: {mfu}")
        parts += [
            f"learning rate: {m['lr']:.3E}",
            f"global batch size: {t.global_batch_size:>4d}",
            f"lm loss: {m['loss']:.6E}",
        ]
        if "moe_aux_loss" in m:
            parts.append(f"moe aux loss: {m['moe_aux_loss']:.4E}")
        if "moe_expert_load_imbalance" in m:
            parts.append(f"expert load imbalance: {m['moe_expert_load_imbalance']:.3f}")
        parts += [
            f"grad norm: {m['grad_norm']:.3f}",
            f"tokens/s: {m['tokens_per_s']:.1f}",
            f"tokens/s/GPU: {m['tokens_per_s_per_gpu']:.1f}",
            f"step time min/max (ms): {m['step_time_min_s'] * 1000:.1f}/"
            f"{m['step_time_s'] * 1000:.1f}",
            f"peak mem (GB): {m['peak_mem_gb']:.2f}",
        ]
        if m.get("skipped_steps") or m.get("nan_steps"):
            parts.append(f"number of skipped iterations: {m['skipped_steps']:>3d}")
            parts.append(f"number of nan iterations: {m['nan_steps']:>3d}")
        return " | ".join(parts)

    def on_event(self, trainer: Trainer, event: dict[str, Any]) -> None:
        # The trainer prints the event's message; the record goes next to the metrics.
        self._write({**event, "time": time.time()})

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write(metrics)
        if is_rank0():
            print(
                f"validation at iteration {metrics['step']} | lm loss: "
                f"{metrics['val_loss']:.6E} | lm loss PPL: {metrics['val_ppl']:.3f}",
                flush=True,
            )
