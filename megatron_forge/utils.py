"""Small helpers every layer shares: which rank logs, collectives on small CPU tensors,
the device, dtype names, free ports and whether Transformer Engine is usable.

Nothing here starts a process group or imports megatron-core at import time.
"""

from __future__ import annotations

import functools
import socket

import torch
import torch.distributed as dist

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Config dtype names (precision.params_dtype, --dtype) -> torch dtypes."""


def is_rank0() -> bool:
    """Global rank 0, or a process without a process group (a world of one)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """This process's compute device: its CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small tensor over the world, returned on the CPU. It travels on this
    process's device, since NCCL reduces only CUDA tensors. A no-op in a world of one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    moved = tensor.to(device())
    dist.all_reduce(moved, op=op)
    return moved.cpu()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache
def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a GPU is present (its spec needs CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True
