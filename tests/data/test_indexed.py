"""megatron_forge.data.indexed: the streaming writer matches megatron-core byte for byte, and a
truncated or mismatched .bin/.idx pair is caught, naming the file, before training reads it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_forge.config import load_config
from megatron_forge.data import indexed
from megatron_forge.data.datasets import build_datasets, check_data_paths
from megatron_forge.data.indexed import (
    IndexedDatasetError,
    IndexedDatasetWriter,
    append_eod_tokens,
    check_indexed_dataset,
    check_token_ids,
    read_index_header,
)
from megatron_forge.data.tokenizer import load_tokenizer
from megatron_forge.errors import DataError

REBUILD = "rerun tools/preprocess_data.py for this prefix"


def random_documents(num: int, seed: int = 0, high: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, rng.integers(1, 60)).astype(np.uint16) for _ in range(num)]


def write_dataset(prefix: Path, docs: list[np.ndarray], dtype: type = np.uint16) -> Path:
    writer = IndexedDatasetWriter(f"{prefix}.bin", dtype)
    for start in range(0, len(docs), 7):  # several calls, as chunks arrive
        part = docs[start : start + 7]
        lengths = np.array([d.size for d in part])
        writer.add_documents(np.concatenate(part) if part else np.zeros(0, dtype), lengths)
    writer.finalize(f"{prefix}.idx")
    return prefix


@pytest.mark.parametrize("num_docs", [0, 1, 50])
def test_writer_matches_megatron_core_builder(
    num_docs: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(indexed, "COPY_ITEMS", 8)  # exercise the blockwise index writing
    docs = random_documents(num_docs)
    ours = write_dataset(tmp_path / "ours", docs)
    builder = IndexedDatasetBuilder(str(tmp_path / "mcore.bin"), np.uint16)
    for doc in docs:
        builder.add_document(doc, [doc.size])
    builder.finalize(str(tmp_path / "mcore.idx"))
    for ext in (".bin", ".idx"):
        assert Path(f"{ours}{ext}").read_bytes() == (tmp_path / f"mcore{ext}").read_bytes()
    assert not list(tmp_path.glob("*.lengths"))  # the spool file is gone
    if num_docs:
        dataset = IndexedDataset(str(ours))
        assert all((dataset[i] == doc).all() for i, doc in enumerate(docs))


@pytest.mark.parametrize("copy_file_range", [True, False])
def test_parts_append_to_the_same_bytes(
    copy_file_range: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents written as parts by other writers (as preprocessing workers write spans) and
    appended in order, empty parts included, give the bytes of one writer; the parts are
    deleted. The same without os.copy_file_range (the plain copy it falls back to)."""
    if not copy_file_range:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    docs = random_documents(40, seed=3)
    whole = write_dataset(tmp_path / "whole", docs)
    writer = IndexedDatasetWriter(str(tmp_path / "joined.bin"), np.uint16)
    writer.add_documents(docs[0], np.array([docs[0].size]))  # appended parts follow this
    for i, part_docs in enumerate((docs[1:15], [], docs[15:16], docs[16:])):
        part = IndexedDatasetWriter(str(tmp_path / f"part{i}.bin"), np.uint16)
        if part_docs:
            lengths = np.array([d.size for d in part_docs])
            part.add_documents(np.concatenate(part_docs), lengths)
        part.close()
        writer.add_part(str(tmp_path / f"part{i}.bin"))
    assert (writer.num_documents, writer.num_tokens) == (40, sum(d.size for d in docs))
    writer.finalize(str(tmp_path / "joined.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"joined{ext}").read_bytes() == Path(f"{whole}{ext}").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "joined.bin",
        "joined.idx",
        "whole.bin",
        "whole.idx",
    ]


@pytest.fixture
def good_prefix(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "good", random_documents(30))


def truncate(path: Path, num_bytes: int) -> int:
    size = path.stat().st_size - num_bytes
    os.truncate(path, size)
    return size


def test_good_pair_passes(good_prefix: Path) -> None:
    summary = check_indexed_dataset(str(good_prefix))
    assert (summary.num_sequences, summary.num_documents, summary.dtype) == (30, 31, np.uint16)
    assert read_index_header(f"{good_prefix}.idx") == summary
    int32 = write_dataset(good_prefix.with_name("wide"), random_documents(3), np.int32)
    assert read_index_header(f"{int32}.idx").dtype == np.int32
    assert issubclass(IndexedDatasetError, DataError)


def test_append_eod_tokens() -> None:
    tokens, lengths = np.array([5, 6, 7], np.uint16), np.array([2, 0, 1])
    out, out_lengths = append_eod_tokens(tokens, lengths, 2)
    assert out.dtype == np.uint16 and out.tolist() == [5, 6, 2, 2, 7, 2]
    assert out_lengths.tolist() == [3, 1, 2]
    out, out_lengths = append_eod_tokens(tokens, lengths, 2, skip_empty=True)  # Megatron-LM's
    assert out.tolist() == [5, 6, 2, 7, 2] and out_lengths.tolist() == [3, 0, 2]
    assert tokens.tolist() == [5, 6, 7] and lengths.tolist() == [2, 0, 1]  # inputs untouched


def test_truncated_bin(good_prefix: Path) -> None:
    bin_path, idx_path = Path(f"{good_prefix}.bin"), Path(f"{good_prefix}.idx")
    full = bin_path.stat().st_size
    size = truncate(bin_path, 10)
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{bin_path} is {size} bytes but {idx_path} describes 30 sequences of uint16 tokens = "
        f"{full} bytes: the .bin is truncated or belongs to a different .idx; {REBUILD}"
    )


