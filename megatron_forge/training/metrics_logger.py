"""Metrics of every logged step and evaluation in ``<logging.dir>/metrics.jsonl``, and the
console line in Megatron-LM's format (readable in Slurm .out files), with the run's
progress: tokens seen, the time left to train_iters and to the next checkpoint at the
speed since the previous line.

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
from typing import TYPE_CHECKING, Any, Optional

from megatron_forge.training.callback import Callback
from megatron_forge.training.checkpoint_saver import CheckpointSaver
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
        self.clock = time.monotonic
        self._mark: Optional[tuple[float, int, int]] = None
        """(monotonic time, step, consumed samples) at the previous line or the start."""

    def on_train_start(self, trainer: Trainer) -> None:
        self._mark = (self.clock(), trainer.step, trainer.consumed_samples)

    def progress(self, trainer: Trainer, m: dict[str, Any]) -> dict[str, float]:
        """``eta_s`` (to train_iters) and ``next_checkpoint_s`` (with checkpoint.save_interval
        or save_interval_minutes) at the speed since the previous line (samples per second,
        so a growing batch is counted right); empty before the first timed step."""
        now, mark = self.clock(), self._mark
        self._mark = (now, m["step"], m["consumed_samples"])
        if mark is None or m["step"] <= mark[1] or m["consumed_samples"] <= mark[2]:
            return {}
        elapsed = now - mark[0]
        per_sample = elapsed / (m["consumed_samples"] - mark[2])
        per_step = elapsed / (m["step"] - mark[1])
        t = trainer.cfg.train
        batch_sizes = getattr(trainer, "batch_sizes", None)
        if batch_sizes is not None:
            remaining = batch_sizes.samples_at_step(t.train_iters) - m["consumed_samples"]
        else:
            remaining = (t.train_iters - m["step"]) * t.global_batch_size
        out = {"eta_s": max(remaining, 0) * per_sample}
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, CheckpointSaver)), None)
        ck = trainer.cfg.checkpoint
        waits = []
        if saver is not None and ck.save_interval:
            steps = min(ck.save_interval - m["step"] % ck.save_interval, t.train_iters - m["step"])
            waits.append(steps * per_step)
        if saver is not None and ck.save_interval_minutes is not None:
            since = now - saver.checkpointer.last_save_time
            waits.append(max(ck.save_interval_minutes * 60 - since, 0.0))
        if waits:
            out["next_checkpoint_s"] = min(waits)
        return out

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
        progress = self.progress(trainer, metrics)
        tokens = {"tokens_seen": metrics["consumed_samples"] * trainer.cfg.model.seq_length}
        self._write({**metrics, **tokens, **progress})
        if is_rank0():
            print(self.console_line(trainer, metrics, progress), flush=True)

    @staticmethod
    def console_line(
        trainer: Trainer, m: dict[str, Any], progress: Optional[dict[str, float]] = None
    ) -> str:
        """Megatron-LM's iteration line (so tools that parse its logs keep working), plus
        tokens seen, MFU, tokens/s, memory, when there are any MoE and skipped/NaN counts,
        and the ``progress`` times (ETA, next checkpoint) when given."""
        t = trainer.cfg.train
        tokens = m["consumed_samples"] * trainer.cfg.model.seq_length
        parts = [
            f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {m['step']:>8d}/{t.train_iters:>8d}",
            f"consumed samples: {m['consumed_samples']:>10d}",
            f"tokens seen: {_count(tokens)}",
            f"elapsed time per iteration (ms): {m['step_time_s'] * 1000:.1f}",
        ]
        if "tflops_per_gpu" in m:
            mfu = f"{m['mfu'] * 100:.1f}%" if "mfu" in m else "n/a"
            parts.append(f"throughput per GPU (TFLOP/s/GPU): {m['tflops_per_gpu']:.4g}")
            parts.append(f"MFU: {mfu}")
        parts += [
            f"learning rate: {m['lr']:.3E}",
            f"global batch size: {m.get('global_batch_size', t.global_batch_size):>4d}",
            f"lm loss: {m['loss']:.6E}",
        ]
        if "moe_aux_loss" in m:
            parts.append(f"moe aux loss: {m['moe_aux_loss']:.4E}")
        if "moe_expert_load_imbalance" in m:
            parts.append(f"expert load imbalance: {m['moe_expert_load_imbalance']:.3f}")
        if m.get("moe_dropped_token_fraction"):
            parts.append(f"dropped tokens: {m['moe_dropped_token_fraction'] * 100:.2f}%")
        mtp = sorted(k for k in m if k.startswith("mtp_") and k.endswith("_loss"))
        parts += [f"mtp {k[4:-5]} loss: {m[k]:.6E}" for k in mtp]
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
        if progress and "eta_s" in progress:
            parts.append(f"ETA: {_duration(progress['eta_s'])}")
        if progress and "next_checkpoint_s" in progress:
            parts.append(f"next checkpoint in: {_duration(progress['next_checkpoint_s'])}")
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


def _count(n: float) -> str:
    """1234567 -> '1.23M' (K, M, B, T)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _duration(seconds: float) -> str:
    """3725 -> '1:02:05'; a day or more -> '2d 03:00:00'."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours:d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {hours:02d}:{rest // 60:02d}:{rest % 60:02d}" if days else clock
