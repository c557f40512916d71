"""Real two-node jobs on one machine (tools/local_slurm_multinode.sh): two slurmd nodes,
forge-n1 and forge-n2, each in its own network and UTS namespace, so ranks on different
nodes share no loopback and reach each other only through the first node's name in the
nodelist, as on a cluster.

Shown here: ranks, local ranks and the master address across nodes under ``srun``;
``sbatch --nodes=2 slurm/pretrain_tiny.sh`` training TP=2 across the two nodes; and
``launch/submit.py --nodes 2`` through submitit. The cluster is started once for this
module and stopped at its end (unless it was already up)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import data_overrides, read_metrics
from tests.launch.conftest import sbatch_env, wait_for_job

REPO = Path(__file__).resolve().parents[2]
MULTINODE = REPO / "tools/local_slurm_multinode.sh"
SCRATCH = Path(os.environ.get("FORGE_SLURM_MULTINODE_DIR", "/tmp/forge-slurm-multinode"))
NO_NETNS = 3  # local_slurm_multinode.sh's exit status where namespaces are not allowed
NODES = ["forge-n1", "forge-n2"]
NUM_STEPS = 4


def _multinode(command: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(MULTINODE), command], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def multinode_slurm() -> Iterator[Path]:
    """``local_slurm_multinode.sh start`` (2 nodes), SLURM_CONF pointing at it for this
    module's clients and jobs, ``stop`` at the end unless it was already up. Skips only
    where it cannot exist: not root, no Slurm, or no network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("multi-node Slurm needs root: slurmd runs as root in network namespaces")
    was_up = shutil.which("sinfo") is not None and _multinode("status", 60).returncode == 0
    if not was_up:
        proc = _multinode("start", 900)
        tail = (proc.stdout + proc.stderr)[-3000:]
        if proc.returncode == NO_NETNS:
            pytest.skip(f"this machine allows no network namespaces:\n{tail}")
        if proc.returncode != 0:
            if shutil.which("slurmctld") is None:
                pytest.skip(f"Slurm is not installed and apt-get could not install it:\n{tail}")
            pytest.fail(f"tools/local_slurm_multinode.sh start failed:\n{tail}")
    with pytest.MonkeyPatch.context() as mp:
        # wait_for_job's scontrol, sbatch, srun and submitit all read it.
        mp.setenv("SLURM_CONF", str(SCRATCH / "slurm.conf"))
        yield SCRATCH / "slurm.conf"
    if not was_up:
        _multinode("stop", 120)


pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("multinode_slurm")]

# What each srun task reports: where it runs and what read_environment makes of it.
WHERE_AM_I = """
import json, os, socket
from megatron_forge.distributed import read_environment
env = read_environment()
print(json.dumps({
    "host": socket.gethostname(), "addr": socket.gethostbyname(socket.gethostname()),
    "netns": os.readlink("/proc/self/ns/net"), "rank": env.rank, "world": env.world_size,
    "local_rank": env.local_rank, "master": env.master_addr, "port": env.master_port,
    "nodelist": os.environ["SLURM_JOB_NODELIST"], "source": env.source,
}))
"""


