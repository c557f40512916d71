"""Streaming WebDataset shards of fixed-length token sequences, with exact resume.

Shards are tar files written by tools/make_webdataset.py: one member ``KEY.tokens.npy`` per
sample, ``seq_length + 1`` token ids (inputs and the next-token labels, as megatron's
GPTDataset draws them). They are read with the webdataset library from local paths or any
URL it opens (``pipe:`` commands for object storage).

Order, and why a resume is exact
--------------------------------
A data-parallel rank runs ``max(data.num_workers, 1)`` readers (one per DataLoader worker);
reader ``u = dp_rank * W + worker`` of ``U = dp_size * W`` readers. Its sample stream is a
pure function of (seed, u, U, sample position):

1. epoch ``e`` orders all shards by a permutation seeded with (seed, e), the same on every
   rank; reader ``u`` reads shards ``u, u + U, u + 2U, ...`` of that order, so ranks and
   workers never share a shard within an epoch. The reader's input is its shards of epoch 0,
   then of epoch 1, ... (endless);
2. the input is cut into blocks of ``data.shuffle_buffer`` samples and each block is
   emitted in an order seeded with (seed, u, U, block number): a shuffle buffer whose state
   never depends on what was read before it.

Microbatch ``j`` of a rank comes from its worker ``j % W`` (the DataLoader's round robin),
and rank ``r`` trains on its own stream's positions ``[step * GBS/dp, (step+1) * GBS/dp)``.
After a restore the trainer passes ``consumed_samples``; each reader jumps to its position
``p``: shards wholly before ``p``'s block are skipped without being opened when their sample
counts are known (a manifest from make_webdataset.py), then at most one shard prefix and one
block (``shuffle_buffer`` samples) are read and dropped. Without counts (bare URLs) the
reader reads and drops every sample before ``p``: cost linear in the samples consumed.
The order depends on the data-parallel size and ``data.num_workers``; resuming with other
values starts a different (still seeded) order rather than the exact continuation.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import tarfile
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_forge.config import Config, ConfigError
from megatron_forge.errors import DataError

MANIFEST_FORMAT = "megatron-forge-webdataset"
TOKENS_FIELD = "tokens.npy"
EPOCH_SEED, BLOCK_SEED = 1, 2  # keep the two seed streams apart


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: Optional[int] = None
    """From the manifest; None when the shard was named by URL."""


@dataclass
class ShardSet:
    shards: list[Shard]
    seq_lengths: set[int] = field(default_factory=set)
    """Sequence lengths the manifests declare."""
    vocab_sizes: set[int] = field(default_factory=set)


@dataclass
class WebDatasetSplit:
    """What build_datasets returns for data.format=webdataset; microbatch_iterator reads it.

    Plain data (picklable): DataLoader workers receive a copy.
    """

    split: str
    shards: list[Shard]
    seq_length: int
    seed: int
    shuffle_buffer: int
    eod: Optional[int] = None
    pad: int = -1
    eod_mask_loss: bool = False


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file:") else url


def read_manifest(path: str, where: str) -> tuple[list[Shard], dict[str, Any]]:
    """The shards a make_webdataset.py manifest lists (URLs relative to it resolved)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except OSError as e:
        raise DataError(f"{where}: cannot read manifest {path}: {e.strerror}") from None
    except ValueError as e:
        raise DataError(f"{where}: {path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(
            f"{where}: {path} is not a manifest written by tools/make_webdataset.py "
            f'(no "format": "{MANIFEST_FORMAT}")'
        )
    base = Path(path).parent
    shards = []
    try:
        int(manifest["seq_length"])
        for entry in manifest["shards"]:
            url = entry["url"]
            if is_local(url) and not Path(local_path(url)).is_absolute():
                url = str(base / url)
            shards.append(Shard(url, int(entry["num_samples"])))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{where}: manifest {path} is malformed ({type(e).__name__}: {e}); rewrite it "
            "with tools/make_webdataset.py"
        ) from None
    return shards, manifest


