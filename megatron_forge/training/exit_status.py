"""How a training process ends: its exit status, and the same outcome written down in
``<logging.dir>/exit_status.json`` for launchers that cannot see the status.

======  ==========  ======================================================================
status  reason      meaning
======  ==========  ======================================================================
0       finished    trained to ``train.train_iters`` (final checkpoint saved)
1       error       an exception; its traceback is in the log
2       (none)      a config, checkpoint or data error found before training; the message
                    names the field and the fix (written by the entry point, no file)
3       preempted   SIGTERM/SIGUSR2: checkpoint saved, Slurm job requeued
4       hung        the hang watchdog fired (``train.hang_timeout_s``); job requeued
5       nonfinite   loss or gradient norm NaN/inf for ``train.max_nonfinite_steps`` steps
                    in a row (after ``train.max_rollbacks`` rollbacks with that policy)
======  ==========  ======================================================================

Under ``srun`` each task exits with its own status. ``torchrun`` exits 1 whenever a worker
exits non-zero (it prints the worker's status as ``exitcode : 3`` in its failure summary),
so a launcher or script that runs torchrun reads the file instead::

    {"status": 3, "reason": "preempted", "step": 120, "message": "...", ...}

The file is removed when a run starts, so it always describes the latest run in that
directory (a missing file: the run never reached training, or was killed outright).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

EXIT_FINISHED = 0
EXIT_ERROR = 1
EXIT_PREEMPTED = 3
"""A run that saved a checkpoint and stopped on a signal (requeued under Slurm)."""
EXIT_HUNG = 4
"""A rank whose hang watchdog fired."""
EXIT_NONFINITE = 5
"""A run stopped because its loss or gradient norm stayed NaN/inf."""

STATUS_FILE = "exit_status.json"


def status_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATUS_FILE


def clear_exit_status(run_dir: str | Path) -> None:
    """Remove the previous run's outcome (a requeued job starts here)."""
    status_path(run_dir).unlink(missing_ok=True)


def write_exit_status(
    run_dir: str | Path,
    status: int,
    reason: str,
    step: Optional[int],
    message: str = "",
    only_if_absent: bool = False,
    **details: Any,
) -> None:
    """Record the outcome atomically (a reader never sees half a file). With
    ``only_if_absent`` an outcome already written (by another rank, say) stands."""
    path = status_path(run_dir)
    if only_if_absent and path.exists():
        return
    record = {
        "status": status,
        "reason": reason,
        "step": step,
        "message": message,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
        **details,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # the exit status itself still tells the outcome


def read_exit_status(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The recorded outcome of the latest run in ``run_dir``, or None."""
    try:
        return json.loads(status_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
