"""MoE metrics per step: the router losses, how evenly tokens reach experts, how many the
capacity limit dropped, and how far aux-loss-free balancing has moved the expert bias.

The router losses come from megatron-core's own tracker (the router records each per layer
and microbatch, divided by its coefficient; ``reduce_aux_losses_tracker_across_ranks`` sums
pipeline stages and averages data-parallel ranks): ``moe_aux_loss`` (aux_loss),
``moe_seq_aux_loss``, ``moe_global_aux_loss`` and ``moe_z_loss``, each the mean over MoE
layers and microbatches. Expert load comes from forward hooks on the routers: their
routing map says which experts each token went to (after token dropping), counted per
layer and summed over the step:

- ``moe_expert_load_imbalance``: max / mean tokens per expert, averaged over MoE layers
  (1.0 is perfectly even);
- ``moe_expert_load/E``: expert E's share of all routed tokens (summed over MoE layers),
  one series per expert (1 / num_experts when even);
- ``moe_dropped_token_fraction`` (with ``model.moe_expert_capacity_factor``): the share
  of the tokens x top-k expert choices the capacity limit dropped;
- ``moe_expert_bias_spread`` (with ``model.moe_router_enable_expert_bias``): max - min of
  the expert bias, averaged over MoE layers; it grows from 0 as the bias corrects load.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_forge.utils import all_reduce

TRACKED_LOSSES = {
    "load_balancing_loss": "moe_aux_loss",
    "seq_load_balancing_loss": "moe_seq_aux_loss",
    "global_load_balancing_loss": "moe_global_aux_loss",
    "z_loss": "moe_z_loss",
}
"""megatron-core's tracker names -> our metric names."""


class MoEMetrics:
    def __init__(self, model: list[Any], num_layers: int, num_experts: int, seq_parallel: bool):
        from megatron.core.transformer.moe.router import TopKRouter

        # From the model's config, not a router: a pipeline stage may hold dense layers only
        # and must still join the same collectives.
        config = getattr(model[0], "config", None) or model[0].module.config
        num_layers += getattr(config, "mtp_num_layers", None) or 0  # MTP layers route too
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.choices = torch.zeros(num_layers, dtype=torch.float64)
        """Tokens x top-k routed per layer before any dropping."""
        self.seq_parallel = seq_parallel
        self.routers: list[Any] = []
        for chunk in model:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)
                    self.routers.append(module)
        self.losses = _tracked_losses(config)
        self.capacity = config.moe_expert_capacity_factor is not None
        self.padded = config.moe_pad_expert_input_to_capacity
        self.expert_bias = config.moe_router_enable_expert_bias

    def _count(self, router: Any, inputs: Any, outputs: tuple) -> None:
        if not router.training:  # evaluation's tokens are not the step's
            return
        probs, routing_map = outputs
        if self.padded:  # the map also marks the padding slots; routed tokens have a weight
            routing_map = routing_map & (probs != 0)
        per_expert = routing_map.sum(dim=0).to(device="cpu", dtype=torch.float64)
        layer = router.layer_number - 1
        self.counts[layer] += per_expert
        self.choices[layer] += routing_map.shape[0] * router.topk

    def collect(self, num_microbatches: int) -> dict[str, float]:
        """Reduce this step's numbers over all ranks (every rank must call), then reset."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe import moe_utils

        metrics = {}
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        names = self.losses  # the same on every rank: the reduction sums pipeline stages
        for name in names:  # a stage of dense layers only records none: it joins with zeros
            if name not in tracker:
                tracker[name] = {"values": torch.zeros(len(self.choices)), **_reduction(name)}
        if names:
            moe_utils.reduce_aux_losses_tracker_across_ranks(names)
        for name in names:
            entry = tracker[name]
            if entry.get("reduce_group") is None and entry.get("avg_group") is None:
                _average_over_data_parallel(entry["values"])  # the z-loss: rank-local so far
            values = entry["values"].float().cpu()
            layers = max(int((values != 0).sum()), 1)  # dense layers record nothing
            metrics[TRACKED_LOSSES[name]] = float(values.sum() / (num_microbatches * layers))
        moe_utils.clear_aux_losses_tracker()

        counts, choices = all_reduce(self.counts.clone()), all_reduce(self.choices.clone())
        if not self.seq_parallel:  # TP ranks routed the same tokens: counted TP times
            tp = ps.get_tensor_model_parallel_world_size()
            counts, choices = counts / tp, choices / tp
        used = choices > 0
        if used.any():
            per_layer = counts[used]
            imbalance = per_layer.max(dim=1).values / per_layer.mean(dim=1).clamp(min=1e-12)
            metrics["moe_expert_load_imbalance"] = float(imbalance.mean())
            share = per_layer.sum(dim=0) / per_layer.sum().clamp(min=1e-12)
            metrics.update({f"moe_expert_load/{e}": float(s) for e, s in enumerate(share)})
            if self.capacity:
                kept = per_layer.sum() / choices[used].sum()
                metrics["moe_dropped_token_fraction"] = float(1 - kept)
        if self.expert_bias:
            metrics["moe_expert_bias_spread"] = self._bias_spread()
        self.counts.zero_()
        self.choices.zero_()
        return metrics

    def _bias_spread(self) -> float:
        """max - min of each MoE layer's expert bias (the same on every rank holding the
        layer), averaged over layers."""
        spread = torch.zeros_like(self.choices)
        for router in self.routers:
            bias = router.expert_bias.detach().float()
            spread[router.layer_number - 1] = float(bias.max() - bias.min())
        spread = all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        layers = torch.zeros_like(self.choices)
        for router in self.routers:
            layers[router.layer_number - 1] = 1
        layers = all_reduce(layers, op=torch.distributed.ReduceOp.MAX)
        return float(spread.sum() / layers.sum().clamp(min=1))


def _tracked_losses(config: Any) -> list[str]:
    """The tracker names megatron-core's routers record in a training step of ``config``."""
    types = config.moe_router_load_balancing_type
    types, coeffs = (
        (types, config.moe_aux_loss_coeff)
        if isinstance(types, list)
        else (
            [types],
            [config.moe_aux_loss_coeff],
        )
    )
    by_type = {
        "aux_loss": "load_balancing_loss",
        "seq_aux_loss": "seq_load_balancing_loss",
        "global_aux_loss": "global_load_balancing_loss",
    }
    names = [by_type[t] for t, c in zip(types, coeffs) if t in by_type and c > 0]
    return names + (["z_loss"] if config.moe_z_loss_coeff is not None else [])


def _reduction(name: str) -> dict[str, Any]:
    """The reduce group a router gives the tracker entry ``name`` (router.py), so that a
    stage without routers reduces the values the pipeline sum brought it the same way."""
    from megatron.core import parallel_state as ps

    if name in ("load_balancing_loss", "seq_load_balancing_loss"):
        return {"reduce_group": ps.get_tensor_and_context_parallel_group()}
    if name == "global_load_balancing_loss":
        group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        return {"reduce_group": group, "reduce_group_has_dp": True}
    return {}  # z_loss: no group


def _average_over_data_parallel(values: torch.Tensor) -> None:
    """In place: the mean over data-parallel ranks (as megatron-core averages the losses
    it gives a reduce group), by a sum that gloo supports too."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=False)
    size = dist.get_world_size(group)
    if size > 1:
        dist.all_reduce(values, group=group)
        values /= size
