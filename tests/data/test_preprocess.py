"""tools/preprocess_data.py: output matches the tokenizer for every input format and any
number of workers, errors are clear (exact messages), nothing is lost."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_forge.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"Document number {i}: Return the sum of x and {i * 7}.\n  Indented." for i in range(40)]
FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_input(path: Path, texts: list[str], fmt: str, rows_per_group: int = 7) -> Path:
    """``texts`` as one file of format ``fmt`` (parquet: several row groups)."""
    if fmt == "parquet":
        table = pa.table({"id": list(range(len(texts))), "text": texts})
        pq.write_table(table, path, row_group_size=rows_per_group)
        return path
    data = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    if fmt == "jsonl.gz":
        data = gzip.compress(data, mtime=0)
    elif fmt == "jsonl.zst":  # two frames, as zstd's multi-threaded or concatenated files
        half = len(data) // 2
        data = b"".join(zstandard.ZstdCompressor().compress(p) for p in (data[:half], data[half:]))
    path.write_bytes(data)
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


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(
    fmt: str, preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path
) -> None:
    """Documents read back through megatron-core equal the tokenizer's encoding + EOD."""
    texts = [*TEXTS[:20], "", "  \n", *TEXTS[20:]]  # empty documents are skipped
    path = write_input(tmp_path / f"in.{fmt}", texts, fmt)
    prefix = tmp_path / "out"
    args = ["--input", str(path), "--output-prefix", str(prefix), "--tokenizer", str(spm_model)]
    assert preprocess_tool.main([*args, "--append-eod", "--lines-per-chunk", "6"]) == 0
    tok = load_tokenizer(spm_model)
    assert read_documents(tmp_path / "out_text_document") == [
        tok.tokenize(t) + [tok.eod] for t in TEXTS
    ]


def write_mixed_corpus(corpus: Path, out_dir: Path) -> list[str]:
    """The tiny corpus split over one file of each format; returns the texts in input order."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    out_dir.mkdir()
    parts = np.array_split(np.arange(len(texts)), len(FORMATS))
    for i, (fmt, part) in enumerate(zip(FORMATS, parts)):
        write_input(out_dir / f"{i}.{fmt}", [texts[j] for j in part], fmt, rows_per_group=100)
    return texts


@pytest.mark.parametrize("tokenizer_fixture", ["spm_model", "hf_tokenizer_json"])
def test_workers_1_and_2_byte_identical(
    tokenizer_fixture: str,
    request: pytest.FixtureRequest,
    preprocess_tool: ModuleType,
    tiny_corpus: Path,
    tmp_path: Path,
) -> None:
    """A directory of jsonl, gz, zst and parquet: 1 or 2 workers write the same bytes, and the
    documents equal the tokenizer's one-by-one encoding (batch encoding changes nothing)."""
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    texts = write_mixed_corpus(tiny_corpus, tmp_path / "in")
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        args = ["--input", str(tmp_path / "in"), "--output-prefix", str(prefix)]
        args += ["--tokenizer", str(tokenizer), "--append-eod", "--workers", str(workers)]
        assert preprocess_tool.main([*args, "--lines-per-chunk", "50"]) == 0
        outputs[workers] = [Path(f"{prefix}_text_document{ext}") for ext in (".bin", ".idx")]
    for one, two in zip(outputs[1], outputs[2]):
        assert one.read_bytes() == two.read_bytes(), one.name
    tok = load_tokenizer(tokenizer)
    docs = read_documents(tmp_path / "w2_text_document")
    assert docs == [tok.tokenize(t) + [tok.eod] for t in texts if t.strip()]


