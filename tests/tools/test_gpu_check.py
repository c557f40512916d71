"""tools/gpu_check.py --cpu: the GPU check's whole path (install check, gpu-marked tests,
tools/bench_mfu.py with sdpa and local attention, one JSON) on CPU with configs/tiny.yaml."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_cpu_check_end_to_end(tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/gpu_check.py"), "--cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["mode"] == "cpu"
    assert report["install"]["missing"] == []  # this environment has every requirement
    tests = report["gpu_tests"]
    assert "tests/tools/test_bench_mfu.py" in tests["files"]
    assert "skipped" in tests["summary"]  # no CUDA: the gpu-marked tests skip, none fail
    bench = report["bench"]
    assert bench["seq_length"] == 128 and bench["device"] == "CPU"
    assert bench["skipped"] == ["fp8 (needs CUDA + Transformer Engine)"]
    runs = bench["runs"]
    assert {r["attention_backend"] for r in runs.values()} == {"sdpa", "local"}
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and run["tflops_per_gpu"] > 0 and run["peak_mem_gb"] > 0
        assert run["mfu"] is None  # no peak for a CPU
    assert report["comparison"]["sdpa_over_local_tokens_per_s"] > 0
    assert "spec: local, attention: sdpa, local" in bench["output_tail"]
    print(proc.stdout)


def test_refuses_gpu_mode_without_cuda(tmp_path, capsys) -> None:
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device here; run with --cpu" in capsys.readouterr().err
