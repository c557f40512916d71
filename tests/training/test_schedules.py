"""Learning-rate schedules on megatron-core's OptimizerParamScheduler: cosine, linear,
constant, warmup-stable-decay (linear, cosine, 1-sqrt, exponential decay phases) and
inverse-square-root equal their closed forms; a WSD run changes its length on a resume
without a jump in the lr, and continues on the extended curve."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from megatron_forge.config import ConfigError, load_config
from megatron_forge.training.optim import build_scheduler, lr_curve
from megatron_forge.training.resume import hparam_differences, wsd_continues
from tests.training import schedule_worker

LR, MIN_LR, WARMUP, ITERS, GBS = 1.0, 0.1, 4, 20, 8
BASE = [
    f"train.lr={LR}",
    f"train.min_lr={MIN_LR}",
    f"train.warmup_iters={WARMUP}",
    f"train.train_iters={ITERS}",
    f"train.global_batch_size={GBS}",
    "train.micro_batch_size=1",
]


def _cfg(*overrides: str) -> Any:
    return load_config(None, [*BASE, *overrides])


def _above_min(coeff: float) -> float:
    return MIN_LR + coeff * (LR - MIN_LR)


def closed_form(style: str, step: int, wsd_decay: int = 6, wsd_style: str = "") -> float:
    """The lr of step ``step`` (1-based, as logged) of a 20-step run, warmup 4."""
    if step <= WARMUP:
        return LR * step / WARMUP
    progress = (step - WARMUP) / (ITERS - WARMUP)
    if style == "cosine":
        return _above_min(0.5 * (1 + math.cos(math.pi * progress)))
    if style == "linear":
        return _above_min(1 - progress)
    if style == "constant":
        return LR
    if style == "inverse-square-root":
        return max(MIN_LR, LR * math.sqrt(WARMUP / step))
    # wsd: stable until step ITERS - wsd_decay, then the decay phase
    x = max(step - (ITERS - wsd_decay), 0) / wsd_decay
    coeff = {
        "linear": 1 - x,
        "cosine": 0.5 * (1 + math.cos(math.pi * x)),
        "1-sqrt": 1 - math.sqrt(x),
        "exponential": 2 * 0.5**x - 1,
    }[wsd_style]
    return _above_min(coeff)


STEPS = [1, 3, 4, 5, 9, 14, 15, 16, 17, 19, 20]


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "inverse-square-root"])
def test_lr_equals_the_closed_form(style: str) -> None:
    lrs = lr_curve(_cfg(f"train.decay_style={style}"))
    assert [lrs[s - 1] for s in STEPS] == pytest.approx([closed_form(style, s) for s in STEPS])


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", "exponential"])
def test_wsd_lr_equals_the_closed_form(shape: str) -> None:
    cfg = _cfg("train.decay_style=wsd", "train.wsd_decay_iters=6", f"train.wsd_decay_style={shape}")
    lrs = lr_curve(cfg)
    expected = [closed_form("wsd", s, 6, shape) for s in STEPS]
    assert [lrs[s - 1] for s in STEPS] == pytest.approx(expected)
    assert lrs[4:14] == [LR] * 10  # the stable phase, exactly
    assert lrs[-1] == pytest.approx(MIN_LR)


def test_inverse_square_root_stays_at_min_lr_floor() -> None:
    lrs = lr_curve(_cfg("train.decay_style=inverse-square-root", "train.min_lr=0.5"))
    assert lrs[-1] == 0.5 and lrs[5] == pytest.approx(math.sqrt(4 / 6))


def _scheduler(*overrides: str) -> Any:
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=0.0)
    return build_scheduler(_cfg("train.decay_style=wsd", *overrides), optimizer)


def test_checkpoint_holds_the_wsd_decay_phase() -> None:
    """megatron-core's own state dict leaves the WSD decay phase out; a checkpoint-wins
    resume must get the checkpoint's."""
    saved = _scheduler("train.wsd_decay_iters=6", "train.wsd_decay_style=cosine")
    saved.step(increment=16 * GBS)
    state = saved.state_dict()
    assert (state["wsd_decay_steps"], state["lr_wsd_decay_style"]) == (6 * GBS, "cosine")
    other = _scheduler("train.wsd_decay_iters=2", "train.wsd_decay_style=linear")
    other.use_checkpoint_opt_param_scheduler = True
    other.load_state_dict(state)
    assert (other.wsd_decay_steps, other.lr_wsd_decay_style) == (6 * GBS, "cosine")
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(
        closed_form("wsd", 16, 6, "cosine")
    )


