"""Tokenize jsonl or parquet documents into megatron indexed datasets (.bin/.idx), like
Megatron-LM's tool.

Inputs: jsonl (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) and parquet files, given as one file, a
directory (every such file below it, sorted) or a glob. Each `--json-keys` key (a parquet
column) becomes one dataset, `PREFIX_{key}_document.bin/.idx`, which megatron-core's
GPTDataset reads (pass `PREFIX_{key}_document` as the data path). Token ids are uint16 when
the vocabulary has fewer than 65500 entries, else int32 (megatron-core's
`DType.optimal_dtype`).

Speed: `--workers N` processes parse and tokenize chunks of records, each with one batch call
into the tokenizer that returns numpy arrays: the Rust `gigatoken` package when it is
installed and encodes the tokenizer exactly (checked at load; see
megatron_forge.data.tokenizer.GigatokenEncoder): SentencePiece BPE models with byte fallback
and any normalization (for nmt_nfkc, ASCII documents are normalized in Rust too, the others
by sentencepiece itself first) and Hugging Face tokenizer.json BPE tokenizers. Otherwise
(unigram models, say) SentencePiece's list encode or the `tokenizers` library's
`encode_batch_fast`; `--tokenizer-backend native` forces the latter. The summary line names
the backend, and why gigatoken was not used. jsonl chunks are parsed by Arrow's JSON reader
(line by line with json.loads when a chunk has a bad record, for its exact message), and
with gigatoken the texts stay Arrow arrays, never Python strings (except non-ASCII documents
for a SentencePiece normalizer). With several workers, uncompressed jsonl files are cut
into spans of whole lines that each worker reads, encodes and writes to its own part files
(no text or tokens pass between processes), and the main process appends the parts in
input order (a kernel copy, `os.copy_file_range`); compressed files and parquet, which cannot
be read from a byte offset, are read and decompressed by the main process (whole blocks, not
lines) and sent to the workers in chunks whose tokens come back. One worker encodes in the
main process. Nothing imports torch. The output is byte-identical for any number of
workers. At most `4 x workers` chunks or spans are in flight and the index is built from a
spooled file, so memory stays flat however large the input is. Progress lines report
docs/s and tokens/s; tools/bench_preprocess.py measures it against Megatron-LM's strategies.

Safety: outputs are written under temporary names and renamed only when every file is
complete; existing outputs are kept unless `--overwrite`. A malformed record stops the run
with `file:line: reason` (`file:row N: reason` for parquet) unless `--skip-bad-records`;
documents that are empty or only whitespace are skipped and counted. A parquet file without
a requested column stops the run in any case, and so does an input without a single
document to write (nothing is written then, and existing outputs are kept, even with
`--overwrite`).

Usage:
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/sample \\
        --tokenizer tokenizers/sample.model --append-eod --workers 2
    python tools/preprocess_data.py --input 'shards/*.jsonl.zst' --output-prefix data/web \\
        --tokenizer /models/llama/ --json-keys text --append-eod --workers 32
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import multiprocessing
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

# Nothing below imports megatron.core or torch (7 s and 400 MB per process): the tokenizer
# loader and the writer take only what they need of megatron-core.
from megatron_forge.data.corpus import (
    MAX_CHUNK_BYTES,
    BadRecordError,
    Chunk,
    Texts,
    chunk_records,
    drop_blank,
    is_plain_jsonl,
    iter_chunks,
    iter_span_chunks,
    renumber_bad_record,
    resolve_inputs,
    split_jsonl,
)
from megatron_forge.data.indexed import IndexedDatasetWriter, optimal_dtype
from megatron_forge.data.tokenizer import MissingSpecialTokenError, Tokenizer, load_tokenizer
from megatron_forge.errors import DataError

# megatron-core, if something imports it, warns that TE/apex are missing: irrelevant here.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

MAX_BAD_RECORDS_SHOWN = 10
NATIVE_CHUNK_LINES = 1024
# gigatoken's SentencePiece batch encode starts each call with a cold cache: on the sample
# corpus 1 MiB batches run at ~20 MB/s, 8 MiB at ~45, 16 MiB at ~55 (its byte-level BPE keeps
# its cache across calls; GigatokenEncoder bounds that).
FAST_CHUNK_BYTES = 16 << 20
# With several workers, an uncompressed jsonl file is cut into spans of at most this many
# chunks, each read, encoded and written by one worker (see Span).
SPAN_CHUNKS = 4


def chunk_size(tokenizer: Tokenizer, lines_per_chunk: int | None) -> tuple[int, int]:
    """(records, bytes) at most per chunk for this tokenizer's batch backend."""
    if tokenizer.batch_backend == "gigatoken":
        return lines_per_chunk or 1 << 40, FAST_CHUNK_BYTES
    return lines_per_chunk or NATIVE_CHUNK_LINES, MAX_CHUNK_BYTES


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's name for the dataset of one json key (pass it as the data path)."""
    return f"{prefix}_{key}_document"