def test_progress_and_summary(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", records(TEXTS))
    args = ["--input", str(data), "--output-prefix", str(tmp_path / "c")]
    args += ["--tokenizer", str(spm_model), "--log-interval", "0", "--lines-per-chunk", "10"]
    assert preprocess_tool.main(args) == 0
    captured = capsys.readouterr()
    progress = captured.err.splitlines()
    assert len(progress) == 4 and all("docs/s" in p and "tokens/s" in p for p in progress)
    num_tokens = sum(len(d) for d in read_documents(tmp_path / "c_text_document"))
    assert f"{len(TEXTS)} docs, {num_tokens} tokens" in captured.out
    assert f"c_text_document.bin/.idx: {len(TEXTS)} documents, {num_tokens} tokens" in captured.out


def run_main(tool: ModuleType, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = tool.main(list(args))
    return code, capsys.readouterr().err.strip()


def test_bad_jsonl_records_exact_messages(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cases = {
        '{"text": "unterminated': "invalid JSON (Unterminated string starting at: line 1 "
        "column 10 (char 9))",
        '["a", "list"]': "expected a JSON object, got list",
        '{"body": "x"}': "missing key 'text' (has ['body'])",
        '{"text": 7}': "'text' is int, expected a string",
        '{"text": null}': "'text' is NoneType, expected a string",
    }
    for i, (line, reason) in enumerate(cases.items()):
        data = write_jsonl(tmp_path / f"in{i}.jsonl", [records(TEXTS[:1])[0], "", line])
        out = tmp_path / f"c{i}"
        code, err = run_main(
            preprocess_tool,
            capsys,
            *("--input", str(data), "--output-prefix", str(out), "--tokenizer", str(spm_model)),
        )
        assert (code, err) == (1, f"error: {data}:3: {reason}")
        assert not list(tmp_path.glob(f"c{i}*"))  # nothing written


def test_bad_parquet_exact_messages(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tok_args = ["--tokenizer", str(spm_model), "--output-prefix", str(tmp_path / "c")]
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a b", None, "c", None]}), nulls)
    assert run_main(preprocess_tool, capsys, "--input", str(nulls), *tok_args) == (
        1,
        f"error: {nulls}:row 1: 'text' is null",
    )
    assert preprocess_tool.main(["--input", str(nulls), *tok_args, "--skip-bad-records"]) == 0
    assert "2 bad records skipped" in capsys.readouterr().out
    tok = load_tokenizer(spm_model)
    assert read_documents(tmp_path / "c_text_document") == [tok.tokenize("a b"), tok.tokenize("c")]
    tok_args.append("--overwrite")

    no_column = tmp_path / "no_column.parquet"
    pq.write_table(pa.table({"body": ["x"]}), no_column)
    assert run_main(preprocess_tool, capsys, "--input", str(no_column), *tok_args) == (
        1,
        f"error: {no_column}: missing column 'text' (has ['body'])",
    )
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    assert run_main(preprocess_tool, capsys, "--input", str(numbers), *tok_args) == (
        1,
        f"error: {numbers}: column 'text' is int64, expected strings",
    )


def test_unreadable_inputs_exact_messages(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tok_args = ["--tokenizer", str(spm_model), "--output-prefix", str(tmp_path / "out" / "c")]
    truncated = write_input(tmp_path / "t.jsonl.zst", TEXTS * 20, "jsonl.zst")
    truncated.write_bytes(truncated.read_bytes()[:-40])
    code, err = run_main(preprocess_tool, capsys, "--input", str(truncated), *tok_args)
    assert (code, err) == (
        1,
        f"error: {truncated}: cannot decompress or read: the zstd frame is truncated",
    )
    not_gzip = tmp_path / "fake.jsonl.gz"
    not_gzip.write_text('{"text": "plain text, not gzip"}\n')
    assert run_main(preprocess_tool, capsys, "--input", str(not_gzip), *tok_args) == (
        1,
        f"error: {not_gzip}: cannot decompress or read: Not a gzipped file (b'{{\"')",
    )
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    assert run_main(preprocess_tool, capsys, "--input", str(csv), *tok_args) == (
        1,
        f"error: --input {csv}: unsupported file type; expected jsonl (.jsonl, .jsonl.gz, "
        ".jsonl.zst) or parquet (.parquet)",
    )
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert run_main(preprocess_tool, capsys, "--input", str(empty_dir), *tok_args) == (
        1,
        f"error: --input {empty_dir}: no such file, and no jsonl (.jsonl, .jsonl.gz, "
        ".jsonl.zst) or parquet (.parquet) files in a directory or glob of that name",
    )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_append_eod_needs_an_eos_token(
    preprocess_tool: ModuleType,
    hf_tokenizer_json: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copyfile(hf_tokenizer_json, tok_dir / "tokenizer.json")
    (tok_dir / "tokenizer_config.json").write_text("{}")
    data = write_jsonl(tmp_path / "in.jsonl", records(TEXTS[:2]))
    code, err = run_main(
        preprocess_tool,
        capsys,
        *("--input", str(data), "--output-prefix", str(tmp_path / "c")),
        *("--tokenizer", str(tok_dir), "--append-eod"),
    )
    assert code == 1
    assert err == (
        f"error: --append-eod: tokenizer {tok_dir} has no EOS token to end documents with; use a "
        "tokenizer with one (SentencePiece: eos_id, Hugging Face: eos_token in "
        "tokenizer_config.json)"
    )


def test_empty_input_is_an_error_and_writes_nothing(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No records, only blank documents, or only bad ones: an error naming the input, no
    partial files, and an existing dataset kept even with --overwrite."""
    out = tmp_path / "out" / "c"
    tok_args = ["--tokenizer", str(spm_model), "--output-prefix", str(out), "--append-eod"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_main(preprocess_tool, capsys, "--input", str(empty), *tok_args) == (
        1,
        f"error: --input {empty}: no records (the files are empty); {out}_text_document.bin/.idx "
        "not written (existing files are kept)",
    )
    blank = write_jsonl(tmp_path / "blank.jsonl", records(["", "  \n ", "\t"]) + [""])
    assert run_main(preprocess_tool, capsys, "--input", str(blank), *tok_args) == (
        1,
        f"error: --input {blank}: no documents under key 'text', only 3 empty or "
        f"whitespace-only; {out}_text_document.bin/.idx not written (existing files are kept)",
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", ["not json", records([" "])[0]])
    code, err = run_main(
        preprocess_tool, capsys, "--input", str(bad), *tok_args, "--skip-bad-records"
    )
    assert (code, err.splitlines()[-1]) == (
        1,
        f"error: --input {bad}: no documents under key 'text', only 1 empty or whitespace-only "
        f"and 1 bad records skipped; {out}_text_document.bin/.idx not written (existing files "
        "are kept)",
    )
    empty_parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty_parquet)
    code, err = run_main(preprocess_tool, capsys, "--input", str(empty_parquet), *tok_args)
    assert (code, err.split(";")[0]) == (
        1,
        f"error: --input {empty_parquet}: no records (the files are empty)",
    )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    good = write_jsonl(tmp_path / "good.jsonl", records(TEXTS[:3]))
    assert preprocess_tool.main(["--input", str(good), *tok_args]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert (
        run_main(preprocess_tool, capsys, "--input", str(blank), *tok_args, "--overwrite")[0] == 1
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_several_keys_one_empty(
    preprocess_tool: ModuleType, spm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = [json.dumps({"text": t, "title": ""}) for t in TEXTS[:3]]
    data = write_jsonl(tmp_path / "in.jsonl", lines)
    prefix = tmp_path / "c"
    code, err = run_main(
        preprocess_tool,
        capsys,
        *("--input", str(data), "--output-prefix", str(prefix), "--tokenizer", str(spm_model)),
        *("--json-keys", "text", "title"),
    )
    assert (code, err) == (
        1,
        f"error: --input {data}: no documents under key 'title', only 3 empty or "
        f"whitespace-only; {prefix}_title_document.bin/.idx not written (existing files are "
        "kept)",
    )
    assert list(tmp_path.iterdir()) == [data]  # not the text dataset either


def small_spans(tool: ModuleType, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    """Chunks of about `chunk_bytes`, so that 2 workers cut a tiny file into many spans."""
    monkeypatch.setattr(tool, "FAST_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(tool, "MAX_CHUNK_BYTES", chunk_bytes)


def test_spans_of_many_workers_write_the_same_bytes(
    preprocess_tool: ModuleType,
    spm_nfkc_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2 workers reading their own spans of two jsonl files (many spans each, two keys, blank
    documents) write the bytes that 1 worker writes, and no part file is left."""
    texts = [*TEXTS, "", " \t", "é ｆｕｌｌ ＡＢＣ\x85", *TEXTS[:7]]
    for name, part in (("a", texts[:30]), ("b", texts[30:])):
        lines = [json.dumps({"text": t, "title": t[-9:]}) for t in part]
        write_jsonl(tmp_path / f"{name}.jsonl", lines)
    small_spans(preprocess_tool, monkeypatch, 300)
    args = ["--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(spm_nfkc_model)]
    args += ["--append-eod", "--json-keys", "text", "title"]
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / "out" / f"w{workers}"
        assert (
            preprocess_tool.main([*args, "--output-prefix", str(prefix), "--workers", str(workers)])
            == 0
        )
        outputs[workers] = [
            Path(f"{prefix}_{key}_document{ext}").read_bytes()
            for key in ("text", "title")
            for ext in (".bin", ".idx")
        ]
    assert outputs[2] == outputs[1]
    assert len(list((tmp_path / "out").iterdir())) == 8  # 2 runs x 2 keys x .bin/.idx
    files = sorted(tmp_path.glob("*.jsonl"))
    plan = preprocess_tool.Outputs(str(tmp_path / "p"), ["text"], np.uint16)
    tasks = list(preprocess_tool.plan_tasks(files, plan, 2, 1 << 40, 300, True))
    assert len(tasks) >= 5 and all(isinstance(t, preprocess_tool.Span) for t in tasks)
    tok = load_tokenizer(spm_nfkc_model)
    assert read_documents(tmp_path / "out" / "w2_text_document") == [
        tok.tokenize(t) + [tok.eod] for t in texts if t.strip()
    ]


def test_bad_records_in_later_spans_name_their_file_line(
    preprocess_tool: ModuleType,
    spm_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """With 2 workers, a bad record read by a worker from the middle of a file is reported
    at its line in the file (not in the worker's span); skipped ones are printed in order
    and counted, and a stopped run leaves no part files."""
    lines = records(TEXTS)
    for line in (12, 31, 33):  # 1-based, in order: each lands on its line
        lines.insert(line - 1, '{"text": "unterminated')
    data = write_jsonl(tmp_path / "in.jsonl", lines)
    small_spans(preprocess_tool, monkeypatch, 200)
    out = tmp_path / "out" / "c"
    args = ["--input", str(data), "--output-prefix", str(out), "--tokenizer", str(spm_model)]
    args += ["--workers", "2"]
    code, err = run_main(preprocess_tool, capsys, *args)
    assert code == 1 and err.startswith(f"error: {data}:12: invalid JSON"), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    assert preprocess_tool.main([*args, "--skip-bad-records"]) == 0
    captured = capsys.readouterr()
    skipped = [line.split(": invalid")[0] for line in captured.err.splitlines()]
    assert skipped == [f"skipped {data}:{n}" for n in (12, 31, 33)]
    assert "3 bad records skipped" in captured.out
    tok = load_tokenizer(spm_model)
    assert read_documents(tmp_path / "out" / "c_text_document") == [tok.tokenize(t) for t in TEXTS]