def _wsd_resume(saved: Any, at_step: int, *config: str) -> tuple[Any, list[str]]:
    saved.step(increment=at_step * GBS)
    state = saved.state_dict()
    scheduler = _scheduler(*config)
    train = {"global_batch_size": GBS}
    lines = hparam_differences(state, scheduler.state_dict(), train, train)
    return wsd_continues(state, scheduler, lines), lines


def test_wsd_extension_in_the_stable_phase_continues() -> None:
    first = _scheduler("train.wsd_decay_iters=6")
    lr, lines = _wsd_resume(first, 10, "train.wsd_decay_iters=6", "train.train_iters=40")
    assert lr == LR
    assert lines == [
        "  train.decay_iters (unset: train.train_iters): 20 -> 40 (160 -> 320 samples)"
    ]


def test_wsd_sent_into_its_decay_at_the_resumed_step_continues() -> None:
    first = _scheduler("train.wsd_decay_iters=6", "train.train_iters=100")
    lr, lines = _wsd_resume(first, 10, "train.wsd_decay_iters=5", "train.decay_iters=15")
    assert lr == LR
    assert lines == [
        "  train.decay_iters (unset: train.train_iters): 100 -> 15 (800 -> 120 samples)",
        "  train.wsd_decay_iters: 6 -> 5 (48 -> 40 samples)",
    ]


def test_wsd_change_that_jumps_the_lr_is_refused() -> None:
    in_decay = _scheduler("train.wsd_decay_iters=6")  # step 17 is in the decay phase
    assert _wsd_resume(in_decay, 17, "train.wsd_decay_iters=6", "train.train_iters=40")[0] is None
    other_peak = _scheduler("train.wsd_decay_iters=6")
    assert _wsd_resume(other_peak, 10, "train.wsd_decay_iters=6", "train.lr=2.0")[0] is None
    now_cosine = _scheduler("train.wsd_decay_iters=6")
    now_cosine.step(increment=2 * GBS)
    state, train = now_cosine.state_dict(), {"global_batch_size": GBS}
    cosine = build_scheduler(_cfg(), torch.optim.SGD([torch.zeros(1)], lr=0.0))
    lines = hparam_differences(state, cosine.state_dict(), train, train)
    assert lines == ["  train.decay_style: wsd -> cosine"]
    assert wsd_continues(state, cosine, lines) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.decay_style=wsd"], "train.decay_style=wsd needs train.wsd_decay_iters >= 1"),
        (
            ["train.decay_style=wsd", "train.wsd_decay_iters=17"],
            "train.wsd_decay_iters=17 does not fit: warmup_iters=4 \\+ wsd_decay_iters must be "
            "<= train.train_iters=20; lower train.wsd_decay_iters to at most 16",
        ),
        (["train.wsd_decay_iters=3"], "train.wsd_decay_iters=3 is used only with"),
        (["train.decay_style=wsd", "train.wsd_decay_iters=2", "train.wsd_decay_style=sqrt"],
         r"train.wsd_decay_style='sqrt' must be one of \['linear', 'cosine', '1-sqrt'"),
        (["train.decay_style=inverse-square-root", "train.warmup_iters=0"],
         "inverse-square-root scales lr by sqrt\\(warmup / step\\)"),
    ],
)  # fmt: skip
def test_bad_schedule_names_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


# ---------------------------------------------------------------------------------------
# The real Trainer (DP=2, tests/training/schedule_worker.py): a WSD run checkpointed at
# step 4 of 6, resumed with the stable phase lengthened to 8 steps


@pytest.mark.slow
def test_wsd_run_extended_from_a_checkpoint_follows_the_extended_curve() -> None:
    runs = schedule_worker.results()
    first, extended = runs["wsd_first"], runs["wsd_extended"]  # step: [loss, lr, ...]
    expected = lr_curve(load_config(None, schedule_worker.WSD_EXTENDED))  # the train section
    # stable to step 6, linear decay over 7-8
    assert expected == pytest.approx([1e-3] * 6 + [5.5e-4, 1e-4])
    assert sorted(first) == [1, 2, 3, 4] and sorted(extended) == [5, 6, 7, 8]
    assert [first[s][1] for s in (1, 2, 3, 4)] == pytest.approx(expected[:4])
    assert [extended[s][1] for s in (5, 6, 7, 8)] == pytest.approx(expected[4:])
    assert "resuming at step 4 on this config's warmup-stable-decay schedule" in runs["output"]
    assert "the lr at step 4 is 0.001 on both" in runs["output"]
