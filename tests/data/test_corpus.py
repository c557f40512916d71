"""megatron_forge.data.corpus: block-wise chunking and Arrow parsing give exactly what reading
line by line with json.loads gives; the preprocessing path never imports torch."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from megatron_forge.data import corpus
from megatron_forge.data.corpus import Chunk, chunk_records, iter_lines

REPO = Path(__file__).resolve().parents[2]


def line_by_line_chunks(path: Path, lines_per_chunk: int, max_bytes: int) -> list[tuple]:
    """The chunking rule, one line at a time: a chunk ends after `lines_per_chunk` lines or
    at the line that brings it to `max_bytes`."""
    chunks, lines, size, first = [], [], 0, 1
    for lineno, line in enumerate(iter_lines(path), 1):
        first = lineno if not lines else first
        lines.append(line)
        size += len(line)
        if len(lines) >= lines_per_chunk or size >= max_bytes:
            chunks.append((first, b"".join(lines)))
            lines, size = [], 0
    if lines:
        chunks.append((first, b"".join(lines)))
    return chunks


def test_block_chunking_equals_line_by_line(tmp_path: Path, monkeypatch) -> None:
    rng = random.Random(0)
    for trial in range(300):
        lines = [b"x" * rng.choice([0, 1, 5, 50, 300, 3000]) for _ in range(rng.randint(0, 40))]
        data = b"\n".join(lines) + (b"\n" if lines and rng.random() < 0.7 else b"")
        suffix = rng.choice([".jsonl", ".jsonl.gz"])
        path = tmp_path / f"{trial}{suffix}"
        path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
        lines_per_chunk = rng.choice([1, 2, 3, 7, 1024, 1 << 40])
        max_bytes = rng.choice([1, 10, 100, 1000, 8 << 20])
        block = rng.choice([1, 3, 64, 1 << 20])
        monkeypatch.setattr(corpus.iter_blocks, "__defaults__", (block,))
        got = list(corpus.iter_chunks([path], ["text"], lines_per_chunk, max_bytes))
        expected = line_by_line_chunks(path, lines_per_chunk, max_bytes)
        assert [(c.first, c.payload) for c in got] == expected, (trial, block)
        assert all(c.num_bytes == len(c.payload) for c in got)


CHUNKS = {
    "plain": ['{"text": "a"}', '{"text": "b\\u00e9\\ud83d\\ude00 \\n\\t", "n": [1, {"x": NaN}]}'],
    "crlf": ['{"text": "a"}\r', '{"text": "b"}\r'],
    "no final newline": ['{"text": "a"}', '{"text": "b"}'],
    "blank line": ['{"text": "a"}', "  ", '{"text": "b"}'],
    "two objects on a line": ['{"text": "a"} {"text": "b"}', '{"text": "c"}'],
    "repeated key": ['{"text": "a", "text": "b"}'],
    "lone surrogate": ['{"text": "\\ud800x"}'],
    "number": ['{"text": 5}'],
    "null": ['{"text": null}'],
    "missing key": ['{"id": 1}'],
    "not an object": ["[1, 2]"],
    "invalid": ['{"text": "a",}'],
    "raw control character": ['{"text": "a\tb"}'],
}


@pytest.mark.parametrize("name", sorted(CHUNKS))
def test_arrow_parsing_equals_json_loads(name: str) -> None:
    """The fast path (Arrow) and the line-by-line path read the same texts and report the
    same bad records; the fast path steps aside wherever it would differ."""
    lines = CHUNKS[name]
    end = "" if name == "no final newline" else "\n"
    chunk = Chunk("f.jsonl", 1, ("\n".join(lines) + end).encode(), 0)
    texts, bad = chunk_records(chunk, ["text"])
    expected, expected_bad = [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            expected.append(corpus.read_texts("f.jsonl", lineno, line.encode(), ["text"])["text"])
        except corpus.BadRecordError as e:
            expected_bad.append(str(e))
    assert (texts["text"], bad) == (expected, expected_bad)
    fast = corpus._jsonl_texts_arrow(chunk.payload, ["text"])
    assert fast is None or (fast["text"].to_pylist() == expected and not expected_bad)
    arrow_texts, arrow_bad = chunk_records(chunk, ["text"], arrow=True)
    assert (list(arrow_texts["text"]) if fast is None else arrow_texts["text"].to_pylist()) == (
        expected
    ) and arrow_bad == expected_bad
    if name in ("plain", "crlf", "no final newline"):
        assert fast is not None  # the common case does take the fast path


def test_preprocessing_imports_no_torch(spm_model: Path) -> None:
    """The tokenizer loader and preprocess_data.py stay light (no megatron.core, no torch),
    and the tokenizer is still a megatron-core MegatronTokenizerBase once that is imported."""
    code = f"""
