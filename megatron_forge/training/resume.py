"""What a resumed run must agree on with its checkpoint, checked before it is loaded.

- ``train.train_iters`` must lie beyond the checkpoint's step: otherwise there is nothing
  to train, which is almost always a mistake (a finished run submitted again).
- Hyper-parameters stored in the checkpoint: megatron-core's scheduler state (lr, min_lr,
  warmup, decay, weight decay) and the optimizer's parameter groups (their lr bounds,
  Adam betas and eps) come back from the checkpoint and silently win over the config. A
  config that asks for other values is an error listing them, unless
  ``train.resume_hparams`` says which side wins: ``config`` (Megatron-LM's
  --override-opt-param-scheduler) or ``checkpoint`` (--use-checkpoint-opt-param-scheduler).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from megatron_forge.checkpointing import iteration_dir, iteration_to_load
from megatron_forge.checkpointing.files import load_common_state
from megatron_forge.config import Config
from megatron_forge.errors import ConfigError
from megatron_forge.utils import is_rank0

# megatron's scheduler state key -> the config field it comes from; warmup and decay are
# stored in samples (iterations x global batch size).
SCHEDULER_FIELDS = {
    "max_lr": "train.lr",
    "min_lr": "train.min_lr",
    "lr_warmup_steps": "train.warmup_iters",
    "lr_decay_steps": "train.decay_iters (unset: train.train_iters)",
    "lr_decay_style": "train.decay_style",
    "start_wd": "train.weight_decay",
}
IN_SAMPLES = ("lr_warmup_steps", "lr_decay_steps")
# Stored in the optimizer's parameter groups; compared through the checkpoint's config.
ADAM_FIELDS = ("adam_beta1", "adam_beta2", "adam_eps")


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _iters(samples: Any, global_batch: int) -> str:
    if isinstance(samples, int) and global_batch and samples % global_batch == 0:
        return str(samples // global_batch)
    return f"{samples} samples"


def hparam_differences(
    saved_scheduler: dict[str, Any],
    scheduler: dict[str, Any],
    saved_train: dict[str, Any],
    train: dict[str, Any],
) -> list[str]:
    """One line per hyper-parameter on which a checkpoint (its scheduler state and the
    ``train`` section of its config) and this run disagree:
    ``field: checkpoint value -> config value``."""
    saved_gbs = int(saved_train.get("global_batch_size", train["global_batch_size"]))
    gbs = int(train["global_batch_size"])
    lines = []
    for key, name in SCHEDULER_FIELDS.items():
        if key not in saved_scheduler or saved_scheduler[key] == scheduler[key]:
            continue
        old, new = saved_scheduler[key], scheduler[key]
        if key in IN_SAMPLES:
            text = f"{_iters(old, saved_gbs)} -> {_iters(new, gbs)} ({old} -> {new} samples)"
        else:
            text = f"{_value(old)} -> {_value(new)}"
        lines.append(f"  {name}: {text}")
    if lines and saved_gbs != gbs:
        lines.append(f"  train.global_batch_size: {saved_gbs} -> {gbs}")
    for key in ADAM_FIELDS:
        if key in saved_train and saved_train[key] != train[key]:
            lines.append(f"  train.{key}: {_value(saved_train[key])} -> {_value(train[key])}")
    return lines


def check_resume(cfg: Config, scheduler: Any) -> Optional[int]:
    """Check ``cfg`` against the checkpoint that ``checkpoint.load`` resumes from, before
    loading it, and tell the scheduler which values win; returns the checkpoint's step
    (None: no checkpoint, or weights only). Raises ConfigError on a mismatch."""
    root = cfg.checkpoint.load
    iteration = iteration_to_load(root, cfg.checkpoint) if root else None
    if iteration is None:
        return None  # a run that resumes itself and has not saved yet
    path = iteration_dir(root, iteration)
    common = load_common_state(path)  # with the allowlist, as the load that follows
    if not (cfg.checkpoint.load_optimizer and common.get("has_optimizer", True)):
        return None  # weights only: a new run, with its own schedule from step 0
    t = cfg.train
    step = int(common["iteration"])
    if t.skip_train:
        return step  # evaluation only: no step follows, so no hyper-parameter matters
    if step >= t.train_iters:
        raise ConfigError(
            f"checkpoint.load={root} resumes at step {step} (iter_{step:07d}), and "
            f"train.train_iters={t.train_iters} is not beyond it: there is nothing to "
            f"train. Raise train.train_iters above {step} to train further, set "
            "train.skip_train=true to evaluate the checkpoint, or set checkpoint.load to "
            "another directory (or null) to start a new run"
        )
    differences = hparam_differences(
        common.get("scheduler", {}),
        scheduler.state_dict(),
        (common.get("config") or {}).get("train") or {},
        cfg.to_dict()["train"],
    )
    if differences and t.resume_hparams is None:
        raise ConfigError(
            f"this config's hyper-parameters differ from those of the checkpoint it "
            f"resumes from, {path} (checkpoint -> config):\n"
            + "\n".join(differences)
            + f"\nSet train.resume_hparams=config to use the config's from step {step} on "
            "(Megatron-LM's --override-opt-param-scheduler), or "
            "train.resume_hparams=checkpoint to keep the checkpoint's "
            "(--use-checkpoint-opt-param-scheduler)"
        )
    scheduler.override_opt_param_scheduler = t.resume_hparams == "config"
    scheduler.use_checkpoint_opt_param_scheduler = t.resume_hparams != "config"
    if differences and is_rank0():
        print(
            f"resuming at step {step} with the {t.resume_hparams}'s hyper-parameters "
            f"(train.resume_hparams={t.resume_hparams}); checkpoint -> config:\n"
            + "\n".join(differences),
            file=sys.stderr,
            flush=True,
        )
    return step


def apply_config_hparams(cfg: Config, optimizer: Any, scheduler: Any) -> None:
    """After a load with ``train.resume_hparams=config``: the optimizer's parameter
    groups came back from the checkpoint with its lr bounds and Adam settings, which
    megatron's scheduler reads before its own values; put the config's back."""
    if cfg.train.resume_hparams != "config":
        return
    t = cfg.train
    for group in optimizer.param_groups:
        if group.get("default_config", True):  # groups without their own lr override
            group["max_lr"], group["min_lr"] = t.lr, t.min_lr
        if "betas" in group:
            group["betas"] = (t.adam_beta1, t.adam_beta2)
        if "eps" in group:
            group["eps"] = t.adam_eps
    scheduler.step(increment=0)  # recompute lr and weight decay at the resumed step
