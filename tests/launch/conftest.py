"""The one-node Slurm cluster for tests marked ``slurm`` (started once per session), and
helpers that submit to it and follow jobs through ``scontrol``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "tools/local_slurm.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _slurm_is_up() -> bool:
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, timeout=60)
    return proc.returncode == 0


@pytest.fixture(scope="session")
def local_slurm() -> object:
    """``tools/local_slurm.sh start`` once, ``stop`` at the end (unless it was already up:
    then it belongs to someone else). Skips only where it cannot exist: not root, or
    Slurm missing and apt-get unable to install it."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root: tools/local_slurm.sh runs slurmd as root")
    was_up = shutil.which("sinfo") is not None and _slurm_is_up()
    if not was_up:
        proc = subprocess.run(
            ["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            if shutil.which("slurmctld") is None:
                pytest.skip(f"Slurm is not installed and apt-get could not install it:\n{tail}")
            pytest.fail(f"tools/local_slurm.sh start failed:\n{tail}")
    yield
    if not was_up:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=120)


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict ({} once the controller forgot the job)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True
    ).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for_job(
    job_id: str,
    timeout: float = 300,
    on_poll: Optional[Callable[[dict[str, str]], None]] = None,
) -> dict[str, str]:
    """Poll until the job reaches a final state; return its scontrol fields.

    Faster than ``sbatch --wait`` (which polls every ~20 s here). A requeued job is held
    PENDING (Reason=BeginTime) for about two minutes by slurmctld before it may start
    again; we release it with ``scontrol update StartTime=now`` so the requeue tests take
    seconds, not minutes. Not at once: the kill revoked the job's credential, and slurmd
    refuses a relaunch whose new credential is stamped in the same second as the
    revocation ("Job N already killed, do not launch batch job": the job then FAILS with
    exit 1 and no output). Two seconds after the hold is first seen is always past it.
    """
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    held_since: Optional[float] = None
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if on_poll:
            on_poll(fields)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since >= 2.0:
                subprocess.run(
                    ["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=False
                )
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=False)
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {fields}")


def wait_for_file_lines(path: Path, job_id: str, timeout: float = 180) -> None:
    """Wait until ``path`` has a line (the job is training), failing early if it ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return
        if job_fields(job_id).get("JobState") in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended before writing {path}")
        time.sleep(0.2)
    raise AssertionError(f"{path} still empty after {timeout}s")


def sbatch_env() -> dict[str, str]:
    """The environment jobs inherit: this interpreter for the scripts' python."""
    return dict(os.environ, FORGE_PYTHON=sys.executable, PYTHONWARNINGS="ignore")
