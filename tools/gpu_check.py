"""One prepared check of a single-GPU machine without internet access: install what is
missing from carried wheels, run the ``gpu``-marked tests, measure MFU, write one JSON.

    python tools/gpu_check.py                      # H100/H200, torch with CUDA, no TE
    python tools/gpu_check.py --cpu                # the same path on CPU with configs/tiny.yaml

The machine has Python and torch with CUDA and nothing else of ours (no Transformer Engine,
no megatron-core). This script uses the standard library only, so it runs before any
install, and drives everything else in child processes:

1. install: each module the training path imports that is missing here is installed,
   with ``pip install --no-index --no-deps``, from the wheels in ``--wheels`` (default
   gpu_wheels/, an ignored folder; docs/gpu.md says how to download them). The package
   itself is not installed: the children run from the checkout (``PYTHONPATH``).
2. the ``gpu``-marked tests (``pytest -m gpu`` over the test files that have the mark).
3. tools/bench_mfu.py: a ~1B Llama (configs/llama3_2_1b.yaml at seq 4096, BF16, micro
   batch 1, global batch 8) with ``sdpa`` attention and with ``local``, warmup then a timed
   window, in one process (``--cpu``: configs/tiny.yaml in fp32, 1 + 2 steps).

Each part has its own time box (``--budget-s`` in all, default 480 s), so the check ends
within it whatever hangs; the JSON (``--out``) has tokens/s, TFLOP/s, MFU and peak memory
per run, the tests' summary, what was installed, and the time each part took. Exit status:
0 when every part passed, 1 otherwise, 2 for bad arguments or a missing wheel.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

REQUIREMENTS = {
    # module imported -> the distribution whose wheel provides it
    "megatron.core": "megatron-core",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "packaging": "packaging",
    "einops": "einops",
    "tqdm": "tqdm",
    "psutil": "psutil",
    "pytest": "pytest",
    "pluggy": "pluggy",
    "iniconfig": "iniconfig",
    "pygments": "pygments",
    # megatron_forge.data.tokenizer imports both, synthetic data or not
    "sentencepiece": "sentencepiece",
    "tokenizers": "tokenizers",
}
"""What the training path (megatron-core's model, DDP, optimizer, schedules, mock data)
and pytest import beyond torch and the standard library. torch's own wheel brings
typing-extensions, sympy, networkx, jinja2, filelock and fsspec."""

GPU_BENCH = {
    "config": "configs/llama3_2_1b.yaml",
    "precisions": "bf16",
    "warmup": 3,
    "steps": 10,
    "global_batch_size": 8,
    "overrides": [
        "model.seq_length=4096",
        "train.micro_batch_size=1",
        # one GPU: nothing to overlap with
        "parallel.overlap_grad_reduce=false",
        "parallel.overlap_param_gather=false",
    ],
}
CPU_BENCH = {
    "config": "configs/tiny.yaml",
    "precisions": "fp32,fp8",  # fp8 is reported as skipped (no Transformer Engine)
    "warmup": 1,
    "steps": 2,
    "global_batch_size": 4,
    "overrides": [
        "model.vocab_size=2048",
        "model.num_layers=2",
        "train.micro_batch_size=2",
        # synthetic tokens: the corpus and tokenizer tiny.yaml names are never read
        "data.blend=[absent/corpus_text_document]",
        "data.tokenizer=absent/tokenizer.model",
    ],
}
BACKENDS = "sdpa,local"


def child_env() -> dict[str, str]:
    """The children import megatron_forge and tests from the checkout."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
        "PYTHONWARNINGS": "ignore",
    }


