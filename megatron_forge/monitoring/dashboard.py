"""The names metrics get on dashboards (W&B, TensorBoard): grouped into sections by prefix.

metrics.jsonl keeps the trainer's flat keys (``loss``, ``val_loss``); dashboards get
``train/loss``, ``val/loss``, ``throughput/mfu``... so that W&B and TensorBoard show one
panel section per concern. Keys not listed here (a metric added later) appear under
``train/``.
"""

from __future__ import annotations

from typing import Any

DASHBOARD_NAMES: dict[str, str] = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "skipped_steps": "train/skipped_steps",
    "nan_steps": "train/nan_steps",
    "consumed_samples": "train/consumed_samples",
    "moe_aux_loss": "train/moe_aux_loss",
    "moe_expert_load_imbalance": "train/moe_expert_load_imbalance",
    "tokens_per_s": "throughput/tokens_per_s",
    "tokens_per_s_per_gpu": "throughput/tokens_per_s_per_gpu",
    "tflops_per_gpu": "throughput/tflops_per_gpu",
    "mfu": "throughput/mfu",
    "step_time_s": "time/step_s",
    "step_time_min_s": "time/step_min_s",
    "data_wait_s": "time/data_wait_s",
    "checkpoint_blocked_s": "time/checkpoint_blocked_s",
    "peak_mem_gb": "memory/peak_gb",
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
    "loss_zscore": "spikes/loss_zscore",
    "grad_norm_zscore": "spikes/grad_norm_zscore",
    "straggler_rank": "stragglers/rank",
    "straggler_busy_s": "stragglers/busy_s",
    "straggler_data_wait_s": "stragglers/data_wait_s",
    "straggler_compute_s": "stragglers/compute_s",
    "busy_median_s": "stragglers/busy_median_s",
    "busy_spread_s": "stragglers/busy_spread_s",
    "straggler_excess": "stragglers/excess",
    "rank_step_time_spread_s": "stragglers/step_time_spread_s",
    "straggler_gather_ms": "stragglers/gather_ms",
}

NOT_PLOTTED = {"step", "skipped", "step_time_rank_s"}
"""The step is the x axis; ``skipped`` is a per-step flag (``skipped_steps`` counts them);
``step_time_rank_s`` is rank 0's own time, already inside the min/max."""


def dashboard_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one step (or evaluation) under their dashboard names.

    Non-finite values are kept (a NaN loss is worth seeing); None and non-numbers dropped.
    """
    scalars = {}
    for key, value in metrics.items():
        if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        scalars[DASHBOARD_NAMES.get(key, f"train/{key}")] = float(value)
    return scalars


def is_log_step(step: int, log_interval: int, train_iters: int) -> bool:
    """Whether a step's metrics are logged: every ``log_interval`` steps and the last one
    (the rule MetricsLogger uses for metrics.jsonl and the console)."""
    return step % log_interval == 0 or step == train_iters
