"""Blends through megatron-core's BlendedMegatronDatasetBuilder: weights hold, the order is a
function of the seed (the same on rerun, from the cache, and after a resume), and per-split
blends feed train and valid from separate datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_forge.config import Config, load_config
from megatron_forge.data.datasets import build_datasets, microbatch_iterator
from megatron_forge.data.tokenizer import load_tokenizer
from tests.data.test_indexed import write_dataset

GBS, MBS, SEQ = 16, 4, 16
STEPS = 125  # 2000 samples
# Tokens of dataset A lie in [10, 100), of B in [200, 300): a sample tells its source.
RANGES = {"a": (10, 100), "b": (200, 300)}


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    prefixes = {}
    for name, (low, high) in RANGES.items():
        docs = [
            np.append(rng.integers(low, high, rng.integers(5, 40)), 2).astype(np.uint16)
            for _ in range(300)
        ]
        prefixes[name] = write_dataset(out / name, docs)
    return prefixes


def blend_config(spm_model: Path, cache: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"model.seq_length={SEQ}",
            f"train.global_batch_size={GBS}",
            f"train.micro_batch_size={MBS}",
            f"train.train_iters={STEPS}",
            "train.eval_interval=0",
            f"data.tokenizer={spm_model}",
            f"data.cache_dir={cache}",
            *overrides,
        ],
    )


def sources(batches: list[dict]) -> list[str]:
    """'a' or 'b' for every sample of the microbatches, in order."""
    out = []
    for batch in batches:
        for row in batch["tokens"]:
            (name,) = [n for n, (lo, hi) in RANGES.items() if ((row >= lo) & (row < hi)).any()]
            out.append(name)
    return out


def read(dataset, cfg: Config, start: int = 0, steps: int = STEPS, dp=(0, 1)) -> list[dict]:
    it = microbatch_iterator(dataset, cfg, dp[0], dp[1], start_sample=start, num_steps=steps)
    return list(it)


def same(x: list[dict], y: list[dict]) -> bool:
    return len(x) == len(y) and all((a["tokens"] == b["tokens"]).all() for a, b in zip(x, y))


def test_weights_hold_and_order_repeats(
    two_datasets: dict[str, Path], spm_model: Path, tmp_path: Path, process_group: None
) -> None:
    """0.7/0.3: every prefix of the sample order holds 0.7 n samples of A to within one
    sample (megatron-core's greedy blending index), so 1400/2000 exactly; a rebuild with a
    fresh cache and one from the cache give the same samples in the same order."""
    blend = f"data.blend=[0.7, {two_datasets['a']}, 0.3, {two_datasets['b']}]"
    cfg = blend_config(spm_model, tmp_path / "cache", blend, "data.split='100,0,0'")
    tok = load_tokenizer(spm_model)
    train, valid = build_datasets(cfg, tok)
    assert valid is None
    first = read(train, cfg)
    names = np.array(sources(first))
    assert len(names) == STEPS * GBS
    from_a = np.cumsum(names == "a")
    assert from_a[-1] == 0.7 * len(names)
    assert np.abs(from_a - 0.7 * np.arange(1, len(names) + 1)).max() < 1.0
    assert list(Path(tmp_path / "cache").rglob("*.npy"))  # megatron-core's index cache

    cached = build_datasets(cfg, tok)[0]
    assert same(read(cached, cfg), first)
    fresh_cfg = blend_config(spm_model, tmp_path / "fresh", blend, "data.split='100,0,0'")
    assert same(read(build_datasets(fresh_cfg, tok)[0], fresh_cfg), first)
    reseeded = blend_config(spm_model, tmp_path / "seed", blend, "data.split='100,0,0'")
    reseeded.train.seed += 1
    assert not same(read(build_datasets(reseeded, tok)[0], reseeded), first)


def test_resume_and_data_parallel_see_the_same_samples(
    two_datasets: dict[str, Path], spm_model: Path, tmp_path: Path, process_group: None
) -> None:
    blend = f"data.blend=[0.7, {two_datasets['a']}, 0.3, {two_datasets['b']}]"
    cfg = blend_config(spm_model, tmp_path / "cache", blend, "data.split='100,0,0'")
    train, _ = build_datasets(cfg, load_tokenizer(spm_model))
    whole = read(train, cfg, steps=10)
    per_step = GBS // MBS
    assert same(read(train, cfg, start=4 * GBS, steps=6), whole[4 * per_step :])
    # Two data-parallel ranks split each global batch: rank 0 the first half, rank 1 the rest.
    ranks = [read(train, cfg, steps=10, dp=(rank, 2)) for rank in (0, 1)]
    half = per_step // 2
    for step in range(10):
        joined = (
            ranks[0][step * half : (step + 1) * half] + ranks[1][step * half : (step + 1) * half]
        )
        assert same(joined, whole[step * per_step : (step + 1) * per_step])


def test_blend_per_split(
    two_datasets: dict[str, Path], spm_model: Path, tmp_path: Path, process_group: None
) -> None:
    a, b = two_datasets["a"], two_datasets["b"]
    cfg = blend_config(
        spm_model,
        tmp_path / "cache",
        "data.blend=[]",
        f"data.blend_per_split={{train: [0.7, {a}, 0.3, {b}], valid: [{b}], test: [{a}]}}",
        "train.eval_interval=50",
    )
    train, valid = build_datasets(cfg, load_tokenizer(spm_model))
    names = np.array(sources(read(train, cfg)))
    assert (names == "a").sum() == 0.7 * len(names)
    assert set(sources(read(valid, cfg, steps=cfg.train.eval_iters))) == {"b"}
