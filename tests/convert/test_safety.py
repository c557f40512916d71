"""Converting never destroys its input nor runs code from it: an output directory that
would replace the checkpoint (or its run) is refused before anything is touched, pickles
are read with an allowlist of types, and a damaged shard is named, not a traceback."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from megatron_forge.checkpointing.files import check_safe_to_load, load_metadata
from megatron_forge.errors import CheckpointError
from tests.conftest import REPO
from tests.convert.conftest import convert_in_process


def inspect_tool(*args: object) -> int:
    """tools/inspect_checkpoint.py in this process (tools/ is not a package)."""
    path = REPO / "tools/inspect_checkpoint.py"
    spec = importlib.util.spec_from_file_location("forge_inspect_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def fails_with(capsys: pytest.CaptureFixture, *args: object) -> str:
    assert convert_in_process(*args) == 2
    return capsys.readouterr().err


def digests(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> its sha256: what 'intact' means."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run_dir(dense_ckpt: Path, tmp_path: Path) -> Path:
    """A run laid out as megatron_forge.train writes it: runs/NAME/{checkpoints, config.yaml,
    metrics.jsonl, wandb/}."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(dense_ckpt, run / "checkpoints")
    (run / "config.yaml").write_text("model: {}\n")
    (run / "metrics.jsonl").write_text('{"step": 3}\n')
    (run / "wandb").mkdir()
    (run / "wandb" / "run-1.wandb").write_text("logs")
    return run


@pytest.mark.parametrize("command", ["to-hf", "to-trtllm"])
def test_output_overlapping_the_checkpoint_is_refused(run_dir, tmp_path, capsys, command):
    ckpt = run_dir / "checkpoints"
    (tmp_path / "link").symlink_to(ckpt)
    before = digests(run_dir)
    flags = ["--tp", "1"] if command == "to-trtllm" else []
    outputs = {
        ckpt: "is the checkpoint directory",
        run_dir: "is the run directory",
        tmp_path / "runs": "contains the run directory",
        ckpt / "hf": "lies inside the checkpoint directory",
        ckpt / "iter_0000003": "lies inside the checkpoint directory",
        tmp_path / "link": "is the checkpoint directory",  # a symlink to it
        run_dir / "wandb" / ".." / "checkpoints": "is the checkpoint directory",
    }
    for out, relation in outputs.items():
        err = fails_with(capsys, command, ckpt, out, "--overwrite", *flags)
        assert f"output {out} {relation}" in err, err
        assert str(ckpt) in err or str(run_dir) in err
        assert "ready to serve" not in err
        assert digests(run_dir) == before, f"{out} changed the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "runs"]


