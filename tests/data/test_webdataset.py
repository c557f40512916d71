"""WebDataset shards: tools/make_webdataset.py packs exactly the indexed token stream, the
loader splits shards over ranks and workers, and a resume continues at the exact next sample
(directly, and in a real 2-rank training run whose losses match an uninterrupted one)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_forge.checkpointing import TRACKER
from megatron_forge.config import Config, ConfigError, load_config
from megatron_forge.data.datasets import build_datasets, microbatch_iterator
from megatron_forge.data.tokenizer import load_tokenizer
from megatron_forge.data.webdataset import (
    Shard,
    WebDatasetSplit,
    iter_reader_samples,
    iter_shard,
    resolve_shards,
)
from megatron_forge.errors import DataError
from tests.conftest import REPO, run_training

SEQ = 128
PER_SHARD = 20
PER_SHARD_ARGS = ["--samples-per-shard", str(PER_SHARD)]


@pytest.fixture(scope="module")
def indexed(preprocess_tool: ModuleType, tiny_corpus: Path, spm_model: Path, tmp_path_factory):
    """The tiny corpus tokenized with the tiny SentencePiece model (EOD after each document)."""
    prefix = tmp_path_factory.mktemp("indexed") / "tiny"
    args = ["--input", str(tiny_corpus), "--output-prefix", str(prefix)]
    assert preprocess_tool.main([*args, "--tokenizer", str(spm_model), "--append-eod"]) == 0
    return Path(f"{prefix}_text_document")


@pytest.fixture(scope="module")
def shards(indexed: Path, webdataset_tool: ModuleType, tmp_path_factory) -> Path:
    """~490 sequences of 129 tokens in shards of 20; returns the manifest."""
    out = tmp_path_factory.mktemp("shards") / "sample"
    args = ["--indexed", str(indexed), "--output", str(out), "--seq-length", str(SEQ)]
    assert webdataset_tool.main(args + PER_SHARD_ARGS) == 0
    return Path(f"{out}.json")


def wds_config(manifest: Path, spm_model: Path, *overrides: str) -> Config:
    return load_config(
        str(REPO / "configs/tiny.yaml"),
        [
            f"data.tokenizer={spm_model}",
            "data.format=webdataset",
            f"data.train_shards=[{manifest}]",
            "data.shuffle_buffer=64",
            *overrides,
        ],
    )


def test_shards_hold_the_indexed_token_stream(
    shards: Path,
    indexed: Path,
    tiny_corpus: Path,
    spm_model: Path,
    webdataset_tool: ModuleType,
    tmp_path: Path,
) -> None:
    """Sample i is tokens [i*L, (i+1)*L] of the documents back to back (GPTDataset's
    overlap of one token); counts match the manifest; a rerun writes identical bytes, and
    packing the jsonl with the tokenizer gives the same shards as packing the .bin/.idx."""
    manifest = json.loads(shards.read_text())
    dataset = IndexedDataset(str(indexed))
    stream = np.concatenate([dataset[i] for i in range(len(dataset))])
    num = (stream.size - 1) // SEQ
    assert manifest["num_samples"] == num and manifest["seq_length"] == SEQ
    assert [s["num_samples"] for s in manifest["shards"]][:-1] == [PER_SHARD] * (num // PER_SHARD)
    samples = []
    for shard in resolve_shards([str(shards)], "test").shards:
        samples += list(iter_shard(shard, SEQ + 1))
    assert [key for key, _ in samples] == [f"{i:010d}" for i in range(num)]
    for i, (_, tokens) in enumerate(samples):
        assert tokens.dtype == np.uint16 and (tokens == stream[i * SEQ : (i + 1) * SEQ + 1]).all()

    again, from_text = tmp_path / "again", tmp_path / "text"
    common = ["--seq-length", str(SEQ), *PER_SHARD_ARGS]
    assert webdataset_tool.main(["--indexed", str(indexed), "--output", str(again), *common]) == 0
    text_args = ["--input", str(tiny_corpus), "--tokenizer", str(spm_model), "--append-eod"]
    assert webdataset_tool.main([*text_args, "--output", str(from_text), *common]) == 0
    for entry in manifest["shards"]:
        original = (shards.parent / entry["url"]).read_bytes()
        assert (tmp_path / entry["url"].replace("sample", "again")).read_bytes() == original
        assert (tmp_path / entry["url"].replace("sample", "text")).read_bytes() == original
    with tarfile.open(shards.parent / manifest["shards"][0]["url"]) as tar:
        assert tar.getnames()[:2] == ["0000000000.tokens.npy", "0000000001.tokens.npy"]


def split_for(manifest: Path, shuffle_buffer: int, urls: bool = False) -> WebDatasetSplit:
    entries = [str(manifest)]
    if urls:  # the same shards named by a brace pattern: no sample counts
        count = len(json.loads(manifest.read_text())["shards"])
        entries = [f"{manifest.parent}/sample-{{000000..{count - 1:06d}}}.tar"]
    found = resolve_shards(entries, "data.train_shards").shards
    return WebDatasetSplit("train", found, SEQ, 1234, shuffle_buffer, eod=2, pad=3)


def test_readers_partition_the_shards(shards: Path) -> None:
    """Without shuffling, 4 readers' first epochs together hold every sample exactly once."""
    data = split_for(shards, shuffle_buffer=0)
    manifest = json.loads(shards.read_text())
    seen = []
    for reader in range(4):
        from megatron_forge.data.webdataset import reader_shards

        epoch_size = sum(s.num_samples for s in reader_shards(data.shards, 1234, 0, reader, 4))
        samples = itertools.islice(iter_reader_samples(data, reader, 4), epoch_size)
        seen += [key for key, _ in samples]
    assert sorted(seen) == [f"{i:010d}" for i in range(manifest["num_samples"])]


