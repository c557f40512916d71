"""Megatron DDP wrapping, the (distributed) optimizer and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch

from megatron_forge.config import Config


def wrap_ddp(cfg: Config, tf_config: Any, chunks: list[torch.nn.Module]) -> list[Any]:
    """Wrap each model chunk in megatron-core's DDP (contiguous fp32 grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=tf_config,
            ddp_config=ddp_config,
            module=chunk,
            # Megatron-LM buckets only the first chunk; the rest reduce in one go.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]


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
