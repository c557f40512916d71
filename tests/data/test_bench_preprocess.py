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
    assert {r["tokenizer"] for r in runs} == {"given"}
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
        assert sum(line.startswith(f"given     {label} ") for line in table.splitlines()) == 2
    assert re.search(
        r"^given, 1 worker\(s\): ours [\d.]+ MB/s, [\d.]+x Megatron-LM-style "
        r"\([\d.]+x in CPU time\)",
        table,
        re.M,
    )

    # The reference output is the tokenizer's own encoding plus EOD, document by document.
    tok = load_tokenizer(spm_model)
    corpus = tmp_path / "work" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    idx = tmp_path / "work" / "out" / "given_ours_w1_text_document"
    bin_tokens = np.fromfile(f"{idx}.bin", dtype=np.uint16)
    expected = [t for text in texts for t in tok.tokenize(text) + [tok.eod]]
    assert bin_tokens.tolist() == expected


@pytest.mark.slow
def test_bench_trains_nfkc_sentencepiece_and_byte_level_bpe(tmp_path: Path) -> None:
    """The two kinds the fast path was missing, trained in the benchmark: ours is
    token-identical to the Megatron-LM-style run, on gigatoken."""
    pytest.importorskip("gigatoken")
    results = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "tools/bench_preprocess.py"), "--size-mb", "0.3"]
    cmd += ["--tokenizers", "spm-nfkc", "bpe", "--vocab-size", "384", "--bpe-vocab-size", "1024"]
    cmd += ["--bpe-extra-mb", "0", "--methods", "megatron", "ours", "--workers", "2"]
    cmd += ["--work-dir", str(tmp_path / "work"), "--json", str(results)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    runs = {(r["tokenizer"], r["method"]): r for r in json.loads(results.read_text())}
    assert set(runs) == {(k, m) for k in ("spm-nfkc", "bpe") for m in ("megatron", "ours")}
    for kind in ("spm-nfkc", "bpe"):
        assert runs[(kind, "megatron")]["check"] == "identical"
        assert runs[(kind, "ours")]["speedup"] > 0
    assert "spm-nfkc (sentencepiece, 384 entries, nmt_nfkc)" in result.stdout
    assert "bpe (huggingface, 1024 entries)" in result.stdout
    for kind in ("spm-nfkc", "bpe"):  # ours ran on gigatoken
        log = (tmp_path / "work" / "out" / f"{kind}_ours_w2.log").read_text()
        assert "tokenized with gigatoken" in log
