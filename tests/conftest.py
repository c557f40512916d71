"""Fixtures shared by the suite: the sample data built by the real pipeline, and one helper
that runs the real entry point (``python -m megatron_forge.train``) in N gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Two tiers: `pytest -m "not slow"` (units, and component tests that run gloo ranks
# in-process: tests/multiprocess.py) for the inner loop, and the whole suite (CI). A test is
# end-to-end, so slow, when it is marked so or needs one of these fixtures: the sample
# corpus built by the real pipeline, checkpoints from real training runs, a real Slurm.
END_TO_END_FIXTURES = {
    "sample_data",
    "dense_ckpt",
    "qwen2_ckpt",
    "moe_ckpt",
    "local_slurm",
    "multinode_slurm",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/sample built by tools/make_sample_data.sh (the embedded default's pipeline)
    into a fresh directory, so tests never depend on what a developer has in data/."""
    out = tmp_path_factory.mktemp("sample")
    env = dict(os.environ, FORGE_VENV=str(Path(sys.executable).parents[1]))
    subprocess.run(["bash", str(REPO / "tools/make_sample_data.sh"), str(out)], check=True, env=env)
    return out


MOCK_TINY = [
    "data.format=mock",
    "data.tokenizer=null",
    "data.blend=[]",
    "model.vocab_size=2048",
    "model.num_layers=2",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
]
"""Overrides of configs/tiny.yaml for a run on synthetic tokens (no data files needed)."""


def data_overrides(data_dir: Path) -> list[str]:
    return [
        f"data.blend=[{data_dir / 'corpus_text_document'}]",
        f"data.tokenizer={data_dir / 'tokenizer.model'}",
    ]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def training_command(
    nprocs: int, config: str, overrides: list[str], run_dir: Path
) -> tuple[list[str], dict[str, str]]:
    """Command line and environment that run the training entry point on ``nprocs`` gloo
    ranks (torchrun when more than one)."""
    cmd = [sys.executable]
    if nprocs > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}"]
    cmd += ["-m", "megatron_forge.train", "--config", str(REPO / config)]
    # Checkpointing is opt-in per test: the configs point at runs/ in the checkout.
    cmd += ["checkpoint.load=null", "checkpoint.save=null", *overrides, f"logging.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1" if nprocs > 1 else "2", PYTHONWARNINGS="ignore")
    return cmd, env


def run_training(
    nprocs: int,
    config: str,
    overrides: list[str],
    run_dir: Path,
    timeout: int = 600,
) -> list[dict[str, Any]]:
    """Run the training entry point on ``nprocs`` gloo ranks and return the records of
    metrics.jsonl. Raises with the output tail when the run fails."""
    cmd, env = training_command(nprocs, config, overrides, run_dir)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return read_metrics(run_dir)


def run_worker(module: str, *args: str, timeout: int = 600) -> None:
    """``python -m <module> ARGS`` (a test worker that runs the real Trainer in its own
    process); raises with the output tail when it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="session")
def train_runner() -> Callable[..., list[dict[str, Any]]]:
    return run_training
