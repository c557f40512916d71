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
from typing import Any

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
    batch = get_batch_on_this_cp_rank(next(data_iterator))
    output = model(
        batch["tokens"],
        batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
    )
    return output, partial(loss_func, batch["loss_mask"])


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
