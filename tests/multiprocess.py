"""Run a test function on N real gloo ranks, in spawned processes of this interpreter
(as OLMo-core's ``run_distributed_test``): megatron-core's parallel state and the CPU
emulation are set up exactly as the entry point does, without starting the whole
training loop. Component tests of distributed pieces use this; end-to-end runs of
``python -m megatron_forge.train`` stay in the slow tier.

The function must be defined at module level (it is pickled by reference); its return
value on each rank comes back, in rank order.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron_forge.utils import free_port


def _worker(
    rank: int,
    world_size: int,
    port: int,
    overrides: list[str],
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from megatron_forge import distributed
    from megatron_forge.config import load_config

    try:
        cfg = load_config(None, overrides)
        env = distributed.DistEnv(rank, world_size, 0, "127.0.0.1", port, "test")
        distributed.initialize(cfg, env, timeout_minutes=2)
        try:
            results.put((rank, fn(cfg, *args), None))
        finally:
            distributed.shutdown()
    except BaseException:  # report any failure to the parent with its traceback
        results.put((rank, None, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    overrides: list[str] | None = None,
    timeout_s: float = 120,
    daemon: bool = True,
) -> list[Any]:
    """``fn(cfg, *args)`` on ``world_size`` gloo ranks; the config is the defaults plus
    ``overrides`` (e.g. ``parallel.tensor=2``). Raises with the failing rank's traceback.
    ``daemon=False`` for ranks that start processes of their own (torch_dist saves write
    through a multiprocessing Manager even when synchronous)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, list(overrides or []), fn, args, results),
            daemon=daemon,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, value, error = results.get(timeout=timeout_s)
            if error:
                errors.append(f"rank {rank}:\n{error}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]
