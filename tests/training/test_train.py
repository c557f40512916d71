"""The training entry point end to end on the sample corpus (single process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, data_overrides, read_metrics


@pytest.fixture(scope="module")
def tiny_run(sample_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """configs/tiny.yaml as shipped (60 steps, eval every 20, save every 30)."""
    run_dir = tmp_path_factory.mktemp("tiny")
    cmd = [
        sys.executable,
        "-m",
        "megatron_forge.train",
        "--config",
        "configs/tiny.yaml",
        *data_overrides(sample_data),
        f"logging.dir={run_dir}",
        f"checkpoint.save={run_dir / 'ckpt'}",
        f"checkpoint.load={run_dir / 'ckpt'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout, read_metrics(run_dir)


def test_loss_goes_down_on_sample_corpus(tiny_run) -> None:
    _, _, records = tiny_run
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    first, last = train[0]["loss"], train[-1]["loss"]
    print(f"train loss step 5: {first:.3f} -> step 60: {last:.3f}")
    assert last < first - 1.0
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [20, 40, 60]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert val[-1]["val_ppl"] == pytest.approx(2.718281828 ** val[-1]["val_loss"], rel=1e-6)


def test_metrics_fields(tiny_run) -> None:
    _, _, records = tiny_run
    step = next(r for r in records if "loss" in r)
    for key in (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "consumed_samples",
        "step_time_s",
    ):
        assert key in step, key
    assert step["consumed_samples"] == step["step"] * 16
    assert step["tokens_per_s"] > 0 and step["grad_norm"] > 0
    for r in (r for r in records if "loss" in r):
        assert r["consumed_samples"] == r["step"] * 16
        assert r["tokens_per_s"] == pytest.approx(16 * 128 / r["step_time_s"], rel=1e-12)
        # the batches of every step take some time to arrive, also after the evaluations
        # at steps 20 and 40
        assert 0 < r["data_wait_s"] < r["step_time_rank_s"], r
    # warmup (5 steps) then cosine decay to min_lr at the last step
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[5] == pytest.approx(3e-3) and lrs[60] == pytest.approx(3e-4)


def test_console_line_and_outputs(tiny_run) -> None:
    run_dir, stdout, _ = tiny_run
    assert "iteration       60/      60 | consumed samples:        960" in stdout
    assert "| lm loss: " in stdout and "validation at iteration 60" in stdout
    assert (run_dir / "config.yaml").is_file()
    ckpt = run_dir / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "60"
    assert (ckpt / "iter_0000030" / "metadata.json").is_file()


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_forge.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    proc = _train_cli(
        "--config",
        "configs/tiny.yaml",
        f"data.blend=[{tmp_path}/nope]",
        f"logging.dir={tmp_path}/run",
        "checkpoint.save=null",
    )
    assert proc.returncode == 2
    assert f"data.blend: {tmp_path}/nope.bin does not exist" in proc.stderr


def test_dry_run_prints_layout() -> None:
    proc = _train_cli("--config", "configs/llama_70b.yaml", "--dry-run")
    # a single process cannot hold TP=4 x PP=4: refused before anything is allocated
    assert proc.returncode == 2
    assert "world size 1 is not divisible by parallel.tensor" in proc.stderr
    proc = _train_cli("--config", "configs/tiny.yaml", "--dry-run", "train.lr=1e-3")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.001" in proc.stdout
    assert "world=1 TP=1 PP=1 CP=1 EP=1 DP=1 microbatches=4" in proc.stdout


def test_corrupt_tracker_is_a_checkpoint_error(tmp_path: Path) -> None:
    """A checkpoint directory at fault is reported as such, not as a config mistake; the
    run needs no data (synthetic tokens)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("12 (copied by hand)\n")
    proc = _train_cli(
        "--config",
        "configs/tiny.yaml",
        "data.format=mock",
        "model.vocab_size=2048",
        f"data.tokenizer={tmp_path}/absent.model",
        f"checkpoint.load={ckpt}",
        "checkpoint.save=null",
        f"logging.dir={tmp_path}/run",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "checkpoint error: " in proc.stderr and "holds '12 (copied by hand)'" in proc.stderr
