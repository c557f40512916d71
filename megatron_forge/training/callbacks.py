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
    from megatron_forge.config import Config
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

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write(metrics)
        if is_logging_rank():
            print(
                f"validation at iteration {metrics['step']} | lm loss: "
                f"{metrics['val_loss']:.6E} | lm loss PPL: {metrics['val_ppl']:.3f}",
                flush=True,
            )


def build_callbacks(cfg: Config) -> list[Callback]:
    """The side concerns of a run, in hook order: the watchdog first (its clock), the
    saver before the loggers (which report save time), throughput before the loggers (it
    adds TFLOP/s and MFU to the metrics), preemption last (it exits)."""
    from megatron_forge.checkpointing import Checkpointer, CheckpointSaver
    from megatron_forge.monitoring.tensorboard import TensorBoardLogger
    from megatron_forge.monitoring.throughput import ThroughputMonitor
    from megatron_forge.monitoring.wandb_logger import WandbLogger
    from megatron_forge.training.preemption import PreemptionHandler
    from megatron_forge.training.watchdog import HangWatchdog

    callbacks: list[Callback] = []
    if cfg.train.hang_timeout_s:
        callbacks.append(
            HangWatchdog(cfg.logging.dir, cfg.train.hang_timeout_s, cfg.launch.max_requeues)
        )
    checkpointer = (
        Checkpointer(cfg.checkpoint.save, cfg.checkpoint) if cfg.checkpoint.save else None
    )
    if checkpointer:
        callbacks.append(CheckpointSaver(checkpointer))
    lg = cfg.logging
    callbacks.append(ThroughputMonitor(cfg))
    callbacks.append(MetricsLogger(lg.dir, lg.log_interval))
    if lg.wandb_project and lg.wandb_mode != "disabled":
        callbacks.append(WandbLogger(cfg))
    if lg.tensorboard:
        callbacks.append(TensorBoardLogger(lg.dir, lg.log_interval))
    callbacks.append(PreemptionHandler(checkpointer, cfg.launch.max_requeues))
    return callbacks
