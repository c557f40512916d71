"""Batch-size ramp-up (train.rampup_batch_size, Megatron-LM's --rampup-batch-size through
megatron-core's microbatch calculator): the batch sizes and consumed samples follow the
closed form, the data order does not change, the lr schedule runs in samples, the layout
is checked, and a run stopped mid-ramp resumes bit for bit."""

from __future__ import annotations

from typing import Any

import pytest

from megatron_forge.config import Config, ConfigError, load_config
from megatron_forge.data.datasets import BatchSizes, MicroBatchSampler
from tests.training import schedule_worker

RAMP = schedule_worker.RAMP
# start 2, +2 every 12 / 3 = 4 samples consumed, up to 8 once more than 12 are consumed:
# batches 2, 2, 4, 6, 8, 8, ... (the size at c consumed is 2 + 2 * int(c / 4) while c <= 12)
CONSUMED = [0, 2, 4, 8, 14, 22, 30, 38]


def _ramp_cfg(*overrides: str) -> Any:
    return load_config(None, [*RAMP, *overrides])


def validate_for_world(cfg: Config, world_size: int) -> None:
    cfg.validate(world_size, cuda_available=True, te_available=False)


def test_consumed_samples_follow_the_closed_form() -> None:
    sizes = BatchSizes(_ramp_cfg().train)
    assert [sizes.samples_at_step(step) for step in range(8)] == CONSUMED
    assert [sizes.at(c) for c in CONSUMED[:-1]] == [2, 2, 4, 6, 8, 8, 8]
    assert sizes.samples_at_step(1000) == 22 + (1000 - 5) * 8
    assert sizes.step_of(14) == 4 and sizes.step_of(22 + 8 * 10) == 15
    assert sizes.step_of(6) is None and sizes.step_of(23) is None


def test_ramp_changes_where_steps_begin_not_the_sample_order() -> None:
    """Under DP=2 each step's samples are the next ones, split in two halves, the same
    sequence a fixed batch reads, from any step boundary on."""
    sizes = BatchSizes(_ramp_cfg().train)

    def steps(start: int, num_steps: int) -> list[list[int]]:
        ranks = [
            list(MicroBatchSampler(10_000, start, 8, 1, rank, 2, num_steps * 8, sizes))
            for rank in range(2)
        ]
        out, cursors = [], [0, 0]
        consumed = start
        for _ in range(num_steps):
            half = sizes.at(consumed) // 2
            step = []
            for rank in range(2):
                step += [i for mb in ranks[rank][cursors[rank] : cursors[rank] + half] for i in mb]
                cursors[rank] += half
            out.append(step)
            consumed += 2 * half
        return out

    whole = steps(0, 6)
    assert [len(s) for s in whole] == [2, 2, 4, 6, 8, 8]
    assert [i for s in whole for i in s] == list(range(30))
    assert steps(8, 3) == whole[3:]  # a resumed sampler continues where the run stopped
    with pytest.raises(ConfigError, match=r"consumed sample 6, which falls inside a step of"):
        MicroBatchSampler(100, 6, 8, 1, 0, 2, None, sizes)


def test_lr_schedule_runs_in_samples() -> None:
    from megatron_forge.training.optim import lr_curve, scheduler_arguments

    cfg = _ramp_cfg(
        "train.lr=1.0", "train.min_lr=0.0", "train.warmup_iters=4", "train.decay_iters=7",
        "train.decay_style=linear", "train.train_iters=7",
    )  # fmt: skip
    args = scheduler_arguments(cfg)
    assert (args["lr_warmup_steps"], args["lr_decay_steps"]) == (14, 38)
    lrs = lr_curve(cfg)
    assert lrs[:4] == pytest.approx([2 / 14, 4 / 14, 8 / 14, 1.0])
    assert lrs[4:] == pytest.approx([1 - 8 / 24, 1 - 16 / 24, 0.0])


def test_every_ramp_size_must_divide_by_micro_batch_times_dp() -> None:
    cfg = _ramp_cfg()
    validate_for_world(cfg, 2)  # 2, 4, 6, 8 over micro batch 1 x DP 2
    with pytest.raises(ConfigError) as err:
        validate_for_world(cfg, 4)
    assert str(err.value) == (
        "train.rampup_batch_size=[2, 2, 12] passes through a global batch of 2, which is not "
        "divisible by train.micro_batch_size x data-parallel size = 1 x 4; choose start and "
        "increment as multiples of 4"
    )


@pytest.mark.parametrize(
    ("ramp", "message"),
    [
        ("[2,2]", r"train.rampup_batch_size must be \[start, increment, samples\] \(integers\)"),
        ("[2,0,12]", "with start >= 1, increment >= 1 and samples >= 0, got"),
        ("[3,2,12]", "global_batch_size - start must be a positive multiple of the increment"),
        ("[8,2,12]", "global_batch_size - start must be a positive multiple"),
    ],
)
def test_bad_ramp_names_the_field(ramp: str, message: str) -> None:
    overrides = ["train.global_batch_size=8", f"train.rampup_batch_size={ramp}"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_webdataset_refuses_a_ramp() -> None:
    cfg = load_config(None, [*RAMP, "data.format=webdataset", "data.train_shards=[a.tar]"])
    with pytest.raises(ConfigError, match="train.rampup_batch_size needs data.format indexed"):
        validate_for_world(cfg, 2)


# ---------------------------------------------------------------------------------------
# The real Trainer under DP=2 (tests/training/schedule_worker.py): a run that checkpoints
# at step 3 (mid-ramp: the next batch is 6 of 8) and a run resumed from that checkpoint


@pytest.mark.slow
def test_resumed_mid_ramp_matches_the_uninterrupted_run() -> None:
    runs = schedule_worker.results()
    whole, resumed = runs["rampup_whole"], runs["rampup_resumed"]  # step: [loss, lr, ...]
    assert [whole[s][3] for s in range(1, 7)] == CONSUMED[1:7]
    assert [whole[s][4] for s in range(1, 7)] == [2, 2, 4, 6, 8, 8]
    assert sorted(resumed) == [4, 5, 6]
    # bit-identical loss, lr, grad norm (and consumed samples) at every step after the resume
    assert resumed == {s: whole[s] for s in (4, 5, 6)}
