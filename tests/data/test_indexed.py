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

from megatron_forge.config import ConfigError, load_config
from megatron_forge.data import indexed
from megatron_forge.data.datasets import build_datasets, check_data_paths
from megatron_forge.data.indexed import (
    IndexedDatasetError,
    IndexedDatasetWriter,
    append_eod_tokens,
    check_indexed_dataset,
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
