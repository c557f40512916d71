"""Raw pretraining text on disk: finding input files, reading them in chunks, parsing records.

Inputs are jsonl (optionally gzip or zstd compressed: ``.jsonl.gz``, ``.jsonl.zst``; ``.json``
is read as jsonl too) and parquet. A spec names one file, a directory (every supported file
below it, sorted) or a glob. Files are read as streams of chunks so memory stays flat however
large the corpus is; chunks keep their file and first line (or row) number, so every bad
record is reported as ``file:line: reason``.

Chunks are cheap to send to worker processes: a jsonl chunk is one bytes object, a parquet
chunk an Arrow record batch (pickled buffer by buffer). Parsing happens in the worker. An
uncompressed jsonl file can also be cut into byte ranges of whole lines (`split_jsonl`) that
workers read on their own (`iter_span_chunks`), so that nothing is sent at all.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import re
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # imported here, not per chunk: forked workers start with it loaded
import pyarrow.compute as pc
import pyarrow.json as pa_json

from megatron_forge.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = "jsonl (.jsonl, .jsonl.gz, .jsonl.zst) or parquet (.parquet)"
MAX_CHUNK_BYTES = 8 << 20  # bounds a chunk of very long documents
READ_BLOCK_BYTES = 1 << 20


Texts = Any  # list[str], or a pyarrow string array (chunk_records(..., arrow=True))


class BadRecordError(DataError):
    """A record that cannot be used; the message starts with ``file:line:``."""


class InputError(DataError):
    """An input file that cannot be read at all (format, schema); names the file."""


def is_supported(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(JSONL_SUFFIXES) or name.endswith(PARQUET_SUFFIXES)


def is_parquet(path: Path | str) -> bool:
    return str(path).lower().endswith(PARQUET_SUFFIXES)


def resolve_inputs(spec: str) -> list[Path]:
    """Return the input files named by a file, a directory (searched recursively) or a glob."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_supported(p))
    elif path.is_file():
        if not is_supported(path):
            raise InputError(f"--input {spec}: unsupported file type; expected {SUPPORTED}")
        files = [path]
    else:
        matches = sorted(glob.glob(spec, recursive=True))
        files = [Path(p) for p in matches if Path(p).is_file() and is_supported(Path(p))]
    if not files:
        raise FileNotFoundError(
            f"--input {spec}: no such file, and no {SUPPORTED} files in a directory or glob "
            "of that name"
        )
    return files


def iter_lines(path: Path) -> Iterator[bytes]:
    """The raw lines of a jsonl file (newline kept), decompressing .gz and .zst on the fly.

    A truncated compressed file raises (gzip: EOFError; zstd: InputError) rather than
    ending early.
    """
    name = path.name.lower()
    if name.endswith(".zst"):
        yield from _split_lines(_zstd_blocks(path))
        return
    with gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb") as f:
        yield from f


