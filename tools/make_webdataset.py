"""Pack tokenized documents into WebDataset tar shards of fixed-length sequences.

Documents come from a megatron indexed dataset (`--indexed PREFIX`, as written by
tools/preprocess_data.py: the fast path for large corpora) or from jsonl/parquet files and a
tokenizer (`--input FILES --tokenizer T`). They are concatenated (optionally in a seeded
random order, `--shuffle-seed`) and cut into samples of `--seq-length + 1` tokens that
overlap by one token, as megatron's GPTDataset does: sample i holds tokens
[i * L, (i + 1) * L] of the stream, inputs and next-token labels in one. The tail shorter than
one sample is dropped (and reported).

Output, for `--output DIR/NAME`:
    DIR/NAME-000000.tar ...  samples `KEY.tokens.npy` (KEY: the sample's index, 10 digits)
    DIR/NAME.json            the manifest: shards with their sample counts, seq_length,
                             dtype, vocab size. Point data.train_shards at it; the counts
                             let a resumed run skip whole shards without reading them.
Shards are written under temporary names and renamed when all are complete (replacing any
earlier shards of that name only then); the manifest is written last. Identical inputs give
byte-identical shards.

Usage:
    python tools/make_webdataset.py --indexed data/sample/corpus_text_document \\
        --output data/shards/sample --seq-length 128 --samples-per-shard 1024
    python tools/make_webdataset.py --input corpus.jsonl --tokenizer tok.model --append-eod \\
        --output data/shards/web --seq-length 4096
Upload the shards anywhere and list them as `pipe:` URLs in the manifest (or in
data.train_shards directly) to stream them from object storage.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_forge.data.corpus import BadRecordError, chunk_records, iter_chunks, resolve_inputs
from megatron_forge.data.webdataset import MANIFEST_FORMAT, TOKENS_FIELD
from megatron_forge.errors import DataError

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

LOG_EVERY_S = 5.0


def iter_indexed_documents(prefix: str, shuffle_seed: int | None) -> Iterator[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    order = np.arange(len(dataset))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(dataset))
    for i in order:
        yield dataset[int(i)]


def iter_text_documents(args: argparse.Namespace, tokenizer) -> Iterator[np.ndarray]:
    for chunk in iter_chunks(resolve_inputs(args.input), [args.json_key], 1024):
        texts, bad = chunk_records(chunk, [args.json_key])
        if bad:
            raise BadRecordError(bad[0])
        docs = [t for t in texts[args.json_key] if t.strip()]
        if not docs:
            continue
        flat, lengths = tokenizer.tokenize_documents(docs, args.append_eod)
        yield from np.split(flat, np.cumsum(lengths)[:-1])


def pack(documents: Iterator[np.ndarray], seq_length: int, stats: Stats) -> Iterator[np.ndarray]:
    """Samples of seq_length + 1 tokens; consecutive samples share one token."""
    pending: list[np.ndarray] = []
    num_pending = 0
    for doc in documents:
        stats.num_documents += 1
        pending.append(doc)
        num_pending += doc.size
        if num_pending < seq_length + 1:
            continue
        stream = np.concatenate(pending)
        num = (stream.size - 1) // seq_length
        for i in range(num):
            yield stream[i * seq_length : (i + 1) * seq_length + 1]
        rest = stream[num * seq_length :]
        pending, num_pending = [rest], rest.size
    stats.num_dropped_tokens = num_pending


@dataclass
class Stats:
    num_documents: int = 0
    num_samples: int = 0
    num_shards: int = 0
    num_dropped_tokens: int = 0
    start: float = field(default_factory=time.monotonic)

    def line(self, num_shards: int) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (
            f"{self.num_documents} documents, {self.num_samples} samples, {num_shards} shards, "
            f"{self.num_samples / elapsed:.0f} samples/s"
        )


class ShardWriter:
    """Tar shards NAME-%06d.tar, written under temporary names; commit() renames them all
    (and writes the manifest last), so an error leaves any previous shards untouched."""

    def __init__(self, output: str, samples_per_shard: int) -> None:
        self.output = Path(output)
        self.samples_per_shard = samples_per_shard
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.entries: list[dict] = []  # {"url", "num_samples"} of every closed shard

    def final_path(self, index: int) -> Path:
        return self.output.with_name(f"{self.output.name}-{index:06d}.tar")

    def tmp_path(self, index: int) -> Path:
        return self.final_path(index).with_suffix(f".tar.partial-{os.getpid()}")

    def write(self, key: str, tokens: np.ndarray) -> None:
        if self.tar is None:
            path = self.tmp_path(len(self.entries))
            self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        buf = io.BytesIO()
        np.save(buf, tokens, allow_pickle=False)
        info = tarfile.TarInfo(f"{key}.{TOKENS_FIELD}")
        info.size, info.mtime, info.mode = buf.tell(), 0, 0o444  # fixed: reproducible tars
        info.uname = info.gname = "forge"
        buf.seek(0)
        self.tar.addfile(info, buf)
        self.count += 1
        if self.count == self.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tar = None
        name = self.final_path(len(self.entries)).name
        self.entries.append({"url": name, "num_samples": self.count})
        self.count = 0

    def commit(self, manifest: dict) -> Path:
        """Replace any previous shards by the new ones, then write the manifest."""
        self.close_shard()
        for old in existing_outputs(str(self.output)):
            old.unlink()
        for index in range(len(self.entries)):
            os.replace(self.tmp_path(index), self.final_path(index))
        path = Path(f"{self.output}.json")
        tmp = path.with_suffix(f".json.partial-{os.getpid()}")
        tmp.write_text(json.dumps({**manifest, "shards": self.entries}, indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def discard(self) -> None:
        if self.tar is not None:
            self.tar.close()
        for index in range(len(self.entries) + 1):
            self.tmp_path(index).unlink(missing_ok=True)


def write_shards(args: argparse.Namespace, documents: Iterator[np.ndarray], meta: dict) -> Stats:
    stats = Stats()
    writer = ShardWriter(args.output, args.samples_per_shard)
    dtype = np.dtype(meta["dtype"])
    last_log = time.monotonic()
    try:
        for sample in pack(documents, args.seq_length, stats):
            writer.write(f"{stats.num_samples:010d}", sample.astype(dtype))
            stats.num_samples += 1
            if time.monotonic() - last_log > LOG_EVERY_S:
                print(stats.line(len(writer.entries)), file=sys.stderr, flush=True)
                last_log = time.monotonic()
        if not stats.num_samples:
            raise ValueError(
                f"no sample of {args.seq_length + 1} tokens: the input holds fewer tokens than "
                "one sequence; lower --seq-length"
            )
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": 1,
            **meta,
            "seq_length": args.seq_length,
            "num_samples": stats.num_samples,
        }
        writer.commit(manifest)
        stats.num_shards = len(writer.entries)
    except BaseException:
        writer.discard()
        raise
    return stats


def existing_outputs(output: str) -> list[Path]:
    out = Path(output)
    found = sorted(out.parent.glob(f"{out.name}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    manifest = Path(f"{output}.json")
    return found + ([manifest] if manifest.exists() else [])


def run(args: argparse.Namespace) -> Stats:
    existing = existing_outputs(args.output)
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the shards")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if args.indexed:
        from megatron_forge.data.indexed import check_indexed_dataset

        dtype = check_indexed_dataset(args.indexed).dtype
        meta = {"source": args.indexed, "dtype": np.dtype(dtype).name, "vocab_size": None}
        documents = iter_indexed_documents(args.indexed, args.shuffle_seed)
    else:
        from megatron.core.datasets.indexed_dataset import DType

        from megatron_forge.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        if args.append_eod:
            tokenizer.eod  # noqa: B018  (raises if the tokenizer has no EOS)
        dtype = DType.optimal_dtype(tokenizer.vocab_size)
        meta = {
            "source": args.input,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": str(args.tokenizer),
        }
        documents = iter_text_documents(args, tokenizer)
    return write_shards(args, documents, meta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--indexed", help="indexed dataset prefix (PREFIX_text_document)")
    source.add_argument("--input", help="jsonl/jsonl.gz/jsonl.zst/parquet file, dir or glob")
    parser.add_argument("--tokenizer", help="with --input: tokenizer path or registered name")
    parser.add_argument("--json-key", default="text", help="with --input: the text key/column")
    parser.add_argument("--append-eod", action="store_true", help="with --input: end docs with EOD")
    parser.add_argument("--output", required=True, help="writes OUTPUT-%%06d.tar and OUTPUT.json")
    parser.add_argument("--seq-length", type=int, required=True, help="model.seq_length")
    parser.add_argument("--samples-per-shard", type=int, default=4096, help="samples per tar")
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        help="with --indexed: concatenate documents in this seed's random order",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    args = parser.parse_args(argv)
    if args.input and not args.tokenizer:
        parser.error("--input needs --tokenizer")
    if args.seq_length < 1 or args.samples_per_shard < 1:
        parser.error("--seq-length and --samples-per-shard must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = run(args)
    except (DataError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output}.json: {stats.line(stats.num_shards)}; "
        f"{stats.num_dropped_tokens} tail tokens dropped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