def test_bin_of_another_dataset(good_prefix: Path, tmp_path: Path) -> None:
    other = write_dataset(tmp_path / "other", random_documents(30, seed=1))
    shutil.copyfile(f"{other}.bin", f"{good_prefix}.bin")
    with pytest.raises(IndexedDatasetError, match="belongs to a different .idx"):
        check_indexed_dataset(str(good_prefix))


def test_truncated_idx(good_prefix: Path) -> None:
    idx_path = Path(f"{good_prefix}.idx")
    full = idx_path.stat().st_size
    size = truncate(idx_path, 8)
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx_path} is {size} bytes but its header describes 30 sequences and 31 documents "
        f"({full} bytes): the index is truncated or corrupt; {REBUILD}"
    )
    truncate(idx_path, size - 20)
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx_path} is 20 bytes, shorter than the 34-byte header: the index is truncated; "
        f"{REBUILD}"
    )


def test_not_an_index(good_prefix: Path) -> None:
    idx_path = Path(f"{good_prefix}.idx")
    idx_path.write_bytes(b"X" * 100)
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx_path} is not a megatron indexed dataset index (header {b'X' * 17!r}); {REBUILD}"
    )


def test_training_reports_the_broken_file(
    good_prefix: Path, spm_model: Path, tmp_path: Path
) -> None:
    """Both checks the trainer runs (before process groups, and when building datasets)
    raise a DataError naming the file, instead of megatron-core crashing mid-run."""
    cfg = load_config(
        None,
        [
            f"data.blend=[{good_prefix}]",
            f"data.tokenizer={spm_model}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.seq_length=16",
        ],
    )
    size = truncate(Path(f"{good_prefix}.bin"), 2)
    expected = f"data.blend: {good_prefix}.bin is {size} bytes but {good_prefix}.idx describes"
    with pytest.raises(DataError, match=re.escape(expected)):
        check_data_paths(cfg)
    with pytest.raises(DataError, match=re.escape(expected)):
        build_datasets(cfg, load_tokenizer(spm_model))


def index_array(prefix: Path, which: str) -> np.ndarray:
    """One array of a .idx, writable in place: lengths, pointers or documents."""
    summary = read_index_header(f"{prefix}.idx")
    num_seq, num_docs = summary.num_sequences, summary.num_documents
    pointers_at = indexed.HEADER_BYTES + 4 * num_seq
    dtype, offset, count = {
        "lengths": (np.int32, indexed.HEADER_BYTES, num_seq),
        "pointers": (np.int64, pointers_at, num_seq),
        "documents": (np.int64, pointers_at + 8 * num_seq, num_docs),
    }[which]
    return np.memmap(f"{prefix}.idx", dtype, "r+", offset=offset, shape=(count,))