def resolve_shards(entries: list[str], where: str) -> ShardSet:
    """Expand manifests, globs and brace patterns into shards; check local files exist."""
    import webdataset as wds

    result = ShardSet([])
    for entry in entries:
        if is_local(entry) and entry.endswith(".json"):
            shards, manifest = read_manifest(local_path(entry), where)
            result.shards += shards
            result.seq_lengths.add(int(manifest["seq_length"]))
            if manifest.get("vocab_size"):
                result.vocab_sizes.add(int(manifest["vocab_size"]))
            continue
        for url in wds.shardlists.expand_urls(entry):
            if is_local(url) and any(c in url for c in "*?["):
                matches = sorted(glob.glob(local_path(url)))
                if not matches:
                    raise DataError(f"{where}: {url} matches no files")
                result.shards += [Shard(m) for m in matches]
            else:
                result.shards.append(Shard(url))
    for shard in result.shards:
        if is_local(shard.url) and not Path(local_path(shard.url)).is_file():
            raise DataError(
                f"{where}: shard {shard.url} does not exist (write shards with "
                "tools/make_webdataset.py)"
            )
    if not result.shards:
        raise DataError(f"{where} names no shards")
    return result


def check_shards(cfg: Config, tokenizer: Any = None) -> dict[str, ShardSet]:
    """Resolve data.train_shards / valid_shards and check them against the model."""
    sets = {}
    for split, entries in (("train", cfg.data.train_shards), ("valid", cfg.data.valid_shards)):
        if not entries:
            continue
        where = f"data.{split}_shards"
        shard_set = resolve_shards(entries, where)
        wrong = sorted(shard_set.seq_lengths - {cfg.model.seq_length})
        if wrong:
            raise ConfigError(
                f"{where}: the manifest's sequences have seq_length={wrong[0]} but "
                f"model.seq_length={cfg.model.seq_length}; rebuild the shards with "
                f"tools/make_webdataset.py --seq-length {cfg.model.seq_length}"
            )
        vocab = max(shard_set.vocab_sizes, default=0)
        if tokenizer is not None and vocab > tokenizer.vocab_size:
            raise ConfigError(
                f"{where}: the shards were tokenized with a vocabulary of {vocab} but "
                f"data.tokenizer has {tokenizer.vocab_size}; use the same tokenizer"
            )
        sets[split] = shard_set
    return sets


def build_webdatasets(
    cfg: Config, tokenizer: Any
) -> tuple[WebDatasetSplit, Optional[WebDatasetSplit]]:
    """The train (and, with data.valid_shards and evaluation on, validation) streams."""
    sets = check_shards(cfg, tokenizer)
    eod = tokenizer.eod if tokenizer is not None else None
    pad = tokenizer.pad if tokenizer is not None else -1

    def make(split: str) -> WebDatasetSplit:
        return WebDatasetSplit(
            split,
            sets[split].shards,
            cfg.model.seq_length,
            cfg.train.seed,
            cfg.data.shuffle_buffer,
            eod,
            pad,
            cfg.data.eod_mask_loss,
        )

    evaluates = cfg.train.eval_interval > 0
    return make("train"), (make("valid") if "valid" in sets and evaluates else None)


