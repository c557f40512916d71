"""The per-microbatch work: forward pass and a token-weighted language-model loss.

``loss_func`` returns the SUM of per-token losses and the token count. With
``calculate_per_token_loss`` megatron-core adds up both over microbatches and
data-parallel ranks and divides the gradients once by the global token count
(finalize_model_grads), so every loss token in the global batch weighs the same, whatever
the layout and however the loss mask falls across microbatches.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any, Optional

import torch

from megatron_forge.utils import all_reduce


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss sum, number of loss tokens, {'lm loss': [sum, count]} for reporting)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any) -> tuple:
    """Run one microbatch through this pipeline stage; megatron calls loss_func at the end."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    # Context parallel: each CP rank keeps 2 of 2*CP sequence chunks (load-balanced for
    # causal attention); a no-op without CP.
    batch = next(data_iterator)
    if batch["tokens"] is None and batch["labels"] is not None:
        batch = mtp_inputs_on_last_stage(batch, model)
    batch = get_batch_on_this_cp_rank(batch)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
        # Multi-token prediction layers mask their own (shifted) losses with it; megatron-core
        # adds their scaled loss to the gradient inside GPTModel. Unused without MTP.
        loss_mask=batch["loss_mask"],
    )
    return output, partial(loss_func, batch["loss_mask"])


def mtp_inputs_on_last_stage(batch: dict[str, Any], model: Any) -> dict[str, Any]:
    """A last pipeline stage's batch with the inputs its multi-token prediction layers
    embed. The data pipeline sends only the loss targets there; since ``labels`` are the
    tokens shifted by one, tokens[:, 1:] = labels[:, :-1]. Position 0 stays a 0: the MTP
    layer shifts its inputs one to the left (roll -1), so position 0 is never embedded.
    Unchanged without MTP (nothing on this stage reads the inputs)."""
    if not getattr(getattr(model, "config", None), "mtp_num_layers", None):
        return batch
    labels = batch["labels"]
    tokens = torch.zeros_like(labels)
    tokens[:, 1:] = labels[:, :-1]
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return {**batch, "tokens": tokens, "position_ids": positions.contiguous()}


def reduce_reported_loss(losses: list[dict[str, torch.Tensor]]) -> float:
    """Mean loss per token over the global batch, identical on every rank.

    ``losses`` holds one [sum, count] pair per microbatch on the last pipeline stage
    and is empty elsewhere. Exactly one tensor-parallel rank per data-parallel replica
    contributes, then one all-reduce over the world gives every rank the global mean.
    """
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    contributes = (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    if contributes:
        for item in losses:
            total += item["lm loss"].to(torch.float64).cpu()
    loss_sum, count = all_reduce(total).tolist()
    return loss_sum / max(count, 1.0)


def mtp_loss_metrics(mtp_num_layers: Optional[int], num_microbatches: int) -> dict[str, float]:
    """This step's multi-token prediction losses, ``mtp_1_loss``... (per MTP layer, its
    per-token loss averaged over the step's microbatches and the data-parallel ranks) from
    megatron-core's MTP tracker, which is then cleared; empty without MTP. Every rank must
    call it: the last pipeline stage recorded the losses, a sum over the pipeline group
    gives them to every rank."""
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    if not mtp_num_layers:
        return {}
    tracker = MTPLossLoggingHelper.tracker
    recorded = tracker.get("values")
    values = torch.zeros(mtp_num_layers, dtype=torch.float64)
    if recorded is not None:
        values += recorded.detach().to("cpu", torch.float64)
        MTPLossLoggingHelper.clean_loss_in_tracker()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        torch.distributed.all_reduce(values, group=group)
    dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(values, group=dp)
    values /= torch.distributed.get_world_size(dp) * max(num_microbatches, 1)
    return {f"mtp_{i + 1}_loss": float(v) for i, v in enumerate(values.tolist())}
