"""Training and validation batches from megatron indexed datasets.

Datasets are megatron-core's GPTDataset, blended and split by its
BlendedMegatronDatasetBuilder (which caches its sample index in ``data.cache_dir``).
Sample order is a function of the seed alone. Each global batch is the contiguous range
of samples ``[step * global_batch, (step + 1) * global_batch)``, cut into equal parts per
data-parallel rank and then into microbatches, so the same step sees the same samples
under every parallel layout and a resumed run continues at ``consumed_samples``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron_forge.config import Config, ConfigError


class MicroBatchSampler(Sampler[list[int]]):
    """Yields this data-parallel rank's microbatches, in step order, from a sample offset."""

    def __init__(
        self,
        num_samples: int,
        start_sample: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_steps: Optional[int] = None,
    ) -> None:
        if start_sample % global_batch_size:
            raise ValueError(
                f"start_sample={start_sample} is not a multiple of the global batch size "
                f"{global_batch_size}"
            )
        self.num_samples = num_samples
        self.start_sample = start_sample
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.num_steps = num_steps

    def __iter__(self) -> Iterator[list[int]]:
        steps = itertools.count() if self.num_steps is None else range(self.num_steps)
        for step in steps:
            first = self.start_sample + step * self.global_batch_size + self.dp_rank * self.per_rank
            for offset in range(0, self.per_rank, self.micro_batch_size):
                indices = range(first + offset, first + offset + self.micro_batch_size)
                # Wrap rather than fail if a short validation split is read repeatedly.
                yield [i % self.num_samples for i in indices]


def load_run_tokenizer(cfg: Config) -> Any:
    """The tokenizer named by data.tokenizer (None when unset), errors as ConfigError."""
    from megatron_forge.data.tokenizer import (
        MissingSpecialTokenError,
        TokenizerLoadError,
        load_tokenizer,
    )

    if not cfg.data.tokenizer:
        return None
    try:
        return load_tokenizer(cfg.data.tokenizer)
    except (TokenizerLoadError, MissingSpecialTokenError) as err:
        raise ConfigError(f"data.tokenizer: {err}") from None


def check_data_paths(cfg: Config) -> None:
    """Fail fast, before any process group exists, on missing datasets or tokenizer."""
    prefixes, _ = cfg.data.prefixes_and_weights()
    if not prefixes:
        raise ConfigError("data.blend is empty; set it to dataset prefixes (see README)")
    _check_prefixes(prefixes)
    load_run_tokenizer(cfg)


def _check_prefixes(prefixes: list[str]) -> None:
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(
                    f"data.blend: {prefix}{suffix} does not exist; data.blend lists prefixes "
                    "written by tools/preprocess_data.py (e.g. out/corpus_text_document)"
                )


def build_datasets(cfg: Config, tokenizer: Any) -> tuple[Dataset, Optional[Dataset]]:
    """Train and validation GPTDatasets sized for the run (validation None if unused)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = cfg.data.prefixes_and_weights()
    _check_prefixes(prefixes)
    t = cfg.train
    num_evals = t.train_iters // t.eval_interval + 1 if t.eval_interval else 0
    sizes = [
        max(t.train_iters, 1) * t.global_batch_size,
        num_evals * t.eval_iters * t.global_batch_size,
        0,
    ]
    cache = cfg.data.cache_dir or str(Path(cfg.logging.dir) / "data_cache")
    ds_config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, weights),
        split=cfg.data.split,
        path_to_cache=cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, ds_config
    ).build()
    if train is None:
        raise ConfigError(
            f"data.split={cfg.data.split!r} leaves no training documents; give train a share"
        )
    return train, (valid if num_evals else None)


def microbatch_iterator(
    dataset: Dataset,
    cfg: Config,
    dp_rank: int,
    dp_size: int,
    start_sample: int = 0,
    num_steps: Optional[int] = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """An iterator of this rank's microbatches (dicts of tokens/labels/loss_mask/...)."""
    sampler = MicroBatchSampler(
        len(dataset),
        start_sample,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        dp_rank,
        dp_size,
        num_steps,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )
    return iter(loader)
