"""tools/bench_preprocess.py on a tiny corpus: the table has every method and worker count, and
every output holds the same tokens as ours."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_forge.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_tiny_corpus(spm_model: Path, tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "tools/bench_preprocess.py"), "--size-mb", "1"]
    cmd += ["--tokenizer", str(spm_model), "--work-dir", str(tmp_path / "work")]
    cmd += ["--json", str(results)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    runs = json.loads(results.read_text())
    methods = {run["method"] for run in runs}
    # gigatoken when installed, else the tokenizers library's batch encoding in its place
    fast = "gigatoken" if "gigatoken" in methods else "hf-batch"
    assert methods == {"megatron", "ours", fast}
    assert sorted((r["method"], r["workers"]) for r in runs) == sorted(
        (m, w) for m in methods for w in (1, 2)
    )
    checks = {(r["method"], r["workers"]): r["check"] for r in runs}
    assert checks[("ours", 1)] == "reference"
    assert checks[("ours", 2)] == "identical"
    assert checks[("megatron", 1)] == checks[("megatron", 2)] == "identical"
    for workers in (1, 2):  # Rust paths may split literal special tokens differently
        assert re.fullmatch(r"identical|\d+ of \d+ documents differ", checks[(fast, workers)])

    tokens = {r["tokens"] for r in runs if r["check"] == "identical" or r["method"] == "ours"}
    assert len(tokens) == 1 and tokens.pop() > 100_000
    for run in runs:
        assert run["seconds"] > 0 and run["mb_per_s"] > 0 and run["tokens_per_s"] > 0
        assert run["peak_rss_mb"] > 10 and run["cpu_seconds"] > 0
        assert run["speedup"] > 0 and run["error"] == ""

    table = result.stdout
    assert "method" in table and "tokens/s" in table and "peak RSS MB" in table
    assert "vs Megatron-LM" in table
    for label in ("Megatron-LM-style", "ours"):
        assert sum(line.startswith(label) for line in table.splitlines()) == 2
    assert re.search(r"^1 worker\(s\): ours [\d.]+ MB/s, [\d.]+x Megatron-LM-style", table, re.M)

    # The reference output is the tokenizer's own encoding plus EOD, document by document.
    tok = load_tokenizer(spm_model)
    corpus = tmp_path / "work" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    idx = tmp_path / "work" / "out" / "ours_w1_text_document"
    bin_tokens = np.fromfile(f"{idx}.bin", dtype=np.uint16)
    expected = [t for text in texts for t in tok.tokenize(text) + [tok.eod]]
    assert bin_tokens.tolist() == expected
