"""The last pipeline stage's inputs for multi-token prediction, rebuilt from the labels."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_forge.training.step import mtp_inputs_on_last_stage


def test_last_stage_gets_the_tokens_its_mtp_layers_embed() -> None:
    text = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    tokens, labels = text[:, :-1], text[:, 1:]  # as the GPT datasets make them
    batch = {"tokens": None, "position_ids": None, "labels": labels, "loss_mask": None}
    model = SimpleNamespace(config=SimpleNamespace(mtp_num_layers=1))
    rebuilt = mtp_inputs_on_last_stage(batch, model)
    # MTP embeds roll(tokens, -1) = tokens[:, 1:]; position 0 is never read.
    assert torch.equal(rebuilt["tokens"][:, 1:], tokens[:, 1:])
    assert torch.equal(rebuilt["position_ids"][1], torch.arange(8))
    assert rebuilt["labels"] is labels
    plain = SimpleNamespace(config=SimpleNamespace(mtp_num_layers=None))
    assert mtp_inputs_on_last_stage(batch, plain) is batch