def test_ranks_and_master_address_across_two_nodes() -> None:
    """2 nodes x 2 tasks: global ranks run 0-1 on forge-n1 and 2-3 on forge-n2, local ranks
    restart at 0 on each node, and every task agrees on forge-n1 (the first host of the
    bracketed nodelist, resolving to that node's own address) and one port."""
    proc = subprocess.run(
        ["srun", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5",
         sys.executable, "-c", WHERE_AM_I],
        cwd=REPO, env=sbatch_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    tasks = sorted((json.loads(line) for line in lines), key=lambda t: t["rank"])
    assert [t["rank"] for t in tasks] == [0, 1, 2, 3]
    assert [t["host"] for t in tasks] == [NODES[0]] * 2 + [NODES[1]] * 2
    assert [t["local_rank"] for t in tasks] == [0, 1, 0, 1]
    assert {t["nodelist"] for t in tasks} == {"forge-n[1-2]"}
    assert {(t["master"], t["port"], t["world"], t["source"]) for t in tasks} == {
        ("forge-n1", tasks[0]["port"], 4, "slurm")
    }
    # Two real nodes: separate network stacks, each host name resolving to its own address.
    n1, n2 = tasks[0], tasks[2]
    assert n1["netns"] != n2["netns"] and n1["addr"] != n2["addr"]
    assert not n1["addr"].startswith("127.") and not n2["addr"].startswith("127.")


def tiny_overrides(sample_data: Path) -> list[str]:
    return [
        *data_overrides(sample_data),
        f"train.train_iters={NUM_STEPS}",
        "train.eval_interval=0",
        "logging.log_interval=1",
    ]


@pytest.fixture(scope="module")
def sbatch_two_nodes(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """slurm/pretrain_tiny.sh (TP=2) on 2 nodes x 1 task, overriding only the script's
    --nodes/--ntasks-per-node on the sbatch command line, as a user would."""
    run_dir = tmp_path_factory.mktemp("multinode") / "tiny"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
         f"--output={run_dir}.out", f"--error={run_dir}.err",
         "slurm/pretrain_tiny.sh", *tiny_overrides(sample_data)],
        cwd=REPO, env={**sbatch_env(), "RUN_DIR": str(run_dir)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = proc.stdout.strip().split(";")[0]
    return {"job_id": job_id, "run_dir": run_dir, "fields": wait_for_job(job_id)}


def test_sbatch_tiny_trains_tp2_across_two_nodes(sbatch_two_nodes: dict[str, Any]) -> None:
    fields, run_dir = sbatch_two_nodes["fields"], sbatch_two_nodes["run_dir"]
    log = Path(f"{run_dir}.out").read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{log[-2000:]}"
    assert fields["ExitCode"] == "0:0"
    assert (fields["NodeList"], fields["NumNodes"], fields["NumTasks"]) == (
        "forge-n[1-2]",
        "2",
        "2",
    )
    assert f"on {fields['NodeList']}: run dir" in log
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, NUM_STEPS + 1))
    assert (run_dir / "checkpoints" / f"iter_{NUM_STEPS:07d}").is_dir()
    assert "tensor: 2" in (run_dir / "config.yaml").read_text()


def test_submitit_two_nodes_completes(
    sample_data: Path, tmp_path: Path, sbatch_two_nodes: dict[str, Any]
) -> None:
    """``launch/submit.py --nodes 2 --gpus-per-node 1 --cpu``: one rank per node, with
    MASTER_ADDR from submitit's host list; the same layout, seed and data as the sbatch
    run, so the same losses."""
    cmd = [
        sys.executable, "launch/submit.py", "--config", "configs/tiny.yaml",
        "--partition", "debug", "--nodes", "2", "--gpus-per-node", "1", "--cpu",
        "--cpus-per-task", "1", "--time", "00:10:00", "--log-dir", str(tmp_path / "logs"),
        "--wait", "--", *tiny_overrides(sample_data), "parallel.tensor=2",
        f"logging.dir={tmp_path / 'run'}", "checkpoint.save=null", "checkpoint.load=null",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) to Slurm \(2 tasks\)", proc.stdout).group(1)
    assert proc.stdout.strip().endswith(f"job {job_id}: COMPLETED")
    logs = tmp_path / "logs" / job_id
    script = (logs / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    rank1 = (logs / f"{job_id}_1_log.out").read_text() + (logs / f"{job_id}_1_log.err").read_text()
    assert "hostname=forge-n2" in rank1 and "global_rank=1(2)" in rank1, rank1[-2000:]

    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    reference = [r["loss"] for r in read_metrics(sbatch_two_nodes["run_dir"])]
    assert len(losses) == NUM_STEPS
    assert losses == pytest.approx(reference, rel=1e-5)