def existing_outputs(prefix: str, json_keys: list[str]) -> list[str]:
    """Return the output files of this run that are already on disk."""
    paths = [output_prefix(prefix, k) + ext for k in json_keys for ext in (".bin", ".idx")]
    return [p for p in paths if os.path.exists(p)]


@dataclass
class Span:
    """A byte range of an uncompressed jsonl file (whole lines, `corpus.split_jsonl`) that
    one worker reads, encodes and writes to its own part files, `parts[key]` (.bin, and its
    lengths beside it): only this description and the counts cross processes, not the text
    nor the tokens. The main process appends the parts in input order."""

    path: str
    start: int
    end: int
    parts: dict[str, str]
    lines_per_chunk: int
    max_bytes: int
    stop_at_bad: bool  # stop reading at the first bad record (the run stops there anyway)


@dataclass
class EncodedChunk:
    """What a worker returns for one chunk: per json key, the tokens of its documents back
    to back and each document's length (two arrays pickle far faster than many lists); for
    a Span, the part files it wrote them to instead, and how many lines it read."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    num_empty: dict[str, int]
    bad_records: list[str] = field(default_factory=list)  # "file:line: reason"
    num_bytes: int = 0
    num_bad: int = 0  # bad records; only the first MAX_BAD_RECORDS_SHOWN are kept for a span
    parts: dict[str, str] = field(default_factory=dict)
    num_documents: dict[str, int] = field(default_factory=dict)
    num_tokens: dict[str, int] = field(default_factory=dict)
    path: str = ""
    num_lines: int = 0  # a span's newlines: its bad records' lines count from its start

    def __post_init__(self) -> None:
        self.num_bad = self.num_bad or len(self.bad_records)
        for key, lengths in self.lengths.items():
            self.num_documents.setdefault(key, len(lengths))
            self.num_tokens.setdefault(key, int(self.tokens[key].size))


@dataclass
class Encoder:
    """Turns chunks of records into token arrays; one per worker process."""

    tokenizer: Tokenizer
    json_keys: list[str]
    append_eod: bool
    dtype: type[np.number]

    def encode_chunk(self, chunk: Chunk) -> EncodedChunk:
        # Arrow arrays straight into the tokenizer when it takes them: no Python strings.
        texts, bad = chunk_records(chunk, self.json_keys, arrow=self.tokenizer.takes_arrow)
        tokens, lengths, empty = {}, {}, {}
        for key in self.json_keys:
            docs, empty[key] = drop_blank(texts[key])
            tokens[key], lengths[key] = self.encode_texts(docs)
        return EncodedChunk(tokens, lengths, empty, bad, chunk.num_bytes)

    def encode_span(self, span: Span) -> EncodedChunk:
        """Read, encode and write one span to its part files, chunk by chunk."""
        keys = self.json_keys
        out = EncodedChunk({}, {}, dict.fromkeys(keys, 0), parts=span.parts, path=span.path)
        out.num_documents, out.num_tokens = dict.fromkeys(keys, 0), dict.fromkeys(keys, 0)
        writers = {key: IndexedDatasetWriter(span.parts[key], self.dtype) for key in keys}
        try:
            chunks = iter_span_chunks(
                Path(span.path), span.start, span.end, span.lines_per_chunk, span.max_bytes
            )
            for chunk in chunks:
                encoded = self.encode_chunk(chunk)
                for key, writer in writers.items():
                    writer.add_documents(encoded.tokens[key], encoded.lengths[key])
                    out.num_documents[key] += encoded.num_documents[key]
                    out.num_tokens[key] += encoded.num_tokens[key]
                    out.num_empty[key] += encoded.num_empty[key]
                shown = MAX_BAD_RECORDS_SHOWN - len(out.bad_records)
                out.bad_records += encoded.bad_records[: max(shown, 0)]
                out.num_bad += encoded.num_bad
                out.num_bytes += chunk.num_bytes
                out.num_lines += chunk.payload.count(b"\n")
                if encoded.num_bad and span.stop_at_bad:
                    break
        finally:
            for writer in writers.values():
                writer.close()
        return out

    def encode_texts(self, texts: Texts) -> tuple[np.ndarray, np.ndarray]:
        """All documents' ids back to back (each followed by EOD if asked) and their lengths."""
        if not len(texts):
            return np.zeros(0, self.dtype), np.zeros(0, np.int32)
        flat, lengths = self.tokenizer.tokenize_documents(texts, self.append_eod, self.dtype)
        return flat, lengths.astype(np.int32)


