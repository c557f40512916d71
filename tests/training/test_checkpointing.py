"""Async checkpoints, exact resume after SIGTERM, kill -9 mid-write, resharding, retention,
and the hang watchdog: all with the real entry point on gloo ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_forge.checkpointing import iterations_to_delete
from megatron_forge.training.preemption import EXIT_PREEMPTED
from megatron_forge.training.watchdog import EXIT_HUNG, describe_stalled
from tests.conftest import REPO, data_overrides, read_metrics, training_command

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = [
    f"train.train_iters={STEPS}",
    "train.eval_interval=0",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "logging.log_interval=1",
]


def _start(nprocs: int, config: str, overrides: list[str], run_dir: Path) -> subprocess.Popen:
    cmd, env = training_command(nprocs, config, overrides, run_dir)
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _workers(proc: subprocess.Popen, nprocs: int) -> list[psutil.Process]:
    """The training processes: torchrun's children, or the process itself."""
    if nprocs == 1:
        return [psutil.Process(proc.pid)]
    deadline = time.time() + 60
    while time.time() < deadline:
        kids = []
        for child in psutil.Process(proc.pid).children():  # not the checkpoint writers
            try:
                if "megatron_forge.train" in " ".join(child.cmdline()):
                    kids.append(child)
            except psutil.Error:  # exited meanwhile
                continue
        if len(kids) == nprocs:
            return kids
        time.sleep(0.2)
    raise AssertionError("training workers did not start")


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = [r for r in read_metrics(run_dir) if "loss" in r]
        if records and records[-1]["step"] >= step:
            return
        assert proc.poll() is None, run_dir.with_suffix(".log").read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def _losses(run_dir: Path) -> dict[int, float]:
    # A resumed run appends to the same metrics.jsonl: later records win.
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


