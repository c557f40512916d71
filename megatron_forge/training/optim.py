"""Megatron DDP wrapping, the (distributed) optimizer, its guarded step and the
learning-rate schedule."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_forge.config import Config


def wrap_ddp(cfg: Config, tf_config: Any, chunks: list[torch.nn.Module]) -> list[Any]:
    """Wrap each model chunk in megatron-core's DDP (contiguous fp32 grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel

    ddp = [
        DistributedDataParallel(
            config=tf_config,
            ddp_config=ddp_config(cfg),
            module=chunk,
            # Megatron-LM buckets only the first chunk; the rest reduce in one go.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    set_overlap_hooks(cfg, tf_config, ddp)
    return ddp


def ddp_config(cfg: Config) -> Any:
    """megatron-core's DDP config: fp32 grad buffers, optional overlapped reduce/gather."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p = cfg.parallel
    bucket = int(p.grad_bucket_size_mb * 2**20) if p.grad_bucket_size_mb else None
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        align_param_gather=p.overlap_param_gather and p.virtual_pipeline is not None,
        use_distributed_optimizer=p.use_distributed_optimizer,
        bucket_size=bucket,
        fp8_param_gather=cfg.precision.fp8_param_gather,
    )


def set_overlap_hooks(cfg: Config, tf_config: Any, model: list[Any]) -> None:
    """What megatron's pipeline schedules call to overlap communication (as Megatron-LM)."""
    p = cfg.parallel
    if p.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        tf_config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        if p.virtual_pipeline is not None:  # reduce each chunk's grads as soon as it is done
            tf_config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
    if p.overlap_param_gather and p.virtual_pipeline is not None:
        tf_config.param_sync_func = [chunk.start_param_sync for chunk in model]


def build_optimizer(cfg: Config, model: list[Any]) -> Any:
    """Adam(W) through megatron-core: distributed (ZeRO-1) when configured, with clipping."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = cfg.train
    dtype = cfg.precision.params_dtype
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype],
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, model)


# The config's names for the WSD decay shapes -> megatron-core's.
WSD_DECAY_STYLES = {
    "linear": "linear",
    "cosine": "cosine",
    "1-sqrt": "minus_sqrt",
    "exponential": "exponential",
}
# The config's decay styles -> megatron-core's.
DECAY_STYLES = {"wsd": "WSD"}


@functools.cache
def _scheduler_class() -> type:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class ParamScheduler(OptimizerParamScheduler):
        """megatron-core's scheduler, whose state also holds the WSD decay phase (length in
        samples, shape): megatron-core keeps them out of its state dict, so a checkpoint
        could not tell a resumed run which decay phase it was trained for."""

        def state_dict(self) -> dict:
            state = super().state_dict()
            if self.lr_decay_style == "WSD":
                state["wsd_decay_steps"] = self.wsd_decay_steps
                state["lr_wsd_decay_style"] = self.lr_wsd_decay_style
            return state

        def load_state_dict(self, state_dict: dict) -> None:
            for key, name in (
                ("wsd_decay_steps", "WSD decay steps"),
                ("lr_wsd_decay_style", "WSD decay style"),
            ):
                if key in state_dict:
                    value = getattr(self, key)
                    if value is None:  # not WSD now: nothing to check against
                        value = state_dict[key]
                    setattr(self, key, self._check_and_set(value, state_dict[key], name))
            super().load_state_dict(state_dict)  # sets the lr with the values above

    return ParamScheduler


def scheduler_arguments(cfg: Config) -> dict[str, Any]:
    """OptimizerParamScheduler's lr and weight-decay arguments, in samples (as Megatron-LM):
    warmup and decay end where the iterations ``warmup_iters`` and ``decay_iters`` end,
    which with a batch-size ramp-up is fewer samples than iterations x global batch."""
    from megatron_forge.data.datasets import BatchSizes

    t = cfg.train
    samples = BatchSizes(t).samples_at_step
    decay_iters = max(t.decay_iters or t.train_iters, t.warmup_iters + 1)
    decay_samples = samples(decay_iters)
    arguments: dict[str, Any] = {
        "init_lr": 0.0,
        "max_lr": t.lr,
        "min_lr": t.min_lr,
        "lr_warmup_steps": samples(t.warmup_iters),
        "lr_decay_steps": decay_samples,
        "lr_decay_style": DECAY_STYLES.get(t.decay_style, t.decay_style),
        "start_wd": t.weight_decay,
        "end_wd": t.weight_decay,
        "wd_incr_steps": samples(max(t.train_iters, 1)),
        "wd_incr_style": "constant",
    }
    if t.decay_style == "wsd":
        stable_end = max(decay_iters - (t.wsd_decay_iters or 0), 0)
        arguments["wsd_decay_steps"] = max(decay_samples - samples(stable_end), 1)
        arguments["lr_wsd_decay_style"] = WSD_DECAY_STYLES[t.wsd_decay_style]
    return arguments


def build_scheduler(cfg: Config, optimizer: Any) -> Any:
    """megatron-core's OptimizerParamScheduler: linear warmup, then cosine, linear,
    constant, warmup-stable-decay or inverse-square-root, stepped in samples."""
    return _scheduler_class()(optimizer, **scheduler_arguments(cfg))


def lr_curve(cfg: Config, steps: Optional[int] = None) -> list[float]:
    """The learning rate of steps 1..``steps`` (default train_iters) of a run of ``cfg``,
    from the same scheduler a run builds (on a stand-in optimizer), without training:
    the lr each step is logged with."""
    from megatron_forge.data.datasets import BatchSizes

    optimizer = torch.optim.SGD([torch.zeros(1)], lr=0.0)
    scheduler = build_scheduler(cfg, optimizer)
    batch_sizes = BatchSizes(cfg.train)
    lrs, consumed = [], 0
    for _ in range(cfg.train.train_iters if steps is None else steps):
        size = batch_sizes.at(consumed)
        scheduler.step(increment=size)
        consumed += size
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@dataclass
class StepResult:
    updated: bool
    """Whether the optimizer updated the parameters."""
    grad_norm: float
    """Gradient norm before clipping (NaN when fp16 loss scaling found an overflow)."""
    nonfinite: bool
    """The loss or the gradient norm was NaN/inf, so the update was refused."""


@torch.no_grad()
def optimizer_step(optimizer: Any, loss: float) -> StepResult:
    """megatron-core's optimizer step, refusing the update when the loss or the gradient
    norm is not finite.

    megatron skips a step only when fp16 loss scaling finds inf/NaN gradients; in bf16 or
    fp32 a NaN norm turns clipping into a multiplication by NaN and Adam then writes NaN
    into every parameter and its moments. So the norm is computed first, as
    ``ChainedOptimizer.step`` does, and only then are the gradients clipped and the update
    applied. A refused step leaves parameters, Adam moments and Adam's step count
    untouched. No collective is needed to agree: the reported loss is all-reduced over
    the world, and megatron's grad norm over every rank that holds gradients, so both
    (and a NaN on any rank) are the same on every rank.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # fp16 overflow: megatron already lowered the loss scale
        return StepResult(False, float("nan"), not math.isfinite(loss))
    grad_norm = float(optimizer.get_grad_norm())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return StepResult(False, grad_norm, True)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=opt.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return StepResult(bool(optimizer.step_with_ready_grads()), grad_norm, False)
