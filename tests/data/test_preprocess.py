"""tools/preprocess_data.py: output matches the tokenizer, errors are clear, nothing is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_forge.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"Document number {i}: Return the sum of x and {i * 7}.\n  Indented." for i in range(40)]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def records(texts: list[str]) -> list[str]:
    return [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools/preprocess_data.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def read_documents(prefix: Path) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_subprocess_output_equals_tokenizer_plus_eod(spm_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", records(TEXTS))
    out = tmp_path / "out" / "corpus"
    result = run_tool(
        *("--input", str(data), "--output-prefix", str(out), "--tokenizer", str(spm_model)),
        *("--append-eod", "--workers", "2", "--lines-per-chunk", "3"),  # many chunks, in order
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(TEXTS)} documents" in result.stdout
    tok = load_tokenizer(spm_model)
    prefix = tmp_path / "out" / "corpus_text_document"
    assert read_documents(prefix) == [tok.tokenize(t) + [tok.eod] for t in TEXTS]
    assert IndexedDataset(str(prefix)).index.dtype == np.uint16
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corpus_text_document.bin",
        "corpus_text_document.idx",
    ]


def test_bad_json_names_file_and_line(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = records(TEXTS[:3])
    lines.insert(2, '{"text": "unterminated')
    data = write_jsonl(tmp_path / "in.jsonl", lines)
    args = [
        "--input",
        str(data),
        "--output-prefix",
        str(tmp_path / "c"),
        "--tokenizer",
        str(spm_model),
    ]
    assert preprocess_tool.main(args) == 1
    assert f"error: {data}:3: invalid JSON" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [data]  # no partial outputs left behind


def test_missing_key_and_skip_bad_records(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = records(TEXTS[:4])
    lines[1] = json.dumps({"body": "no text key"})
    lines[3] = "not json"
    data = write_jsonl(tmp_path / "in.jsonl", lines)
    args = [
        "--input",
        str(data),
        "--output-prefix",
        str(tmp_path / "c"),
        "--tokenizer",
        str(spm_model),
    ]
    assert preprocess_tool.main(args) == 1
    assert f"{data}:2: missing key 'text'" in capsys.readouterr().err

    assert preprocess_tool.main([*args, "--skip-bad-records"]) == 0
    captured = capsys.readouterr()
    assert "2 bad records skipped" in captured.out
    assert f"{data}:4: invalid JSON" in captured.err
    tok = load_tokenizer(spm_model)
    expected = [tok.tokenize(TEXTS[0]), tok.tokenize(TEXTS[2])]  # no --append-eod
    assert read_documents(tmp_path / "c_text_document") == expected


def test_empty_documents_and_blank_lines(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_jsonl(tmp_path / "in.jsonl", records(["first", "", "  \n ", "last"]) + [""])
    args = ["--input", str(tmp_path), "--output-prefix", str(tmp_path / "c")]  # a directory
    assert preprocess_tool.main([*args, "--tokenizer", str(spm_model), "--append-eod"]) == 0
    summary = capsys.readouterr().out
    assert "2 documents" in summary and "2 empty documents skipped" in summary
    assert "0 bad records" in summary  # the blank line is not a record
    tok = load_tokenizer(spm_model)
    docs = read_documents(tmp_path / "c_text_document")
    assert docs == [tok.tokenize("first") + [tok.eod], tok.tokenize("last") + [tok.eod]]


def test_refuses_to_overwrite(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", records(TEXTS[:2]))
    args = [
        "--input",
        str(data),
        "--output-prefix",
        str(tmp_path / "c"),
        "--tokenizer",
        str(spm_model),
    ]
    assert preprocess_tool.main(args) == 0
    bin_file = tmp_path / "c_text_document.bin"
    before = bin_file.read_bytes()
    write_jsonl(data, records(TEXTS[2:5]))
    assert preprocess_tool.main(args) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert bin_file.read_bytes() == before
    assert preprocess_tool.main([*args, "--overwrite"]) == 0
    assert len(read_documents(tmp_path / "c_text_document")) == 3


def test_glob_of_files_and_several_keys(
    preprocess_tool: ModuleType, hf_tokenizer_json: Path, tmp_path: Path
) -> None:
    for shard, texts in (("a", TEXTS[:3]), ("b", TEXTS[3:5])):
        lines = [json.dumps({"text": t, "title": t[:12]}) for t in texts]
        write_jsonl(tmp_path / f"{shard}.jsonl", lines)
    prefix = tmp_path / "out" / "web"
    args = ["--input", str(tmp_path / "*.jsonl"), "--output-prefix", str(prefix)]
    args += ["--tokenizer", str(hf_tokenizer_json), "--json-keys", "text", "title"]
    assert preprocess_tool.main(args) == 0
    tok = load_tokenizer(hf_tokenizer_json)
    assert read_documents(tmp_path / "out" / "web_text_document") == [
        tok.tokenize(t) for t in TEXTS[:5]
    ]
    assert read_documents(tmp_path / "out" / "web_title_document") == [
        tok.tokenize(t[:12]) for t in TEXTS[:5]
    ]