import runpy, sys
runpy.run_path({str(REPO / "tools/preprocess_data.py")!r}, run_name="preprocess_data")
from megatron_forge.data.tokenizer import load_tokenizer
tok = load_tokenizer({str(spm_model)!r})
assert "torch" not in sys.modules and "megatron.core" not in sys.modules, "heavy import"
from megatron.core.datasets.indexed_dataset import DType
from megatron.core.tokenizers import MegatronTokenizerBase
from megatron_forge.data.indexed import optimal_dtype
assert isinstance(tok, MegatronTokenizerBase)
for size in (None, 100, 65499, 65500, 10**6):
    assert optimal_dtype(size) == DType.optimal_dtype(size)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_jsonl_chunks_parse_like_json_loads(tmp_path: Path) -> None:
    """A file of varied records through iter_chunks + chunk_records: the texts json.loads
    reads, in order."""
    rng = random.Random(1)
    alphabet = 'ab é€😀\n\t"\\<>/'
    texts = ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(2000)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, "i": i}) + "\n" for i, t in enumerate(texts)))
    got = []
    for chunk in corpus.iter_chunks([path], ["text"], 300, 10_000):
        records, bad = chunk_records(chunk, ["text"])
        assert not bad
        got += records["text"]
    assert got == texts


def test_drop_blank_lists_and_arrow_agree() -> None:
    """Blank documents are those `text.strip()` empties, for lists and Arrow arrays alike."""
    spaces = [chr(c) for c in range(0x3001) if chr(c).isspace()]
    not_spaces = ["\u200b", "\ufeff", "\x00", "a", "é", "\u180e"]
    texts = ["", *spaces, "".join(spaces), *not_spaces, " x ", spaces[0] + not_spaces[0]]
    expected = [t for t in texts if t.strip()]
    kept, dropped = corpus.drop_blank(texts)
    assert (kept, dropped) == (expected, len(texts) - len(expected))
    kept, dropped = corpus.drop_blank(pa.array(texts))
    assert (kept.to_pylist(), dropped) == (expected, len(texts) - len(expected))


def test_spans_cover_the_file_in_whole_lines(tmp_path: Path) -> None:
    """split_jsonl + iter_span_chunks read every line once, in order, cut at line starts
    (lines longer than a span included); local line numbers plus the newlines of the spans
    before give the file's, as renumber_bad_record applies them."""
    rng = random.Random(2)
    path = tmp_path / "in.jsonl"
    for trial in range(60):
        lines = [b"x" * rng.choice([0, 1, 5, 50, 300, 3000]) for _ in range(rng.randint(0, 40))]
        data = b"\n".join(lines) + (b"\n" if lines and rng.random() < 0.7 else b"")
        path.write_bytes(data)
        span_bytes = rng.choice([1, 7, 100, 1000, 1 << 20])
        spans = corpus.split_jsonl(path, span_bytes)
        assert [s for s, _ in spans[1:]] == [e for _, e in spans[:-1]]  # contiguous
        assert (spans[0][0] if spans else 0) == 0
        assert (spans[-1][1] if spans else 0) == len(data), trial
        assert all(s == 0 or data[s - 1 : s] == b"\n" for s, _ in spans), trial
        assert len(spans) <= -(-len(data) // span_bytes), trial
        got, lines_before = [], 0
        for start, end in spans:
            chunks = list(corpus.iter_span_chunks(path, start, end, rng.choice([1, 3, 1024]), 64))
            assert b"".join(c.payload for c in chunks) == data[start:end]
            for chunk in chunks:  # (line number in the file, line)
                lines_of = chunk.payload.splitlines(keepends=True)
                got += enumerate(lines_of, chunk.first + lines_before)
            lines_before += data[start:end].count(b"\n")
        assert got == list(enumerate(data.splitlines(keepends=True), 1)), trial


def test_renumber_bad_record() -> None:
    message = "/data/a:b.jsonl:3: missing key 'text' (has ['x:1'])"
    assert corpus.renumber_bad_record(message, "/data/a:b.jsonl", 40) == (
        "/data/a:b.jsonl:43: missing key 'text' (has ['x:1'])"
    )
