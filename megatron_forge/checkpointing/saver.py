"""Writing checkpoints: :class:`Checkpointer` saves the parts it is given, asynchronously
by default, and finalizes (tracker, retention) once every rank has written.

Saves are asynchronous when ``checkpoint.async_save``: the caller blocks only while the
state is staged, a background process writes, and when every rank has finished
(megatron-core's AsyncCallsQueue agrees on that with an all-reduce) rank 0 writes the
tracker and applies retention. A checkpoint interrupted mid-write is therefore never the
one resumed from, and retention never deletes the newest complete one.
"""

from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_forge.checkpointing.directory import (
    iteration_dir,
    iterations_to_delete,
    latest_iteration,
    saved_iterations,
    write_tracker,
)
from megatron_forge.checkpointing.state import (
    CALLBACK_STATES,
    CHECKPOINT_VERSION,
    TrainState,
    parallel_layout,
    sharded_state,
)
from megatron_forge.config import CheckpointConfig
from megatron_forge.errors import CheckpointError
from megatron_forge.utils import barrier, device, is_rank0, world_size


class Checkpointer:
    """Saves (async or not) into ``root`` and finalizes: tracker, retention.

    One save is in flight at a time: a new save first waits for the previous one, as
    Megatron-LM does, so the write bandwidth never competes with itself. Every method
    except :meth:`close` with ``abort`` must be called by all ranks together.
    """

    def __init__(self, root: str | Path, cfg: CheckpointConfig) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.root = Path(root)
        self.cfg = cfg
        self.queue = AsyncCallsQueue() if cfg.async_save else None
        self.last_save_time = time.monotonic()
        self.last_blocked_s = 0.0
        """Seconds the last save held up training (staging, or the whole write if sync)."""
        self.pending_iteration: Optional[int] = None
        """Iteration being written in the background, if any."""

    def save(
        self,
        model_chunks: list[Any],
        optimizer: Any,
        scheduler: Any,
        state: TrainState,
        config: dict[str, Any],
        blocking: bool = False,
    ) -> None:
        """Checkpoint the parts at ``state.step`` (a no-op if that step is already saved).

        ``config`` is the resolved config tree, stored for conversion and inspection.
        With ``blocking`` the checkpoint is complete (tracker written) on return.
        """
        step = state.step
        if latest_iteration(self.root) == step or self.pending_iteration == step:
            if blocking:
                self.finalize(blocking=True)
            return
        self.finalize(blocking=True)
        start = time.perf_counter()
        target = self._prepare_dir(step)
        # Before the first step the optimizer holds no state to save (megatron's
        # distributed optimizer refuses); such a checkpoint is an initialization.
        with_optimizer = step > 0
        sharded = sharded_state(model_chunks, optimizer, with_optimizer, True, is_loading=False)
        sharded.update(
            {
                "iteration": step,
                "consumed_samples": state.consumed_samples,
                "has_optimizer": with_optimizer,
                "scheduler": scheduler.state_dict(),
                "config": config,
                "layout": parallel_layout(),
                CALLBACK_STATES: {key: dict(value) for key, value in state.callbacks.items()},
                "checkpoint_version": CHECKPOINT_VERSION,
            }
        )
        from megatron.core import dist_checkpointing

        request = dist_checkpointing.save(
            sharded, str(target), async_sharded_save=self.queue is not None
        )
        finish = partial(self._finish, step)
        if request is None:
            finish()
        else:
            request.add_finalize_fn(finish)
            self.queue.schedule_async_request(request)
            self.pending_iteration = step
        self.last_save_time = time.monotonic()
        if blocking:
            self.finalize(blocking=True)
        self.last_blocked_s = time.perf_counter() - start

    def _prepare_dir(self, step: int) -> Path:
        target = iteration_dir(self.root, step)
        latest = latest_iteration(self.root)
        if target.exists() and latest is not None and step <= latest:
            raise CheckpointError(
                f"{target} already holds a complete checkpoint (the tracker is at {latest}); "
                "refusing to overwrite it. Point checkpoint.save at a new directory, or set "
                "checkpoint.load to it to resume from there"
            )
        if is_rank0():
            if target.exists():  # newer than the tracker: left by a save that never finished
                shutil.rmtree(target)
            target.mkdir(parents=True)
        barrier()
        return target

    def _finish(self, step: int) -> None:
        """Runs on every rank once all ranks finished writing ``step``."""
        if is_rank0():
            write_tracker(self.root, step)
            doomed = iterations_to_delete(
                saved_iterations(self.root), step, self.cfg.keep_last, self.cfg.keep_every
            )
            for iteration in doomed:
                shutil.rmtree(iteration_dir(self.root, iteration), ignore_errors=True)
        self.pending_iteration = None

    def finalize(self, blocking: bool) -> None:
        """Complete finished background saves (all ranks must call this together)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def due(self, step: int) -> bool:
        """Whether the interval or the wall-clock budget asks for a save at ``step``."""
        by_steps = bool(self.cfg.save_interval) and step % self.cfg.save_interval == 0
        minutes = self.cfg.save_interval_minutes
        by_time = minutes is not None and time.monotonic() - self.last_save_time >= minutes * 60
        if minutes is not None and world_size() > 1:
            # Clocks differ slightly across ranks; everyone follows rank 0's decision.
            flag = torch.tensor([int(by_time)], device=device())
            dist.broadcast(flag, src=0)
            by_time = bool(flag.item())
        return by_steps or by_time

    def close(self, abort: bool = False) -> None:
        """Finish the background save in flight and stop the writer.

        ``abort`` (after an error, when the other ranks may not take part in a collective):
        the writer is stopped without finalizing, so the checkpoint it was writing never
        gets the tracker and the previous complete one stays the one resumed from.
        """
        if self.queue is None:
            return
        if abort:
            # AsyncCallsQueue.close(abort=True) stops only persistent writers; ours are
            # one process per save, each stopped here without a collective.
            while self.queue.async_calls:
                caller = self.queue.async_calls.popleft().async_caller
                writer = getattr(caller, "process", None)
                caller.close(abort=True)
                if writer is not None:
                    writer.join(timeout=60)  # reap the killed writer
        else:
            self.finalize(blocking=True)
            self.queue.close()
        self.pending_iteration = None
