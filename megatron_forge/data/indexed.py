"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``): a streaming writer, the header
reader and a check.

The format is megatron-core's (``megatron.core.datasets.indexed_dataset``), version 1:

    .idx: b"MMIDIDX\\x00\\x00", version <Q (1), dtype code <B, sequence count S <Q,
          document count D <Q, lengths int32[S], byte pointers int64[S], document
          indices int64[D] (a trailing int8[S] of modes in multimodal datasets)
    .bin: the tokens of every sequence, back to back, in the dtype of the code

:class:`IndexedDatasetWriter` writes the same bytes as megatron-core's
``IndexedDatasetBuilder`` but keeps the per-document lengths in a file rather than in Python
lists, so memory stays flat for billions of documents. :func:`read_index_header` is the one
parser of the ``.idx`` header. :func:`check_indexed_dataset` checks a pair against each other
(sizes, and every length, pointer and document index of the ``.idx``) before megatron-core
memory-maps it, which otherwise reads a truncated or corrupt file as garbage or fails deep
inside training. :func:`check_token_ids` finds token ids outside the model's vocabulary (a
dataset made with another tokenizer), in a sample of the ``.bin`` or in all of it.
:func:`append_eod_tokens` ends documents given back to back with the end-of-document token,
as ``--append-eod`` asks.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_forge.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype, S, D
# megatron.core.datasets.indexed_dataset.DType
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
COPY_ITEMS = 1 << 22  # items per block when streaming the index arrays
REBUILD = "rerun tools/preprocess_data.py for this prefix"
# check_token_ids' sample of a .bin: its head and tail, and blocks spread between.
SAMPLE_END_BYTES = 4 << 20
SAMPLE_BLOCKS = 32
SAMPLE_BLOCK_BYTES = 256 << 10
SCAN_BLOCK_BYTES = 64 << 20  # a full scan reads this much at a time


class IndexedDatasetError(DataError):
    """A .bin/.idx pair that megatron-core cannot read correctly; names the file."""


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Token dtype for a vocabulary: megatron-core's ``DType.optimal_dtype`` (uint16 below 65500
    ids, else int32), without importing megatron-core (and torch) to get it."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype: type[np.number]) -> int:
    return next(code for code, value in DTYPE_CODES.items() if value == np.dtype(dtype).type)


