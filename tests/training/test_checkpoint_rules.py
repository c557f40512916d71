"""What a checkpoint's common entries say about loading it (ours or Megatron-LM's), and the
refusals that follow: an optimizer format that cannot follow a layout change, a padded
vocabulary of another size. Pure functions; the loads themselves are in
test_checkpoint_formats.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from megatron_forge.checkpointing.loader import (
    check_optimizer_layout,
    check_vocab,
    consumed_samples,
    describe_checkpoint,
    scheduler_state,
)
from megatron_forge.checkpointing.state import FORGE_FORMAT, FORMAT_VERSION
from megatron_forge.config import load_config
from megatron_forge.errors import CheckpointError, ConfigError

LAYOUT = {"tensor": 1, "pipeline": 1, "context": 1, "data": 2, "expert": 1}
PATH = Path("/ckpt/iter_0000010")


def _ours(sharding: str | None = "dp_reshardable", **layout: int) -> dict:
    common = {
        "layout": {**LAYOUT, **layout},
        "model_chunks": 1,
        "has_optimizer": True,
        FORGE_FORMAT: FORMAT_VERSION,
        "scheduler": {"num_steps": 80},
        "consumed_samples": 80,
    }
    if sharding is not None:
        common["content_metadata"] = {"distrib_optim_sharding_type": sharding}
    return common


def _megatron_lm(content: dict | None, **args: object) -> dict:
    return {
        "args": argparse.Namespace(
            tensor_model_parallel_size=2, pipeline_model_parallel_size=1, **args
        ),
        "iteration": 10,
        "opt_param_scheduler": {"num_steps": 40},
        "content_metadata": content,
    }


def test_describe_ours_old_and_new() -> None:
    new = describe_checkpoint(_ours())
    assert (new.writer, new.sharding, new.rng) == ("megatron-forge", "dp_reshardable", "forge")
    old = _ours(None)
    del old[FORGE_FORMAT]
    legacy = describe_checkpoint(old)  # before content metadata: always fully_reshardable
    assert (legacy.sharding, legacy.rng, legacy.content) == ("fully_reshardable", "legacy", None)


def test_describe_megatron_lm() -> None:
    saved = describe_checkpoint(_megatron_lm({"distrib_optim_sharding_type": "dp_reshardable"}))
    assert (saved.writer, saved.sharding, saved.rng) == (
        "Megatron-LM",
        "dp_reshardable",
        "megatron",
    )
    assert saved.layout["tensor"] == 2 and saved.layout["model_chunks"] == 1
    # without content metadata, Megatron-LM's own fallback
    old = describe_checkpoint(_megatron_lm(None, ckpt_fully_parallel_save=True, no_save_rng=True))
    assert (old.sharding, old.rng) == ("fully_sharded_model_space", None)
    common = _megatron_lm(None, consumed_train_samples=640)
    assert scheduler_state(common) == {"num_steps": 40}
    assert consumed_samples(common) == 640
    assert consumed_samples(_ours()) == 80 and scheduler_state(_ours()) == {"num_steps": 80}
    with pytest.raises(CheckpointError, match="no scheduler state"):
        scheduler_state({"iteration": 3})


def test_dp_reshardable_follows_data_parallel_only() -> None:
    here = {**LAYOUT, "data": 4, "context": 2, "model_chunks": 1}
    check_optimizer_layout(describe_checkpoint(_ours()), here, PATH, "/ckpt")  # DP, CP change
    for key, value in (("tensor", 2), ("pipeline", 2), ("expert", 2), ("model_chunks", 2)):
        with pytest.raises(CheckpointError) as err:
            check_optimizer_layout(
                describe_checkpoint(_ours()), {**here, key: value}, PATH, "/ckpt"
            )
        message = str(err.value)
        assert f"{key} 1 -> 2" in message and "dp_reshardable format" in message
        assert "checkpoint.optimizer_format=fully_reshardable" in message
        assert "checkpoint.load=/ckpt" in message and "parallel.tensor=1" in message
    full = describe_checkpoint(_ours("fully_reshardable"))
    check_optimizer_layout(full, {**here, "tensor": 2, "pipeline": 2}, PATH, "/ckpt")


def test_vocabulary_mismatch_is_refused() -> None:
    ours, mlm = describe_checkpoint(_ours()), describe_checkpoint(_megatron_lm(None))
    here = {**LAYOUT, "model_chunks": 1}
    check_vocab(2048, 2048, mlm, here, PATH)
    check_vocab(None, 2048, mlm, here, PATH)  # no embedding in it
    with pytest.raises(CheckpointError) as err:
        check_vocab(2176, 2048, describe_checkpoint(_megatron_lm(None)), here, PATH)
    assert "vocabulary of 2176 rows (padded), this model 2048" in str(err.value)
    assert "SentencePiece tokenizer adds 4" in str(err.value)
    with pytest.raises(CheckpointError):
        check_vocab(2304, 2048, ours, here, PATH)  # ours, same TP: not padding
    check_vocab(2304, 2048, ours, {**here, "tensor": 2}, PATH)  # ours, TP padding only


def test_optimizer_format_config() -> None:
    cfg = load_config(None, [])
    assert cfg.checkpoint.optimizer_format == "dp_reshardable"
    assert cfg.checkpoint.fully_parallel_save and cfg.checkpoint.fully_parallel_load
    with pytest.raises(ConfigError, match="optimizer_format"):
        load_config(None, ["checkpoint.optimizer_format=zero"])


def test_persistent_writer_needs_gpus(tmp_path: Path) -> None:
    import torch

    from megatron_forge.checkpointing import Checkpointer

    if torch.cuda.is_available():
        pytest.skip("on GPUs the persistent writer stages copies")
    cfg = load_config(None, ["checkpoint.persistent_writer=true"])
    with pytest.raises(ConfigError, match="checkpoint.persistent_writer=true needs GPUs"):
        Checkpointer(tmp_path, cfg.checkpoint)


@pytest.mark.slow  # a fresh process that imports megatron-core
def test_trusted_load_keeps_megatron_cores_registered_types(tmp_path) -> None:
    """Reading a file that needs megatron-core's types (Megatron-LM's ``args`` is an
    argparse.Namespace) imports megatron-core, which puts them on torch's process-wide
    allowlist; the read must leave them there: dist_checkpointing.load of the same
    checkpoint (check-serving --reference, a resumed W&B run) reads it afterwards. A fresh
    process, as megatron-core must not be imported before the read."""
    import subprocess
    import sys

    import torch

    path = tmp_path / "common.pt"
    torch.save({"args": argparse.Namespace(tensor_model_parallel_size=2)}, path)
    code = (
        "import argparse, sys, torch\n"
        "from megatron_forge.checkpointing.files import _torch_load_trusted\n"
        "assert 'megatron.core' not in sys.modules\n"
        f"args = _torch_load_trusted(lambda: {str(path)!r}, 'common.pt')['args']\n"
        "assert args.tensor_model_parallel_size == 2\n"
        "assert argparse.Namespace in torch.serialization.get_safe_globals(), 'removed'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