def rank_keys(data, cfg: Config, rank: int, start: int, steps: int) -> list[list[str]]:
    """The sample keys of each microbatch rank ``rank`` of 2 reads."""
    from megatron_forge.data.webdataset import webdataset_microbatches

    batches = webdataset_microbatches(data, cfg, rank, 2, start_sample=start, num_steps=steps)
    return [batch["sample_keys"] for batch in batches]


@pytest.mark.parametrize(
    ("num_workers", "urls"), [(0, False), (0, True), (2, False)], ids=["manifest", "urls", "W2"]
)
def test_resume_continues_at_the_exact_next_sample(
    shards: Path, spm_model: Path, num_workers: int, urls: bool
) -> None:
    """For 2 data-parallel ranks, a stream started at consumed_samples equals the
    uninterrupted stream from there: at step 1, mid-block (3) and in later epochs (a rank's
    epoch is ~245 samples, ~30 steps of 8 samples)."""
    cfg = wds_config(shards, spm_model, f"data.num_workers={num_workers}")
    data = split_for(shards, cfg.data.shuffle_buffer, urls)
    gbs, total = cfg.train.global_batch_size, 70
    per_step = gbs // 2 // cfg.train.micro_batch_size
    for rank in (0, 1):
        full = rank_keys(data, cfg, rank, 0, total)
        assert len(full) == total * per_step
        for resume_step in (1, 3, 31, 64):
            resumed = rank_keys(data, cfg, rank, resume_step * gbs, total - resume_step)
            assert resumed == full[resume_step * per_step :], (resume_step, rank)


def test_pipe_urls_read_the_same_samples(shards: Path) -> None:
    """`pipe:` URLs (how object storage is read: `pipe:aws s3 cp s3://... -`) stream the
    same samples as the local files."""
    local = split_for(shards, 64)
    piped = split_for(shards, 64)
    piped.shards = [replace(s, url=f"pipe:cat {s.url}") for s in local.shards]
    for reader in (0, 1):
        expected = [k for k, _ in itertools.islice(iter_reader_samples(local, reader, 2, 30), 50)]
        got = [k for k, _ in itertools.islice(iter_reader_samples(piped, reader, 2, 30), 50)]
        assert got == expected


def test_no_sample_twice_within_an_epoch(shards: Path, spm_model: Path) -> None:
    """The first 15 steps of both ranks (240 of ~490 samples, all before any reader's epoch
    ends) hold no sample twice."""
    cfg = wds_config(shards, spm_model)
    data = split_for(shards, cfg.data.shuffle_buffer)
    keys = [k for rank in (0, 1) for batch in rank_keys(data, cfg, rank, 0, 15) for k in batch]
    assert len(keys) == len(set(keys)) == 15 * cfg.train.global_batch_size


def test_sample_keys_reach_the_trainer_as_tensors(shards: Path, spm_model: Path) -> None:
    cfg = wds_config(shards, spm_model, "data.eod_mask_loss=true")
    train, valid = build_datasets(cfg, load_tokenizer(spm_model))
    assert valid is None  # no data.valid_shards
    batches = list(microbatch_iterator(train, cfg, 0, 2, num_steps=5))
    assert len(batches) == 5 * 2
    batch = batches[0]
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (cfg.train.micro_batch_size, SEQ)
    key, tokens = next(iter_reader_samples(train, 0, 2))
    assert batch["tokens"][0].tolist() == tokens[:-1].tolist()
    assert batch["labels"][0].tolist() == tokens[1:].tolist()
    assert batch["position_ids"][1].tolist() == list(range(SEQ))
    tokens = torch.cat([b["tokens"] for b in batches])
    loss_mask = torch.cat([b["loss_mask"] for b in batches])
    eod = (tokens == 2).float()
    assert eod.sum() > 0 and ((1 - loss_mask) == eod).all()  # only EOD inputs are masked


