"""Never lose a checkpoint or a run: a checkpoint directory belongs to one run
(forge_owner.json), one live run writes a directory at a time (forge.lock), a lost or
broken tracker refuses rather than restarting over the checkpoints, retention touches
only this run's complete checkpoints, and a full disk says where and how much is left
without advancing the tracker.

Fast tests work on real files in-process (and subprocesses for the lock); the slow ones
run the real entry point."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from megatron_forge.checkpointing import directory, ownership
from megatron_forge.checkpointing.directory import (
    TRACKER,
    disk_full_cause,
    iteration_dir,
    latest_iteration,
    resolve_iteration,
    write_tracker,
)
from megatron_forge.checkpointing.lock import LOCK_FILE, DirectoryLock
from megatron_forge.checkpointing.ownership import (
    OWNER_FILE,
    Owner,
    apply_claim,
    plan_claim,
    read_owner,
    write_owner,
)
from megatron_forge.config import CheckpointConfig, load_config
from megatron_forge.errors import CheckpointError, ConfigError
from tests.conftest import REPO, read_metrics, training_command


def fake_checkpoint(root: Path, iteration: int, complete: bool = True) -> Path:
    """An iter_ directory with the files a torch_dist save writes."""
    path = iteration_dir(root, iteration)
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(os.urandom(64))
    (path / "common.pt").write_bytes(b"common")
    if complete:
        (path / ".metadata").write_bytes(b"meta")
        (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path -> sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def other_run(root: Path, iterations: list[int], digest: str = "other-config") -> Owner:
    """A directory written by another run: its checkpoints, tracker and owner record."""
    for i in iterations:
        fake_checkpoint(root, i)
    write_tracker(root, iterations[-1])
    owner = Owner.new(digest, iterations=list(iterations))
    write_owner(root, owner, "")
    return owner


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "SLURM_JOB_ID",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_RESTART_COUNT",
    ):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------
# Ownership: who may write into a checkpoint directory


def test_new_run_refused_in_another_runs_directory_which_stays_byte_identical(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ckpt"
    owner = other_run(root, [2, 4])
    (root / "notes.txt").write_text("mine")
    before = snapshot(root)
    for load in (None, tmp_path / "elsewhere"):
        with pytest.raises(CheckpointError) as err:
            plan_claim(root, load, "this-config")
        message = str(err.value)
        assert f"checkpoint.save={root} belongs to another run: run {owner.run_id}" in message
        assert "newest iteration 4 (the tracker's)" in message
        assert "checkpoint.overwrite=true" in message and f"checkpoint.load={root}" in message
    assert snapshot(root) == before


def test_checkpoints_without_owner_record_are_not_a_new_runs(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    fake_checkpoint(root, 10)
    write_tracker(root, 10)
    before = snapshot(root)
    with pytest.raises(CheckpointError, match="holds checkpoints this run did not write"):
        plan_claim(root, None, "this-config")
    assert snapshot(root) == before
    # a complete checkpoint without any tracker is protected the same way
    (root / TRACKER).unlink()
    with pytest.raises(CheckpointError, match="newest complete iteration 10"):
        plan_claim(root, None, "this-config")


def test_fresh_and_empty_directories_are_claimed(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    claim = plan_claim(fresh, fresh, "cfg")
    assert not fresh.exists()  # planning writes nothing
    apply_claim(claim)
    owner = read_owner(fresh)
    assert owner is not None and owner.config_hash == "cfg" and owner.iterations == []
    # an interrupted first save (incomplete iter_ directory) holds nothing to lose
    partial = tmp_path / "partial"
    fake_checkpoint(partial, 3, complete=False)
    assert plan_claim(partial, None, "cfg").write


def test_same_run_before_its_first_save_keeps_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job requeued before it saved anything: same config, or the same Slurm job."""
    root = tmp_path / "ckpt"
    apply_claim(plan_claim(root, root, "cfg"))
    first = read_owner(root)
    claim = plan_claim(root, root, "cfg")
    assert claim.owner.run_id == first.run_id and not claim.write
    with pytest.raises(CheckpointError, match="belongs to another run"):
        plan_claim(root, root, "changed-config")
    # the same Slurm job (a requeue) with a changed config is still the same run
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    (root / OWNER_FILE).unlink()
    apply_claim(plan_claim(root, root, "cfg"))
    assert read_owner(root).job_id == "777"
    assert plan_claim(root, root, "changed-config").owner.job_id == "777"


