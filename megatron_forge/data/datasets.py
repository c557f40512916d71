"""Training and validation batches: megatron indexed datasets or WebDataset shards.

``data.format: indexed`` (default): megatron-core's GPTDataset, blended and split by its
BlendedMegatronDatasetBuilder (which caches its sample index in ``data.cache_dir``), from
``data.blend`` + ``data.split`` or from ``data.blend_per_split``. Sample order is a function
of the seed alone. Each global batch is the contiguous range of samples
``[consumed, consumed + global_batch)``, cut into equal parts per data-parallel rank and
then into microbatches, so the same step sees the same samples under every parallel layout
and a resumed run continues at ``consumed_samples``. With ``train.rampup_batch_size`` the
global batch grows (:class:`BatchSizes`); the samples keep their order.

``data.format: webdataset``: tar shards streamed by :mod:`megatron_forge.data.webdataset`,
whose order is a function of the seed, the data-parallel rank and size and the number of
workers, and which resumes at ``consumed_samples`` as well.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from megatron_forge.config import Config, ConfigError, TrainConfig
from megatron_forge.data.webdataset import (
    WebDatasetSplit,
    build_webdatasets,
    check_shards,
    webdataset_microbatches,
)
from megatron_forge.errors import DataError


class BatchSizes:
    """The global batch size of every step, a function of the samples consumed before it:
    ``train.global_batch_size``, or with ``train.rampup_batch_size`` the size megatron-core's
    ``RampupBatchsizeNumMicroBatchesCalculator`` gives (Megatron-LM's --rampup-batch-size).
    Batch sizes do not depend on the data-parallel size (the config's validation checks that
    each divides by micro batch x data-parallel size), so one schedule serves every rank."""

    def __init__(self, train: TrainConfig) -> None:
        from megatron.core.num_microbatches_calculator import (
            RampupBatchsizeNumMicroBatchesCalculator,
        )

        self.global_batch_size = train.global_batch_size
        self.rampup = train.rampup_batch_size
        self._calculator = None
        self._ramp_consumed = [0]
        """Samples consumed before each step of the ramp-up (where batches still grow)."""
        if self.rampup is None:
            return
        start, increment, samples = self.rampup
        self._calculator = RampupBatchsizeNumMicroBatchesCalculator(
            global_batch_size=train.global_batch_size,
            micro_batch_size=1,  # sizes only; divisibility is the config's check
            data_parallel_size=1,
            decrease_batch_size_if_needed=False,
            rank=0,
            start_global_batch_size=start,
            batch_size_increment=increment,
            ramup_samples=samples,
        )
        while self._ramp_consumed[-1] <= samples:
            consumed = self._ramp_consumed[-1]
            self._ramp_consumed.append(consumed + self.at(consumed))

    def at(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after ``consumed_samples``."""
        if self._calculator is None:
            return self.global_batch_size
        self._calculator.update(consumed_samples, consistency_check=False)
        return self._calculator.get_current_global_batch_size()

    def samples_at_step(self, step: int) -> int:
        """Samples consumed by the end of ``step`` steps (the closed form of the ramp)."""
        ramp_steps = len(self._ramp_consumed) - 1
        if step <= ramp_steps:
            return self._ramp_consumed[step]
        return self._ramp_consumed[-1] + (step - ramp_steps) * self.global_batch_size

    def step_of(self, consumed_samples: int) -> Optional[int]:
        """The number of steps that consume exactly ``consumed_samples`` (None: none do, the
        count falls inside a step)."""
        ramp_end = self._ramp_consumed[-1]
        if consumed_samples < ramp_end:
            try:
                return self._ramp_consumed.index(consumed_samples)
            except ValueError:
                return None
        steps, rest = divmod(consumed_samples - ramp_end, self.global_batch_size)
        return None if rest else len(self._ramp_consumed) - 1 + steps


class MicroBatchSampler(Sampler[list[int]]):
    """Yields this data-parallel rank's microbatches, in step order, from a sample offset.

    A step's global batch is the next ``batch_sizes.at(consumed)`` samples (all of them
    ``global_batch_size`` without a ramp-up), so the order of the samples is the same
    whatever the batch sizes: a ramp-up changes only where steps begin."""

    def __init__(
        self,
        num_samples: int,
        start_sample: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_steps: Optional[int] = None,
        batch_sizes: Optional[BatchSizes] = None,
    ) -> None:
        if batch_sizes is None:
            if start_sample % global_batch_size:
                raise ValueError(
                    f"start_sample={start_sample} is not a multiple of the global batch size "
                    f"{global_batch_size}"
                )
        elif batch_sizes.step_of(start_sample) is None:
            raise ConfigError(
                f"the run resumes at consumed sample {start_sample}, which falls inside a step "
                f"of train.rampup_batch_size={batch_sizes.rampup} up to "
                f"train.global_batch_size={batch_sizes.global_batch_size}: the checkpoint was "
                "written with another ramp-up or global batch size; resume with those it "
                "was written with"
            )
        self.num_samples = num_samples
        self.start_sample = start_sample
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_steps = num_steps
        self.batch_sizes = batch_sizes

    def __iter__(self) -> Iterator[list[int]]:
        steps = itertools.count() if self.num_steps is None else range(self.num_steps)
        consumed = self.start_sample
        for _ in steps:
            size = self.global_batch_size
            if self.batch_sizes is not None:
                size = self.batch_sizes.at(consumed)
            per_rank = size // self.dp_size
            first = consumed + self.dp_rank * per_rank
            for offset in range(0, per_rank, self.micro_batch_size):
                indices = range(first + offset, first + offset + self.micro_batch_size)
                # Wrap rather than fail if a short validation split is read repeatedly.
                yield [i % self.num_samples for i in indices]
            consumed += size


def load_run_tokenizer(cfg: Config) -> Any:
    """The tokenizer named by data.tokenizer, errors as ConfigError. None when unset, and
    for ``data.format: mock``, whose synthetic tokens need only model.vocab_size."""
    from megatron_forge.data.tokenizer import (
        MissingSpecialTokenError,
        TokenizerLoadError,
        load_tokenizer,
    )

    if not cfg.data.tokenizer or cfg.data.format == "mock":
        return None
    try:
        return load_tokenizer(cfg.data.tokenizer)
    except (TokenizerLoadError, MissingSpecialTokenError) as err:
        raise DataError(f"data.tokenizer: {err}") from None


def check_data_paths(cfg: Config) -> None:
    """Fail fast, before any process group exists, on missing or broken data or tokenizer:
    a .bin/.idx pair that disagrees, an empty dataset, or token ids past the vocabulary."""
    if cfg.data.format == "webdataset":
        check_shards(cfg, load_run_tokenizer(cfg))
        return
    if cfg.data.format == "mock":
        if cfg.model.vocab_size is None:
            raise ConfigError("data.format=mock needs model.vocab_size (there is no tokenizer)")
        return
    prefixes = cfg.data.all_prefixes()
    if not prefixes:
        raise ConfigError("data.blend is empty; set it to dataset prefixes (see README)")
    _check_prefixes(prefixes, _blend_field(cfg))
    _check_token_ids(cfg, prefixes, load_run_tokenizer(cfg))


def _blend_field(cfg: Config) -> str:
    return "data.blend" if cfg.data.blend_per_split is None else "data.blend_per_split"


def _check_prefixes(prefixes: list[str], where: str = "data.blend") -> None:
    """Every prefix has a .bin/.idx pair that agree (sizes, lengths, pointers, document
    indices) and holds documents, before megatron-core maps them."""
    from megatron_forge.data.indexed import IndexedDatasetError, check_indexed_dataset

    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise DataError(
                    f"{where}: {prefix}{suffix} does not exist; {where} lists prefixes "
                    "written by tools/preprocess_data.py (e.g. out/corpus_text_document)"
                )
        try:
            summary = check_indexed_dataset(prefix)
        except IndexedDatasetError as err:
            raise DataError(f"{where}: {err}") from None
        if not summary.num_sequences:
            raise DataError(
                f"{where}: {prefix}.idx holds no documents; remove {prefix} from {where}, or "
                "rerun tools/preprocess_data.py on an input that has some"
            )


def _check_token_ids(cfg: Config, prefixes: list[str], tokenizer: Any) -> None:
    """No .bin holds an id past the model's vocabulary: a sample of each, or all of every
    token with data.full_check. Skipped when neither model.vocab_size nor a tokenizer says
    the vocabulary (the trainer then refuses to start)."""
    from megatron_forge.data.indexed import IndexedDatasetError, check_token_ids

    retokenize = "tokenize the dataset again with data.tokenizer (tools/preprocess_data.py)"
    if cfg.model.vocab_size is not None:
        vocab, source = cfg.model.vocab_size, f"model.vocab_size={cfg.model.vocab_size}"
        fix = (
            "set model.vocab_size to the vocabulary of the tokenizer that made the dataset "
            f"(or remove it to use data.tokenizer's), or {retokenize}"
        )
    elif tokenizer is not None:
        vocab = tokenizer.vocab_size
        source = f"data.tokenizer {cfg.data.tokenizer} has {vocab} ids"
        fix = (
            f"the dataset was made with another tokenizer: {retokenize}, or set "
            "data.tokenizer to the one that made it"
        )
    else:
        return
    full, where = cfg.data.full_check, _blend_field(cfg)
    # Ranks check alike (so all stop alike, before any process group); one of them says so.
    say = full and (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"
    for prefix in prefixes:
        if say:
            size = os.path.getsize(prefix + ".bin") / 2**30
            print(
                f"data.full_check: reading every token of {prefix}.bin ({size:.1f} GiB)",
                file=sys.stderr,
                flush=True,
            )
        try:
            check_token_ids(prefix, vocab, source, full=full)
        except IndexedDatasetError as err:
            raise DataError(f"{where}: {err}; {fix}") from None


def _split_sizes(cfg: Config) -> list[int]:
    """Samples the run draws from train, valid and test."""
    t = cfg.train
    num_evals = t.train_iters // t.eval_interval + 1 if t.eval_interval else 0
    return [
        BatchSizes(t).samples_at_step(max(t.train_iters, 1)),
        num_evals * t.eval_iters * t.global_batch_size,
        0,
    ]


def _blend_config(cfg: Config, sizes: list[int]) -> dict[str, Any]:
    """GPTDatasetConfig's blend arguments: blend + split, or blend_per_split."""
    data = cfg.data
    if data.blend_per_split is None:
        return {"blend": data.prefixes_and_weights(), "split": data.split}
    per_split = []
    for name, size in zip(("train", "valid", "test"), sizes):
        blend = data.blend_per_split.get(name)
        # Test is never read; megatron-core would build (and cache) it all the same.
        per_split.append(data.split_blend(blend) if blend and size else None)
    return {"blend": None, "blend_per_split": per_split, "split": None}


def build_datasets(cfg: Config, tokenizer: Any) -> tuple[Any, Optional[Any]]:
    """Train and validation datasets sized for the run (validation None if unused).

    Indexed: megatron-core GPTDatasets (or BlendedDatasets); webdataset: WebDatasetSplits.
    """
    if cfg.data.format == "webdataset":
        return build_webdatasets(cfg, tokenizer)
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    sizes = _split_sizes(cfg)
    if cfg.data.format == "mock":
        # megatron-core builds mock data when there is no blend; NullTokenizer(n) has
        # n + 1 ids, the last one being end-of-document.
        tokenizer = _null_tokenizer_class()(cfg.model.vocab_size - 1)
        blend: dict[str, Any] = {"blend": None, "split": cfg.data.split}
        dataset_class = MockGPTDataset
    else:
        _check_prefixes(cfg.data.all_prefixes(), _blend_field(cfg))
        blend = _blend_config(cfg, sizes)
        dataset_class = GPTDataset
    cache = cfg.data.cache_dir or str(Path(cfg.logging.dir) / "data_cache")
    ds_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        path_to_cache=cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=True,
        **blend,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_class, sizes, lambda: True, ds_config
    ).build()
    if train is None:
        raise ConfigError(
            f"data.split={cfg.data.split!r} leaves no training documents; give train a share"
        )
    return train, (valid if sizes[1] else None)


def _null_tokenizer_class() -> type:
    """megatron-core's ``NullTokenizer``, loaded from its own module file: importing it by
    name runs ``megatron.core.tokenizers.text.libraries/__init__``, which imports
    transformers for the other tokenizers there (3-5 s per rank for mock data)."""
    import importlib.util

    import megatron.core.tokenizers

    name = "megatron.core.tokenizers.text.libraries.null_tokenizer"
    if name in sys.modules:
        return sys.modules[name].NullTokenizer
    path = Path(megatron.core.tokenizers.__file__).parent / "text/libraries/null_tokenizer.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NullTokenizer


def microbatch_iterator(
    dataset: Any,
    cfg: Config,
    dp_rank: int,
    dp_size: int,
    start_sample: int = 0,
    num_steps: Optional[int] = None,
    batch_sizes: Optional[BatchSizes] = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """An iterator of this rank's microbatches (dicts of tokens/labels/loss_mask/...), in
    global batches of ``batch_sizes`` (None: train.global_batch_size)."""
    if isinstance(dataset, WebDatasetSplit):
        batches = webdataset_microbatches(dataset, cfg, dp_rank, dp_size, start_sample, num_steps)
        return _log_sample_ids(batches, cfg, dataset.split)
    sampler = MicroBatchSampler(
        len(dataset),
        start_sample,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        dp_rank,
        dp_size,
        num_steps,
        batch_sizes,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )
    if not cfg.data.log_sample_ids:
        return iter(loader)
    # The sampler is deterministic: a second pass over it names the samples of each batch.
    batches = ({**batch, "sample_keys": ids} for ids, batch in zip(sampler, loader))
    return _log_sample_ids(batches, cfg, _split_name(dataset))


def _split_name(dataset: Any) -> str:
    split = getattr(dataset, "index_split", None) or getattr(dataset, "split", None)
    return getattr(split, "name", str(split))


def _log_sample_ids(batches: Iterator[dict], cfg: Config, split: str) -> Iterator[dict]:
    """Drop the batches' sample keys, writing them down first if data.log_sample_ids."""
    log = None
    if cfg.data.log_sample_ids:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        path = Path(cfg.logging.dir) / "sample_ids" / f"{split}_rank{rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a")  # noqa: SIM115 - closed when the stream ends
    try:
        for batch in batches:
            keys = batch.pop("sample_keys")
            if log is not None:
                log.write(" ".join(map(str, keys)) + "\n")
                log.flush()
            yield batch
    finally:
        if log is not None:
            log.close()