def append_eod_tokens(
    tokens: np.ndarray, lengths: np.ndarray, eod: int, skip_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Documents given as their tokens back to back and each one's length, with ``eod``
    after every document (after every non-empty one with ``skip_empty``, as Megatron-LM
    does); returns the new tokens and lengths, the inputs are left as they are."""
    lengths = np.asarray(lengths)
    ends = np.cumsum(lengths)
    if skip_empty:
        ends = ends[lengths > 0]
        return np.insert(tokens, ends, eod), lengths + (lengths > 0)
    return np.insert(tokens, ends, eod), lengths + 1


class IndexedDatasetWriter:
    """Appends documents to ``BIN_PATH``; :meth:`finalize` writes the index next to it.

    Lengths are spooled to ``BIN_PATH.lengths`` (4 bytes per document) and turned into the
    index in blocks, so memory does not grow with the dataset.
    """

    def __init__(self, bin_path: str, dtype: type[np.number]) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        self.lengths_path = bin_path + ".lengths"
        self._bin = open(bin_path, "wb")  # noqa: SIM115 - closed in finalize/discard
        self._lengths = open(self.lengths_path, "wb")  # noqa: SIM115
        self.num_documents = 0
        self.num_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their tokens back to back and each one's length."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.write(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())
        self.num_documents += len(lengths)
        self.num_tokens += int(tokens.size)

    def close(self) -> None:
        """Close the files without writing an index: they are a part that another writer's
        :meth:`add_part` appends."""
        self._bin.close()
        self._lengths.close()

    def add_part(self, bin_path: str) -> None:
        """Append the documents of a part (``bin_path`` and its lengths, as another writer of
        this dtype left them at :meth:`close`), then delete the part's files. The bytes are
        copied by the kernel where it can (``os.copy_file_range``)."""
        lengths_path = bin_path + ".lengths"
        num_tokens, remainder = divmod(os.path.getsize(bin_path), self.dtype.itemsize)
        if remainder or os.path.getsize(lengths_path) % 4:
            raise IndexedDatasetError(f"{bin_path}: a truncated part; it cannot be appended")
        for source, target in ((bin_path, self._bin), (lengths_path, self._lengths)):
            _append_file(source, target)
        self.num_documents += os.path.getsize(lengths_path) // 4
        self.num_tokens += num_tokens
        os.unlink(bin_path)
        os.unlink(lengths_path)

    def finalize(self, idx_path: str) -> None:
        """Close the .bin and write the .idx (megatron-core's layout, one sequence per doc)."""
        self.close()
        num = self.num_documents
        lengths = np.memmap(self.lengths_path, np.int32, "r") if num else np.zeros(0, np.int32)
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", dtype_code(self.dtype)))
            f.write(struct.pack("<Q", num) + struct.pack("<Q", num + 1))
            for start in range(0, num, COPY_ITEMS):
                f.write(np.asarray(lengths[start : start + COPY_ITEMS]).tobytes())
            offset = 0  # bytes before the current block
            for start in range(0, num, COPY_ITEMS):
                block = np.asarray(lengths[start : start + COPY_ITEMS], dtype=np.int64)
                ends = np.cumsum(block) * self.dtype.itemsize + offset
                f.write((ends - block * self.dtype.itemsize).tobytes())
                offset = int(ends[-1])
            for start in range(0, num + 1, COPY_ITEMS):
                f.write(
                    np.arange(start, min(start + COPY_ITEMS, num + 1), dtype=np.int64).tobytes()
                )
        del lengths
        os.unlink(self.lengths_path)

    def discard(self) -> None:
        """Close and delete everything written so far."""
        for handle in (self._bin, self._lengths):
            handle.close()
        for path in (self.bin_path, self.lengths_path):
            Path(path).unlink(missing_ok=True)


def _append_file(source: str, target: Any) -> None:
    """Copy the file at `source` to the end of the open binary file `target`."""
    target.flush()
    with open(source, "rb") as f:
        size, done = os.fstat(f.fileno()).st_size, 0
        try:  # in the kernel, no copy through this process
            while done < size and (
                n := os.copy_file_range(f.fileno(), target.fileno(), size - done)
            ):
                done += n
        except (AttributeError, OSError):  # not on this system, or not between these files
            pass
        target.seek(0, os.SEEK_END)
        if done < size:
            f.seek(done)
            shutil.copyfileobj(f, target, 4 << 20)


@dataclass
class IndexSummary:
    num_sequences: int
    num_documents: int
    dtype: type[np.number]


def read_index_header(idx: str) -> IndexSummary:
    """The sequence and document counts and the token dtype a ``.idx`` header declares.

    Raises IndexedDatasetError naming the file when it is missing, shorter than the header,
    not an index, or of an unknown dtype.
    """
    if not os.path.isfile(idx):
        raise IndexedDatasetError(f"{idx} does not exist; {REBUILD}")
    with open(idx, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise IndexedDatasetError(
            f"{idx} is {os.path.getsize(idx)} bytes, shorter than the {HEADER_BYTES}-byte "
            f"header: the index is truncated; {REBUILD}"
        )
    magic, (version,), code = header[:9], struct.unpack("<Q", header[9:17]), header[17]
    if magic != INDEX_HEADER or version != 1:
        raise IndexedDatasetError(
            f"{idx} is not a megatron indexed dataset index (header {header[:17]!r}); {REBUILD}"
        )
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx} has an unknown token dtype code {code}; {REBUILD}")
    num_seq, num_docs = struct.unpack("<QQ", header[18:34])
    return IndexSummary(num_seq, num_docs, DTYPE_CODES[code])


def check_indexed_dataset(prefix: str) -> IndexSummary:
    """Check that ``prefix.idx`` is complete and consistent and ``prefix.bin`` has the size it
    describes.

    Raises IndexedDatasetError naming the file at fault. Reads the whole ``.idx`` (12 bytes
    per sequence and 8 per document, in blocks, so memory stays flat) and none of the
    ``.bin``: every length is >= 0, every sequence starts where the one before it ends
    (the first at byte 0), the document indices climb from 0 to the sequence count, and the
    last sequence ends where the ``.bin`` does.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise IndexedDatasetError(f"{path} does not exist; {REBUILD}")
    summary = read_index_header(idx)
    num_seq, num_docs, dtype = summary.num_sequences, summary.num_documents, summary.dtype
    idx_size = os.path.getsize(idx)
    expected = HEADER_BYTES + num_seq * (4 + 8) + num_docs * 8
    if idx_size not in (expected, expected + num_seq):  # + int8 modes when multimodal
        raise IndexedDatasetError(
            f"{idx} is {idx_size} bytes but its header describes {num_seq} sequences and "
            f"{num_docs} documents ({expected} bytes): the index is truncated or corrupt; "
            f"{REBUILD}"
        )
    bin_expected = _check_lengths_and_pointers(idx, summary)
    _check_document_indices(idx, summary)
    bin_size = os.path.getsize(bin_)
    if bin_size != bin_expected:
        raise IndexedDatasetError(
            f"{bin_} is {bin_size} bytes but {idx} describes {num_seq} sequences of "
            f"{np.dtype(dtype).name} tokens = {bin_expected} bytes: the .bin is truncated or "
            f"belongs to a different .idx; {REBUILD}"
        )
    return summary


def _index_arrays(idx: str, summary: IndexSummary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lengths, byte pointers and document indices of a ``.idx``, memory-mapped."""
    num_seq, num_docs = summary.num_sequences, summary.num_documents

    def array(dtype: type, offset: int, count: int) -> np.ndarray:
        if not count:
            return np.zeros(0, dtype)
        return np.memmap(idx, dtype, "r", offset=offset, shape=(count,))

    pointers_at = HEADER_BYTES + 4 * num_seq
    return (
        array(np.int32, HEADER_BYTES, num_seq),
        array(np.int64, pointers_at, num_seq),
        array(np.int64, pointers_at + 8 * num_seq, num_docs),
    )


def _check_lengths_and_pointers(idx: str, summary: IndexSummary) -> int:
    """Check every length and byte pointer; return the byte where the last sequence ends."""
    lengths, pointers, _ = _index_arrays(idx, summary)
    itemsize = np.dtype(summary.dtype).itemsize
    end = 0  # the byte where the sequences before the current block end
    for start in range(0, summary.num_sequences, COPY_ITEMS):
        block = np.asarray(lengths[start : start + COPY_ITEMS], dtype=np.int64)
        negative = np.flatnonzero(block < 0)
        if negative.size:
            i = start + int(negative[0])
            raise IndexedDatasetError(
                f"{idx}: sequence {i} has length {int(block[negative[0]])}, below 0: the "
                f"index is corrupt; {REBUILD}"
            )
        ends = end + np.cumsum(block * itemsize)
        starts = ends - block * itemsize
        found = np.asarray(pointers[start : start + COPY_ITEMS])
        wrong = np.flatnonzero(found != starts)
        if wrong.size:
            i, w = start + int(wrong[0]), int(wrong[0])
            should = "the first sequence starts at byte 0"
            if i:
                should = f"sequence {i - 1} ends at byte {int(starts[w])}"
            raise IndexedDatasetError(
                f"{idx}: sequence {i} starts at byte {int(found[w])} of the .bin, but {should}: "
                f"the pointers disagree with the lengths, the index is corrupt; {REBUILD}"
            )
        end = int(ends[-1])
    return end


def _check_document_indices(idx: str, summary: IndexSummary) -> None:
    """Document indices climb from 0 to the sequence count (document d is the sequences
    ``[doc[d], doc[d + 1])``)."""
    _, _, documents = _index_arrays(idx, summary)
    num_seq, num_docs = summary.num_sequences, summary.num_documents
    if num_docs == 0 or documents[0] != 0 or documents[-1] != num_seq:
        first = int(documents[0]) if num_docs else None
        last = int(documents[-1]) if num_docs else None
        raise IndexedDatasetError(
            f"{idx}: the document indices must run from 0 to the sequence count {num_seq}, "
            f"but they are {num_docs} numbers from {first} to {last}: the index is corrupt; "
            f"{REBUILD}"
        )
    previous = 0
    for start in range(0, num_docs, COPY_ITEMS):
        block = np.asarray(documents[start : start + COPY_ITEMS])
        falling = np.flatnonzero(np.diff(block, prepend=previous) < 0)
        if falling.size:
            d = start + int(falling[0])
            raise IndexedDatasetError(
                f"{idx}: document {d} starts at sequence {int(documents[d])}, before document "
                f"{d - 1} (sequence {int(documents[d - 1])}): the document indices must not "
                f"decrease, the index is corrupt; {REBUILD}"
            )
        previous = int(block[-1])


def _scan_ranges(num_tokens: int, itemsize: int, full: bool) -> list[tuple[int, int]]:
    """Token ranges [start, stop) to read: all of them in blocks, or the sample."""
    if full or num_tokens * itemsize <= 2 * SAMPLE_END_BYTES + SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
        step = max(SCAN_BLOCK_BYTES // itemsize, 1)
        return [(s, min(s + step, num_tokens)) for s in range(0, num_tokens, step)]
    end, block = SAMPLE_END_BYTES // itemsize, SAMPLE_BLOCK_BYTES // itemsize
    middle = np.linspace(end, num_tokens - end - block, SAMPLE_BLOCKS).astype(np.int64)
    return [(0, end), *((int(s), int(s) + block) for s in middle), (num_tokens - end, num_tokens)]


def check_token_ids(
    prefix: str, vocab_size: int, vocab_source: str, full: bool = False
) -> IndexSummary:
    """Check that ``prefix.bin`` holds no token id outside ``[0, vocab_size)``.

    Such ids index past the embedding (a crash on GPU) or into its padding rows (silent
    garbage): the dataset was made with another tokenizer. Reads a sample of the ``.bin``
    (its first and last ``SAMPLE_END_BYTES`` and ``SAMPLE_BLOCKS`` blocks between: about
    16 MiB however large it is), or all of it with ``full``. ``vocab_source`` says where
    ``vocab_size`` comes from (``model.vocab_size=32000``), for the message. Raises
    IndexedDatasetError naming the file, the id and the document that holds it.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    summary = read_index_header(idx)
    dtype = np.dtype(summary.dtype)
    if dtype.kind == "u" and np.iinfo(dtype).max < vocab_size:
        return summary  # no id this dtype can hold is out of range
    num_tokens = os.path.getsize(bin_) // dtype.itemsize
    if not num_tokens:
        return summary
    tokens = np.memmap(bin_, dtype, "r", shape=(num_tokens,))
    for start, stop in _scan_ranges(num_tokens, dtype.itemsize, full):
        block = np.asarray(tokens[start:stop])
        if block.max() < vocab_size and (dtype.kind == "u" or block.min() >= 0):
            continue
        offset = int(np.flatnonzero((block >= vocab_size) | (block < 0))[0])
        position, value = start + offset, block[offset].item()
        raise IndexedDatasetError(
            f"{bin_} holds token id {value} (token {position}, in document "
            f"{_document_of(idx, summary, position)}) but {vocab_source}: ids must be in "
            f"[0, {vocab_size})"
        )
    return summary


def _document_of(idx: str, summary: IndexSummary, position: int) -> int:
    """The document holding the token at ``position`` of the ``.bin``."""
    _, pointers, documents = _index_arrays(idx, summary)
    itemsize = np.dtype(summary.dtype).itemsize
    sequence = int(np.searchsorted(pointers, position * itemsize, side="right")) - 1
    return int(np.searchsorted(documents, sequence, side="right")) - 1