def test_same_run_not_resuming_its_checkpoints_is_told_to_set_load(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    owner = other_run(root, [5], digest="cfg")
    with pytest.raises(CheckpointError) as err:
        plan_claim(root, None, "cfg")
    assert f"holds this run's checkpoints ({owner.describe()}; newest iteration 5" in str(err.value)
    assert f"Set checkpoint.load={root} to resume" in str(err.value)


def test_resume_continues_the_owner_and_adopts_a_directory_without_record(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ckpt"
    owner = other_run(root, [2, 4])
    claim = plan_claim(root, root, "a-changed-recipe")
    assert claim.resumes_from == 4 and claim.owner.run_id == owner.run_id and not claim.write
    legacy = tmp_path / "legacy"
    fake_checkpoint(legacy, 2)
    fake_checkpoint(legacy, 4)
    fake_checkpoint(legacy, 6, complete=False)  # an interrupted save
    write_tracker(legacy, 4)
    claim = plan_claim(legacy, legacy, "cfg")
    assert claim.write and claim.resumes_from == 4
    # not this run's: resumed from, never removed by its retention
    assert claim.owner.iterations == [] and claim.owner.adopted == [2, 4]


def test_overwrite_takes_over_and_keeps_the_previous_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    old = other_run(root, [2, 4])
    apply_claim(plan_claim(root, None, "mine", overwrite=True))
    owner = read_owner(root)
    assert owner.config_hash == "mine" and owner.not_ours == [2, 4] and owner.iterations == []
    assert owner.previous["owner"]["run_id"] == old.run_id and owner.previous["tracker"] == "4"
    assert not (root / TRACKER).exists()  # a requeue never resumes the previous run's
    assert iteration_dir(root, 2).is_dir() and iteration_dir(root, 4).is_dir()
    # the new run's requeue before its first save: the kept ones are not its checkpoints
    assert resolve_iteration(root, None, owner.not_ours) is None
    assert plan_claim(root, root, "mine").resumes_from is None


# ---------------------------------------------------------------------------------------
# Which iteration to load: a lost, broken or wrong tracker refuses, load_iteration picks


def test_trackerless_directory_lists_iterations_and_load_iteration_picks(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for i in (2, 4):
        fake_checkpoint(root, i)
    fake_checkpoint(root, 6, complete=False)
    with pytest.raises(CheckpointError) as err:
        resolve_iteration(root)
    assert str(err.value) == (
        f"{root} has no {TRACKER} but holds complete checkpoints at iterations 2, 4: "
        "refusing to start again from step 0 over them. Set checkpoint.load_iteration=4 "
        "(the newest) or another of them to resume from it, or restore the tracker "
        f"(echo 4 > {root / TRACKER})"
    )
    assert resolve_iteration(root, 2) == 2
    with pytest.raises(CheckpointError, match=r"iter_0000006 is incomplete; complete .*: 2, 4"):
        resolve_iteration(root, 6)
    # the same refusal at startup, before a run could save over them
    with pytest.raises(CheckpointError, match="has no latest_checkpointed_iteration.txt"):
        plan_claim(root, root, "cfg")
    with pytest.raises(CheckpointError, match="complete checkpoints after step 2 .iterations 4"):
        plan_claim(root, root, "cfg", load_iteration=2)
    assert plan_claim(root, root, "cfg", load_iteration=4).resumes_from == 4


def test_tracker_naming_a_missing_iteration_or_garbage(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    fake_checkpoint(root, 3)
    write_tracker(root, 9)
    with pytest.raises(CheckpointError) as err:
        resolve_iteration(root)
    assert f"names iteration 9 but {iteration_dir(root, 9)} is missing" in str(err.value)
    assert "complete iterations in" in str(err.value) and ": 3. Set" in str(err.value)
    (root / TRACKER).write_text("<<<<<<< HEAD\n")
    with pytest.raises(CheckpointError) as err:
        latest_iteration(root)
    assert "holds '<<<<<<< HEAD', not an iteration number; write one of the complete " in str(
        err.value
    )
    assert "iterations (3) into it" in str(err.value)


def test_requeue_after_load_iteration_resumes_from_the_tracker(tmp_path: Path) -> None:
    """The same command (load_iteration=4) requeued after the run saved 6 goes on from 6."""
    root = tmp_path / "ckpt"
    other_run(root, [2, 4], digest="cfg")
    (root / TRACKER).unlink()
    apply_claim(plan_claim(root, root, "cfg", load_iteration=4))
    owner = read_owner(root)
    assert owner.load_iteration_done == 4
    fake_checkpoint(root, 6)
    owner.iterations.append(6)
    write_owner(root, owner, "")
    write_tracker(root, 6)
    assert plan_claim(root, root, "cfg", load_iteration=4).resumes_from == 6
    cfg = CheckpointConfig(load=str(root), save=str(root), load_iteration=4)
    from megatron_forge.checkpointing.loader import iteration_to_load

    assert iteration_to_load(root, cfg) == 6
    # load_iteration picks an iteration of checkpoint.load only: reloading the run's own
    # newest checkpoint from checkpoint.save (a rollback) goes by that tracker
    source = tmp_path / "pretrained"
    fake_checkpoint(source, 4)
    cfg = CheckpointConfig(load=str(source), save=str(root), load_iteration=4)
    assert iteration_to_load(source, cfg) == 4
    assert iteration_to_load(root, cfg) == 6


def test_load_iteration_needs_load() -> None:
    with pytest.raises(ConfigError, match="checkpoint.load_iteration=3 needs checkpoint.load"):
        load_config(None, ["checkpoint.load=null", "checkpoint.load_iteration=3"])


def test_load_modes_and_the_step_a_run_resuming_its_directory_starts_at(tmp_path: Path) -> None:
    """load_mode=finetune and the older load_optimizer=false start at step 0, so resuming
    a directory that way would write over its checkpoints (refused); no_optim keeps the
    step; contradicting spellings and unknown modes are refused naming the field."""
    finetune = load_config(None, ["checkpoint.load_mode=finetune"]).checkpoint
    older = load_config(None, ["checkpoint.load_optimizer=false"]).checkpoint
    no_optim = load_config(None, ["checkpoint.load_mode=no_optim"]).checkpoint
    assert finetune.load_mode == older.load_mode == "finetune"
    assert no_optim.load_mode == "no_optim"
    with pytest.raises(
        ConfigError, match="load_optimizer=false .* contradicts checkpoint.load_mode"
    ):
        load_config(None, ["checkpoint.load_optimizer=false", "checkpoint.load_mode=no_optim"])
    with pytest.raises(ConfigError, match="checkpoint.load_mode"):
        load_config(None, ["checkpoint.load_mode=weights"])
    root = tmp_path / "ckpt"
    other_run(root, [2, 4], digest="cfg")
    # (the entry point passes checkpoint.load_optimizer, which finetune sets false)
    for ck in (finetune, older):
        with pytest.raises(CheckpointError, match="load_mode=finetune .* starts again from step 0"):
            plan_claim(root, root, "cfg", load_optimizer=ck.load_optimizer)
    assert plan_claim(root, root, "cfg", load_optimizer=no_optim.load_optimizer).resumes_from == 4


# ---------------------------------------------------------------------------------------
# Saving: retention, replacing, disk full (the Checkpointer on real files, no model)


def checkpointer(root: Path, **cfg: Any):
    from megatron_forge.checkpointing import Checkpointer

    return Checkpointer(root, CheckpointConfig(save=str(root), async_save=False, **cfg))


def test_retention_touches_only_this_runs_complete_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    other_run(root, [1])  # left by the previous owner
    apply_claim(plan_claim(root, None, "mine", overwrite=True))
    foreign = fake_checkpoint(root, 3, complete=False)
    (foreign / "important.txt").write_text("not a checkpoint")
    saver = checkpointer(root, keep_last=1)
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
        if step == 4:
            (iteration_dir(root, 4) / "notes.txt").write_text("keep me")
        saver._finish(step)
    assert latest_iteration(root) == 6
    assert read_owner(root).iterations == [6]
    assert not iteration_dir(root, 2).exists()
    assert sorted(p.name for p in iteration_dir(root, 4).iterdir()) == ["notes.txt"]
    assert (foreign / "important.txt").read_text() == "not a checkpoint"
    assert (foreign / "__0_0.distcp").exists()  # not this run's: untouched
    assert (iteration_dir(root, 1) / "metadata.json").exists()  # the previous owner's


def test_save_never_replaces_a_complete_checkpoint_it_did_not_write(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    apply_claim(plan_claim(root, None, "mine"))
    foreign = fake_checkpoint(root, 5)
    saver = checkpointer(root)
    with pytest.raises(CheckpointError, match="already holds a complete checkpoint that another"):
        saver._prepare_dir(5, {})
    assert (foreign / "metadata.json").exists()
    # an interrupted save is replaced; a file that is not part of it stays
    partial = fake_checkpoint(root, 7, complete=False)
    (partial / "readme.txt").write_text("x")
    assert saver._prepare_dir(7, {}) == "new"
    assert sorted(p.name for p in partial.iterdir()) == ["readme.txt"]


def test_disk_full_writing_the_tracker_names_path_and_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    write_tracker(root, 4)
    real_replace = os.replace

    def full(src: Any, dst: Any) -> None:
        if Path(dst).parent == root:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(directory.os, "replace", full)
    with pytest.raises(CheckpointError) as err:
        write_tracker(root, 6, previous=4)
    message = str(err.value)
    assert message.startswith(f"disk full while writing {root / TRACKER} (")
    assert " free there): the tracker still names iteration 4, so iteration 6 is not " in message
    assert "checkpoint.keep_last" in message
    assert (root / TRACKER).read_text() == "4\n"
    assert sorted(p.name for p in root.iterdir()) == [TRACKER]  # no temporary left behind


def test_disk_full_recording_a_checkpoint_leaves_the_tracker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ckpt"
    apply_claim(plan_claim(root, None, "mine"))
    saver = checkpointer(root)
    fake_checkpoint(root, 2)
    saver._finish(2)
    fake_checkpoint(root, 4)

    def full(path: Any, text: str, consequence: str) -> None:
        raise directory.disk_full_error(
            Path(path), OSError(errno.EDQUOT, "Disk quota exceeded"), consequence
        )

    monkeypatch.setattr(ownership, "atomic_write_text", full)
    with pytest.raises(CheckpointError) as err:
        saver._finish(4)
    assert f"disk quota exceeded while writing {root / OWNER_FILE}" in str(err.value)
    assert "the tracker still names iteration 2" in str(err.value)
    assert latest_iteration(root) == 2


def test_disk_full_during_the_write_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dist_checkpointing.save failing with ENOSPC (as torch wraps it) stops the save with
    the path and the free space; the tracker stays at the previous checkpoint."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_forge.checkpointing import TrainState
    from megatron_forge.checkpointing import saver as saver_module

    root = tmp_path / "ckpt"
    apply_claim(plan_claim(root, None, "mine"))
    saver = checkpointer(root)
    fake_checkpoint(root, 2)
    saver._finish(2)
    shard = iteration_dir(root, 4) / "__0_0.distcp"

    def full(*args: Any, **kwargs: Any) -> None:
        cause = OSError(errno.ENOSPC, "No space left on device", str(shard))
        raise CheckpointException("save failed", {0: (cause, None)})

    monkeypatch.setattr(saver_module, "sharded_state", lambda *a, **k: {})
    monkeypatch.setattr(saver_module, "parallel_layout", lambda: {})
    monkeypatch.setattr(dist_checkpointing, "save", full)

    class Scheduler:
        def state_dict(self) -> dict:
            return {}

    with pytest.raises(CheckpointError) as err:
        saver.save([], None, Scheduler(), TrainState(step=4), {})
    message = str(err.value)
    assert message.startswith(f"disk full while writing {shard} (")
    assert "the checkpoint of step 4 is incomplete and is not resumed from; the tracker " in message
    assert "still names iteration 2" in message
    assert latest_iteration(root) == 2


def test_disk_full_cause_is_found_inside_wrapped_errors() -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    cause = OSError(errno.ENOSPC, "No space left on device")
    wrapped = CheckpointException("x", {3: (cause, None)})
    assert disk_full_cause(wrapped) is cause
    try:
        try:
            raise cause
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        assert disk_full_cause(outer) is cause
    assert disk_full_cause(OSError(errno.EACCES, "denied")) is None


# ---------------------------------------------------------------------------------------
# The lock: one live run per directory, never blocked by a dead one

HOLDER = """
import os, sys, time
from megatron_forge.checkpointing.lock import DirectoryLock
lock = DirectoryLock(sys.argv[1], "checkpoint.save").acquire()
if len(sys.argv) > 2 and os.fork() == 0:  # a child that outlives its parent
    time.sleep(120)
    os._exit(0)
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(directory: Path, fork_child: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-c", HOLDER, str(directory)] + (["fork"] if fork_child else [])
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_live_run_is_refused_and_a_killed_one_never_blocks(tmp_path: Path) -> None:
    first = hold_lock(tmp_path)
    try:
        with pytest.raises(CheckpointError) as err:
            DirectoryLock(tmp_path, "checkpoint.save").acquire()
        message = str(err.value)
        assert f"checkpoint.save={tmp_path} is in use by another run that is still running" in (
            message
        )
        assert f"pid {first.pid} on {os.uname().nodename}" in message
        with pytest.raises(ConfigError, match=f"logging.dir={tmp_path} is in use"):
            DirectoryLock(tmp_path, "logging.dir", ConfigError).acquire()
    finally:
        first.kill()  # kill -9
        first.wait()
    lock = DirectoryLock(tmp_path, "checkpoint.save").acquire()
    assert lock.warning is None  # the kernel released it: nothing stale to take over
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == os.uname().nodename
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no holder recorded
    DirectoryLock(tmp_path, "checkpoint.save").acquire().release()


def test_forked_children_do_not_keep_the_lock(tmp_path: Path) -> None:
    """A checkpoint writer or data worker forked by the holder does not hold the lock once
    the holder is gone."""
    holder = hold_lock(tmp_path, fork_child=True)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    try:
        lock = DirectoryLock(tmp_path, "checkpoint.save").acquire()
        assert lock.warning is None  # free, not merely stale
        lock.release()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the orphaned child


def _flock_with_record(path: Path, record: dict[str, Any]) -> subprocess.Popen:
    """Another process holds the flock while the record names ``record``: a lock that a
    shared filesystem keeps after its holder died."""
    code = textwrap.dedent(
        f"""
        import fcntl, json, os, sys, time
        fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({record!r}).encode())
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_stale_holder_records_never_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = {"host": os.uname().nodename, "pid": int(dead.stdout), "started": "earlier"}
    holder = _flock_with_record(tmp_path / LOCK_FILE, gone)
    try:
        lock = DirectoryLock(tmp_path, "checkpoint.save").acquire()
        assert f"pid {gone['pid']} on {gone['host']} is gone; taking it over" in lock.warning
        lock.release()
    finally:
        holder.kill()
        holder.wait()
    # this Slurm job's previous incarnation, on another node: a requeue is never blocked
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    before = {"host": "node-that-died", "pid": 1, "job_id": "4242", "restart": 0}
    holder = _flock_with_record(tmp_path / LOCK_FILE, before)
    try:
        lock = DirectoryLock(tmp_path, "checkpoint.save").acquire()
        assert "previous incarnation" in lock.warning
        lock.release()
        # ... but another live step of the same incarnation is refused
        (tmp_path / LOCK_FILE).write_text(json.dumps({**before, "restart": 1}))
        with pytest.raises(CheckpointError, match="node-that-died, Slurm job 4242"):
            DirectoryLock(tmp_path, "checkpoint.save").acquire()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------
# End to end: the real entry point

RUN = [
    "data.format=mock",
    "data.tokenizer=/absent/tokenizer.model",  # mock data never reads it
    "data.blend=[/absent/corpus]",
    "model.vocab_size=2048",
    "model.num_layers=2",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "train.decay_iters=100",  # the schedule stays the same when a resume changes train_iters
    "logging.log_interval=1",
]


def train(
    run_dir: Path, overrides: list[str], nprocs: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    cmd, env = training_command(nprocs, "configs/tiny.yaml", RUN + overrides, run_dir)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    cmd, env = training_command(1, "configs/tiny.yaml", RUN + overrides, run_dir)
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_refused_save_leaves_another_runs_directory_byte_identical(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    mine = [f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}", "checkpoint.save_interval=2"]
    ok(train(tmp_path / "first", mine + ["train.train_iters=4"]))
    owner = read_owner(ckpt)
    assert owner.iterations == [2, 4] and latest_iteration(ckpt) == 4
    before = snapshot(ckpt)

    # a new run (another recipe, not resuming) on 2 ranks: every rank refuses at startup
    second = [f"checkpoint.save={ckpt}", "train.lr=1e-3", "train.train_iters=3"]
    proc = train(tmp_path / "second", second + ["checkpoint.save_interval=3"], nprocs=2)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert (
        f"checkpoint error: checkpoint.save={ckpt} belongs to another run: "
        f"run {owner.run_id} (no Slurm job on {owner.host}, created {owner.created}), "
        "newest iteration 4 (the tracker's); this run does not resume from it" in out
    ), out[-3000:]
    assert not (tmp_path / "second" / "metrics.jsonl").exists()  # refused before training
    assert snapshot(ckpt) == before

    # checkpoint.overwrite=true: this run owns it; the previous checkpoints are kept
    ok(
        train(
            tmp_path / "second",
            second + ["checkpoint.save_interval=3", "checkpoint.overwrite=true"],
        )
    )
    taker = read_owner(ckpt)
    assert taker.run_id != owner.run_id and taker.iterations == [3] and taker.not_ours == [2, 4]
    assert taker.previous["owner"]["run_id"] == owner.run_id
    assert latest_iteration(ckpt) == 3
    for i in (2, 4):
        kept = iteration_dir(ckpt, i)
        assert {k: v for k, v in snapshot(ckpt).items() if k.startswith(kept.name)} == {
            k: v for k, v in before.items() if k.startswith(kept.name)
        }


@pytest.mark.slow
def test_lost_tracker_refuses_then_load_iteration_resumes(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run = tmp_path / "run"
    resume = [
        f"checkpoint.save={ckpt}",
        f"checkpoint.load={ckpt}",
        "checkpoint.save_interval=2",
        "train.resume_hparams=checkpoint",  # each resume trains further on the first schedule
    ]
    ok(train(run, resume + ["train.train_iters=4"]))
    (ckpt / TRACKER).unlink()
    foreign = ckpt / "iter_0000003"
    foreign.mkdir()
    (foreign / "important.txt").write_text("not a checkpoint")
    before = snapshot(ckpt)

    proc = train(run, resume + ["train.train_iters=8"])
    assert proc.returncode == 2
    assert (
        f"checkpoint error: {ckpt} has no {TRACKER} but holds complete checkpoints at "
        "iterations 2, 4: refusing to start again from step 0 over them. Set "
        "checkpoint.load_iteration=4" in proc.stderr
    ), proc.stderr[-3000:]
    assert snapshot(ckpt) == before and steps(run) == [1, 2, 3, 4]

    # load_iteration picks one; retention (keep_last=1) removes only this run's checkpoints
    pick = resume + ["checkpoint.load_iteration=4", "checkpoint.keep_last=1"]
    ok(train(run, pick + ["train.train_iters=6"]))
    assert steps(run) == [1, 2, 3, 4, 5, 6] and latest_iteration(ckpt) == 6
    # the same command requeued after that run saved: it goes on from the tracker's 6
    proc = ok(train(run, pick + ["train.train_iters=8"]))
    assert "an earlier job of this run resumed from it" in proc.stderr
    assert steps(run) == [1, 2, 3, 4, 5, 6, 7, 8] and latest_iteration(ckpt) == 8
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000003", "iter_0000008"]
    assert (foreign / "important.txt").read_text() == "not a checkpoint"


@pytest.mark.slow
def test_second_live_run_refused_until_the_first_is_killed(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    resume = [
        f"checkpoint.save={ckpt}",
        f"checkpoint.load={ckpt}",
        "checkpoint.save_interval=1",
        "checkpoint.async_save=false",
        "train.train_iters=100000",
    ]
    first = start(tmp_path / "first", resume)
    second = None
    try:
        deadline = time.time() + 300
        while latest_iteration(ckpt) is None:
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        holder = json.loads((ckpt / LOCK_FILE).read_text())
        proc = train(tmp_path / "second", resume)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert (
            f"checkpoint error: checkpoint.save={ckpt} is in use by another run that is still "
            f"running (pid {holder['pid']} on {holder['host']}" in proc.stderr
        ), proc.stderr[-3000:]
        assert first.poll() is None  # the first run goes on undisturbed

        os.killpg(first.pid, signal.SIGKILL)  # kill -9: its lock is stale now
        first.wait()
        resumed_from = latest_iteration(ckpt)
        second = start(tmp_path / "second", resume)
        deadline = time.time() + 300
        while not [s for s in steps(tmp_path / "second") if s > resumed_from]:
            assert second.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        assert json.loads((ckpt / LOCK_FILE).read_text())["pid"] == second.pid
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
