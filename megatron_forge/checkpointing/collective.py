"""Decisions taken by global rank 0 alone (it reads and writes the checkpoint directory)
that every rank must follow: the same result, or the same error, on all of them, so that
no rank waits in a collective for one that has already failed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from megatron_forge.errors import ForgeError
from megatron_forge.utils import is_rank0

T = TypeVar("T")


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0 only; every rank returns its result or raises its error
    (a :class:`ForgeError` as it is; anything else as a RuntimeError on the other ranks)."""
    result, error, original = None, None, None
    if is_rank0():
        try:
            result = fn()
        except ForgeError as err:
            error = err
        except Exception as err:
            original = err
            error = RuntimeError(f"rank 0 failed: {type(err).__name__}: {err}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if original is not None:
        raise original
    if error is not None:
        raise error
    return result  # type: ignore[return-value]
