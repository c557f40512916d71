"""tools/inspect_checkpoint.py on a damaged checkpoint: one PROBLEM line naming the file
and a non-zero exit, never a traceback, whichever file is at fault.

The checkpoint comes from a real (short) training run, so the tests using it are slow."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from megatron_forge.checkpointing.files import verify_iteration
from tests.conftest import REPO, run_training


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    """tools/inspect_checkpoint.py imported (tools/ is not a package)."""
    path = REPO / "tools/inspect_checkpoint.py"
    spec = importlib.util.spec_from_file_location("forge_inspect_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of the tiny model on synthetic tokens, checkpointed at the end."""
    root = tmp_path_factory.mktemp("inspect")
    absent = root / "absent"
    overrides = [
        "data.format=mock",
        f"data.tokenizer={absent}/tokenizer.model",  # mock data never reads it
        f"data.blend=[{absent}/corpus]",
        "model.vocab_size=512",
        "model.num_layers=2",
        "train.train_iters=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_interval=0",
        "logging.wandb_project=null",
        f"checkpoint.save={root / 'ckpt'}",
    ]
    run_training(1, "configs/tiny.yaml", overrides, root / "run")
    return root / "ckpt"


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint to damage."""
    shutil.copytree(saved, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def inspect(tool: ModuleType, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    status = tool.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.slow
def test_complete_checkpoint(tool, saved, capsys):
    status, out = inspect(tool, capsys, saved, "--verify")
    assert status == 0, out
    assert f"{saved}: tracker -> 2" in out and "iter_0000002" in out
    assert "verify: OK, complete and readable" in out and "PROBLEM" not in out
    assert verify_iteration(saved / "iter_0000002", read_tensors=True) == []


@pytest.mark.slow
def test_garbage_tracker(tool, ckpt, capsys):
    (ckpt / "latest_checkpointed_iteration.txt").write_text("garbage\n")
    status, out = inspect(tool, capsys, ckpt)
    assert status == 1
    assert f"{ckpt}: tracker -> UNREADABLE" in out
    assert f"PROBLEM: {ckpt / 'latest_checkpointed_iteration.txt'} holds 'garbage'" in out
    # What can still be shown is: the newest iteration, to point the tracker at.
    assert "inspecting the newest directory, iter_0000002" in out
    assert "iteration 2, consumed samples" in out and "Traceback" not in out


@pytest.mark.slow
def test_tracker_naming_a_missing_iteration(tool, ckpt, capsys):
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7\n")
    status, out = inspect(tool, capsys, ckpt)
    assert status == 1
    assert f"names iteration 7 but {ckpt / 'iter_0000007'} is missing" in out


@pytest.mark.slow
def test_missing_metadata(tool, ckpt, capsys):
    (ckpt / "iter_0000002" / ".metadata").unlink()
    status, out = inspect(tool, capsys, ckpt)
    assert status == 1
    assert f"PROBLEM: {ckpt / 'iter_0000002' / '.metadata'} is missing" in out
    assert "check: FAILED" in out and "Traceback" not in out


@pytest.mark.slow
def test_truncated_common_state(tool, ckpt, capsys):
    common = ckpt / "iter_0000002" / "common.pt"
    os.truncate(common, common.stat().st_size // 2)
    status, out = inspect(tool, capsys, ckpt)
    assert status == 1
    assert f"PROBLEM: {common} is truncated or corrupt (" in out
    assert out.count("PROBLEM:") == 1  # the summary and the check found the same thing


@pytest.mark.slow
@pytest.mark.parametrize("verify", [False, True])
def test_truncated_and_missing_shards(tool, ckpt, capsys, verify):
    shards = sorted((ckpt / "iter_0000002").glob("*.distcp"))
    os.truncate(shards[0], 100)
    shards[-1].unlink()
    flags = ["--verify"] if verify else []
    status, out = inspect(tool, capsys, ckpt / "iter_0000002", *flags)
    assert status == 1
    assert f"PROBLEM: {shards[0]} is truncated: 100 bytes, needs" in out
    assert f"PROBLEM: {shards[-1]} missing" in out
    assert ("verify: FAILED" if verify else "check: FAILED") in out


@pytest.mark.slow
def test_damaged_tensor_bytes(tool, ckpt, capsys):
    """Same length, damaged content: only reading the tensors back finds it."""
    shard = sorted((ckpt / "iter_0000002").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data), 5):
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    status, out = inspect(tool, capsys, ckpt, "--verify")
    assert status == 1
    assert f": unreadable from {shard} (" in out and "verify: FAILED" in out


def test_not_a_checkpoint(tool, tmp_path, capsys):
    status, out = inspect(tool, capsys, tmp_path)
    assert status == 1 and f"{tmp_path}: no latest_checkpointed_iteration.txt" in out
    status, out = inspect(tool, capsys, tmp_path / "absent")
    assert status == 1 and f"{tmp_path / 'absent'} is not a directory" in out
