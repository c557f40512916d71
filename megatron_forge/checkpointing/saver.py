"""Writing checkpoints: :class:`Checkpointer` saves the parts it is given, asynchronously
by default, and finalizes (tracker, retention) once every rank has written.

Saves are asynchronous when ``checkpoint.async_save``: the caller blocks only while the
state is staged, a background process writes, and when every rank has finished
(megatron-core's AsyncCallsQueue agrees on that with an all-reduce) rank 0 writes the
tracker and applies retention. A checkpoint interrupted mid-write is therefore never the
one resumed from, and retention never deletes the newest complete one.

Rank 0 keeps the directory's owner record (:mod:`.ownership`) up to date: every complete
checkpoint this run writes is recorded before the tracker names it, retention removes
only recorded ones (and only their checkpoint files), and a save never replaces a
complete checkpoint this run did not write. A full disk stops the run with a message
naming the path and the free space, the tracker still at the last complete checkpoint.

Each rank writes a distinct share: with ``checkpoint.fully_parallel_save`` megatron-core's
FullyParallelSaveStrategyWrapper spreads the tensors that data-parallel (+context) ranks
hold in common over those ranks, so no rank writes a whole replica. The save plan and
metadata are cached across saves of the same structure (megatron-core's cached metadata
and shard distribution, Megatron-LM's ``--ckpt-assume-constant-structure``), so a save
after the first ones skips the planning collectives. Each save's times are kept apart:
planning (``last_plan_s``), staging (``last_stage_s``), the whole blocked time
(``last_blocked_s``) and, once finished, the background write (``last_write_s``).

The background writer is a process forked when the save is scheduled: device tensors
are copied to host memory before the fork (megatron-core's staging), CPU tensors are not
copied at all, the fork being their snapshot (:mod:`.fork_writer`). With
``checkpoint.persistent_writer`` (GPUs only) megatron-core's own persistent writer stages.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_forge.checkpointing.collective import on_rank0
from megatron_forge.checkpointing.directory import (
    disk_full_cause,
    disk_full_error,
    is_complete,
    iteration_dir,
    iterations_to_delete,
    latest_iteration,
    remove_checkpoint,
    write_tracker,
)
from megatron_forge.checkpointing.ownership import Owner, config_hash, read_owner, write_owner
from megatron_forge.checkpointing.state import (
    CALLBACK_STATES,
    CHECKPOINT_VERSION,
    FORGE_FORMAT,
    FORMAT_VERSION,
    TrainState,
    content_metadata,
    megatron_args,
    optimizer_metadata,
    parallel_layout,
    sharded_state,
)
from megatron_forge.config import CheckpointConfig
from megatron_forge.errors import CheckpointError, ConfigError
from megatron_forge.utils import device, world_size


class Checkpointer:
    """Saves (async or not) into ``root`` and finalizes: tracker, retention.

    One save is in flight at a time: a new save first waits for the previous one, as
    Megatron-LM does, so the write bandwidth never competes with itself. Every method
    except :meth:`close` with ``abort`` must be called by all ranks together.
    """

    def __init__(self, root: str | Path, cfg: CheckpointConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg
        if cfg.async_save and cfg.persistent_writer and not torch.cuda.is_available():
            # The persistent writer receives the tensors through shared memory: on CPU
            # that is the live parameters themselves (staging copies only from a GPU),
            # which the next steps change while it writes.
            raise ConfigError(
                "checkpoint.persistent_writer=true needs GPUs: on CPU the writer would "
                "write the live tensors while training changes them; set it to false"
            )
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=cfg.persistent_writer) if cfg.async_save else None
        self.last_save_time = time.monotonic()
        self.last_blocked_s = 0.0
        """Seconds the last save held up training (staging, or the whole write if sync)."""
        self.last_plan_s = 0.0
        """Of those, building the sharded state and planning the write (with megatron-core's
        persistent writer, also its copies of CPU tensor views)."""
        self.last_stage_s = 0.0
        """Of those, staging the tensors for the background writer (async only): the copy
        of device tensors to host memory and the fork of the writer."""
        self.last_write_s: Optional[float] = None
        """Seconds from the end of staging until every rank had written the last finished
        save (observed when it is finalized, so at most one step late); None until then."""
        self.written: Optional[tuple[int, float]] = None
        """(iteration, write seconds) of a save finished since the caller last took it."""
        self._strategies: dict[bool, Any] = {}
        """Save strategies by structure (with or without optimizer state): each keeps its
        cached plan, metadata and shard distribution across saves."""
        self._scheduled_at = 0.0
        self.pending_iteration: Optional[int] = None
        """Iteration being written in the background, if any."""
        self._owner: Optional[Owner] = None
        """Rank 0: the directory's owner record, read (or created) at the first save."""

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
        # Before the first step the optimizer holds no state to save (megatron's
        # distributed optimizer refuses); such a checkpoint is an initialization.
        with_optimizer = step > 0
        metadata = optimizer_metadata(self.cfg.optimizer_format)
        sharded = sharded_state(
            model_chunks, optimizer, with_optimizer, "save", is_loading=False, metadata=metadata
        )
        layout = parallel_layout()
        sharded.update(
            {
                "iteration": step,
                "consumed_samples": state.consumed_samples,
                "has_optimizer": with_optimizer,
                "scheduler": scheduler.state_dict(),
                "config": config,
                "layout": layout,
                "model_chunks": len(model_chunks),
                CALLBACK_STATES: {key: dict(value) for key, value in state.callbacks.items()},
                "checkpoint_version": CHECKPOINT_VERSION,
                FORGE_FORMAT: FORMAT_VERSION,
                # Megatron-LM's own common entries, so that its loader resumes this.
                "args": megatron_args(config, state, layout, with_optimizer),
                "opt_param_scheduler": scheduler.state_dict(),
                "num_floating_point_operations_so_far": 0,
            }
        )
        # The directory last, then straight to the save: a rank that writes sooner would
        # otherwise make rank 0's megatron-core report the directory as an old, incomplete
        # checkpoint.
        if self._prepare_dir(step, config) == "saved":
            # This run resumed from that very checkpoint and has not stepped since.
            self._finish(step)
            self.last_blocked_s = time.perf_counter() - start
            return
        target = iteration_dir(self.root, step)
        from megatron.core import dist_checkpointing

        strategy, first = self._strategy(with_optimizer)
        try:
            request = dist_checkpointing.save(
                sharded,
                str(target),
                strategy,
                async_sharded_save=self.queue is not None,
                validate_access_integrity=first,
                content_metadata=content_metadata(metadata),
            )
        except BaseException as err:  # torch wraps failures in a BaseException
            self._raise_if_disk_full(err, step)
            raise
        self.last_plan_s = time.perf_counter() - start
        finish = partial(self._finish, step)
        if request is None:  # written already: the whole save counts as the write
            self.last_stage_s = 0.0
            self._scheduled_at = start
            finish()
        else:
            request.add_finalize_fn(finish)
            staging = time.perf_counter()
            self.queue.schedule_async_request(request)
            self._scheduled_at = time.perf_counter()
            self.last_stage_s = self._scheduled_at - staging
            self.pending_iteration = step
        self.last_save_time = time.monotonic()
        if blocking:
            self.finalize(blocking=True)
        self.last_blocked_s = time.perf_counter() - start

    def _strategy(self, with_optimizer: bool) -> tuple[Any, bool]:
        """The save strategy for this structure, and whether it is its first save (whose
        sharding megatron-core validates; later ones reuse the cached plan)."""
        if with_optimizer in self._strategies:
            return self._strategies[with_optimizer], False
        if not dist.is_initialized():  # one process: megatron-core's default
            return None, True
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )
        from megatron.core.dist_checkpointing.strategies.torch import (
            TorchDistSaveShardedStrategy,
        )

        from megatron_forge.checkpointing.fork_writer import ForkStagedSaveStrategy

        # A forked writer snapshots CPU tensors itself; the persistent one shares them.
        kind = (
            TorchDistSaveShardedStrategy if self.cfg.persistent_writer else ForkStagedSaveStrategy
        )
        strategy: Any = kind("torch_dist", 1, cached_metadata=True)
        group = ps.get_data_parallel_group(with_context_parallel=True)
        if self.cfg.fully_parallel_save and dist.get_world_size(group) > 1:
            strategy = FullyParallelSaveStrategyWrapper(strategy, group, do_cache_distribution=True)
        self._strategies[with_optimizer] = strategy
        return strategy, True

    def _owner_record(self, config: Optional[dict[str, Any]] = None) -> Owner:
        """Rank 0: the owner record, created for this run when the directory has none
        (a Checkpointer used without the entry point's claim)."""
        if self._owner is None:
            self._owner = read_owner(self.root) or Owner.new(config_hash(config or {}))
        return self._owner

    def _prepare_dir(self, step: int, config: dict[str, Any]) -> str:
        """Make ``iter_<step>`` ready for a save ("new"), or say this run already saved it
        ("saved"). Refuses to replace a complete checkpoint this run did not write."""

        def prepare() -> str:
            target = iteration_dir(self.root, step)
            owner = self._owner_record(config)
            latest = latest_iteration(self.root)
            if is_complete(target):
                resumable = step in owner.iterations or step in owner.adopted
                if resumable and (latest is None or step > latest):
                    return "saved"
                if step not in owner.not_ours:
                    whose = "this run wrote" if step in owner.iterations else "another run wrote"
                    raise CheckpointError(
                        f"{target} already holds a complete checkpoint that {whose} (the "
                        f"tracker is at {latest}); refusing to overwrite it. Point "
                        "checkpoint.save at a new directory, or set checkpoint.load to it "
                        "to resume from there"
                    )
                owner.not_ours.remove(step)  # taken over: this save replaces it
                write_owner(self.root, owner, "nothing was replaced")
            # An interrupted save (or a kept one taken over): only its checkpoint files
            # go; anything else in the directory stays.
            kept = remove_checkpoint(target)
            if kept:
                _warn(f"{target}: keeping {', '.join(kept)} (not part of a checkpoint)")
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                self._raise_if_disk_full(err, step)
                raise
            return "new"

        return on_rank0(prepare)

    def _raise_if_disk_full(self, error: BaseException, step: int) -> None:
        cause = None if isinstance(error, CheckpointError) else disk_full_cause(error)
        if cause is None:  # not the disk, or already said (a CheckpointError)
            return
        try:
            latest = latest_iteration(self.root)
        except CheckpointError:
            latest = None
        path = Path(cause.filename) if cause.filename else iteration_dir(self.root, step)
        raise disk_full_error(
            path,
            cause,
            f"the checkpoint of step {step} is incomplete and is not resumed from; the "
            f"tracker still names iteration {latest if latest is not None else 'none'}",
        ) from error

    def _finish(self, step: int) -> None:
        """Runs on every rank once all ranks finished writing ``step``: records it as this
        run's, points the tracker at it, then applies retention to this run's own."""

        def finish() -> None:
            previous = latest_iteration(self.root)
            owner = self._owner_record()
            if step not in owner.iterations:
                owner.iterations = sorted([*owner.iterations, step])
            write_owner(
                self.root,
                owner,
                f"the checkpoint of step {step} is written but not recorded; the tracker "
                f"still names iteration {previous if previous is not None else 'none'}",
            )
            write_tracker(self.root, step, previous)
            ours = [i for i in owner.iterations if is_complete(iteration_dir(self.root, i))]
            doomed = iterations_to_delete(ours, step, self.cfg.keep_last, self.cfg.keep_every)
            for iteration in doomed:
                kept = remove_checkpoint(iteration_dir(self.root, iteration))
                if kept:
                    _warn(
                        f"retention removed the checkpoint of {iteration_dir(self.root, iteration)} "
                        f"but kept {', '.join(kept)} (not part of a checkpoint)"
                    )
            if doomed:
                owner.iterations = [i for i in owner.iterations if i not in doomed]
                write_owner(self.root, owner, "retention's removals are not recorded")

        self.last_write_s = time.perf_counter() - self._scheduled_at
        self.written = (step, self.last_write_s)
        try:
            on_rank0(finish)
        finally:
            self.pending_iteration = None

    def finalize(self, blocking: bool) -> None:
        """Complete finished background saves (all ranks must call this together)."""
        if self.queue is None:
            return
        pending = self.pending_iteration
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as err:  # torch wraps failures in a BaseException
            if pending is not None:
                self._raise_if_disk_full(err, pending)
            raise

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


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