_WORKER_ENCODER: Encoder | None = None


def _init_worker(
    tokenizer_path: str, json_keys: list[str], append_eod: bool, dtype: type, fast: bool
) -> None:
    global _WORKER_ENCODER
    if _WORKER_ENCODER is not None:  # forked: the parent's encoder, tokenizer loaded, is here
        return
    tokenizer = load_tokenizer(tokenizer_path)
    if fast:  # the parent checked it; either backend gives the same ids
        tokenizer.use_fast_backend()
    _WORKER_ENCODER = Encoder(tokenizer, json_keys, append_eod, dtype)


def _encode_in_worker(task: Chunk | Span) -> EncodedChunk:
    assert _WORKER_ENCODER is not None
    if isinstance(task, Span):
        return _WORKER_ENCODER.encode_span(task)
    return _WORKER_ENCODER.encode_chunk(task)


def encode_all(
    chunks: Iterator[Chunk | Span], encoder: Encoder, tokenizer_path: str, num_workers: int
) -> Iterator[EncodedChunk]:
    """Encode chunks (and spans) in order, in `num_workers` processes with a bounded
    read-ahead.

    Pool.imap would read the whole input ahead of slow workers; a window of pending
    results keeps memory flat however large the input is (and, for spans, the part files
    waiting to be appended: at most 4 x workers spans' tokens on disk).
    """
    global _WORKER_ENCODER
    if num_workers <= 1:
        yield from map(encoder.encode_chunk, chunks)
        return
    fast = encoder.tokenizer.batch_backend != encoder.tokenizer.library
    initargs = (tokenizer_path, encoder.json_keys, encoder.append_eod, encoder.dtype, fast)
    drop_blank(pa.array([], pa.string()))  # builds its pattern once, before workers fork
    # Workers made by fork inherit this encoder (no tokenizer reload); others build their own.
    _WORKER_ENCODER = encoder
    try:
        pool = multiprocessing.Pool(num_workers, _init_worker, initargs)
    finally:
        _WORKER_ENCODER = None
    with pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 4 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class Outputs:
    """One IndexedDatasetWriter per json key, writing to temporary files until commit()."""

    prefix: str
    json_keys: list[str]
    dtype: type[np.number]
    writers: dict[str, IndexedDatasetWriter] = field(default_factory=dict)

    def final_prefix(self, key: str) -> str:
        return output_prefix(self.prefix, key)

    def tmp_prefix(self, key: str) -> str:
        return f"{self.final_prefix(key)}.partial-{os.getpid()}"

    def open(self) -> None:
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        for key in self.json_keys:
            self.writers[key] = IndexedDatasetWriter(self.tmp_prefix(key) + ".bin", self.dtype)

    def part_path(self, key: str, index: int) -> str:
        """Where a worker writes the documents of span `index` (see Span)."""
        return f"{self.tmp_prefix(key)}.part{index}.bin"

    def add(self, encoded: EncodedChunk) -> None:
        for key, writer in self.writers.items():
            if encoded.parts:
                writer.add_part(encoded.parts[key])
            else:
                writer.add_documents(encoded.tokens[key], encoded.lengths[key])

    def commit(self) -> None:
        """Write the .idx files, then move every pair to its final name."""
        for key, writer in self.writers.items():
            writer.finalize(self.tmp_prefix(key) + ".idx")
        for key in self.json_keys:
            tmp, final = self.tmp_prefix(key), self.final_prefix(key)
            Path(final + ".idx").unlink(missing_ok=True)  # never pair a new .bin with an old .idx
            os.replace(tmp + ".bin", final + ".bin")
            os.replace(tmp + ".idx", final + ".idx")

    def discard(self) -> None:
        for key, writer in self.writers.items():
            writer.discard()
            Path(self.tmp_prefix(key) + ".idx").unlink(missing_ok=True)
            tmp = Path(self.tmp_prefix(key))
            for part in tmp.parent.glob(glob.escape(tmp.name) + ".part*.bin*"):
                part.unlink(missing_ok=True)  # spans not yet appended