# Reading ------------------------------------------------------------------------------------
def iter_shard(
    shard: Shard, num_tokens: int, skip: int = 0
) -> Generator[tuple[str, np.ndarray], None, int]:
    """(key, tokens) of the samples of one shard after the first ``skip``, in tar order;
    returns the number of samples in the shard. Skipped samples are not decoded."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = wds.gopen(shard.url)
    count = 0
    try:
        files = ({**f, "__url__": shard.url} for f in tar_file_iterator(stream))
        samples = group_by_keys(files)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(
                    f"shard {shard.url}: unreadable after {count} samples ({e}); the tar is "
                    "truncated or corrupt: rewrite it with tools/make_webdataset.py"
                ) from None
            count += 1
            if count > skip:
                yield sample["__key__"], decode_tokens(shard, sample, num_tokens)
    finally:
        stream.close()
    if shard.num_samples is not None and count != shard.num_samples:
        raise DataError(
            f"shard {shard.url} holds {count} samples but its manifest says "
            f"{shard.num_samples}; the shard is truncated or the manifest is stale"
        )
    return count


def decode_tokens(shard: Shard, sample: dict[str, Any], num_tokens: int) -> np.ndarray:
    key = sample["__key__"]
    if TOKENS_FIELD not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(
            f"shard {shard.url}: sample {key} has no {TOKENS_FIELD} (has {fields}); "
            "write shards with tools/make_webdataset.py"
        )
    tokens = load_npy(sample[TOKENS_FIELD])
    if tokens.shape != (num_tokens,):
        raise DataError(
            f"shard {shard.url}: sample {key} has shape {tokens.shape}, expected "
            f"({num_tokens},) tokens (model.seq_length + 1); rebuild the shards with "
            f"tools/make_webdataset.py --seq-length {num_tokens - 1}"
        )
    return tokens


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def load_npy(raw: bytes) -> np.ndarray:
    """np.load of one .npy file; headers seen before skip numpy's (slow) header parsing."""
    if raw[:6] == b"\x93NUMPY" and raw[6] == 1:  # format 1.0: <H header length at byte 8
        size = 10 + int.from_bytes(raw[8:10], "little")
        known = _NPY_HEADERS.get(raw[:size])
        if known is not None:
            return np.frombuffer(raw, known[0], offset=size).reshape(known[1])
        array = np.load(io.BytesIO(raw), allow_pickle=False)
        if len(_NPY_HEADERS) < 64:  # fixed-length samples: a handful of distinct headers
            _NPY_HEADERS[raw[:size]] = (array.dtype, array.shape)
        return array
    return np.load(io.BytesIO(raw), allow_pickle=False)


def reader_shards(shards: list[Shard], seed: int, epoch: int, reader: int, readers: int):
    """The shards one reader reads in one epoch, in order."""
    order = np.random.default_rng([seed, EPOCH_SEED, epoch]).permutation(len(shards))
    return [shards[i] for i in order[reader::readers]]


def iter_reader_input(
    data: WebDatasetSplit, reader: int, readers: int, start: int
) -> Iterator[tuple[str, np.ndarray]]:
    """A reader's input stream (before shuffling), endless, from position ``start``.

    Shards wholly before ``start`` are skipped unopened when their size is known.
    """
    skip = start
    for epoch in itertools.count():
        seen = 0
        for shard in reader_shards(data.shards, data.seed, epoch, reader, readers):
            if shard.num_samples is not None and skip >= shard.num_samples:
                num = shard.num_samples  # skipped unopened
            else:
                num = yield from iter_shard(shard, data.seq_length + 1, skip)
            skip = max(skip - num, 0)
            seen += num
        if not seen:
            raise DataError(f"data.{data.split}_shards: reader {reader} has only empty shards")


def iter_reader_samples(
    data: WebDatasetSplit, reader: int, readers: int, start: int = 0
) -> Iterator[tuple[str, np.ndarray]]:
    """A reader's shuffled sample stream (key, tokens), endless, from position ``start``."""
    size = max(data.shuffle_buffer, 1)
    block = start // size
    source = iter_reader_input(data, reader, readers, block * size)
    drop = start - block * size
    while True:
        items = list(itertools.islice(source, size))
        if size > 1:
            rng = np.random.default_rng([data.seed, BLOCK_SEED, reader, readers, block])
            items = [items[i] for i in rng.permutation(len(items))]
        yield from items[drop:]
        drop, block = 0, block + 1


