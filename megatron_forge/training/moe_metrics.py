"""MoE metrics per step: the load-balancing loss and how evenly tokens reach experts.

The aux loss comes from megatron-core's own tracker (the router records it per layer and
microbatch; ``reduce_aux_losses_tracker_across_ranks`` sums pipeline stages and averages
data-parallel ranks). Expert load comes from forward hooks on the routers: their routing
map says which experts each token went to, counted per layer and summed over the step.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_forge.utils import all_reduce


class MoEMetrics:
    def __init__(self, model: list[Any], num_layers: int, num_experts: int, seq_parallel: bool):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.seq_parallel = seq_parallel
        for chunk in model:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router: Any, inputs: Any, outputs: tuple) -> None:
        _, routing_map = outputs
        per_expert = routing_map.sum(dim=0).to(device="cpu", dtype=torch.float64)
        self.counts[router.layer_number - 1] += per_expert

    def collect(self, num_microbatches: int) -> dict[str, float]:
        """Reduce this step's numbers over all ranks (every rank must call), then reset."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe import moe_utils

        metrics = {}
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if "load_balancing_loss" in tracker:
            moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
            values = tracker["load_balancing_loss"]["values"].float().cpu()
            metrics["moe_aux_loss"] = float(values.sum() / (num_microbatches * len(values)))
        moe_utils.clear_aux_losses_tracker()

        counts = all_reduce(self.counts.clone())
        if not self.seq_parallel:  # TP ranks routed the same tokens: counted TP times
            counts /= ps.get_tensor_model_parallel_world_size()
        used = counts.sum(dim=1) > 0
        if used.any():
            per_layer = counts[used]
            imbalance = per_layer.max(dim=1).values / per_layer.mean(dim=1)
            metrics["moe_expert_load_imbalance"] = float(imbalance.mean())
        self.counts.zero_()
        return metrics