def run(cmd: list[str], timeout: float) -> dict:
    """A child process, time-boxed: its exit status, seconds and output tail."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=max(timeout, 1),
        )
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        out = (_text(err.stdout) + _text(err.stderr)) + f"\n[timed out after {timeout:.0f} s]"
    return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "output_tail": out[-4000:]}


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def missing_requirements() -> list[str]:
    missing = []
    for module, dist in REQUIREMENTS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        if not found:
            missing.append(dist)
    return missing


def install(wheels: Path, timeout: float) -> dict:
    """Install the missing requirements from the carried wheels, offline."""
    missing = missing_requirements()
    result: dict = {"missing": missing, "wheels": str(wheels)}
    if not missing:
        return {**result, "rc": 0, "seconds": 0.0}
    if not wheels.is_dir():
        raise SystemExit(
            f"gpu_check: {', '.join(missing)} not installed and --wheels {wheels} does not "
            "exist; download the wheels as docs/gpu.md says (pip download ... -d gpu_wheels)"
        )
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps"]
    cmd += ["--find-links", str(wheels), *missing]
    result.update(run(cmd, timeout))
    result["still_missing"] = missing_requirements()
    return result


def gpu_test_files() -> list[str]:
    """The test files with a ``gpu`` mark (collecting only those keeps pytest quick)."""
    found = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if "mark.gpu" in path.read_text(errors="replace"):
            found.append(str(path.relative_to(REPO)))
    return found


def run_gpu_tests(timeout: float) -> dict:
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    result = {"files": files, **run(cmd, timeout)}
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|deselected).*?)\s*=*$",
                         result["output_tail"], re.M)  # fmt: skip
    result["summary"] = summary[-1] if summary else None
    result["passed"] = result["rc"] in (0, 5)  # 5: every gpu test deselected or none
    return result


def run_bench(bench: dict, out_json: Path, log_dir: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(REPO / "tools/bench_mfu.py"), "--config", bench["config"]]
    cmd += ["--precisions", bench["precisions"], "--attention-backend", BACKENDS]
    cmd += ["--warmup", str(bench["warmup"]), "--steps", str(bench["steps"])]
    cmd += ["--global-batch-size", str(bench["global_batch_size"])]
    cmd += ["--json", str(out_json), "--log-dir", str(log_dir), *bench["overrides"]]
    result = {"command": " ".join(cmd[1:]), **run(cmd, timeout)}
    if result["rc"] == 0 and out_json.is_file():
        result.update(json.loads(out_json.read_text()))
    return result


def compare(runs: dict) -> dict:
    """sdpa against local in the same run: tokens/s ratio, and whether sdpa reached 40%
    MFU (the goal on H100/H200)."""
    by_backend = {r["attention_backend"]: r for r in runs.values()}
    out: dict = {}
    if "sdpa" in by_backend and "local" in by_backend:
        sdpa, local = by_backend["sdpa"], by_backend["local"]
        out["sdpa_over_local_tokens_per_s"] = sdpa["tokens_per_s"] / local["tokens_per_s"]
        if sdpa.get("mfu") is not None:
            out["sdpa_mfu_at_least_40_percent"] = sdpa["mfu"] >= 0.40
    return out


def environment() -> dict:
    import torch  # torch is on the machine before anything is installed

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "cuda_available": cuda,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny config on CPU (the suite's check)")
    parser.add_argument("--wheels", default=str(REPO / "gpu_wheels"), help="wheel folder")
    parser.add_argument("--out", default=str(REPO / "runs/gpu_check/gpu_check.json"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="for all parts together")
    args = parser.parse_args(argv)

    if args.cpu:  # the children too, on a machine that has a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    start = time.monotonic()
    deadline = start + args.budget_s
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    if not args.cpu and not env["cuda_available"]:
        print("gpu_check: no CUDA device here; run with --cpu for the CPU check", file=sys.stderr)
        return 2
    report: dict = {"mode": "cpu" if args.cpu else "gpu", "environment": env}

    def left(share: float) -> float:
        """This part's time box: ``share`` of what is left of the budget."""
        return max(1.0, share * (deadline - time.monotonic()))

    try:
        report["install"] = install(Path(args.wheels), left(0.15))
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    report["gpu_tests"] = run_gpu_tests(left(0.35))
    bench = CPU_BENCH if args.cpu else GPU_BENCH
    report["bench"] = run_bench(
        bench, out.with_suffix(".bench.json"), out.parent / "bench", left(1.0)
    )
    report["comparison"] = compare(report["bench"].get("runs", {}))
    report["seconds"] = round(time.monotonic() - start, 1)
    passed = {
        "install": report["install"].get("rc") == 0,
        "gpu_tests": report["gpu_tests"]["passed"],
        "bench": report["bench"]["rc"] == 0,
    }
    ok = all(passed.values())
    report["ok"] = ok
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: {'ok' if ok else 'FAILED'} in {report['seconds']} s; report: {out}")
    for name, r in report["bench"].get("runs", {}).items():
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        print(
            f"  {name}: {r['tokens_per_s']:.0f} tokens/s, {r['tflops_per_gpu']:.4g} TFLOP/s, "
            f"MFU {mfu}, peak {r['peak_mem_gb']:.2f} GB"
        )
    for part in (name for name, good in passed.items() if not good):
        print(f"--- {part} (exit {report[part].get('rc')}):\n{report[part].get('output_tail', '')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