def test_overwrite_inside_the_run_replaces_only_exports(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoints"
    before = digests(run_dir)
    err = fails_with(capsys, "to-hf", ckpt, run_dir / "wandb", "--overwrite")
    assert f"--overwrite would replace {run_dir / 'wandb'}" in err
    assert f"inside the run directory {run_dir}" in err and "not an earlier export" in err
    assert digests(run_dir) == before
    # An export beside the checkpoints is written, then replaced by a second export.
    assert convert_in_process("to-hf", ckpt, run_dir / "hf") == 0
    assert convert_in_process("to-hf", ckpt, run_dir / "hf", "--overwrite") == 0
    assert (run_dir / "hf" / "config.json").is_file()
    after = digests(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("hf/")} == before


def test_overwrite_never_deletes_another_run(run_dir, dense_ckpt, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    before = digests(other)
    for command, flags in (("to-hf", []), ("to-trtllm", ["--tp", "1"])):
        err = fails_with(capsys, command, dense_ckpt, other, "--overwrite", *flags)
        assert f"--overwrite would delete {other}, which holds the" in err
    assert digests(other) == before


def test_from_hf_never_replaces_its_source(transformers_llama, tmp_path, capsys):
    models = tmp_path / "models"
    hf_dir = models / "llama"
    shutil.copytree(transformers_llama, hf_dir)
    before = digests(models)
    for out, relation in (
        (hf_dir, "is"),
        (models, "contains"),
        (hf_dir / "megatron", "lies inside"),
    ):
        err = fails_with(capsys, "from-hf", hf_dir, out, "--overwrite")
        assert f"output {out} {relation} the Hugging Face model directory {hf_dir}" in err
        assert digests(models) == before


class RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def planted(dense_ckpt: Path, tmp_path: Path, where: str) -> tuple[Path, Path]:
    """A copy of the checkpoint with a pickle that would create ``marker`` planted in
    common.pt, .metadata or a sharded object (the RNG state) inside a .distcp file."""
    ckpt, marker = tmp_path / "shared", tmp_path / "pwned"
    shutil.copytree(dense_ckpt, ckpt)
    directory = ckpt / "iter_0000003"
    if where == "common.pt":
        common = torch.load(directory / "common.pt", weights_only=True)
        common["config"]["note"] = RunsCode(marker)
        torch.save(common, directory / "common.pt")
    elif where == ".metadata":
        (directory / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    else:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        metadata = load_metadata(directory)
        blob = io.BytesIO()
        torch.save([RunsCode(marker)], blob)
        (directory / "__9_0.distcp").write_bytes(blob.getvalue())
        for index in list(metadata.storage_data):
            if index.fqn.startswith("rng_state"):
                metadata.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(blob.getvalue()))
        (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    return ckpt, marker


@pytest.mark.parametrize("where", ["common.pt", ".metadata", "rng_state"])
def test_a_pickle_that_runs_code_is_refused(dense_ckpt, tmp_path, capsys, where):
    ckpt, marker = planted(dense_ckpt, tmp_path, where)
    err = fails_with(capsys, "to-hf", ckpt, tmp_path / "out")
    assert "needs posix.system to be unpickled" in err and "could run code" in err
    assert "cannot be converted" in err and not (tmp_path / "out").exists()
    assert inspect_tool(ckpt, "--verify") == 1
    out = capsys.readouterr().out
    assert "PROBLEM: " in out and "needs posix.system" in out
    with pytest.raises(CheckpointError, match="posix.system"):
        check_safe_to_load(ckpt / "iter_0000003")  # what the training loader can call
    assert not marker.exists()
    # The planted pickle is real: an unrestricted load runs it.
    if where == "common.pt":
        torch.load(ckpt / "iter_0000003" / "common.pt", weights_only=False)
        assert marker.exists()


def test_damaged_shards_are_named(dense_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(dense_ckpt, ckpt)
    metadata = load_metadata(ckpt / "iter_0000003")
    info = next(
        info
        for index, info in metadata.storage_data.items()
        if index.fqn == "embedding.word_embeddings.weight"
    )
    shard = ckpt / "iter_0000003" / info.relative_path  # holds a chunk of the embedding
    original = shard.read_bytes()

    os.truncate(shard, len(original) // 2)
    err = fails_with(capsys, "to-hf", ckpt, tmp_path / "out")
    assert f"{shard} is truncated: {len(original) // 2} bytes, needs" in err
    assert "inspect_checkpoint.py" in err and "--iteration" in err

    shard.unlink()
    err = fails_with(capsys, "to-trtllm", ckpt, tmp_path / "out", "--tp", "1")
    assert f"{shard} missing" in err

    # Same length, the bytes of one tensor damaged: found while reading, named with it.
    damaged = bytearray(original)
    for i in range(info.offset, info.offset + info.length, 3):
        damaged[i] ^= 0x5A
    shard.write_bytes(bytes(damaged))
    err = fails_with(capsys, "to-hf", ckpt, tmp_path / "out")
    assert "cannot be converted (reading embedding.word_embeddings.weight)" in err
    assert f"embedding.word_embeddings.weight is unreadable from {shard} (" in err
    assert list(tmp_path.iterdir()) == [ckpt]  # no output, no staging directory left behind


# Fast checks of the same rules on directories that only look like a run --------------------
def fake_run(root: Path) -> Path:
    """runs/tiny/{checkpoints/iter_0000005/, config.yaml}: what check_output looks at."""
    run = root / "runs" / "tiny"
    (run / "checkpoints" / "iter_0000005").mkdir(parents=True)
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("5\n")
    (run / "config.yaml").write_text("model: {}\n")
    return run


def test_output_rules_on_paths(tmp_path):
    from megatron_forge.convert.files import check_output, run_directory
    from megatron_forge.errors import ConvertError

    run = fake_run(tmp_path)
    ckpt = run / "checkpoints"
    assert run_directory(ckpt) == run and run_directory(run) is None
    refused = [ckpt, ckpt / "x", run, tmp_path, run / "checkpoints" / ".." / ".." / "tiny"]
    for out in refused:
        for overwrite in (False, True):
            with pytest.raises(ConvertError, match=f"output {out} (is|contains|lies inside)"):
                check_output(out, ckpt, overwrite)
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_text("x")
    with pytest.raises(ConvertError, match="not an earlier export"):
        check_output(run / "tensorboard", ckpt, overwrite=True)
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    check_output(run / "hf", ckpt, overwrite=True)  # an earlier export: replaced
    check_output(run / "new", ckpt, overwrite=False)  # a new directory beside the checkpoints
    other = fake_run(tmp_path / "elsewhere")
    with pytest.raises(ConvertError, match="holds the checkpoint .*iter_0000005"):
        check_output(other.parent, ckpt, overwrite=True)


def test_planted_pickles_are_refused_by_the_loaders(tmp_path):
    from megatron_forge.checkpointing.files import load_common_state

    marker = tmp_path / "pwned"
    torch.save({"iteration": 1, "x": RunsCode(marker)}, tmp_path / "common.pt")
    with pytest.raises(CheckpointError, match=r"common.pt needs posix.system to be unpickled"):
        load_common_state(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata needs posix.system to be unpickled"):
        load_metadata(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"\.metadata is truncated or corrupt"):
        load_metadata(tmp_path)
    assert not marker.exists()
