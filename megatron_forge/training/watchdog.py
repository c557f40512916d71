"""Hang detection: exit (and requeue) when training stops making progress.

Each rank runs a daemon thread that writes a heartbeat file
``<logging.dir>/heartbeat/rank{R}.json`` (its last completed step, what it did last,
host, pid, time) every few seconds, and the main thread rewrites it at every step end,
so a frozen rank's file shows its real last step. The thread checks when this rank last
showed progress: a completed step, a training or evaluation microbatch read, a checkpoint
save starting or ending (:meth:`~.callback.Callback.on_progress`). A long evaluation
therefore never counts as a hang, while one microbatch, one checkpoint save or one
collective taking longer than ``train.hang_timeout_s`` does (a
peer stopped with SIGSTOP, a collective that never returns, a dead node or filesystem).
Then the thread reads every rank's heartbeat, names the stalled ones (a stale heartbeat
means a frozen process; a lower step count means a rank that fell behind), asks Slurm to
requeue the job, records the outcome in ``<logging.dir>/exit_status.json`` and exits the
process with :data:`EXIT_HUNG`, so the allocation is not burned waiting on NCCL/gloo
timeouts.

The clock starts when the first step ends: the first step's one-time work (kernel
compilation, communicator set-up, the first batches) may take long on a large job, and a
hang before it ends is left to the process-group timeout (10 minutes), which fails the
run. The watchdog stops before the final checkpoint save: a finished run is never
requeued.

Files rather than the c10d store: the store is served by rank 0's process, so it freezes
with rank 0, while reading a file never blocks on another process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch.distributed as dist

from megatron_forge.training.callback import Callback, announce
from megatron_forge.training.exit_status import EXIT_HUNG, write_exit_status
from megatron_forge.training.preemption import requeue_slurm_job
from megatron_forge.utils import world_size

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer

__all__ = ["EXIT_HUNG", "HangWatchdog", "describe_stalled"]

ANNOUNCE_TIMEOUT_S = 15.0
"""How long the other callbacks get to hear of a hang before the process exits."""


def describe_stalled(heartbeats: dict[int, dict[str, Any]], now: float, stale_s: float) -> str:
    """One line per rank that looks stalled: frozen (stale heartbeat) or behind (fewer
    steps than the most advanced rank). Empty when every rank looks alike."""
    if not heartbeats:
        return ""
    top_step = max(hb["step"] for hb in heartbeats.values())
    lines = []
    for rank, hb in sorted(heartbeats.items()):
        age = now - hb["time"]
        doing = f" ({hb['activity']})" if hb.get("activity") else ""
        if age > stale_s:
            why = f"no heartbeat for {age:.0f} s, last at step {hb['step']}{doing} (frozen or dead)"
        elif hb["step"] < top_step:
            why = f"behind: at step {hb['step']}{doing}, others at {top_step}"
        else:
            continue
        lines.append(f"  rank {rank} on host {hb['host']} (pid {hb['pid']}): {why}")
    return "\n".join(lines)


class HangWatchdog(Callback):
    exit_process: Callable[[int], Any] = staticmethod(os._exit)
    """How the firing thread ends the process (``os._exit``: no cleanup that could hang)."""

    def __init__(self, run_dir: str | Path, timeout_s: float, max_requeues: int) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "heartbeat"
        self.timeout_s = timeout_s
        self.max_requeues = max_requeues
        self.interval_s = min(5.0, timeout_s / 4)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = world_size()
        self.host = socket.gethostname()
        self.step = 0
        self.activity = "starting"
        self.last_progress = time.monotonic()
        self.armed = False
        """Whether a silence can fire: from the end of the first step on."""
        self._lock = threading.Lock()  # the thread and the main thread both write the file
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.trainer: Any = None

    def _beat(self) -> None:
        record = {
            "step": self.step,
            "activity": self.activity,
            "time": time.time(),
            "host": self.host,
            "pid": os.getpid(),
        }
        path = self.dir / f"rank{self.rank}.json"
        with self._lock:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)

    def _safe_beat(self) -> None:
        try:
            self._beat()
        except OSError:
            pass  # a full or flaky filesystem must not kill training

    def _read_all(self) -> dict[int, dict[str, Any]]:
        beats = {}
        for rank in range(self.world):
            try:
                beats[rank] = json.loads((self.dir / f"rank{rank}.json").read_text())
            except (OSError, ValueError):
                continue
        return beats

    def _fire(self) -> None:
        idle = time.monotonic() - self.last_progress
        beats = self._read_all()
        stalled = describe_stalled(beats, time.time(), stale_s=3 * self.interval_s)
        missing = sorted(set(range(self.world)) - set(beats))
        message = (
            f"watchdog: rank {self.rank} on host {self.host} made no progress for "
            f"{idle:.0f} s (train.hang_timeout_s={self.timeout_s:g}; last step {self.step}, "
            f"then: {self.activity}).\n"
            + (f"Stalled ranks:\n{stalled}\n" if stalled else "")
            + (f"No heartbeat file from ranks {missing}.\n" if missing else "")
        )
        why_not = requeue_slurm_job(self.max_requeues)
        message += "Requeued the Slurm job." if why_not is None else f"Not requeued: {why_not}."
        message += f" Exiting with status {EXIT_HUNG} (hung)."
        print(message, file=sys.stderr, flush=True)
        write_exit_status(
            self.run_dir,
            EXIT_HUNG,
            "hung",
            self.step,
            message,
            rank=self.rank,
            requeued=why_not is None,
        )
        self._announce(message)  # after the status is recorded: it may take a while
        self.exit_process(EXIT_HUNG)

    def _announce(self, message: str) -> None:
        """The other callbacks hear of the hang (a W&B alert, a record in metrics.jsonl),
        within ANNOUNCE_TIMEOUT_S: a logger blocked on the network must not keep a hung
        job from exiting."""
        if self.trainer is None:
            return
        event = {
            "event": "hang",
            "step": self.step,
            "rank": self.rank,
            "host": self.host,
            "message": message.splitlines()[0],
        }
        thread = threading.Thread(target=announce, args=(self.trainer, event), daemon=True)
        thread.start()
        thread.join(timeout=ANNOUNCE_TIMEOUT_S)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._safe_beat()
            if self.armed and time.monotonic() - self.last_progress > self.timeout_s:
                self._fire()

    def _progress(self, activity: str) -> None:
        self.activity = activity
        self.last_progress = time.monotonic()

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.dir.mkdir(parents=True, exist_ok=True)
        self.step = trainer.step
        self._progress("first step")
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="forge-watchdog", daemon=True)
        self._thread.start()

    def on_progress(self, trainer: Trainer, activity: str) -> None:
        self._progress(activity)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.step = trainer.step
        self._progress("step end")
        self.armed = True
        self._safe_beat()

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._progress("evaluation end")

    def on_train_end(self, trainer: Trainer) -> None:
        # Stop watching before the final checkpoint save: once the last step is done the
        # run must finish, never be requeued.
        self._stop.set()

    def close(self, trainer: Trainer) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)
            self._thread = None
