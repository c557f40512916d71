"""Real jobs on the one-node Slurm (tools/local_slurm.sh, started once per session):
``sbatch slurm/pretrain_tiny.sh``, ``launch/submit.py`` through submitit, and preemption:
USR2 -> checkpoint on every rank -> requeue -> resume from that checkpoint -> COMPLETED."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import data_overrides, read_metrics
from tests.launch.conftest import sbatch_env, wait_for_file_lines, wait_for_job

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("local_slurm")]

REPO = Path(__file__).resolve().parents[2]
NUM_STEPS = 12  # long enough to preempt after the first logged step


def tiny_overrides(sample_data: Path, steps: int = NUM_STEPS) -> list[str]:
    return [
        *data_overrides(sample_data),
        f"train.train_iters={steps}",
        "train.eval_interval=0",
        "logging.log_interval=1",
    ]


def sbatch_tiny(run_dir: Path, overrides: list[str]) -> str:
    """Submit slurm/pretrain_tiny.sh from the repo root; logs go next to the run dir."""
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={run_dir}.out", f"--error={run_dir}.err",
         "slurm/pretrain_tiny.sh", *overrides],
        cwd=REPO, env={**sbatch_env(), "RUN_DIR": str(run_dir)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return proc.stdout.strip().split(";")[0]


def final_loss(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir) if "loss" in r][-1]["loss"]


@pytest.fixture(scope="module")
def uninterrupted(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """sbatch slurm/pretrain_tiny.sh, run to the end: the reference for the preempted run."""
    run_dir = tmp_path_factory.mktemp("sbatch") / "tiny"
    job_id = sbatch_tiny(run_dir, tiny_overrides(sample_data))
    return {"job_id": job_id, "run_dir": run_dir, "fields": wait_for_job(job_id)}


def test_sbatch_tiny_completes(uninterrupted: dict[str, Any]) -> None:
    fields, run_dir = uninterrupted["fields"], uninterrupted["run_dir"]
    log = Path(f"{run_dir}.out").read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{log[-2000:]}"
    assert fields["ExitCode"] == "0:0" and fields["NumTasks"] == "2"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, NUM_STEPS + 1))
    assert (run_dir / "checkpoints" / f"iter_{NUM_STEPS:07d}").is_dir()
    # The run was TP=2 (the script's layout), as its stored config says.
    assert "tensor: 2" in (run_dir / "config.yaml").read_text()


def test_preempted_sbatch_job_requeues_and_resumes(
    sample_data: Path, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    run_dir = tmp_path / "tiny"
    job_id = sbatch_tiny(run_dir, tiny_overrides(sample_data))
    wait_for_file_lines(run_dir / "metrics.jsonl", job_id)
    # USR2 to the job's steps (the srun tasks), as --signal=USR2@120 delivers it.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    fields = wait_for_job(job_id)
    log = Path(f"{run_dir}.out").read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{log[-3000:]}"
    assert fields["Restarts"] == "1"

    saved = re.search(r"SIGUSR2 at step (\d+): saved checkpoint", log)
    assert saved and "requeued the Slurm job" in log, log[-3000:]
    step = int(saved.group(1))
    assert 1 <= step < NUM_STEPS
    assert (run_dir / "checkpoints" / f"iter_{step:07d}").is_dir()
    # The requeued run (restart 1) starts right after the saved step, not from scratch.
    second_run = log.split("(restart 1)", 1)[1]
    first = re.search(r"iteration\s+(\d+)/", second_run)
    assert first and int(first.group(1)) == step + 1, second_run[:2000]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "event" not in r] == list(range(1, NUM_STEPS + 1))
    assert [r["step"] for r in records if r.get("event") == "preempted"] == [step]
    assert final_loss(run_dir) == pytest.approx(final_loss(uninterrupted["run_dir"]), rel=1e-5)


def submit_cmd(tmp_path: Path, sample_data: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "launch/submit.py", "--config", "configs/tiny.yaml",
        "--partition", "debug", "--nodes", "1", "--gpus-per-node", "2", "--cpu",
        "--cpus-per-task", "1", "--time", "00:10:00", "--log-dir", str(tmp_path / "logs"),
        *extra, "--", *tiny_overrides(sample_data, steps=4),
        f"logging.dir={tmp_path / 'run'}",
    ]  # fmt: skip


def test_submitit_job_completes(sample_data: Path, tmp_path: Path) -> None:
    cmd = submit_cmd(tmp_path, sample_data, "--wait") + [
        "checkpoint.save=null", "checkpoint.load=null",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) to Slurm \(2 tasks\)", proc.stdout).group(1)
    assert proc.stdout.strip().endswith(f"job {job_id}: COMPLETED")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    script = (tmp_path / "logs" / job_id / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR2@120" in script
    assert "gpus" not in script  # --cpu: 2 tasks, no GPU request


def test_preempted_submitit_job_requeues_and_resumes(sample_data: Path, tmp_path: Path) -> None:
    """submitit's path: the training processes (not submitit's rank-0 handler) save on every
    rank and requeue; the requeued job re-runs the pickled TrainJob, which resumes, and
    ``--wait`` follows the job through the requeue to its end."""
    run_dir = tmp_path / "run"
    cmd = submit_cmd(tmp_path, sample_data, "--wait") + [
        f"train.train_iters={NUM_STEPS}",
        f"checkpoint.save={run_dir / 'checkpoints'}",
        f"checkpoint.load={run_dir / 'checkpoints'}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        first_line = proc.stdout.readline()
        job_id = re.match(r"submitted job (\d+)", first_line).group(1)
        wait_for_file_lines(run_dir / "metrics.jsonl", job_id)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        fields = wait_for_job(job_id)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert out.strip().endswith(f"job {job_id}: COMPLETED")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1"
    step = int(re.search(r"SIGUSR2 at step (\d+): saved checkpoint", out).group(1))
    assert (run_dir / "checkpoints" / f"iter_{step:07d}").is_dir()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "event" not in r] == list(range(1, NUM_STEPS + 1))
    assert [r["step"] for r in records if r.get("event") == "preempted"] == [step]


def test_unknown_partition_is_one_line_and_submits_nothing(
    sample_data: Path, tmp_path: Path
) -> None:
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    cmd = submit_cmd(tmp_path, sample_data) + ["launch.partition=no_such_partition"]
    cmd[cmd.index("--partition") + 1] = "no_such_partition"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "submission failed: sbatch: error: invalid partition specified: no_such_partition"
    )
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split())