@dataclass
class Stats:
    """Running counts, printed as progress lines and as the final summary."""

    num_docs: dict[str, int]
    num_tokens: dict[str, int]
    num_empty: dict[str, int]
    num_bad: int = 0
    num_bytes: int = 0
    backend: str = ""
    start: float = field(default_factory=time.monotonic)
    num_shown: int = 0  # bad records printed
    lines_read: dict[str, int] = field(default_factory=dict)  # per file, through spans

    def add(self, chunk: EncodedChunk) -> None:
        for key in self.num_docs:
            self.num_docs[key] += chunk.num_documents[key]
            self.num_tokens[key] += chunk.num_tokens[key]
            self.num_empty[key] += chunk.num_empty[key]
        self.num_bytes += chunk.num_bytes

    def elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def progress_line(self) -> str:
        elapsed = self.elapsed()
        docs, tokens = sum(self.num_docs.values()), sum(self.num_tokens.values())
        return (
            f"{docs} docs, {tokens} tokens, {self.num_bytes / 2**20:.1f} MiB read, "
            f"{docs / elapsed:.0f} docs/s, {tokens / elapsed:.0f} tokens/s, "
            f"{self.num_bytes / 2**20 / elapsed:.1f} MiB/s"
        )

    def summary(self, prefix: str) -> str:
        lines = [f"done in {self.elapsed():.1f}s: {self.progress_line()}"]
        for key in self.num_docs:
            lines.append(
                f"  {output_prefix(prefix, key)}.bin/.idx: {self.num_docs[key]} documents, "
                f"{self.num_tokens[key]} tokens, {self.num_empty[key]} empty documents skipped"
            )
        lines.append(f"  {self.num_bad} bad records skipped")
        if self.backend:
            lines.append(f"  tokenized with {self.backend}")
        return "\n".join(lines)


def write_chunk(encoded: EncodedChunk, outputs: Outputs, stats: Stats, skip_bad: bool) -> None:
    """Append a chunk's documents to the outputs; stop at a bad record unless `skip_bad`."""
    bad = encoded.bad_records
    if encoded.parts:  # a span: its lines count from its start
        before = stats.lines_read.get(encoded.path, 0)
        bad = [renumber_bad_record(reason, encoded.path, before) for reason in bad]
        stats.lines_read[encoded.path] = before + encoded.num_lines
    if bad and not skip_bad:
        raise BadRecordError(bad[0])
    for reason in bad[: max(MAX_BAD_RECORDS_SHOWN - stats.num_shown, 0)]:
        print(f"skipped {reason}", file=sys.stderr)
        stats.num_shown += 1
    stats.num_bad += encoded.num_bad
    outputs.add(encoded)
    stats.add(encoded)


