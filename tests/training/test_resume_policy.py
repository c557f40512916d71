"""Resuming with changed hyper-parameters is never silent: a difference from the
checkpoint is an error listing it (field: checkpoint value -> config value) unless
``train.resume_hparams`` says whether the config or the checkpoint wins; and a resume with
nothing left to train (train_iters at or below the checkpoint's step) is an error too."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from megatron_forge.config import ConfigError, load_config
from megatron_forge.training.resume import hparam_differences
from tests.conftest import MOCK_TINY, REPO, run_worker, training_command

SCHEDULER = {
    "max_lr": 3e-4,
    "min_lr": 3e-5,
    "lr_warmup_steps": 80,
    "lr_decay_steps": 800,
    "lr_decay_style": "cosine",
    "start_wd": 0.1,
    "num_steps": 400,
}
TRAIN = {"global_batch_size": 8, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8}


def test_same_hyperparameters_differ_in_nothing() -> None:
    assert hparam_differences(SCHEDULER, {**SCHEDULER, "num_steps": 0}, TRAIN, TRAIN) == []


def test_differences_name_the_field_and_both_values() -> None:
    wanted = {**SCHEDULER, "max_lr": 1e-3, "lr_decay_steps": 1600, "lr_decay_style": "linear"}
    lines = hparam_differences(SCHEDULER, wanted, TRAIN, {**TRAIN, "adam_beta2": 0.99})
    assert lines == [
        "  train.lr: 0.0003 -> 0.001",
        "  train.decay_iters (unset: train.train_iters): 100 -> 200 (800 -> 1600 samples)",
        "  train.decay_style: cosine -> linear",
        "  train.adam_beta2: 0.95 -> 0.99",
    ]


def test_a_new_global_batch_size_shows_in_samples() -> None:
    wanted = {**SCHEDULER, "lr_warmup_steps": 160, "lr_decay_steps": 1600}
    lines = hparam_differences(SCHEDULER, wanted, TRAIN, {**TRAIN, "global_batch_size": 16})
    assert lines == [
        "  train.warmup_iters: 10 -> 10 (80 -> 160 samples)",
        "  train.decay_iters (unset: train.train_iters): 100 -> 100 (800 -> 1600 samples)",
        "  train.global_batch_size: 8 -> 16",
    ]


def test_wsd_fields_are_named_as_in_the_config() -> None:
    saved = {
        **SCHEDULER,
        "lr_decay_style": "WSD",
        "wsd_decay_steps": 160,
        "lr_wsd_decay_style": "minus_sqrt",
    }
    wanted = {**saved, "wsd_decay_steps": 80, "lr_wsd_decay_style": "linear"}
    assert hparam_differences(saved, wanted, TRAIN, TRAIN) == [
        "  train.wsd_decay_iters: 20 -> 10 (160 -> 80 samples)",
        "  train.wsd_decay_style: 1-sqrt -> linear",
    ]
    # a config that is not WSD has no decay phase to compare: its style says it all
    assert hparam_differences(saved, SCHEDULER, TRAIN, TRAIN) == [
        "  train.decay_style: wsd -> cosine"
    ]


def test_lengths_show_in_samples_with_a_batch_ramp_up() -> None:
    wanted = {**SCHEDULER, "lr_decay_steps": 1600}
    ramp = {**TRAIN, "rampup_batch_size": [2, 2, 100]}
    assert hparam_differences(SCHEDULER, wanted, ramp, ramp) == [
        "  train.decay_iters (unset: train.train_iters): 800 samples -> 1600 samples "
        "(800 -> 1600 samples)"
    ]


def test_resume_hparams_takes_config_or_checkpoint() -> None:
    assert load_config(None, ["train.resume_hparams=config"]).train.resume_hparams == "config"
    assert load_config(None, []).train.resume_hparams is None
    with pytest.raises(ConfigError, match=r"train.resume_hparams='both' must be one of"):
        load_config(None, ["train.resume_hparams=both"])


# ---------------------------------------------------------------------------------------
# The real Trainer: a checkpoint at step 4 of a 4-step run (lr 1e-3), then resumed


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("resume")
    run_worker("tests.training.fault_worker", str(out), "resume_hparams")
    return out, json.loads((out / "resume_hparams.json").read_text())


@pytest.mark.slow
def test_changed_hyperparameters_are_an_error_listing_them(resumed) -> None:
    out, r = resumed
    assert r["mismatch"] == (
        "ConfigError: this config's hyper-parameters differ from those of the checkpoint it "
        f"resumes from, {out / 'ckpt_hparams' / 'iter_0000004'} (checkpoint -> config):\n"
        "  train.lr: 0.001 -> 0.002\n"
        "  train.decay_iters (unset: train.train_iters): 4 -> 8 (16 -> 32 samples)\n"
        "  train.adam_beta2: 0.95 -> 0.99\n"
        "Set train.resume_hparams=config to use the config's from step 4 on (Megatron-LM's "
        "--override-opt-param-scheduler), or train.resume_hparams=checkpoint to keep the "
        "checkpoint's (--use-checkpoint-opt-param-scheduler)"
    )


@pytest.mark.slow
def test_config_wins_with_resume_hparams_config(resumed) -> None:
    _, r = resumed
    wins = r["config_wins"]
    assert wins["step"] == 4
    assert wins["max_lr"] == wins["scheduler_max_lr"] == 2e-3
    assert wins["betas"] == [0.9, 0.99] and wins["decay_steps"] == 32
    # warmup 8 samples, decay to 32: cosine at 16 samples is 3/4 of the way up from min_lr
    assert wins["lr"] == pytest.approx(1e-4 + 0.75 * (2e-3 - 1e-4))


@pytest.mark.slow
def test_checkpoint_wins_with_resume_hparams_checkpoint(resumed) -> None:
    _, r = resumed
    assert r["checkpoint_wins"] == {**r["same"]}  # as if nothing had changed
    assert r["same"]["max_lr"] == 1e-3 and r["same"]["betas"] == [0.9, 0.95]
    assert r["same"]["lr"] == pytest.approx(1e-4)  # the end of the 4-step decay


@pytest.mark.slow
def test_nothing_left_to_train_is_an_error(resumed) -> None:
    out, r = resumed
    expected = (
        f"ConfigError: checkpoint.load={out / 'ckpt_hparams'} resumes at step 4 "
        "(iter_0000004), and train.train_iters={} is not beyond it: there is nothing to "
        "train. Raise train.train_iters above 4 to train further, set "
        "train.skip_train=true to evaluate the checkpoint, or set checkpoint.load to "
        "another directory (or null) to start a new run"
    )
    assert r["finished"] == expected.format(4)
    assert r["below"] == expected.format(3)


@pytest.mark.slow
def test_entry_point_exits_2_when_nothing_is_left_to_train(resumed, tmp_path: Path) -> None:
    out, _ = resumed
    overrides = [
        *MOCK_TINY,
        "train.lr=1e-3",
        "train.min_lr=1e-4",
        "train.warmup_iters=2",
        "train.train_iters=4",
        f"checkpoint.load={out / 'ckpt_hparams'}",
    ]
    cmd, env = training_command(1, "configs/tiny.yaml", overrides, tmp_path / "run")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "config error: checkpoint.load=" in proc.stderr
    assert "train.train_iters=4 is not beyond it: there is nothing to train" in proc.stderr