def to_microbatch(data: WebDatasetSplit, samples: list[tuple[str, np.ndarray]]) -> dict:
    """Stack samples into the dict GPTDataset batches hold, plus their keys."""
    text = torch.from_numpy(np.stack([tokens for _, tokens in samples]).astype(np.int64))
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones(tokens.shape, dtype=torch.float)
    if data.eod_mask_loss and data.eod is not None:
        loss_mask[tokens == data.eod] = 0.0
    # As megatron-core's GPTDataset: pad labels carry no loss, pad ids map to a real row.
    loss_mask[labels == data.pad] = 0.0
    tokens[tokens == data.pad] = 0
    labels[labels == data.pad] = 0
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "sample_keys": [key for key, _ in samples],
    }


def iter_reader_microbatches(
    data: WebDatasetSplit, reader: int, readers: int, first: int, micro_batch_size: int
) -> Iterator[dict]:
    """A reader's microbatches from its microbatch number ``first`` on."""
    samples = iter_reader_samples(data, reader, readers, first * micro_batch_size)
    while True:
        yield to_microbatch(data, list(itertools.islice(samples, micro_batch_size)))


class RankStream(IterableDataset):
    """One data-parallel rank's microbatches; each DataLoader worker is one reader."""

    def __init__(
        self,
        data: WebDatasetSplit,
        dp_rank: int,
        dp_size: int,
        num_workers: int,
        first: int,
        micro_batch_size: int,
    ) -> None:
        self.data = data
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = max(num_workers, 1)
        self.first = first
        self.micro_batch_size = micro_batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = self.num_workers
        # Microbatch j comes from worker j % W: worker w has made those j < first with
        # j % W == w, that is ceil((first - w) / W) of them.
        local_first = (self.first + workers - 1 - worker) // workers
        reader = self.dp_rank * workers + worker
        yield from iter_reader_microbatches(
            self.data, reader, self.dp_size * workers, local_first, self.micro_batch_size
        )


def webdataset_microbatches(
    data: WebDatasetSplit,
    cfg: Config,
    dp_rank: int,
    dp_size: int,
    start_sample: int = 0,
    num_steps: Optional[int] = None,
) -> Iterator[dict]:
    """This rank's microbatches after ``start_sample`` samples were consumed (all ranks)."""
    t = cfg.train
    per_rank = t.global_batch_size // dp_size
    if start_sample % t.global_batch_size:
        raise ValueError(
            f"start_sample={start_sample} is not a multiple of the global batch size "
            f"{t.global_batch_size}"
        )
    readers = dp_size * max(cfg.data.num_workers, 1)
    if len(data.shards) < readers:
        raise ConfigError(
            f"data.{data.split}_shards has {len(data.shards)} shards but {readers} readers "
            f"(data-parallel size {dp_size} x {max(cfg.data.num_workers, 1)} per rank, "
            f"data.num_workers={cfg.data.num_workers}) need at least one each; write more, "
            "smaller shards (tools/make_webdataset.py --samples-per-shard) or lower "
            "data.num_workers"
        )
    _warn_if_buffer_exceeds_epoch(data, readers)
    first = start_sample // dp_size // t.micro_batch_size
    stream = RankStream(data, dp_rank, dp_size, cfg.data.num_workers, first, t.micro_batch_size)
    if cfg.data.num_workers == 0:
        batches: Iterator[dict] = iter(stream)
    else:
        loader = DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers)
        batches = iter(loader)
    if num_steps is not None:
        batches = itertools.islice(batches, num_steps * per_rank // t.micro_batch_size)
    return batches


def _warn_if_buffer_exceeds_epoch(data: WebDatasetSplit, readers: int) -> None:
    if any(shard.num_samples is None for shard in data.shards):
        return
    smallest = min(
        sum(shard.num_samples for shard in reader_shards(data.shards, data.seed, 0, r, readers))
        for r in range(readers)
    )
    if data.shuffle_buffer > smallest:
        warnings.warn(
            f"data.shuffle_buffer={data.shuffle_buffer} exceeds the {smallest} samples a reader "
            "gets per epoch, so a shuffle block holds samples of several epochs (some twice); "
            "lower data.shuffle_buffer or data.num_workers",
            stacklevel=2,
        )
