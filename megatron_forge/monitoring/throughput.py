"""Model TFLOP/s per GPU and MFU of every step, added to the step's metrics.

The throughput callback runs it before the metrics are written (see ``build_callbacks``
in megatron_forge/train.py), so metrics.jsonl, the console line and the dashboards all get
``tflops_per_gpu`` and, where the GPU's peak is known, ``mfu`` (a fraction). Where it is
not (CPU, a GPU missing from the table), ``mfu`` is left out and the start of the run says
why and which config field to set.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch

from megatron_forge.config import Config
from megatron_forge.monitoring.flops import mfu, resolve_peak, run_flops_per_token
from megatron_forge.utils import is_rank0


def cuda_device_name() -> Optional[str]:
    """This process's GPU as torch names it, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


class ThroughputMonitor:
    """Adds ``tflops_per_gpu`` (model FLOPs, see :mod:`.flops`) and ``mfu`` to step metrics."""

    def __init__(self, cfg: Config, vocab_size: int, device_name: Optional[str] = None) -> None:
        """``device_name``: GPU name for the peak lookup; default: this process's CUDA device
        (None on CPU)."""
        self.flops_per_token = run_flops_per_token(cfg, vocab_size).training
        self.device_name = device_name or cuda_device_name()
        self.peak = resolve_peak(
            self.device_name, cfg.precision.fp8 is not None, cfg.logging.peak_tflops
        )

    def announce(self) -> None:
        """Say (on rank 0) the FLOPs per token and the peak, or why there is no MFU."""
        if not is_rank0():
            return
        known = f"; peak per GPU: {self.peak.note}" if self.peak.tflops else ""
        print(
            f"model FLOPs per token: {self.flops_per_token:.4g} (training, 3 x forward)" + known,
            flush=True,
        )
        if self.peak.tflops is None and self.device_name is not None:
            print(f"WARNING: {self.peak.note}", file=sys.stderr, flush=True)
        elif self.peak.tflops is None:
            print(self.peak.note, flush=True)

    def add_to(self, metrics: dict[str, Any]) -> None:
        """``tflops_per_gpu`` from ``tokens_per_s_per_gpu``, and ``mfu`` where known."""
        tflops = self.flops_per_token * metrics["tokens_per_s_per_gpu"] / 1e12
        metrics["tflops_per_gpu"] = tflops
        utilization = mfu(tflops, self.peak.tflops)
        if utilization is not None:
            metrics["mfu"] = utilization