def test_errors_name_the_field(shards: Path, spm_model: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(spm_model)
    cfg = wds_config(shards, spm_model, "model.seq_length=64")
    with pytest.raises(ConfigError) as err:
        build_datasets(cfg, tok)
    assert str(err.value) == (
        "data.train_shards: the manifest's sequences have seq_length=128 but "
        "model.seq_length=64; rebuild the shards with tools/make_webdataset.py --seq-length 64"
    )
    one = f"data.train_shards=[{shards.parent}/sample-000000.tar]"
    few = wds_config(shards, spm_model, one)
    train, _ = build_datasets(few, tok)
    with pytest.raises(ConfigError) as err:
        microbatch_iterator(train, few, 0, 2)
    assert str(err.value) == (
        "data.train_shards has 1 shards but 2 readers (data-parallel size 2 x 1 per rank, "
        "data.num_workers=0) need at least one each; write more, smaller shards "
        "(tools/make_webdataset.py --samples-per-shard) or lower data.num_workers"
    )
    missing = f"{shards.parent}/sample-{{000000..000099}}.tar"
    with pytest.raises(DataError) as err:  # the files, not a field, are at fault
        build_datasets(wds_config(shards, spm_model, f"data.train_shards=['{missing}']"), tok)
    count = len(json.loads(shards.read_text())["shards"])
    assert str(err.value) == (
        f"data.train_shards: shard {shards.parent}/sample-{count:06d}.tar does not exist "
        "(write shards with tools/make_webdataset.py)"
    )
    # A URL list carries no seq_length: a wrong one is caught on the first sample.
    by_url = split_for(shards, 0, urls=True)
    by_url.seq_length = 64
    with pytest.raises(DataError) as err:
        next(iter_reader_samples(by_url, 0, 1))
    assert re.fullmatch(
        r"shard .*/sample-\d{6}\.tar: sample \d{10} has shape \(129,\), expected \(65,\) "
        r"tokens \(model\.seq_length \+ 1\); rebuild the shards with "
        r"tools/make_webdataset\.py --seq-length 64",
        str(err.value),
    )
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes((shards.parent / "sample-000001.tar").read_bytes()[:3000])
    with pytest.raises(DataError) as err:
        list(iter_shard(Shard(str(truncated)), SEQ + 1))
    assert str(err.value) == (
        f"shard {truncated}: unreadable after 2 samples (unexpected end of data); the tar is "
        "truncated or corrupt: rewrite it with tools/make_webdataset.py"
    )
    stale = tmp_path / "stale.json"
    manifest = json.loads(shards.read_text())
    manifest["shards"] = [{**manifest["shards"][0], "num_samples": PER_SHARD + 1}]
    manifest["shards"][0]["url"] = str(shards.parent / manifest["shards"][0]["url"])
    stale.write_text(json.dumps(manifest))
    (shard,) = resolve_shards([str(stale)], "test").shards
    with pytest.raises(DataError) as err:
        list(iter_shard(shard, SEQ + 1))
    assert str(err.value) == (
        f"shard {shard.url} holds {PER_SHARD} samples but its manifest says {PER_SHARD + 1}; "
        "the shard is truncated or the manifest is stale"
    )


@pytest.mark.slow
def test_two_rank_training_resumes_exactly(shards: Path, spm_model: Path, tmp_path: Path) -> None:
    """2 DP ranks with 2 loader workers each: a run restored from its step-3 checkpoint
    trains on exactly the next samples (logged ids) and reaches exactly the losses of steps
    4-6 of the uninterrupted run."""
    common = [
        f"data.tokenizer={spm_model}",
        "data.format=webdataset",
        f"data.train_shards=[{shards}]",
        "data.num_workers=2",
        "data.shuffle_buffer=64",  # < a reader's epoch (~120 samples): no repeats to check
        "data.log_sample_ids=true",
        "train.train_iters=6",
        "train.eval_interval=0",
        "logging.log_interval=1",
        "checkpoint.save_interval=3",
        "checkpoint.async_save=false",
    ]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = run_training(
        2, "configs/tiny.yaml", [*common, f"checkpoint.save={full_dir}/ckpt"], full_dir
    )
    shutil.copytree(full_dir / "ckpt" / "iter_0000003", resumed_dir / "ckpt" / "iter_0000003")
    (resumed_dir / "ckpt" / TRACKER).write_text("3\n")
    ckpt = resumed_dir / "ckpt"
    overrides = [*common, f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}"]
    resumed = run_training(2, "configs/tiny.yaml", overrides, resumed_dir)

    losses = {r["step"]: r["loss"] for r in full if "loss" in r}
    assert {r["step"]: r["loss"] for r in resumed if "loss" in r} == {
        step: losses[step] for step in (4, 5, 6)
    }
    per_step = 16 // 2 // 4  # microbatches per rank and step: global batch / DP / micro batch
    consumed = []
    for rank in (0, 1):
        logged = (full_dir / f"sample_ids/train_rank{rank}.txt").read_text().splitlines()
        after = (resumed_dir / f"sample_ids/train_rank{rank}.txt").read_text().splitlines()
        assert len(logged) == 6 * per_step
        assert after == logged[3 * per_step :]  # the exact next samples, none twice, none skipped
        consumed += [key for line in logged for key in line.split()]
    assert len(consumed) == len(set(consumed)) == 6 * 16
