"""Megatron DDP wrapping, the (distributed) optimizer, its guarded step and the
learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


def build_scheduler(cfg: Config, optimizer: Any) -> Any:
    """Warmup then cosine/linear/constant decay, stepped in samples as Megatron-LM does."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    gbs = t.global_batch_size
    decay_iters = t.decay_iters or t.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_iters * gbs,
        lr_decay_steps=max(decay_iters, t.warmup_iters + 1) * gbs,
        lr_decay_style=t.decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.train_iters, 1) * gbs,
        wd_incr_style="constant",
    )


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
