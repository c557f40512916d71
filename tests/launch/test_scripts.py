"""slurm/*.sh without Slurm: the directives users rely on, the config each script runs
validates at the script's world size, running a script outside Slurm is one clear line, and
a copy run from elsewhere (as sbatch runs one from its spool directory) finds the shared
slurm/common.sh through SLURM_SUBMIT_DIR and starts srun with the config and environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_forge.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("pretrain_*.sh"))
COMMON = REPO / "slurm/common.sh"


def sbatch_options(script: Path) -> dict[str, str]:
    """Active ``#SBATCH --key=value`` lines (``##SBATCH`` is commented out)."""
    options = {}
    for line in script.read_text().splitlines():
        match = re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line)
        if match:
            options[match.group(1)] = match.group(2) or ""
    return options


def test_all_four_scripts_exist() -> None:
    names = {s.name for s in SCRIPTS}
    assert names == {
        "pretrain_tiny.sh", "pretrain_7b.sh", "pretrain_70b.sh", "pretrain_mixtral_8x7b.sh",
    }  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_directives(script: Path) -> None:
    opts = sbatch_options(script)
    assert opts["signal"] == "USR2@120" and "requeue" in opts
    assert opts["output"] == "logs/%x-%j.out" and opts["error"] == "logs/%x-%j.err"
    for key in ("job-name", "nodes", "ntasks-per-node", "cpus-per-task", "time"):
        assert key in opts, key
    text = script.read_text()
    assert "##SBATCH --container-image=" in text  # optional, kept commented out
    assert re.search(r'^srun "\$PYTHON" -m megatron_forge\.train --config configs/', text, re.M)
    assert text.rstrip().endswith('"$@"')  # overrides pass through
    if script.name == "pretrain_tiny.sh":
        assert "gpus-per-node" not in opts and opts["ntasks-per-node"] == "2"
    else:
        assert opts["gpus-per-node"] == opts["ntasks-per-node"] == "8"
        assert re.search(r"^forge_gpu_env\b", text, re.M)  # NCCL/CUDA env from common.sh
    assert re.search(rf"^forge_enter_job {script.name}$", text, re.M)


def test_common_body_is_shared() -> None:
    """The body the GPU scripts share is written once, in slurm/common.sh."""
    common = COMMON.read_text()
    assert "NCCL" in common and "export CUDA_DEVICE_MAX_CONNECTIONS=1" in common
    assert "forge_enter_job()" in common and "forge_gpu_env()" in common
    for script in SCRIPTS:
        assert "CUDA_DEVICE_MAX_CONNECTIONS" not in script.read_text(), script.name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_config_fits_the_scripts_world(script: Path) -> None:
    """The layout of the config a script runs divides its nodes x tasks per node."""
    opts = sbatch_options(script)
    world = int(opts["nodes"]) * int(opts["ntasks-per-node"])
    config = re.search(r"--config (configs/\S+\.yaml)", script.read_text()).group(1)
    overrides = re.findall(r"^\s+(parallel\.\w+=\S+|precision\.\w+=\S+)", script.read_text(), re.M)
    cfg = load_config(REPO / config, overrides)
    on_gpus = script.name != "pretrain_tiny.sh"
    cfg.validate(world, cuda_available=on_gpus, te_available=on_gpus)
    if not on_gpus:
        assert cfg.parallel.tensor == 2  # the TP=2 tiny run


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_outside_slurm_is_one_clear_line(script: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"{script.name}: not running under Slurm; submit it: sbatch slurm/{script.name}"
    )


def fake_slurm_bin(tmp_path: Path) -> Path:
    """srun that records its arguments, directory and environment; scontrol for hostnames."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nprintf "%s\\n" "$PWD" "$@" > "$SRUN_RECORD"\nenv > "$SRUN_RECORD.env"\n'
    )
    (bin_dir / "scontrol").write_text('#!/bin/bash\nprintf "gpu001\\ngpu002\\n"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def run_spool_copy(
    script: Path, tmp_path: Path, submit_dir: Path
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run a copy of `script` from a scratch directory as sbatch would: SLURM_* set,
    started in another directory, with srun and scontrol faked."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    copy = spool / "slurm_script"
    shutil.copyfile(script, copy)
    record = tmp_path / "srun.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FORGE_"))}
    env.update(
        PATH=f"{fake_slurm_bin(tmp_path)}:{env['PATH']}",
        SRUN_RECORD=str(record),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="test",
        SLURM_SUBMIT_DIR=str(submit_dir),
        SLURM_JOB_NODELIST="gpu[001-002]",
        SLURM_NNODES="2",
        SLURM_NTASKS="16",
        RUN_DIR=str(tmp_path / "run"),
    )
    proc = subprocess.run(
        ["bash", str(copy), "train.lr=1e-4"],
        cwd=spool, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return proc, record


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_spool_copy_runs_the_config_from_the_submit_dir(script: Path, tmp_path: Path) -> None:
    proc, record = run_spool_copy(script, tmp_path, REPO)
    assert proc.returncode == 0, proc.stderr
    cwd, python, *argv = record.read_text().splitlines()
    config = re.search(r"--config (configs/\S+\.yaml)", script.read_text()).group(1)
    assert cwd == str(REPO)
    assert argv[:4] == ["-m", "megatron_forge.train", "--config", config]
    assert argv[-1] == "train.lr=1e-4"  # overrides pass through, last
    env = dict(
        line.split("=", 1)
        for line in (tmp_path / "srun.txt.env").read_text().splitlines()
        if "=" in line
    )
    if script.name == "pretrain_tiny.sh":
        assert python in (".venv/bin/python", "python") and env["OMP_NUM_THREADS"] == "1"
        assert f"logging.dir={tmp_path / 'run'}" in argv
    else:
        assert python == "python"
        assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["NCCL_DEBUG"] == "WARN"
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu001", str(20000 + 4242))
        assert "job 4242 (restart 0): 2 nodes, 16 tasks, master gpu001:24242" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_submitted_from_elsewhere_is_one_clear_line(script: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc, record = run_spool_copy(script, tmp_path, elsewhere)
    assert proc.returncode == 2 and not record.exists()
    assert proc.stderr.strip() == (
        f"{script.name}: no {elsewhere}/slurm/common.sh; sbatch from the megatron-forge repo root"
    )
