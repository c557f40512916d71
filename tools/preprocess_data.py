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
for a SentencePiece normalizer). The main process only reads (whole blocks, not lines),
decompresses and writes; nothing imports torch. Results are written in input order, so the
output is byte-identical for any number of workers. At most `4 x workers` chunks are in
flight and the index is built from a spooled file, so memory stays flat however large the
input is. Progress lines report docs/s and tokens/s; tools/bench_preprocess.py measures it
against Megatron-LM's strategies.

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
    iter_chunks,
    resolve_inputs,
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
class EncodedChunk:
    """What a worker returns for one chunk: per json key, the tokens of its documents back
    to back and each document's length (two arrays pickle far faster than many lists)."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    num_empty: dict[str, int]
    bad_records: list[str] = field(default_factory=list)  # "file:line: reason"
    num_bytes: int = 0


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
        out = EncodedChunk({}, {}, {}, bad, chunk.num_bytes)
        for key in self.json_keys:
            docs, out.num_empty[key] = drop_blank(texts[key])
            out.tokens[key], out.lengths[key] = self.encode_texts(docs)
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


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode_chunk(chunk)


def encode_all(
    chunks: Iterator[Chunk], encoder: Encoder, tokenizer_path: str, num_workers: int
) -> Iterator[EncodedChunk]:
    """Encode chunks in order, in `num_workers` processes with a bounded read-ahead.

    Pool.imap would read the whole input ahead of slow workers; a window of pending
    results keeps memory flat however large the input is.
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

    def add(self, encoded: EncodedChunk) -> None:
        for key, writer in self.writers.items():
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

    def add(self, chunk: EncodedChunk) -> None:
        for key in self.num_docs:
            self.num_docs[key] += len(chunk.lengths[key])
            self.num_tokens[key] += int(chunk.tokens[key].size)
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
    if encoded.bad_records and not skip_bad:
        raise BadRecordError(encoded.bad_records[0])
    for reason in encoded.bad_records:
        if stats.num_bad < MAX_BAD_RECORDS_SHOWN:
            print(f"skipped {reason}", file=sys.stderr)
        stats.num_bad += 1
    outputs.add(encoded)
    stats.add(encoded)


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
        chunks = iter_chunks(files, args.json_keys, lines, max_bytes)
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
