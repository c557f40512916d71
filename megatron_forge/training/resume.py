"""What a resumed run must agree on with its checkpoint, checked before it is loaded.

- ``train.train_iters`` must lie beyond the checkpoint's step: otherwise there is nothing
  to train, which is almost always a mistake (a finished run submitted again). This holds
  for ``checkpoint.load_mode=no_optim`` too, which keeps the step; with ``finetune`` (or a
  checkpoint without optimizer state) the run starts at step 0.
- Hyper-parameters stored in the checkpoint: megatron-core's scheduler state (lr, min_lr,
  warmup, decay, weight decay) and the optimizer's parameter groups (their lr bounds,
  Adam betas and eps) come back from the checkpoint (with ``load_mode=full`` only) and
  silently win over the config. A
  config that asks for other values is an error listing them, unless
  ``train.resume_hparams`` says which side wins: ``config`` (Megatron-LM's
  --override-opt-param-scheduler) or ``checkpoint`` (--use-checkpoint-opt-param-scheduler).
- Warmup-stable-decay is made to change length mid-run: a WSD run whose config only moves
  the end of its decay (train_iters or decay_iters) or the length of its decay phase
  (wsd_decay_iters) continues on the config's schedule without ``train.resume_hparams``
  when the lr at the resumed step is the same on both schedules: the stable phase is
  extended, or the decay starts from the resumed step. A change that would make the lr
  jump still needs ``train.resume_hparams``.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any, Optional

from megatron_forge.checkpointing import iteration_dir, iteration_to_load
from megatron_forge.checkpointing.files import load_common_state
from megatron_forge.checkpointing.loader import (
    describe_checkpoint,
    loaded_parts,
    scheduler_state,
)
from megatron_forge.config import Config, ExportConfig
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
    "wsd_decay_steps": "train.wsd_decay_iters",
    "lr_wsd_decay_style": "train.wsd_decay_style",
    "start_wd": "train.weight_decay",
}
IN_SAMPLES = ("lr_warmup_steps", "lr_decay_steps", "wsd_decay_steps")
# What a WSD run may change on a resume while its lr at the resumed step stays the same.
WSD_LENGTHS = ("lr_decay_steps", "wsd_decay_steps")
# megatron-core's names of decay styles -> the config's.
STYLE_NAMES = {"WSD": "wsd", "minus_sqrt": "1-sqrt"}
# Stored in the optimizer's parameter groups; compared through the checkpoint's config.
ADAM_FIELDS = ("adam_beta1", "adam_beta2", "adam_eps")


def _value(value: Any) -> str:
    if isinstance(value, str):
        return STYLE_NAMES.get(value, value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _iters(samples: Any, global_batch: int) -> str:
    """Iterations of a length in samples, where they follow from it (no batch ramp-up)."""
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
    if saved_train.get("rampup_batch_size") or train.get("rampup_batch_size"):
        saved_gbs = gbs = 0  # iterations do not follow from samples: show samples
    lines = []
    for key, name in SCHEDULER_FIELDS.items():
        if key not in saved_scheduler or key not in scheduler:
            continue  # (the WSD decay phase where one side is not WSD: the style differs)
        old, new = saved_scheduler[key], scheduler[key]
        if old == new:
            continue
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


def inherit_export(cfg: Config, common: dict[str, Any]) -> None:
    """A run whose config sets no ``export`` metadata takes the loaded checkpoint's, so
    the generation metadata ``forge-convert from-hf`` stored (eos ids, generation_config)
    reaches the checkpoints this run saves, whatever YAML it was started from."""
    saved = (common.get("config") or {}).get("export")
    if saved and cfg.export == ExportConfig():
        cfg.export = ExportConfig(**saved)
        if is_rank0():
            print(f"[resume] export metadata from {cfg.checkpoint.load}: {saved}", flush=True)


def check_resume(cfg: Config, scheduler: Any) -> Optional[int]:
    """Check ``cfg`` against the checkpoint that ``checkpoint.load`` resumes from, before
    loading it, and tell the scheduler which values win; returns the step the run resumes
    at (None: no checkpoint, or a new run from its weights). Raises ConfigError on a
    mismatch."""
    root = cfg.checkpoint.load
    iteration = iteration_to_load(root, cfg.checkpoint) if root else None
    if iteration is None:
        return None  # a run that resumes itself and has not saved yet
    path = iteration_dir(root, iteration)
    common = load_common_state(path)  # with the allowlist, as the load that follows
    inherit_export(cfg, common)
    has_optimizer = describe_checkpoint(common).has_optimizer
    with_optimizer, keeps_progress = loaded_parts(cfg.checkpoint.load_mode, has_optimizer)
    if not keeps_progress:
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
    if not with_optimizer:
        return step  # no_optim: the schedule starts afresh from the config's values
    saved_scheduler = scheduler_state(common)  # ours, or Megatron-LM's
    differences = hparam_differences(
        saved_scheduler,
        scheduler.state_dict(),
        (common.get("config") or {}).get("train") or {},
        cfg.to_dict()["train"],
    )
    if differences and t.resume_hparams is None:
        lr = wsd_continues(saved_scheduler, scheduler, differences)
        if lr is not None:
            _accept_wsd_change(scheduler, step, lr, differences)
            return step
        raise ConfigError(
            f"this config's hyper-parameters differ from those of the checkpoint it "
            f"resumes from, {path} (checkpoint -> config):\n"
            + "\n".join(differences)
            + _wsd_hint(saved_scheduler, scheduler)
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


def _lr_at(scheduler: Any, state: dict[str, Any], num_steps: int) -> float:
    """The lr megatron-core's scheduler gives at ``num_steps`` samples with the schedule
    fields of ``state`` (its own where ``state`` lacks them)."""
    probe = copy.copy(scheduler)  # get_lr reads fields only; the optimizer is not touched
    for key in ("max_lr", "min_lr", *IN_SAMPLES, "lr_decay_style", "lr_wsd_decay_style"):
        if key in state:
            setattr(probe, key, state[key])
    probe.num_steps = num_steps
    return probe.get_lr({})


def wsd_continues(
    saved_scheduler: dict[str, Any], scheduler: Any, differences: list[str]
) -> Optional[float]:
    """The lr at the resumed step when a WSD run changes only its length (the end of the
    decay, the length of the decay phase) and that lr is the same on the checkpoint's and
    the config's schedules; else None."""
    state = scheduler.state_dict()
    if saved_scheduler.get("lr_decay_style") != "WSD" or state["lr_decay_style"] != "WSD":
        return None
    changed = {
        key
        for key in SCHEDULER_FIELDS
        if key in saved_scheduler and saved_scheduler[key] != state.get(key)
    }
    named = tuple(f"  {SCHEDULER_FIELDS[key]}:" for key in changed)
    if not changed <= set(WSD_LENGTHS) or not all(line.startswith(named) for line in differences):
        return None  # something else differs too (Adam, the batch size): be explicit
    num_steps = int(saved_scheduler["num_steps"])
    saved_lr = _lr_at(scheduler, saved_scheduler, num_steps)
    lr = _lr_at(scheduler, state, num_steps)
    return lr if math.isclose(saved_lr, lr, rel_tol=1e-9, abs_tol=0.0) else None


def _accept_wsd_change(scheduler: Any, step: int, lr: float, differences: list[str]) -> None:
    scheduler.override_opt_param_scheduler = True  # only the lengths differ: take them all
    scheduler.use_checkpoint_opt_param_scheduler = False
    if is_rank0():
        print(
            f"resuming at step {step} on this config's warmup-stable-decay schedule "
            f"(checkpoint -> config):\n" + "\n".join(differences) + f"\nthe lr at step "
            f"{step} is {lr:.6g} on both, so the run continues without a jump",
            file=sys.stderr,
            flush=True,
        )


def _wsd_hint(saved_scheduler: dict[str, Any], scheduler: Any) -> str:
    if "WSD" not in (saved_scheduler.get("lr_decay_style"), scheduler.lr_decay_style):
        return ""
    return (
        "\n(a WSD run changes train_iters, decay_iters or wsd_decay_iters without "
        "train.resume_hparams only while its lr at the resumed step stays the same: in the "
        "stable phase, or starting the decay there; anything else is a jump in the lr)"
    )


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