def _zstd_blocks(path: Path, read_size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed blocks of a zstd file of one or more frames; raises if a frame is cut."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame, in_frame = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while data := f.read(read_size):
            while data:
                in_frame = True
                out = frame.decompress(data)
                if out:
                    yield out
                data = b""
                if frame.eof:  # a frame ended: the rest of the input starts the next one
                    data = frame.unused_data
                    frame, in_frame = dctx.decompressobj(), False
    if in_frame:
        raise InputError(f"{path}: cannot decompress or read: the zstd frame is truncated")


def _split_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a corrupt or truncated (compressed) file raises."""
    try:
        import zstandard

        return (OSError, EOFError, zstandard.ZstdError)
    except ImportError:
        return (OSError, EOFError)


@dataclass
class Chunk:
    """Consecutive records of one file."""

    path: str
    first: int
    """Line number (jsonl, from 1) or row index (parquet, from 0) of the first record."""
    payload: Any
    """jsonl: the raw lines joined (bytes); parquet: a pyarrow RecordBatch of the key columns."""
    num_bytes: int


def iter_chunks(
    files: list[Path],
    json_keys: list[str],
    lines_per_chunk: int,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> Iterator[Chunk]:
    """Yield every file's records in order, ``lines_per_chunk`` at a time, cut short so that
    a chunk holds about ``max_chunk_bytes`` (jsonl: the line that reaches it ends the chunk;
    parquet: rows estimated from the file's column sizes)."""
    for path in files:
        if is_parquet(path):
            yield from _parquet_chunks(path, json_keys, lines_per_chunk, max_chunk_bytes)
        else:
            yield from _jsonl_chunks(path, lines_per_chunk, max_chunk_bytes)


def iter_blocks(path: Path, size: int = READ_BLOCK_BYTES) -> Iterator[bytes]:
    """The bytes of a jsonl file in blocks, decompressing .gz and .zst on the fly (a
    truncated compressed file raises, as in iter_lines)."""
    if path.name.lower().endswith(".zst"):
        yield from _zstd_blocks(path, size)
        return
    with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as f:
        while block := f.read(size):
            yield block


def is_plain_jsonl(path: Path | str) -> bool:
    """An uncompressed jsonl file: one that can be read from any byte offset."""
    name = str(path).lower()
    return name.endswith(JSONL_SUFFIXES) and not name.endswith((".gz", ".zst"))


def split_jsonl(path: Path, span_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` that cover an uncompressed jsonl file in order, each about
    ``span_bytes`` long and holding whole lines (every range but the last ends just after a
    newline), so that processes can read a file's ranges on their own. Finds each cut by
    reading from it to the next newline: nothing else of the file is read."""
    try:
        size = path.stat().st_size
        count = max(1, -(-size // max(span_bytes, 1)))
        bounds = [0]
        with open(path, "rb") as f:
            for k in range(1, count):
                cut = _line_start_from(f, k * size // count, size)
                if bounds[-1] < cut < size:
                    bounds.append(cut)
    except OSError as e:
        raise InputError(f"{path}: cannot decompress or read: {e}") from None
    return list(zip(bounds, [*bounds[1:], size])) if size else []


def _line_start_from(f: Any, offset: int, size: int) -> int:
    """The first line start at or after ``offset`` (``size`` if none)."""
    f.seek(offset - 1)  # a newline just before `offset` makes `offset` a line start
    position = offset - 1
    while block := f.read(1 << 16):
        newline = block.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(block)
    return size


def iter_span_chunks(
    path: Path, start: int, end: int, lines_per_chunk: int, max_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[Chunk]:
    """The chunks of the byte range ``[start, end)`` of an uncompressed jsonl file (one range
    of :func:`split_jsonl`), cut as :func:`iter_chunks` cuts whole files. Line numbers count
    from the range's first line (1); :func:`renumber_bad_record` turns a bad record's into
    the file's once the lines before the range are known."""
    return _jsonl_chunks(path, lines_per_chunk, max_bytes, _range_blocks(path, start, end))


def _range_blocks(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (block := f.read(min(READ_BLOCK_BYTES, left))):
            left -= len(block)
            yield block


def renumber_bad_record(message: str, path: str, lines_before: int) -> str:
    """A bad-record message ``PATH:LINE: reason`` of a chunk of :func:`iter_span_chunks`
    (``LINE`` counted from its range's first line) with ``LINE`` counted from the file's
    first line, ``lines_before`` being the lines of the file before that range."""
    prefix = f"{path}:"
    line, reason = message[len(prefix) :].split(":", 1)
    return f"{prefix}{int(line) + lines_before}:{reason}"


def _jsonl_chunks(
    path: Path, lines_per_chunk: int, max_bytes: int, blocks: Iterator[bytes] | None = None
) -> Iterator[Chunk]:
    """Chunks cut from blocks read whole (those of the whole file unless `blocks` is given):
    newlines are found with numpy, not line by line."""
    pending: list[bytes] = []
    pending_bytes = pending_lines = 0
    first = 1
    try:
        for block in iter_blocks(path) if blocks is None else blocks:
            newlines = block.count(b"\n")
            pending.append(block)
            pending_bytes += len(block)
            pending_lines += newlines
            if newlines and (pending_lines >= lines_per_chunk or pending_bytes >= max_bytes):
                data = b"".join(pending)
                rest = yield from _cut(path, data, first, lines_per_chunk, max_bytes, False)
                first += pending_lines - rest.count(b"\n")
                pending, pending_bytes, pending_lines = [rest], len(rest), rest.count(b"\n")
    except _read_errors() as e:
        raise InputError(f"{path}: cannot decompress or read: {e}") from None
    if pending_bytes:
        yield from _cut(path, b"".join(pending), first, lines_per_chunk, max_bytes, True)


def _cut(
    path: Path, data: bytes, first: int, lines_per_chunk: int, max_bytes: int, final: bool
) -> Generator[Chunk, None, bytes]:
    """Yield the chunks that `data` completes (all of it if `final`); return what is left."""
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1  # line ends
    if final and (len(ends) == 0 or ends[-1] != len(data)):
        ends = np.append(ends, len(data))  # a last line without a newline
    start = line = 0  # byte offset and index (in ends) of the chunk's first line
    while line < len(ends):
        by_bytes = int(np.searchsorted(ends, start + max_bytes))  # first line reaching max
        last = min(line + lines_per_chunk - 1, by_bytes)
        if last >= len(ends):
            if not final:
                break
            last = len(ends) - 1
        end = int(ends[last])
        yield Chunk(str(path), first + line, data[start:end], end - start)
        start, line = end, last + 1
    return data[start:]


def _parquet_chunks(
    path: Path, json_keys: list[str], rows_per_chunk: int, max_bytes: int
) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable parquet file: {e}") from None
    schema = parquet.schema_arrow
    for key in json_keys:
        if key not in schema.names:
            raise InputError(f"{path}: missing column {key!r} (has {schema.names})")
        kind = schema.field(key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(f"{path}: column {key!r} is {kind}, expected strings")
    meta = parquet.metadata
    key_bytes = sum(
        meta.row_group(g).column(c).total_uncompressed_size
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        if meta.row_group(g).column(c).path_in_schema in json_keys
    )
    if key_bytes and meta.num_rows:  # rows of about max_bytes of text
        rows_per_chunk = max(1, min(rows_per_chunk, max_bytes * meta.num_rows // key_bytes))
    row = 0
    for batch in parquet.iter_batches(batch_size=rows_per_chunk, columns=json_keys):
        yield Chunk(str(path), row, batch, batch.nbytes)
        row += batch.num_rows


def read_texts(path: str, lineno: int, line: bytes, json_keys: list[str]) -> dict[str, str]:
    """Parse one jsonl line and return its text per key; raise BadRecordError if unusable."""
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise BadRecordError(f"{path}:{lineno}: invalid JSON ({e})") from None
    if not isinstance(record, dict):
        raise BadRecordError(
            f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
        )
    texts = {}
    for key in json_keys:
        if key not in record:
            raise BadRecordError(f"{path}:{lineno}: missing key {key!r} (has {sorted(record)})")
        if not isinstance(record[key], str):
            kind = type(record[key]).__name__
            raise BadRecordError(f"{path}:{lineno}: {key!r} is {kind}, expected a string")
        texts[key] = record[key]
    return texts


def chunk_records(
    chunk: Chunk, json_keys: list[str], arrow: bool = False
) -> tuple[dict[str, Texts], list[str]]:
    """The texts of a chunk per key (records in order) and the reasons of its bad records.

    Blank jsonl lines are not records: they are neither returned nor counted as bad. With
    `arrow`, a chunk without bad records may come back as pyarrow string arrays (the same
    texts, no Python strings made); otherwise, and for chunks with bad records, as lists.
    """
    texts: dict[str, list[str]] = {key: [] for key in json_keys}
    bad: list[str] = []
    if isinstance(chunk.payload, bytes):
        fast = _jsonl_texts_arrow(chunk.payload, json_keys)
        if fast is not None:
            return ({k: v if arrow else v.to_pylist() for k, v in fast.items()}), bad
        for lineno, line in enumerate(chunk.payload.split(b"\n"), chunk.first):
            if not line.strip():
                continue
            try:
                record = read_texts(chunk.path, lineno, line, json_keys)
            except BadRecordError as e:
                bad.append(str(e))
                continue
            for key in json_keys:
                texts[key].append(record[key])
        return texts, bad
    if arrow and not any(chunk.payload.column(key).null_count for key in json_keys):
        return {key: chunk.payload.column(key) for key in json_keys}, bad
    columns = [chunk.payload.column(key).to_pylist() for key in json_keys]
    for offset, values in enumerate(zip(*columns)):
        missing = [key for key, value in zip(json_keys, values) if value is None]
        if missing:
            bad.append(f"{chunk.path}:row {chunk.first + offset}: {missing[0]!r} is null")
            continue
        for key, value in zip(json_keys, values):
            texts[key].append(value)
    return texts, bad


# Whitespace as bytes.strip() sees it (which decides what a blank line is), and a blank line
# between two others.
_SPACE = b" \t\r\x0b\x0c"
_INNER_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")


def _jsonl_texts_arrow(payload: bytes, json_keys: list[str]) -> dict[str, Any] | None:
    """The texts of a chunk of jsonl lines, parsed by Arrow's C++ JSON reader (about 5x
    faster than json.loads line by line), or None when the chunk is not plain: a blank line,
    a line that is not one JSON object with a string under every key, or anything Arrow
    rejects. The caller then parses line by line, which reports `file:line: reason`.

    Arrow reads the same texts as json.loads where both accept a line; where they differ
    (two objects on one line, a repeated key, lone surrogate escapes) Arrow either fails or
    yields a row count that does not match the line count, so the slow path decides.
    """
    body = payload[:-1] if payload.endswith(b"\n") else payload
    first_end, last_start = body.find(b"\n"), body.rfind(b"\n") + 1
    if (
        not body[: first_end if first_end >= 0 else len(body)].strip(_SPACE)
        or not body[last_start:].strip(_SPACE)
        or _INNER_BLANK_LINE.search(body)
    ):
        return None
    schema = pa.schema([(key, pa.string()) for key in json_keys])
    try:
        table = pa_json.read_json(
            pa.BufferReader(body),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(body) + 1),
            parse_options=pa_json.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            ),
        )
    except (pa.ArrowException, ValueError):  # ValueError: UnicodeDecodeError
        return None
    if table.num_rows != body.count(b"\n") + 1:
        return None
    columns = [table.column(key).combine_chunks() for key in json_keys]
    if any(column.null_count for column in columns):
        return None
    return dict(zip(json_keys, columns))


@functools.cache
def _blank_pattern() -> str:
    """An RE2 pattern matching exactly the strings `str.strip()` empties, for Arrow."""
    # Every code point as one string (surrogates included) searched by `re`, whose \s is
    # str.isspace() (CPython's Py_UNICODE_ISSPACE): 30 ms, where a million chr() and
    # isspace() calls took 300 in every run (the whole start-up of a small job is ~1 s).
    every = (
        np.arange(sys.maxunicode + 1, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")
    )
    spaces = re.findall(r"\s", every)
    return "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in spaces) + "]*$"


def drop_blank(texts: Texts) -> tuple[Texts, int]:
    """The texts that are not empty or whitespace only (`text.strip()` is true), and how many
    were dropped; pyarrow string arrays are filtered without making Python strings."""
    if isinstance(texts, list):
        kept = [text for text in texts if text and not text.isspace()]  # no copy, unlike strip
        return kept, len(texts) - len(kept)
    blank = pc.match_substring_regex(texts, _blank_pattern())
    num_blank = pc.sum(blank).as_py() or 0
    return (pc.filter(texts, pc.invert(blank)) if num_blank else texts), num_blank


def iter_texts(files: list[Path], json_key: str) -> Iterator[str]:
    """Every document's text, in order; stops at the first bad record (for tokenizer training)."""
    for chunk in iter_chunks(files, [json_key], 1024):
        texts, bad = chunk_records(chunk, [json_key])
        if bad:
            raise BadRecordError(bad[0])
        yield from texts[json_key]
