"""Megatron DDP wrapping, the (distributed) optimizer and the learning-rate schedule."""

from __future__ import annotations

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
