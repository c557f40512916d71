"""End to end: a tiny 2-rank run with W&B (online without a key -> offline) and
TensorBoard, then the same job resumed from its checkpoint with more steps. What W&B and
TensorBoard wrote is read back with their own readers and compared with metrics.jsonl."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, data_overrides, read_metrics, training_command
from tests.monitoring import wandb_files

pytestmark = pytest.mark.slow

FIRST_ITERS, RESUMED_ITERS = 6, 10
TRAIN_STEPS = {FIRST_ITERS: [2, 4, 6], RESUMED_ITERS: [8, 10]}  # log_interval=2
VAL_STEPS = {FIRST_ITERS: [3, 6], RESUMED_ITERS: [9]}  # eval_interval=3


def _train(run_dir: Path, sample: Path, netrc: Path, train_iters: int) -> str:
    overrides = [
        *data_overrides(sample),
        f"train.train_iters={train_iters}",
        "train.eval_interval=3",
        "train.eval_iters=1",
        "logging.log_interval=2",
        f"checkpoint.save={run_dir / 'ckpt'}",
        f"checkpoint.load={run_dir / 'ckpt'}",
        "checkpoint.save_interval=4",
        # The resumed job trains further; the schedule stays the one the run started with.
        "train.resume_hparams=checkpoint",
        "logging.wandb_project=forge-test",
        "logging.wandb_mode=online",
        "logging.wandb_tags=[tiny, monitoring]",
        "logging.wandb_group=ci",
        "logging.tensorboard=true",
    ]
    cmd, env = training_command(2, "configs/tiny.yaml", overrides, run_dir)
    for name in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_BASE_URL"):
        env.pop(name, None)
    # No key anywhere: online must fall back to offline. A Slurm job to label the run with
    # (without SLURM_PROCID, so the ranks still come from torchrun).
    env.update(NETRC=str(netrc), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]")
    env.update(SLURM_NNODES="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("monitored")
    netrc = run_dir.parent / f"{run_dir.name}_netrc"
    netrc.write_text("")
    first = _train(run_dir, sample_data, netrc, FIRST_ITERS)
    second = _train(run_dir, sample_data, netrc, RESUMED_ITERS)
    wandb_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    return {"dir": run_dir, "stdout": [first, second], "wandb": wandb_dirs}


def _by_step(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def _train_records(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in records if "loss" in r}


def test_wandb_offline_history_holds_the_metrics(runs) -> None:
    assert len(runs["wandb"]) == 2, runs["wandb"]  # one per job: only global rank 0 logs
    jsonl = read_metrics(runs["dir"])
    records = _train_records(jsonl)
    for wandb_dir, iters in zip(runs["wandb"], (FIRST_ITERS, RESUMED_ITERS)):
        rows = wandb_files.history(wandb_dir)
        train = sorted(s for s, row in rows.items() if "train/loss" in row)
        val = sorted(s for s, row in rows.items() if "val/loss" in row)
        assert train == TRAIN_STEPS[iters] and val == VAL_STEPS[iters]
        for step in train:
            row, record = rows[step], records[step]
            # every metric of the step, under its dashboard name, with its value
            for key, name in (
                ("loss", "train/loss"),
                ("lr", "train/lr"),
                ("grad_norm", "train/grad_norm"),
                ("skipped_steps", "train/skipped_steps"),
                ("nan_steps", "train/nan_steps"),
                ("consumed_samples", "train/consumed_samples"),
                ("tokens_per_s", "throughput/tokens_per_s"),
                ("tokens_per_s_per_gpu", "throughput/tokens_per_s_per_gpu"),
                ("tflops_per_gpu", "throughput/tflops_per_gpu"),
                ("step_time_s", "time/step_s"),
                ("step_time_min_s", "time/step_min_s"),
                ("data_wait_s", "time/data_wait_s"),
                ("peak_mem_gb", "memory/peak_gb"),
            ):
                assert row[name] == pytest.approx(record[key], rel=1e-12), (step, name)
            assert "throughput/mfu" not in row  # CPU: MFU n/a
        for step in val:
            assert rows[step]["val/loss"] == pytest.approx(_by_step(jsonl, "val_loss")[step])
            assert rows[step]["val/ppl"] == pytest.approx(_by_step(jsonl, "val_ppl")[step])
    # checkpoint.save_interval=4: the save at step 4 reports how long it blocked training
    blocked = wandb_files.history(runs["wandb"][0])[4]["time/checkpoint_blocked_s"]
    assert blocked == pytest.approx(records[4]["checkpoint_blocked_s"], rel=1e-12)
    assert blocked > 0


def test_step_metrics_have_consistent_values(runs) -> None:
    """What each step reports follows from the config (global batch 16, seq 128, 2 ranks,
    eval every 3 steps) and from the other metrics of that step."""
    records = _train_records(read_metrics(runs["dir"]))
    assert sorted(records) == [2, 4, 6, 8, 10]
    flops_line = next(x for x in runs["stdout"][0].splitlines() if "model FLOPs per token" in x)
    flops_per_token = float(flops_line.split(": ")[1].split(" ")[0])
    for step, r in records.items():
        assert r["consumed_samples"] == 16 * step
        assert r["tokens_per_s"] == pytest.approx(16 * 128 / r["step_time_s"], rel=1e-12)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2, rel=1e-12)
        assert r["tflops_per_gpu"] == pytest.approx(
            flops_per_token * r["tokens_per_s_per_gpu"] / 1e12, rel=1e-3
        )
        assert 0 < r["step_time_min_s"] <= r["step_time_rank_s"] <= r["step_time_s"]
        # waiting for this step's batches takes some time, also after an evaluation
        # (steps 4, 6, 8, 10 follow the ones at 3, 6, 9)
        assert 0 < r["data_wait_s"] < r["step_time_rank_s"]
        assert r["skipped_steps"] == 0 and r["nan_steps"] == 0 and r["skipped"] is False
        assert r["grad_norm"] > 0 and r["peak_mem_gb"] > 0
        assert "mfu" not in r  # no peak FLOP/s known on CPU
    # linear warmup over 5 steps to 3e-3, cosine decay to 3e-4 at the first job's last
    # step; the resumed job keeps the checkpoint's schedule (megatron's default)
    lrs = [records[s]["lr"] for s in sorted(records)]
    assert lrs == pytest.approx([3e-3 * 2 / 5, 3e-3 * 4 / 5, 3e-4, 3e-4, 3e-4], rel=1e-6)


def test_wandb_run_has_config_tags_group_and_slurm_job(runs) -> None:
    info = wandb_files.run_info(runs["wandb"][0])
    assert info.project == "forge-test" and info.run_group == "ci"
    assert list(info.tags) == ["tiny", "monitoring"]
    config = wandb_files.config(runs["wandb"][0])
    assert config["model"]["hidden_size"] == 64 and config["train"]["train_iters"] == 6
    assert config["world_size"] == 2
    assert config["slurm"]["job_id"] == "4242" and config["slurm"]["num_nodes"] == "2"
    assert config["slurm"]["job_nodelist"] == "node[01-02]"
    # the resumed job records its own (changed) config in the same run
    assert wandb_files.config(runs["wandb"][1])["train"]["train_iters"] == 10


def test_offline_fallback_is_said_once(runs) -> None:
    for stdout in runs["stdout"]:
        assert stdout.count("W&B: no API key") == 1, stdout[-3000:]


def test_resumed_job_continues_the_same_wandb_run(runs) -> None:
    from megatron.core import dist_checkpointing

    first, second = (wandb_files.run_info(d).run_id for d in runs["wandb"])
    assert first == second
    assert runs["wandb"][1].name.endswith(first)
    ckpt = runs["dir"] / "ckpt" / "iter_0000006"
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    assert common["callback_states"] == {"wandb": {"run_id": first}}
    assert f"W&B run {first} (offline)" in runs["stdout"][1]


def test_tensorboard_has_the_same_metrics(runs) -> None:
    events = EventAccumulator(str(runs["dir"] / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/loss", "val/ppl", "throughput/tflops_per_gpu"} <= tags
    assert "throughput/mfu" not in tags
    jsonl = read_metrics(runs["dir"])
    wandb_rows = {**wandb_files.history(runs["wandb"][0]), **wandb_files.history(runs["wandb"][1])}
    for tag, key in (("train/loss", "loss"), ("val/loss", "val_loss"), ("val/ppl", "val_ppl")):
        scalars = events.Scalars(tag)
        expected = _by_step(jsonl, key)
        assert [s.step for s in scalars] == sorted(expected)
        for s in scalars:  # TensorBoard stores float32
            assert s.value == pytest.approx(expected[s.step], rel=1e-6)
            assert s.value == pytest.approx(wandb_rows[s.step][tag], rel=1e-6)


def test_metrics_and_console_line(runs) -> None:
    jsonl = read_metrics(runs["dir"])
    train = [r for r in jsonl if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    assert all(r["tflops_per_gpu"] > 0 and "mfu" not in r for r in train)
    first = runs["stdout"][0]
    assert "model FLOPs per token: 2.163e+06 (training, 3 x forward)" in first
    assert "MFU: n/a on CPU" in first
    line = next(x for x in first.splitlines() if "iteration        6/       6" in x)
    assert "| throughput per GPU (TFLOP/s/GPU): " in line and "| MFU: n/a |" in line
    assert "| tokens/s/GPU: " in line and "| step time min/max (ms): " in line


def test_plot_run_draws_the_recorded_curves(runs, plot_run, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    assert plot_run.main([str(runs["dir"]), "-o", str(out), "--labels", "tiny"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    fig = plot_run.plot_runs([runs["dir"]], ["tiny"])
    loss, lr, tput, eff = fig.axes
    jsonl = read_metrics(runs["dir"])
    train_line, val_line = loss.get_lines()
    assert list(train_line.get_xdata()) == [2, 4, 6, 8, 10]
    assert list(train_line.get_ydata()) == [r["loss"] for r in jsonl if "loss" in r]
    assert list(val_line.get_xdata()) == [3, 6, 9]
    assert list(lr.get_lines()[0].get_ydata()) == [r["lr"] for r in jsonl if "lr" in r]
    assert list(tput.get_lines()[0].get_ydata()) == [
        r["tokens_per_s_per_gpu"] for r in jsonl if "loss" in r
    ]
    assert eff.get_ylabel() == "TFLOP/s per GPU"  # no MFU on CPU
    assert list(eff.get_lines()[0].get_ydata()) == [
        r["tflops_per_gpu"] for r in jsonl if "loss" in r
    ]
