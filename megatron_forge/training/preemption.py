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
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from megatron_forge.training.callback import Callback, StopTraining
from megatron_forge.utils import all_reduce, is_rank0

if TYPE_CHECKING:
    from megatron_forge.training.checkpoint_saver import CheckpointSaver
    from megatron_forge.training.trainer import Trainer

EXIT_PREEMPTED = 3
"""Exit status of a run that saved a checkpoint and stopped on a signal."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Preempted(StopTraining):
    """Raised out of the train loop after the checkpoint is saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(EXIT_PREEMPTED)
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

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        signum = self._agreed_signal()
        if not signum:
            return
        rank0 = is_rank0()
        name = signal.Signals(signum).name
        if self.saver is None:
            if rank0:
                print(
                    f"{name} at step {trainer.step}: checkpoint.save is unset, so nothing is "
                    "saved and the job is not requeued",
                    file=sys.stderr,
                    flush=True,
                )
            raise Preempted(signum)
        # Blocking: waits for an in-flight background save, then writes this step's.
        self.saver.save(trainer, blocking=True)
        if rank0:
            print(
                f"{name} at step {trainer.step}: saved checkpoint to "
                f"{self.saver.checkpointer.root}",
                flush=True,
            )
            why_not = requeue_slurm_job(self.max_requeues)
            print(
                "requeued the Slurm job" if why_not is None else f"not requeued: {why_not}",
                flush=True,
            )
        raise Preempted(signum)
