"""slurm/*.sh without Slurm: the directives users rely on, the config each script runs
validates at the script's world size, and running a script outside Slurm is one clear line."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from megatron_forge.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("pretrain_*.sh"))


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
        assert "NCCL" in text and "CUDA_DEVICE_MAX_CONNECTIONS" in text


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
