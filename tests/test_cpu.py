"""The CPU emulation of megatron-core's CUDA assumptions (megatron_forge/cpu.py).

``install()`` changes torch process-wide, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from megatron_forge import cpu

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    script = "import warnings; warnings.simplefilter('ignore')\n" + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_cuda_devices_and_type_names_map_to_cpu() -> None:
    out = _run("""
        import torch
        from megatron_forge import cpu
        cpu.install(); cpu.install()  # idempotent
        assert cpu.is_installed()
        assert torch.empty(3, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).to("cuda:0").device.type == "cpu"
        assert torch.ones(2).to(torch.float64).dtype == torch.float64  # dtype moves untouched
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        torch.cuda.synchronize()
        print("ok")
    """)
    assert out.strip() == "ok"


def test_rng_tracker_forks_like_cuda() -> None:
    """Inside fork() the tensor-parallel RNG stream is used and the default stream is left
    where it was, as with CUDA generators."""
    out = _run("""
        import torch
        from megatron_forge import cpu
        cpu.install()
        from megatron.core.tensor_parallel import random as mrandom
        torch.manual_seed(7)
        mrandom.get_cuda_rng_tracker().add("model-parallel-rng", 1234)
        before = torch.get_rng_state()
        with mrandom.get_cuda_rng_tracker().fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before)
        with mrandom.get_cuda_rng_tracker().fork():
            b = torch.rand(4)
        assert not torch.equal(a, b)  # the forked stream advanced
        outside = torch.rand(4)
        torch.manual_seed(1234)
        assert torch.equal(torch.rand(4), a)  # fork() used the seed it was added with
        print("ok")
    """)
    assert out.strip() == "ok"


def test_streams_events_and_moe_patches() -> None:
    out = _run("""
        import torch
        from megatron_forge import cpu
        cpu.install()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        e = torch.cuda.Event(enable_timing=True); e.record(); e.synchronize()
        with torch.cuda.stream(s):
            pass
        import megatron.core.transformer.moe.moe_utils as mu
        import megatron.core.transformer.moe.token_dispatcher as td
        assert mu.te_general_gemm is None
        sizes = td.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
        assert sizes.tolist() == [1, 2] and type(sizes).__module__ == "numpy"
        print("ok")
    """)
    assert out.strip() == "ok"


def test_refuses_unsupported_megatron_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    monkeypatch.delenv("FORGE_CPU_EMULATION_ANY_VERSION", raising=False)
    with pytest.raises(
        RuntimeError,
        match=r"emulates megatron-core >=0.16.1,<0.17 on CPU, but "
        r"megatron-core 0.17.0 is installed\. Install 'megatron-core>=0.16.1,<0.17'",
    ):
        cpu.check_mcore_version()
    for version in ("0.16.0", "0.15.3"):
        monkeypatch.setattr(megatron.core, "__version__", version)
        with pytest.raises(RuntimeError, match=f"megatron-core {version} is installed"):
            cpu.check_mcore_version()
    for version in ("0.16.1", "0.16.5", "0.16.2rc0"):
        monkeypatch.setattr(megatron.core, "__version__", version)
        assert cpu.check_mcore_version() == version
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    monkeypatch.setenv("FORGE_CPU_EMULATION_ANY_VERSION", "1")
    assert cpu.check_mcore_version() == "0.17.0"


def test_supported_version_is_the_installed_one() -> None:
    cpu.check_mcore_version()


def test_pyproject_pins_the_supported_versions() -> None:
    """pyproject.toml installs exactly the megatron-core versions the emulation supports."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("megatron-core")]
    assert pins == [f"megatron-core{cpu.SUPPORTED_MCORE}"]


def test_install_refuses_a_process_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """install() is for machines without CUDA: with a GPU visible it raises before patching
    anything (distributed.initialize calls it only without CUDA)."""
    import torch

    monkeypatch.setattr(cpu, "_installed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.cuda.current_device
    with pytest.raises(RuntimeError, match="process that sees CUDA.*CUDA_VISIBLE_DEVICES="):
        cpu.install()
    assert not cpu.is_installed() and torch.cuda.current_device is before
