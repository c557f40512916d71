"""tools/bench_mfu.py: its errors, and the GPU measurement (BF16 and, with Transformer Engine,
FP8) where a GPU is present. Its CPU run (both attention backends, the JSON, FP8 skipped
without Transformer Engine) is checked through tools/gpu_check.py --cpu in
test_gpu_check.py."""

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