CASES = {
    "dense-TP2": ("configs/tiny.yaml", ["parallel.tensor=2"]),
    "moe-EP2": ("configs/tiny_moe.yaml", ["parallel.expert=2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_then_resume_is_exact(case: str, sample_data: Path, tmp_path: Path) -> None:
    config, layout = CASES[case]
    base = COMMON + data_overrides(sample_data) + layout + ["checkpoint.save_interval=4"]
    full = tmp_path / "full"
    proc = _start(2, config, base, full)
    assert proc.wait(timeout=600) == 0, full.with_suffix(".log").read_text()[-3000:]

    run = tmp_path / "interrupted"
    ckpt = tmp_path / "ckpt"
    overrides = base + [f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}"]
    proc = _start(2, config, overrides, run)
    _wait_for_step(run, 5, proc)
    for worker in _workers(proc, 2):
        worker.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    log = run.with_suffix(".log").read_text()
    assert f"exitcode  : {EXIT_PREEMPTED}" in log, log[-3000:]
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 5 <= stopped < STEPS, stopped
    assert f"SIGTERM at step {stopped}: saved checkpoint to {ckpt}" in log

    proc = _start(2, config, overrides, run)
    assert proc.wait(timeout=600) == 0, run.with_suffix(".log").read_text()[-3000:]
    expected, resumed = _losses(full), _losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    later = range(stopped + 1, STEPS + 1)
    print(f"{case}: stopped at {stopped}; losses {[resumed[s] for s in later]}")
    assert [resumed[s] for s in later] == [expected[s] for s in later]  # bit-identical
    # async saves: blocked = plan + stage (+ waiting); the write is reported once finished
    saved = [r for r in read_metrics(run) if "checkpoint_blocked_s" in r]
    assert {8, 12} <= {r["step"] for r in saved}
    for r in saved:
        assert r["checkpoint_plan_s"] + r["checkpoint_stage_s"] <= r["checkpoint_blocked_s"]
    written = [r for r in read_metrics(run) if "checkpoint_write_s" in r]
    assert 8 in {r["checkpoint_write_step"] for r in written}
    assert all(0 < r["checkpoint_write_s"] < 300 for r in written)


def test_kill_during_async_write_keeps_previous_checkpoint(
    sample_data: Path, tmp_path: Path
) -> None:
    """SIGKILL the whole job while the background writer of a checkpoint is running: the
    tracker still names the previous checkpoint, and the job resumes from it."""
    ckpt = tmp_path / "ckpt"
    # A wider model, so that writing a checkpoint takes long enough to be interrupted.
    wide = ["model.hidden_size=512", "model.ffn_hidden_size=2048", "model.num_layers=4"]
    overrides = (
        COMMON
        + data_overrides(sample_data)
        + wide
        + ["checkpoint.save_interval=3", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}"]
    )
    run = tmp_path / "run"
    proc = _start(1, "configs/tiny.yaml", overrides, run)
    target = ckpt / "iter_0000006"
    deadline = time.time() + 300
    while not target.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its checkpoint writer
    proc.wait()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not (target / "metadata.json").exists()  # the write was really interrupted

    proc = _start(
        1,
        "configs/tiny.yaml",
        overrides + ["train.train_iters=7", "train.resume_hparams=checkpoint"],
        run,
    )
    assert proc.wait(timeout=600) == 0, run.with_suffix(".log").read_text()[-3000:]
    records = [r for r in read_metrics(run) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps[steps.index(3) + 1 :][-4:] == [4, 5, 6, 7]  # resumed after step 3
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    assert (target / "metadata.json").exists()  # step 6 rewritten cleanly


def test_resharding_keeps_eval_loss(sample_data: Path, tmp_path: Path) -> None:
    """Train under TP=2 and save in the fully_reshardable format; evaluate that checkpoint
    under TP=1 and PP=2 (the default dp_reshardable format is refused there:
    test_checkpoint_formats.py)."""
    ckpt = tmp_path / "ckpt"
    common = COMMON + data_overrides(sample_data) + ["train.eval_iters=2"]
    common.append("checkpoint.optimizer_format=fully_reshardable")
    evaluate = ["train.skip_train=true", "train.eval_interval=1", f"checkpoint.load={ckpt}"]
    proc = _start(
        2,
        "configs/tiny.yaml",
        common + ["parallel.tensor=2", "train.train_iters=6", f"checkpoint.save={ckpt}"],
        tmp_path / "train",
    )
    assert proc.wait(timeout=600) == 0
    val = {}
    for name, nprocs, layout in [
        ("TP2", 2, ["parallel.tensor=2"]),
        ("TP1", 1, []),
        ("PP2", 2, ["parallel.pipeline=2"]),
    ]:
        run = tmp_path / f"eval_{name}"
        proc = _start(nprocs, "configs/tiny.yaml", common + evaluate + layout, run)
        assert proc.wait(timeout=600) == 0, run.with_suffix(".log").read_text()[-3000:]
        (record,) = [r for r in read_metrics(run) if "val_loss" in r]
        assert record["step"] == 6
        val[name] = record["val_loss"]
    print(f"eval loss of the TP=2 checkpoint: {val}")
    assert val["TP1"] == pytest.approx(val["TP2"], rel=1e-6)
    assert val["PP2"] == pytest.approx(val["TP2"], rel=1e-6)


def test_retention_keeps_last_and_every(sample_data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    overrides = (
        COMMON
        + data_overrides(sample_data)
        + [
            "checkpoint.save_interval=2",
            "checkpoint.keep_last=2",
            "checkpoint.keep_every=4",
            f"checkpoint.save={ckpt}",
        ]
    )
    proc = _start(1, "configs/tiny.yaml", overrides, tmp_path / "run")
    assert proc.wait(timeout=600) == 0
    kept = sorted(p.name for p in ckpt.glob("iter_*"))
    assert kept == ["iter_0000004", "iter_0000008", "iter_0000010", "iter_0000012"]

    # tools/inspect_checkpoint.py lists, summarizes and verifies; then spots a torn copy
    tool = [sys.executable, str(REPO / "tools/inspect_checkpoint.py")]
    out = subprocess.run(
        [*tool, str(ckpt), "--verify", "--tensors"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{ckpt}: tracker -> 12" in out.stdout
    assert "iter_0000012: iteration 12, consumed samples 96, optimizer state: True" in out.stdout
    assert "saved under layout: tensor=1 pipeline=1 context=1 data=1 expert=1" in out.stdout
    assert "decoder.layers.self_attention.linear_qkv.weight" in out.stdout
    assert "verify: OK, complete and readable" in out.stdout
    torn = tmp_path / "torn" / "iter_0000012"
    shutil.copytree(ckpt / "iter_0000012", torn)
    shard = sorted(torn.glob("*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    out = subprocess.run(
        [*tool, str(torn), "--verify"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 1
    assert f"PROBLEM: {shard} is truncated" in out.stdout


def test_retention_rule() -> None:
    its = [2, 4, 6, 8, 10, 12]
    assert iterations_to_delete(its, 12, keep_last=2, keep_every=4) == [2, 6]
    assert iterations_to_delete(its, 12, keep_last=None, keep_every=None) == []
    # an unfinished newer directory is never counted or deleted here; latest always kept
    assert iterations_to_delete([2, 4, 6], 4, keep_last=1, keep_every=None) == [2]


def test_watchdog_names_stalled_rank(sample_data: Path, tmp_path: Path) -> None:
    """SIGSTOP one of two ranks: the other exits within the timeout, naming it."""
    run = tmp_path / "run"
    overrides = (
        COMMON
        + data_overrides(sample_data)
        + [
            "train.train_iters=100000",
            "train.hang_timeout_s=8",
        ]
    )
    proc = _start(2, "configs/tiny.yaml", overrides, run)
    _wait_for_step(run, 3, proc)
    workers = _workers(proc, 2)
    rank_of = {w.pid: int(w.environ()["LOCAL_RANK"]) for w in workers}
    victim = next(w for w in workers if rank_of[w.pid] == 1)
    survivor = next(w for w in workers if rank_of[w.pid] == 0)
    victim.suspend()
    stopped_at = time.time()
    try:
        survivor.wait(timeout=120)  # the watchdog of rank 0 fires and exits
        elapsed = time.time() - stopped_at
        # torchrun's SIGTERM cannot reach a stopped process (it would wait 30 s, then kill)
        victim.kill()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = run.with_suffix(".log").read_text()
    assert "watchdog: rank 0 on host" in log, log[-3000:]
    assert f"rank 1 on host {os.uname().nodename}" in log and "no heartbeat for" in log
    assert f"exitcode  : {EXIT_HUNG}" in log
    print(f"rank 0 exited {elapsed:.1f} s after rank 1 was stopped (timeout 8 s)")
    assert elapsed < 30
    beats = json.loads((run / "heartbeat" / "rank1.json").read_text())
    assert beats["pid"] == victim.pid and beats["host"] == os.uname().nodename


def test_describe_stalled() -> None:
    beats = {
        0: {"step": 9, "time": 100.0, "host": "a", "pid": 1},
        1: {"step": 9, "time": 60.0, "host": "b", "pid": 2},
        2: {"step": 7, "time": 99.0, "host": "c", "pid": 3},
    }
    text = describe_stalled(beats, now=101.0, stale_s=15)
    assert "rank 1 on host b (pid 2): no heartbeat for 41 s, last at step 9" in text
    assert "rank 2 on host c (pid 3): behind: at step 7, others at 9" in text
    assert "rank 0" not in text
