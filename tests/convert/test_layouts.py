"""The same weights saved under other layouts export to the same bytes, and training loads
from-hf checkpoints under TP/PP/EP layouts.

Each checkpoint here is written by the real entry point: it loads a checkpoint (weights
only) under a new layout and saves at step 0 without training, so dist_checkpointing
reshards the weights and nothing else changes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_forge.convert.files import SafetensorsReader
from megatron_forge.convert.reader import MegatronCheckpoint
from tests.conftest import data_overrides, run_training
from tests.convert.conftest import DENSE, TRAIN, convert_in_process

pytestmark = pytest.mark.slow

RESAVE = ["train.train_iters=0", "checkpoint.load_optimizer=false"]


def resave(
    sample_data: Path, root: Path, nprocs: int, config: str, source: Path, layout: list[str]
) -> Path:
    out = root / "ckpt"
    overrides = TRAIN + data_overrides(sample_data) + RESAVE + layout
    overrides += [
        f"checkpoint.load={source}",
        f"checkpoint.save={out}",
        "precision.params_dtype=fp32",
    ]
    run_training(nprocs, config, overrides, root / "run")
    return out


def assert_same_export(ckpt: Path, reference: Path, out: Path) -> None:
    assert convert_in_process("to-hf", ckpt, out) == 0
    a, b = SafetensorsReader(reference), SafetensorsReader(out)
    assert sorted(a.entries) == sorted(b.entries)
    for name in a.entries:
        assert torch.equal(a.read(name).view(torch.uint8), b.read(name).view(torch.uint8)), name


def test_tp1_resharded_export_is_identical(exports, sample_data, tmp_path):
    """The TP=2 training checkpoint, resharded to TP=1 (2112 padded rows in both)."""
    ckpt, hf_dir = exports["dense"]
    tp1 = resave(sample_data, tmp_path, 1, "configs/tiny.yaml", ckpt, DENSE)
    assert MegatronCheckpoint(tp1).common["config"]["parallel"]["tensor"] == 1
    assert_same_export(tp1, hf_dir, tmp_path / "hf")


def test_pp2_from_hf_checkpoint_trains_and_exports_identically(
    exports, imported, sample_data, tmp_path
):
    """The from-hf copy of the TP=2 checkpoint, loaded by training under PP=2."""
    _, hf_dir = exports["dense"]
    source = imported["dense"]
    pp2 = resave(
        sample_data,
        tmp_path,
        2,
        str(source / "config.yaml"),
        source,
        ["parallel.tensor=1", "parallel.pipeline=2"],
    )
    assert MegatronCheckpoint(pp2).common["config"]["parallel"]["pipeline"] == 2
    assert_same_export(pp2, hf_dir, tmp_path / "hf")


def test_moe_from_hf_checkpoint_loads_under_ep2(exports, imported, sample_data, tmp_path):
    _, hf_dir = exports["moe"]
    source = imported["moe"]
    ep2 = resave(sample_data, tmp_path, 2, str(source / "config.yaml"), source, [])
    assert_same_export(ep2, hf_dir, tmp_path / "hf")
