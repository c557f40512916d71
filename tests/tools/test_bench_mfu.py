"""tools/bench_mfu.py: a CPU smoke run of the real benchmark path, and the GPU measurement
(BF16 and, with Transformer Engine, FP8) where a GPU is present."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

BENCH = [sys.executable, str(REPO / "tools/bench_mfu.py")]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BENCH, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_cpu_smoke(tmp_path) -> None:
    """Synthetic tokens only: the corpus and tokenizer configs/tiny.yaml names are pointed
    at paths that do not exist, so the run needs nothing from data/."""
    absent = tmp_path / "absent"
    proc = _run(
        "--config",
        "configs/tiny.yaml",
        "--precisions",
        "fp32,fp8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--log-dir",
        str(tmp_path),
        "model.vocab_size=2048",
        f"data.blend=[{absent}/corpus_text_document]",
        f"data.tokenizer={absent}/tokenizer.model",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("precision"))
    row = lines[header + 1].split("|")
    assert row[0].strip() == "fp32" and float(row[2]) > 0  # tokens/s/GPU
    assert row[4].strip() == "n/a"  # no MFU on CPU
    assert "skipped: fp8 (needs CUDA + Transformer Engine)" in proc.stdout
    assert "spec: local" in lines[header - 1]


def test_needs_vocab_size(tmp_path) -> None:
    proc = _run("--config", "configs/tiny.yaml", "--precisions", "fp32", "--log-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "bench_mfu needs model.vocab_size" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_llama3_2_1b_bf16_and_fp8(tmp_path) -> None:
    proc = _run(
        "--config",
        "configs/llama3_2_1b.yaml",
        "--steps",
        "10",
        "--warmup",
        "3",
        "--log-dir",
        str(tmp_path),
        "train.micro_batch_size=1",
        "parallel.overlap_grad_reduce=false",
        "parallel.overlap_param_gather=false",
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert "bf16 |" in proc.stdout
