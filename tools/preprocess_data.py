"""Tokenize jsonl documents into megatron indexed datasets (.bin/.idx), like Megatron-LM's tool.

Each `--json-keys` key becomes one dataset, `PREFIX_{key}_document.bin/.idx`, which
megatron-core's GPTDataset reads (pass `PREFIX_{key}_document` as the data path). Token ids
are uint16 when the vocabulary has fewer than 65500 entries, else int32 (megatron-core's
`DType.optimal_dtype`).

Safety: outputs are written under temporary names and renamed only when every file is
complete; existing outputs are kept unless `--overwrite`. A malformed line stops the run with
`file:line: reason` unless `--skip-bad-records`; documents that are empty or only whitespace
are skipped and counted.

Usage:
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/sample \\
        --tokenizer tokenizers/sample.model --append-eod --workers 2
    python tools/preprocess_data.py --input 'shards/*.jsonl' --output-prefix data/web \\
        --tokenizer /models/llama/ --json-keys text --append-eod --workers 32
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
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

# megatron-core warns at import that TE/apex are missing; irrelevant for tokenization.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402

from megatron_forge.data.tokenizer import (  # noqa: E402
    MissingSpecialTokenError,
    Tokenizer,
    load_tokenizer,
)

Chunk = tuple[str, list[tuple[int, bytes]]]  # (file, [(line number, raw line)])
MAX_BAD_RECORDS_SHOWN = 10


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's name for the dataset of one json key (pass it as the data path)."""
    return f"{prefix}_{key}_document"


def existing_outputs(prefix: str, json_keys: list[str]) -> list[str]:
    """Return the output files of this run that are already on disk."""
    paths = [output_prefix(prefix, k) + ext for k in json_keys for ext in (".bin", ".idx")]
    return [p for p in paths if os.path.exists(p)]


class BadRecordError(ValueError):
    """A jsonl line that cannot be used; the message starts with `file:line:`."""


@dataclass
class EncodedChunk:
    """What a worker returns for one chunk of lines."""

    docs: dict[str, list[np.ndarray]]  # per json key, in input order
    num_empty: dict[str, int]
    bad_records: list[str] = field(default_factory=list)  # "file:line: reason"
    num_bytes: int = 0