def test_pointers_that_disagree_with_lengths(good_prefix: Path) -> None:
    idx = f"{good_prefix}.idx"
    pointers = index_array(good_prefix, "pointers")
    right = int(pointers[5])
    pointers[5] = right + 2  # same size on disk: only reading the pointers finds it
    pointers.flush()
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx}: sequence 5 starts at byte {right + 2} of the .bin, but sequence 4 ends at "
        f"byte {right}: the pointers disagree with the lengths, the index is corrupt; {REBUILD}"
    )
    pointers[5] = right
    pointers[0] = 8
    pointers.flush()
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx}: sequence 0 starts at byte 8 of the .bin, but the first sequence starts at "
        f"byte 0: the pointers disagree with the lengths, the index is corrupt; {REBUILD}"
    )


def test_lengths_that_disagree_with_pointers_or_bin(
    good_prefix: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(indexed, "COPY_ITEMS", 4)  # a fault past the first block
    idx = f"{good_prefix}.idx"
    lengths = index_array(good_prefix, "lengths")
    pointers = index_array(good_prefix, "pointers")
    lengths[9] += 1
    lengths.flush()
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx}: sequence 10 starts at byte {int(pointers[10])} of the .bin, but sequence 9 "
        f"ends at byte {int(pointers[10]) + 2}: the pointers disagree with the lengths, the "
        f"index is corrupt; {REBUILD}"
    )
    lengths[9] = -3
    lengths.flush()
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx}: sequence 9 has length -3, below 0: the index is corrupt; {REBUILD}"
    )


def test_document_indices_checked(good_prefix: Path) -> None:
    idx = f"{good_prefix}.idx"
    documents = index_array(good_prefix, "documents")
    documents[-1] = 29
    documents.flush()
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx}: the document indices must run from 0 to the sequence count 30, but they are "
        f"31 numbers from 0 to 29: the index is corrupt; {REBUILD}"
    )
    documents[-1] = 30
    documents[7] = 3
    documents.flush()
    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(str(good_prefix))
    assert str(err.value) == (
        f"{idx}: document 7 starts at sequence 3, before document 6 (sequence 6): the "
        f"document indices must not decrease, the index is corrupt; {REBUILD}"
    )


def docs_with_id(num: int, position: int, token: int, seed: int = 0) -> list[np.ndarray]:
    """``num`` random documents (ids < 300) with ``token`` at ``position`` of the .bin."""
    docs = random_documents(num, seed)
    ends = np.cumsum([d.size for d in docs])
    doc = int(np.searchsorted(ends, position, side="right"))
    docs[doc][position - (ends[doc - 1] if doc else 0)] = token
    return docs


