"""The pretraining loop: megatron-core model, DDP, optimizer and pipeline schedules.

:class:`Trainer` builds everything once (``__init__``), then :meth:`Trainer.train` runs
the loop. The per-step work is :meth:`train_step`; side concerns are callbacks, which
:meth:`Trainer.close` shuts down on every exit: finished, preempted or failed. How the
run ended is its exit status and ``<logging.dir>/exit_status.json``
(:mod:`.exit_status`).

A step whose loss or gradient norm is not finite updates nothing; what the run does
after such steps (go on, roll back, stop) is :mod:`.nonfinite`'s policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_forge.checkpointing import (
    TrainState,
    iteration_dir,
    iteration_to_load,
    load_checkpoint,
)
from megatron_forge.config import CheckpointConfig, Config, ConfigError
from megatron_forge.data.broadcast import batches_on_this_tp_rank
from megatron_forge.data.datasets import (
    BatchSizes,
    build_datasets,
    load_run_tokenizer,
    microbatch_iterator,
)
from megatron_forge.errors import CheckpointError, ForgeError
from megatron_forge.models import build_model, build_transformer_config
from megatron_forge.training.callback import Callback, StopTraining
from megatron_forge.training.exit_status import (
    EXIT_ERROR,
    EXIT_FINISHED,
    clear_exit_status,
    write_exit_status,
)
from megatron_forge.training.moe_metrics import MoEMetrics
from megatron_forge.training.nonfinite import NonFiniteGuard, NonFiniteStop
from megatron_forge.training.optim import (
    build_optimizer,
    build_scheduler,
    optimizer_step,
    wrap_ddp,
)
from megatron_forge.training.ranges import annotate
from megatron_forge.training.resume import apply_config_hparams, check_resume
from megatron_forge.training.step import forward_step, mtp_loss_metrics, reduce_reported_loss
from megatron_forge.utils import all_reduce, is_rank0


class TimedIterator:
    """Wraps the data stream to measure time spent waiting for batches (``wait_s``) and
    report each batch read as progress (``on_batch``)."""

    def __init__(self, inner: Iterator, on_batch: Optional[Callable[[], None]] = None) -> None:
        self.inner = inner
        self.wait_s = 0.0
        self.on_batch = on_batch

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            with annotate("data"):
                batch = next(self.inner)
        finally:
            self.wait_s += time.perf_counter() - start
        if self.on_batch is not None:
            self.on_batch()
        return batch


class Trainer:
    def __init__(self, cfg: Config, world_size: int, callbacks: list[Callback]) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        self.cfg = cfg
        self.callbacks = callbacks
        self.status_dir: Optional[Path] = Path(cfg.logging.dir)
        """Where the run's outcome is recorded (None: nowhere)."""
        if is_rank0():
            clear_exit_status(self.status_dir)
        self.guard = NonFiniteGuard(cfg.train)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.world_size = world_size
        self.num_microbatches = cfg.num_microbatches(world_size)
        self.batch_sizes = BatchSizes(cfg.train)
        """Each step's global batch: fixed, or growing with train.rampup_batch_size."""
        self.num_skipped = 0
        self.num_nan = 0

        self.tokenizer = load_run_tokenizer(cfg)
        vocab_size = self._vocab_size()
        self.tf_config = build_transformer_config(cfg)
        self.model = wrap_ddp(cfg, self.tf_config, build_model(cfg, self.tf_config, vocab_size))
        self.optimizer = build_optimizer(cfg, self.model)
        self.moe_metrics = (
            MoEMetrics(
                self.model,
                cfg.model.num_layers,
                cfg.model.num_experts,
                cfg.parallel.sequence_parallel,
            )
            if cfg.model.num_experts
            else None
        )
        self.scheduler = build_scheduler(cfg, self.optimizer)
        # Hooks megatron's schedules call: grad all-reduce + per-token scaling at the end
        # of the backward passes, and loss scaling for fp16.
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.grad_scale_func = self.optimizer.scale_loss

        self.step = 0
        self.consumed_samples = 0
        self._callback_states: dict[str, dict[str, Any]] = {}
        """Callback states loaded from the checkpoint, carried into the next one even when
        this run has no callback to take them (W&B switched off for one job, say)."""
        if cfg.checkpoint.load:
            check_resume(cfg, self.scheduler)  # a mismatch fails before the load
            self._resume(
                load_checkpoint(
                    cfg.checkpoint.load, self.model, self.optimizer, self.scheduler, cfg.checkpoint
                )
            )
            apply_config_hparams(cfg, self.optimizer, self.scheduler)
        self.train_ds, self.valid_ds = build_datasets(cfg, self.tokenizer)
        self.train_iter, self.data_timer = self._iterators(
            self.train_ds, start_sample=self.consumed_samples, batch_sizes=self.batch_sizes
        )

    def _vocab_size(self) -> int:
        given = self.cfg.model.vocab_size
        if self.tokenizer is None:
            if given is None:
                raise ConfigError("set data.tokenizer (or model.vocab_size) to size the vocab")
            return given
        if given is not None and given < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={given} is smaller than the tokenizer's vocabulary "
                f"({self.tokenizer.vocab_size}, {self.cfg.data.tokenizer}); remove it"
            )
        return given or self.tokenizer.vocab_size

    def _resume(self, state: TrainState) -> None:
        self.step, self.consumed_samples = state.step, state.consumed_samples
        self._callback_states = dict(state.callbacks)
        for cb in [*self.callbacks, self.guard]:
            if cb.state_key is not None and cb.state_key in state.callbacks:
                cb.load_state_dict(state.callbacks[cb.state_key])

    def train_state(self) -> TrainState:
        """Where the run stands, with the callbacks' resumable state, for a checkpoint."""
        states = dict(self._callback_states)
        for cb in [*self.callbacks, self.guard]:
            if cb.state_key is not None and (state := cb.state_dict()):
                states[cb.state_key] = state
        return TrainState(self.step, self.consumed_samples, states)

    def progress(self, activity: str) -> None:
        """Tell the callbacks the run is alive (hang detection) while no step ends."""
        for cb in self.callbacks:
            cb.on_progress(self, activity)

    def emit(self, event: dict[str, Any], warn: bool = True) -> None:
        """Print an event's message (rank 0) and hand it to every callback."""
        if is_rank0():
            prefix = "WARNING: " if warn else ""
            print(f"{prefix}{event['message']}", file=sys.stderr, flush=True)
        for cb in self.callbacks:
            cb.on_event(self, event)

    def last_step_nonfinite(self) -> bool:
        """Whether the newest step's loss or gradient norm was NaN/inf."""
        return bool(self.guard.streak)

    def _iterators(
        self,
        dataset: Any,
        start_sample: int = 0,
        num_steps: Optional[int] = None,
        activity: str = "training batch",
        batch_sizes: Optional[BatchSizes] = None,
    ) -> tuple[list[Iterator], TimedIterator]:
        """One microbatch stream per model chunk (each virtual pipeline chunk consumes the
        same microbatches in its own order, as megatron's interleaved schedule expects),
        and the timer of the underlying stream, which reports each batch as ``activity``."""
        # Tensor-parallel rank 0 reads, the rest of its group receives (data/broadcast.py).
        stream = TimedIterator(
            batches_on_this_tp_rank(
                lambda: microbatch_iterator(
                    dataset,
                    self.cfg,
                    self.dp_rank,
                    self.dp_size,
                    start_sample,
                    num_steps,
                    batch_sizes,
                )
            ),
            on_batch=lambda: self.progress(activity),
        )
        chunks = list(itertools.tee(stream, len(self.model))) if len(self.model) > 1 else [stream]
        return chunks, stream

    def _forward_backward(
        self, data: list[Iterator], forward_only: bool, num_microbatches: int
    ) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data if len(data) > 1 else data[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )
        return reduce_reported_loss(losses)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over a global batch; returns its metrics."""
        start = time.perf_counter()
        self.data_timer.wait_s = 0.0
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        batch_size = self.batch_sizes.at(self.consumed_samples)
        self.num_microbatches = batch_size // (self.cfg.train.micro_batch_size * self.dp_size)
        loss = self._forward_backward(self.train_iter, False, self.num_microbatches)
        with annotate("optimizer"):
            result = optimizer_step(self.optimizer, loss)
        if result.updated:  # as Megatron-LM: a skipped step does not advance the lr schedule
            self.scheduler.step(increment=batch_size)
        self.step += 1
        self.consumed_samples += batch_size
        self.num_skipped += not result.updated
        self.num_nan += result.nonfinite
        metrics = {
            "step": self.step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm,
            "skipped": not result.updated,
            "nonfinite": result.nonfinite,
            "skipped_steps": self.num_skipped,
            "nan_steps": self.num_nan,
            "consumed_samples": self.consumed_samples,
            "global_batch_size": batch_size,
            "data_wait_s": self.data_timer.wait_s,
        }
        if self.moe_metrics is not None:
            metrics.update(self.moe_metrics.collect(self.num_microbatches))
        metrics.update(mtp_loss_metrics(self.cfg.model.mtp_num_layers, self.num_microbatches))
        metrics.update(self._timing(time.perf_counter() - start, batch_size))
        return metrics

    def _timing(self, elapsed: float, batch_size: int) -> dict[str, float]:
        """Step time (this rank, slowest, fastest), throughput and peak memory (max over
        ranks), with one all-reduce."""
        if torch.cuda.is_available():
            peak_gb = torch.cuda.max_memory_allocated() / 1e9
        else:  # CPU: the process's peak resident set (KiB on Linux)
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        stats = torch.tensor([elapsed, -elapsed, peak_gb], dtype=torch.float64)
        stats = all_reduce(stats, op=dist.ReduceOp.MAX)
        slowest, fastest, peak = stats[0].item(), -stats[1].item(), stats[2].item()
        tokens = batch_size * self.cfg.model.seq_length
        return {
            "step_time_s": slowest,  # the step ends when the slowest rank finishes
            "step_time_min_s": fastest,
            "step_time_rank_s": elapsed,
            "tokens_per_s": tokens / slowest,
            "tokens_per_s_per_gpu": tokens / slowest / self.world_size,
            "peak_mem_gb": peak,
        }

    @contextlib.contextmanager
    def params_synced(self) -> Iterator[None]:
        """With overlap_param_gather the updated parameters arrive during the next forward;
        evaluation and checkpoint saves need them now (megatron's blocking param sync)."""
        overlapped = self.cfg.parallel.overlap_param_gather
        if overlapped:
            for chunk in self.model:
                chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            if overlapped:
                for chunk in self.model:
                    chunk.enable_forward_pre_hook()

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss over ``eval_iters`` global batches, the same ones at every evaluation."""
        for chunk in self.model:
            chunk.eval()
        data, _ = self._iterators(
            self.valid_ds, num_steps=self.cfg.train.eval_iters, activity="evaluation batch"
        )
        with self.params_synced():
            losses = [
                # evaluation batches are train.global_batch_size, ramp-up or not
                self._forward_backward(data, True, self.cfg.num_microbatches(self.world_size))
                for _ in range(self.cfg.train.eval_iters)
            ]
        val_loss = sum(losses) / len(losses)
        return {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}

    def _run_eval(self) -> None:
        metrics = self.evaluate()
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)

    def train(self) -> None:
        """Run to ``train.train_iters`` (or evaluate only, with ``train.skip_train``).

        A failure reaches every callback's ``on_error``; a :class:`StopTraining`
        (preemption: checkpoint saved; non-finite steps) is a clean stop, not a failure.
        Either way, and on success, every callback's ``close`` runs, then the outcome is
        recorded in ``<logging.dir>/exit_status.json``."""
        finished = False
        outcome: BaseException | None = None
        try:
            self._loop()
            finished = True
        except StopTraining as stop:
            outcome = stop
            raise
        except BaseException as error:
            outcome = error
            self._on_error(error)
            raise
        finally:  # a failing close fails a finished run; otherwise its exit stands
            try:
                self.close(raise_errors=finished)
            except BaseException as error:
                outcome = error
                raise
            finally:
                self._record_outcome(outcome)

    def _record_outcome(self, outcome: Optional[BaseException]) -> None:
        if self.status_dir is None:
            return
        if outcome is None:
            if is_rank0():
                write_exit_status(self.status_dir, EXIT_FINISHED, "finished", self.step)
        elif isinstance(outcome, StopTraining):
            if is_rank0():
                details = dict(outcome.details)
                step, message = details.pop("step", self.step), details.pop("message", "")
                write_exit_status(
                    self.status_dir, outcome.code, outcome.reason, step, message, **details
                )
        else:  # any failing rank may be the only one to get here
            status = 2 if isinstance(outcome, ForgeError) else EXIT_ERROR
            if isinstance(outcome, SystemExit) and isinstance(outcome.code, int):
                status = outcome.code
            elif isinstance(outcome, KeyboardInterrupt):
                status = 130
            write_exit_status(
                self.status_dir,
                status,
                "error",
                self.step,
                f"{type(outcome).__name__}: {outcome}",
                only_if_absent=not is_rank0(),
            )

    def _loop(self) -> None:
        t = self.cfg.train
        if t.skip_train:  # evaluate the loaded model only (Megatron-LM's --skip-train)
            self._run_eval()
            return
        for cb in self.callbacks:
            cb.on_train_start(self)
        while self.step < t.train_iters:
            metrics = self.train_step()
            nonfinite = bool(metrics.get("nonfinite"))
            self.guard.record(self.step, nonfinite)  # before the callbacks: a save asks
            if nonfinite:
                self.emit(self._nonfinite_event(metrics))
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
            if nonfinite:
                self._after_nonfinite()
            elif t.eval_interval and self.step % t.eval_interval == 0 and self.valid_ds:
                self._run_eval()
        for cb in self.callbacks:
            cb.on_train_end(self)

    # -----------------------------------------------------------------------------------
    # Non-finite steps: skip, roll back, stop

    def _nonfinite_event(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {  # the step's own record (loss, grad_norm) follows in metrics.jsonl
            "event": "nonfinite_step",
            "step": self.step,
            "consecutive": len(self.guard.streak),
            "message": self.guard.skipped_message(self.step, metrics["loss"], metrics["grad_norm"]),
        }

    def _newest_checkpoint(self) -> Optional[tuple[str, CheckpointConfig, int]]:
        """What a rollback reloads: the newest checkpoint of this run's checkpoint.save,
        else the one it started from (checkpoint.load); as (root, how to load, iteration).
        Everything is loaded back, whatever load_mode, load_optimizer and load_rng say."""
        ck = dataclasses.replace(
            self.cfg.checkpoint, load_mode="full", load_optimizer=True, load_rng=True
        )
        candidates = [(ck.save, dataclasses.replace(ck, load_iteration=None)), (ck.load, ck)]
        for root, how in candidates:
            if not root:
                continue
            try:
                iteration = iteration_to_load(root, how)
            except CheckpointError:
                continue
            if iteration is not None:
                return str(root), how, iteration
        return None

    def _after_nonfinite(self) -> None:
        action = self.guard.decide()
        if action is None:
            return
        for cb in self.callbacks:
            cb.finish_writes(self)
        newest, why_not = self._newest_checkpoint(), ""
        if action == "rollback":
            if newest is not None:
                self._rollback(*newest)
                return
            why_not = "no checkpoint has been written yet"
        path = str(iteration_dir(newest[0], newest[2])) if newest else None
        message = self.guard.stop_message(self.step, path, why_not)
        self.emit({"event": "nonfinite_stop", "step": self.step, "message": message}, False)
        raise NonFiniteStop(message, self.step)

    def _rollback(self, root: str, how: CheckpointConfig, iteration: int) -> None:
        """Reload a checkpoint (model, optimizer, scheduler, RNG) and go on from its step
        with the data where it is now: the batches read since that checkpoint, the bad
        ones among them, are skipped."""
        bad_steps = self.guard.steps_text()
        from_step, checkpoint = self.step, iteration_dir(root, iteration)
        self.progress("rollback")
        state = load_checkpoint(root, self.model, self.optimizer, self.scheduler, how)
        apply_config_hparams(self.cfg, self.optimizer, self.scheduler)
        self.progress("rollback done")
        skip_from = state.consumed_samples
        self.guard.rolled_back()
        self.step = state.step
        message = (
            f"rollback {self.guard.rollbacks} of {self.guard.max_rollbacks} "
            f"(train.max_rollbacks): loss or grad norm NaN/inf at {bad_steps}; reloaded "
            f"{checkpoint} (step {state.step}) and skipping the "
            f"{self.consumed_samples - skip_from} samples read since it (samples "
            f"{skip_from}-{self.consumed_samples - 1}); training continues from step "
            f"{state.step} at sample {self.consumed_samples}"
        )
        self.emit(
            {
                "event": "rollback",
                "step": from_step,
                "to_step": state.step,
                "checkpoint": str(checkpoint),
                "skipped_samples": [skip_from, self.consumed_samples],
                "rollbacks": self.guard.rollbacks,
                "message": message,
            }
        )

    def _on_error(self, error: BaseException) -> None:
        for cb in self.callbacks:
            try:
                cb.on_error(self, error)
            except Exception:  # the run's own error is the one to report
                _warn_failed(cb, "on_error")

    def close(self, raise_errors: bool = True) -> None:
        """Every callback's ``close``, each one even when another fails. With
        ``raise_errors`` the first failure is raised at the end; the others (all of them
        without it) are printed as warnings."""
        first: Optional[Exception] = None
        for cb in self.callbacks:
            try:
                cb.close(self)
            except Exception as err:
                if raise_errors and first is None:
                    first = err
                else:
                    _warn_failed(cb, "close")
        if first is not None:
            raise first


def _warn_failed(cb: Callback, hook: str) -> None:
    print(f"WARNING: {type(cb).__name__}.{hook} failed:", file=sys.stderr, flush=True)
    traceback.print_exc()
