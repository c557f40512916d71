"""Preemption and time limits: save, requeue, exit, on every rank.

Slurm sends SIGTERM on preemption and, with ``--signal=USR2@<s>`` (what our sbatch
scripts and launch/submit.py ask for), USR2 ahead of the time limit. The handler only
sets a flag; the step in flight finishes, then every rank agrees on the flag (one
all-reduce, since ranks receive the signal at slightly different times), the checkpoint
is saved by all ranks, global rank 0 asks Slurm to requeue the job, and every process
exits with :data:`EXIT_PREEMPTED`. The requeued job resumes from that checkpoint because
its ``checkpoint.load`` points at the same directory.

This is one mechanism for both launchers: submitit's own USR2 handler (which would call
``checkpoint()`` on rank 0 only) is replaced in the training processes by this one.

A signal during the last step does not requeue: the run finishes (final checkpoint,
status 0). Under torchrun, which exits 1 whenever a worker exits non-zero, the outcome is
in ``<logging.dir>/exit_status.json`` (:mod:`.exit_status`). torchrun forwards only
SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers and kills them 30 s later; see the
README for the flags that forward USR2 and allow a longer save.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from megatron_forge.checkpointing import iteration_dir
from megatron_forge.training.callback import Callback, StopTraining, announce
from megatron_forge.training.exit_status import EXIT_PREEMPTED, STATUS_FILE
from megatron_forge.utils import all_reduce, is_rank0

if TYPE_CHECKING:
    from megatron_forge.training.checkpoint_saver import CheckpointSaver
    from megatron_forge.training.trainer import Trainer

__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionHandler", "requeue_slurm_job"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Preempted(StopTraining):
    """Raised out of the train loop after the checkpoint is saved."""

    reason = "preempted"

    def __init__(self, signum: int, details: Optional[dict[str, Any]] = None) -> None:
        super().__init__(EXIT_PREEMPTED, {"signal": signal.Signals(signum).name, **(details or {})})
        self.signum = signum


def requeue_slurm_job(max_requeues: int, env: Optional[dict[str, str]] = None) -> Optional[str]:
    """``scontrol requeue`` this job; returns why not when it cannot be done."""
    env = dict(os.environ if env is None else env)
    job_id = env.get("SLURM_ARRAY_JOB_ID") and (
        f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    )
    job_id = job_id or env.get("SLURM_JOB_ID")
    if not job_id:
        return "not running under Slurm (no SLURM_JOB_ID)"
    restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        return f"job {job_id} was already requeued {restarts} times (launch.max_requeues)"
    proc = subprocess.run(
        ["scontrol", "requeue", job_id], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return f"scontrol requeue {job_id} failed: {proc.stderr.strip()}"
    return None


class PreemptionHandler(Callback):
    """Turns SIGTERM/SIGUSR2 into save + requeue + exit at the next step boundary."""

    def __init__(self, saver: Optional[CheckpointSaver], max_requeues: int) -> None:
        self.saver = saver
        self.max_requeues = max_requeues
        self.received: int = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_train_start(self, trainer: Trainer) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def close(self, trainer: Trainer) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _agreed_signal(self) -> int:
        flag = torch.tensor([self.received], dtype=torch.int64)
        return int(all_reduce(flag, op=dist.ReduceOp.MAX).item())

    def _save(self, trainer: Trainer) -> Optional[str]:
        """Save (blocking: waits for a background save in flight, then writes this step's);
        the checkpoint's path, or None when there is no saver or it refused (non-finite
        step: the newest checkpoint stays the one to resume from)."""
        if self.saver is None or not self.saver.save(trainer, blocking=True):
            return None
        return str(iteration_dir(self.saver.checkpointer.root, trainer.step))

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        signum = self._agreed_signal()
        if not signum:
            return
        rank0 = is_rank0()
        name = signal.Signals(signum).name
        if trainer.step >= trainer.cfg.train.train_iters:
            if rank0:
                print(
                    f"{name} at the last step ({trainer.step}): finishing the run (final "
                    "checkpoint) instead of requeueing it",
                    flush=True,
                )
            return
        checkpoint, requeue = self._save(trainer), "not requeued: checkpoint.save is unset"
        if rank0 and self.saver is not None:
            why_not = requeue_slurm_job(self.max_requeues)
            requeue = "requeued the Slurm job" if why_not is None else f"not requeued: {why_not}"
        message = (
            f"{name} at step {trainer.step}: "
            + (
                f"saved checkpoint to {self.saver.checkpointer.root} ({Path(checkpoint).name})"
                if checkpoint and self.saver is not None
                else "no checkpoint saved"
            )
            + f"; {requeue}. Exiting with status {EXIT_PREEMPTED} (preempted), recorded "
            f"in {Path(trainer.cfg.logging.dir) / STATUS_FILE}"
        )
        if rank0:
            print(message, flush=True)
        # the loggers hear of it (a W&B alert, a record in metrics.jsonl; only rank 0 knows
        # whether the job was requeued, and only rank 0 writes them)
        announce(trainer, {"event": "preempted", "step": trainer.step, "message": message})
        raise Preempted(
            signum,
            {
                "checkpoint": checkpoint,
                "requeue": requeue,
                "message": f"{name} at step {trainer.step}",
            },
        )