def plan_tasks(
    files: list[Path], outputs: Outputs, workers: int, lines: int, max_bytes: int, stop: bool
) -> Iterator[Chunk | Span]:
    """What the workers encode, in input order: with several workers, spans of the
    uncompressed jsonl files, read by the workers themselves; chunks read here for the others
    (compressed files and parquet cannot be read from a byte offset), and for all files with
    one worker (which encodes in this process).

    Spans are about a quarter of a worker's share of the input (so that a worker slowed by
    other work on its core leaves little for the others to wait on at the end), but at
    least a chunk (smaller batches encode slower), at most a worker's share (each worker has
    one span of a small input) and at most SPAN_CHUNKS chunks (for progress and disk use);
    each worker gets as many (one file's spans are cut apart where its size allows)."""
    plain = {path for path in files if workers > 1 and is_plain_jsonl(path)}
    total = sum(path.stat().st_size for path in plain)
    share = -(-total // workers)
    target = min(max(share // 4, max_bytes), share, SPAN_CHUNKS * max_bytes)
    rounds = max(-(-share // max(target, 1)), 1)
    span_bytes = max(-(-total // (rounds * workers)), 1)
    index = 0
    for path in files:
        if path not in plain:
            yield from iter_chunks([path], outputs.json_keys, lines, max_bytes)
            continue
        for start, end in split_jsonl(path, span_bytes):
            chunk_bytes = -(-(end - start) // -(-(end - start) // max_bytes))  # even chunks
            parts = {key: outputs.part_path(key, index) for key in outputs.json_keys}
            yield Span(str(path), start, end, parts, lines, chunk_bytes, stop)
            index += 1


def load_checked_tokenizer(path: str, append_eod: bool, backend: str = "native") -> Tokenizer:
    tokenizer = load_tokenizer(path)
    if backend == "auto":
        tokenizer.use_fast_backend()
    if append_eod:
        try:
            tokenizer.eod  # noqa: B018  (fail here, not in a worker, if there is no EOS)
        except MissingSpecialTokenError as e:
            raise DataError(f"--append-eod: {e}") from None
    return tokenizer


def check_not_empty(args: argparse.Namespace, stats: Stats) -> None:
    """Refuse to write a dataset without tokens (training could not use it): raise DataError
    naming the input and what was skipped. Nothing is written; existing outputs are kept."""
    for key in args.json_keys:
        if stats.num_tokens[key]:
            continue
        docs, empty, bad = stats.num_docs[key], stats.num_empty[key], stats.num_bad
        if docs:
            found = f"its {docs} documents under key {key!r} tokenize to no tokens"
        elif empty or bad:
            skipped = [f"{empty} empty or whitespace-only"] if empty else []
            skipped += [f"{bad} bad records skipped"] if bad else []
            found = f"no documents under key {key!r}, only " + " and ".join(skipped)
        else:
            found = "no records (the files are empty)"
        raise DataError(
            f"--input {args.input}: {found}; {output_prefix(args.output_prefix, key)}.bin/.idx "
            "not written (existing files are kept)"
        )


def preprocess(args: argparse.Namespace) -> Stats:
    """Run the whole job; raise DataError (bad records, inputs, tokenizer), FileExistsError,
    ... on misuse."""
    files = resolve_inputs(args.input)
    existing = existing_outputs(args.output_prefix, args.json_keys)
    if existing and not args.overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; pass --overwrite to replace them")
    # One thread per worker: --workers is the parallelism (and forked workers would
    # otherwise inherit a Rust thread pool that the tokenizers library then disables).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_checked_tokenizer(args.tokenizer, args.append_eod, args.tokenizer_backend)
    dtype = optimal_dtype(tokenizer.vocab_size)
    outputs = Outputs(args.output_prefix, args.json_keys, dtype)
    encoder = Encoder(tokenizer, args.json_keys, args.append_eod, dtype)
    keys = args.json_keys
    stats = Stats(dict.fromkeys(keys, 0), dict.fromkeys(keys, 0), dict.fromkeys(keys, 0))
    stats.backend = tokenizer.batch_backend
    if args.tokenizer_backend == "auto" and tokenizer.fast_backend_error:
        stats.backend += f" ({tokenizer.fast_backend_error})"
    last_log = time.monotonic()
    outputs.open()
    try:
        lines, max_bytes = chunk_size(tokenizer, args.lines_per_chunk)
        stop = not args.skip_bad_records
        chunks = plan_tasks(files, outputs, args.workers, lines, max_bytes, stop)
        with contextlib.closing(encode_all(chunks, encoder, args.tokenizer, args.workers)) as it:
            for encoded in it:
                write_chunk(encoded, outputs, stats, args.skip_bad_records)
                if time.monotonic() - last_log >= args.log_interval:
                    print(stats.progress_line(), file=sys.stderr, flush=True)
                    last_log = time.monotonic()
        check_not_empty(args, stats)
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input",
        required=True,
        help="jsonl/jsonl.gz/jsonl.zst/parquet file, directory of them, or glob",
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.*")
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"], help="record keys (parquet columns)"
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="SentencePiece .model, tokenizer.json, a directory with either, or a name in "
        "$FORGE_TOKENIZERS (default ./tokenizers/)",
    )
    parser.add_argument("--append-eod", action="store_true", help="end every document with EOD")
    parser.add_argument(
        "--tokenizer-backend",
        choices=["auto", "native"],
        default="auto",
        help="auto: gigatoken (Rust) where it is installed and encodes this tokenizer exactly, "
        "else the tokenizer's own library; native: always the tokenizer's own library",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip (and count) malformed records instead of stopping at the first",
    )
    parser.add_argument(
        "--lines-per-chunk",
        type=int,
        help=f"records per worker task (default {NATIVE_CHUNK_LINES}, or as many as fit in "
        f"{FAST_CHUNK_BYTES >> 20} MiB with gigatoken, which is faster on large batches)",
    )
    parser.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers={args.workers} must be >= 1")
    if args.lines_per_chunk is not None and args.lines_per_chunk < 1:
        parser.error(f"--lines-per-chunk={args.lines_per_chunk} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = preprocess(args)
    except (DataError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(stats.summary(args.output_prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