def test_token_ids_sampled_or_scanned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny sample (the first and last 32 tokens and two blocks of 8) over ~900 tokens.
    monkeypatch.setattr(indexed, "SAMPLE_END_BYTES", 64)
    monkeypatch.setattr(indexed, "SAMPLE_BLOCKS", 2)
    monkeypatch.setattr(indexed, "SAMPLE_BLOCK_BYTES", 16)
    monkeypatch.setattr(indexed, "SCAN_BLOCK_BYTES", 100)  # a full scan in several reads
    good = write_dataset(tmp_path / "good", random_documents(30))
    assert check_token_ids(str(good), 300, "model.vocab_size=300").num_sequences == 30
    assert check_token_ids(str(good), 300, "model.vocab_size=300", full=True)
    num_tokens = Path(f"{good}.bin").stat().st_size // 2

    middle = write_dataset(tmp_path / "middle", docs_with_id(30, num_tokens // 2, 4000))
    check_token_ids(str(middle), 300, "model.vocab_size=300")  # not in the sample
    with pytest.raises(IndexedDatasetError) as err:
        check_token_ids(str(middle), 300, "model.vocab_size=300", full=True)
    doc = int(
        np.searchsorted(np.cumsum([d.size for d in random_documents(30)]), num_tokens // 2, "right")
    )
    assert str(err.value) == (
        f"{middle}.bin holds token id 4000 (token {num_tokens // 2}, in document {doc}) but "
        "model.vocab_size=300: ids must be in [0, 300)"
    )
    tail = write_dataset(tmp_path / "tail", docs_with_id(30, num_tokens - 3, 300))
    with pytest.raises(
        IndexedDatasetError, match=rf"token id 300 \(token {num_tokens - 3}, in document 29\)"
    ):
        check_token_ids(str(tail), 300, "model.vocab_size=300")


def test_negative_token_ids_and_wide_vocab(tmp_path: Path) -> None:
    docs = [d.astype(np.int32) for d in docs_with_id(5, 7, 0)]
    docs[0][7] = -2
    prefix = write_dataset(tmp_path / "signed", docs, np.int32)
    with pytest.raises(IndexedDatasetError, match=r"holds token id -2 \(token 7, in document 0\)"):
        check_token_ids(str(prefix), 300, "model.vocab_size=300")
    # uint16 cannot hold an id past a vocabulary of 70000: nothing is read.
    check_token_ids(str(write_dataset(tmp_path / "u16", random_documents(5))), 70000, "x")


def blend_config(prefix: Path, tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            f"data.blend=[{prefix}]",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.seq_length=16",
            *overrides,
        ],
    )


def test_training_refuses_ids_past_the_vocabulary(
    tmp_path: Path, spm_model: Path, spm_vocab_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_data_paths (before any process group) names the file, the id and the fix; a
    sample by default, every token with data.full_check."""
    wide = write_dataset(tmp_path / "wide", random_documents(30, high=1000))  # another tokenizer
    cfg = blend_config(wide, tmp_path, f"data.tokenizer={spm_model}")
    with pytest.raises(DataError) as err:
        check_data_paths(cfg)
    assert str(err.value).startswith(f"data.blend: {wide}.bin holds token id ")
    assert f"but data.tokenizer {spm_model} has {spm_vocab_size} ids: ids must be in [0, " in str(
        err.value
    )
    assert str(err.value).endswith(
        f"ids must be in [0, {spm_vocab_size}); the dataset was made with another tokenizer: "
        "tokenize the dataset again with data.tokenizer (tools/preprocess_data.py), or set "
        "data.tokenizer to the one that made it"
    )
    with pytest.raises(DataError) as err:
        check_data_paths(blend_config(wide, tmp_path, "model.vocab_size=256"))
    assert str(err.value).endswith(
        "but model.vocab_size=256: ids must be in [0, 256); set model.vocab_size to the "
        "vocabulary of the tokenizer that made the dataset (or remove it to use "
        "data.tokenizer's), or tokenize the dataset again with data.tokenizer "
        "(tools/preprocess_data.py)"
    )
    check_data_paths(blend_config(wide, tmp_path, "model.vocab_size=1000"))

    monkeypatch.setattr(indexed, "SAMPLE_END_BYTES", 64)
    monkeypatch.setattr(indexed, "SAMPLE_BLOCKS", 2)
    monkeypatch.setattr(indexed, "SAMPLE_BLOCK_BYTES", 16)
    middle = write_dataset(tmp_path / "middle", docs_with_id(30, 450, 999))
    check_data_paths(blend_config(middle, tmp_path, "model.vocab_size=300"))
    full = blend_config(middle, tmp_path, "model.vocab_size=300", "data.full_check=true")
    with pytest.raises(
        DataError, match=r"^data.blend: .*middle.bin holds token id 999 \(token 450"
    ):
        check_data_paths(full)


def test_training_refuses_an_empty_dataset(tmp_path: Path) -> None:
    empty = write_dataset(tmp_path / "empty", [])
    check_indexed_dataset(str(empty))  # a consistent pair...
    cfg = blend_config(empty, tmp_path, "model.vocab_size=300")
    with pytest.raises(DataError) as err:  # ...that training cannot use
        check_data_paths(cfg)
    assert str(err.value) == (
        f"data.blend: {empty}.idx holds no documents; remove {empty} from data.blend, or rerun "
        "tools/preprocess_data.py on an input that has some"
    )