def resolve_inputs(spec: str) -> list[Path]:
    """Return the jsonl files named by a file path, a directory (its *.jsonl) or a glob."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in sorted(glob.glob(spec)) if Path(p).is_file()]
    if not files:
        raise FileNotFoundError(f"--input {spec}: no such file, directory of *.jsonl, or glob")
    return files


def iter_chunks(files: list[Path], lines_per_chunk: int) -> Iterator[Chunk]:
    """Yield the non-blank lines of all files, in order, as chunks of raw bytes."""
    for path in files:
        chunk: list[tuple[int, bytes]] = []
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                chunk.append((lineno, line))
                if len(chunk) == lines_per_chunk:
                    yield str(path), chunk
                    chunk = []
        if chunk:
            yield str(path), chunk


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


@dataclass
class Encoder:
    """Turns chunks of jsonl lines into token arrays; one per worker process."""

    tokenizer: Tokenizer
    json_keys: list[str]
    append_eod: bool
    dtype: type[np.number]

    def encode_chunk(self, chunk: Chunk) -> EncodedChunk:
        path, lines = chunk
        out = EncodedChunk({k: [] for k in self.json_keys}, dict.fromkeys(self.json_keys, 0))
        for lineno, line in lines:
            out.num_bytes += len(line)
            try:
                texts = read_texts(path, lineno, line, self.json_keys)
            except BadRecordError as e:
                out.bad_records.append(str(e))
                continue
            for key, text in texts.items():
                if not text.strip():
                    out.num_empty[key] += 1
                    continue
                ids = self.tokenizer.tokenize(text)
                if self.append_eod:
                    ids.append(self.tokenizer.eod)
                out.docs[key].append(np.asarray(ids, dtype=self.dtype))
        return out


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer_path: str, json_keys: list[str], append_eod: bool, dtype: type) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(load_tokenizer(tokenizer_path), json_keys, append_eod, dtype)


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
    if num_workers <= 1:
        yield from map(encoder.encode_chunk, chunks)
        return
    initargs = (tokenizer_path, encoder.json_keys, encoder.append_eod, encoder.dtype)
    with multiprocessing.Pool(num_workers, _init_worker, initargs) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 4 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class Outputs:
    """One IndexedDatasetBuilder per json key, writing to temporary files until commit()."""

    prefix: str
    json_keys: list[str]
    dtype: type[np.number]
    builders: dict[str, IndexedDatasetBuilder] = field(default_factory=dict)

    def final_prefix(self, key: str) -> str:
        return output_prefix(self.prefix, key)

    def tmp_prefix(self, key: str) -> str:
        return f"{self.final_prefix(key)}.partial-{os.getpid()}"

    def open(self) -> None:
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        for key in self.json_keys:
            self.builders[key] = IndexedDatasetBuilder(self.tmp_prefix(key) + ".bin", self.dtype)

    def add(self, key: str, ids: np.ndarray) -> None:
        self.builders[key].add_document(ids, [ids.size])

    def commit(self) -> None:
        """Write the .idx files, then move every pair to its final name."""
        for key, builder in self.builders.items():
            builder.finalize(self.tmp_prefix(key) + ".idx")
        for key in self.json_keys:
            tmp, final = self.tmp_prefix(key), self.final_prefix(key)
            Path(final + ".idx").unlink(missing_ok=True)  # never pair a new .bin with an old .idx
            os.replace(tmp + ".bin", final + ".bin")
            os.replace(tmp + ".idx", final + ".idx")

    def discard(self) -> None:
        for key, builder in self.builders.items():
            builder.data_file.close()
            for ext in (".bin", ".idx"):
                Path(self.tmp_prefix(key) + ext).unlink(missing_ok=True)


@dataclass
class Stats:
    """Running counts, printed as progress lines and as the final summary."""

    num_docs: dict[str, int]
    num_tokens: dict[str, int]
    num_empty: dict[str, int]
    num_bad: int = 0
    num_bytes: int = 0
    start: float = field(default_factory=time.monotonic)

    def add(self, chunk: EncodedChunk) -> None:
        for key, docs in chunk.docs.items():
            self.num_docs[key] += len(docs)
            self.num_tokens[key] += sum(d.size for d in docs)
            self.num_empty[key] += chunk.num_empty[key]
        self.num_bytes += chunk.num_bytes

    def progress_line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        docs, tokens = sum(self.num_docs.values()), sum(self.num_tokens.values())
        return (
            f"{docs} docs, {tokens} tokens, {self.num_bytes / 2**20:.1f} MiB read, "
            f"{docs / elapsed:.0f} docs/s, {tokens / elapsed:.0f} tokens/s"
        )

    def summary(self, prefix: str) -> str:
        lines = [f"done in {time.monotonic() - self.start:.1f}s: {self.progress_line()}"]
        for key in self.num_docs:
            lines.append(
                f"  {output_prefix(prefix, key)}.bin/.idx: {self.num_docs[key]} documents, "
                f"{self.num_tokens[key]} tokens, {self.num_empty[key]} empty documents skipped"
            )
        lines.append(f"  {self.num_bad} bad records skipped")
        return "\n".join(lines)


def write_chunk(encoded: EncodedChunk, outputs: Outputs, stats: Stats, skip_bad: bool) -> None:
    """Append a chunk's documents to the outputs; stop at a bad record unless `skip_bad`."""
    if encoded.bad_records and not skip_bad:
        raise BadRecordError(encoded.bad_records[0])
    for reason in encoded.bad_records:
        if stats.num_bad < MAX_BAD_RECORDS_SHOWN:
            print(f"skipped {reason}", file=sys.stderr)
        stats.num_bad += 1
    for key, docs in encoded.docs.items():
        for ids in docs:
            outputs.add(key, ids)
    stats.add(encoded)


def preprocess(args: argparse.Namespace) -> Stats:
    """Run the whole job; raise BadRecordError/FileExistsError/FileNotFoundError on misuse."""
    files = resolve_inputs(args.input)
    existing = existing_outputs(args.output_prefix, args.json_keys)
    if existing and not args.overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; pass --overwrite to replace them")
    tokenizer = load_tokenizer(args.tokenizer)
    if args.append_eod:
        try:
            tokenizer.eod  # noqa: B018  (fail here, not in a worker, if there is no EOS)
        except MissingSpecialTokenError as e:
            raise ValueError(f"--append-eod: {e}") from None
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    outputs = Outputs(args.output_prefix, args.json_keys, dtype)
    encoder = Encoder(tokenizer, args.json_keys, args.append_eod, dtype)
    keys = args.json_keys
    stats = Stats(dict.fromkeys(keys, 0), dict.fromkeys(keys, 0), dict.fromkeys(keys, 0))
    last_log = time.monotonic()
    outputs.open()
    try:
        chunks = iter_chunks(files, args.lines_per_chunk)
        with contextlib.closing(encode_all(chunks, encoder, args.tokenizer, args.workers)) as it:
            for encoded in it:
                write_chunk(encoded, outputs, stats, args.skip_bad_records)
                if time.monotonic() - last_log >= args.log_interval:
                    print(stats.progress_line(), file=sys.stderr, flush=True)
                    last_log = time.monotonic()
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="jsonl file, directory of *.jsonl, or glob")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.*")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="record keys to tokenize")
    parser.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model, tokenizer.json or dir"
    )
    parser.add_argument("--append-eod", action="store_true", help="end every document with EOD")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip (and count) malformed lines instead of stopping at the first",
    )
    parser.add_argument("--lines-per-chunk", type=int, default=256, help="lines per worker task")
    parser.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = preprocess(args)
    except (BadRecordError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(stats.summary(args.output_prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
