"""Model TFLOP/s per GPU and MFU of every step, added to the step's metrics.

Runs before :class:`~megatron_forge.training.callbacks.MetricsLogger` (see
``build_callbacks``), so metrics.jsonl, the console line and the dashboards all get
``tflops_per_gpu`` and, where the GPU's peak is known, ``mfu`` (a fraction). Where it is
not (CPU, a GPU missing from the table), ``mfu`` is left out and the start of the run says
why and which config field to set.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Optional

import torch

from megatron_forge.monitoring.flops import Peak, mfu, resolve_peak, run_flops_per_token
from megatron_forge.training.callbacks import Callback, is_logging_rank

if TYPE_CHECKING:
    from megatron_forge.config import Config
    from megatron_forge.training.trainer import Trainer


def cuda_device_name() -> Optional[str]:
    """This process's GPU as torch names it, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


class ThroughputMonitor(Callback):
    """Adds ``tflops_per_gpu`` (model FLOPs, see :mod:`.flops`) and ``mfu`` to each step."""

    def __init__(self, cfg: Config, device_name: Optional[str] = None) -> None:
        self.cfg = cfg
        self.device_name = device_name
        """GPU name for the peak lookup; default: this process's CUDA device (None on CPU)."""
        self.flops_per_token: Optional[float] = None
        self.peak: Optional[Peak] = None

    def on_train_start(self, trainer: Trainer) -> None:
        cfg = self.cfg
        vocab = cfg.model.vocab_size or trainer.tokenizer.vocab_size
        self.flops_per_token = run_flops_per_token(cfg, vocab).training
        name = self.device_name or cuda_device_name()
        self.peak = resolve_peak(name, cfg.precision.fp8 is not None, cfg.logging.peak_tflops)
        if is_logging_rank():
            known = f"; peak per GPU: {self.peak.note}" if self.peak.tflops else ""
            print(
                f"model FLOPs per token: {self.flops_per_token:.4g} (training, 3 x forward)"
                + known,
                flush=True,
            )
            if self.peak.tflops is None and name is not None:
                print(f"WARNING: {self.peak.note}", file=sys.stderr, flush=True)
            elif self.peak.tflops is None:
                print(self.peak.note, flush=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.flops_per_token is None:
            self.on_train_start(trainer)
        tflops = self.flops_per_token * metrics["tokens_per_s_per_gpu"] / 1e12
        metrics["tflops_per_gpu"] = tflops
        utilization = mfu(tflops, self.peak.tflops)
        if utilization is not None:
            metrics["mfu"] = utilization
