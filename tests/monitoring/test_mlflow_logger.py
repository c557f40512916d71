"""The MLflow logger against a local file store (no server), read back with MLflow's own
client: metrics, config params, resumption of the same run, a changed config on resume,
no mlflow installed; and the observed 2-rank run whose resumed job continues its run."""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any

import pytest

from megatron_forge.config import load_config
from megatron_forge.monitoring.mlflow_logger import MlflowLogger, flatten, tracking_uri
from megatron_forge.train import build_callbacks
from megatron_forge.training.monitors import MlflowCallback
from tests.training.observed_run import FIRST_ITERS, RESUMED_ITERS, observed  # noqa: F401

mlflow = pytest.importorskip(
    "mlflow", reason="mlflow is not installed: pip install -e '.[mlflow]' (tools/setup_env.sh does)"
)
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """No store from the environment, and no file-store opt-in: the logger must set that
    itself (set-then-delete: whatever the logger sets is undone after the test)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [f"logging.dir={tmp_path / 'run'}", "logging.mlflow_experiment=forge-unit", *overrides],
    )


def test_store_defaults_to_a_file_store_in_the_run_dir(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert tracking_uri(cfg, {}) == (tmp_path / "run" / "mlruns").resolve().as_uri()
    assert tracking_uri(cfg, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == "http://mlflow:5000"
    cfg = _cfg(tmp_path, f"logging.mlflow_tracking_uri={tmp_path / 'store'}")
    assert tracking_uri(cfg, {"MLFLOW_TRACKING_URI": "x"}) == (tmp_path / "store").as_uri()


def test_config_is_flattened_into_params() -> None:
    flat = flatten({"train": {"lr": 0.0003, "tags": ["a", "b"]}, "world_size": 2, "x": None})
    assert flat == {"train.lr": "0.0003", "train.tags": "- a\n- b", "world_size": "2", "x": "null"}


def test_logs_then_resumes_the_same_run(tmp_path: Path, capsys) -> None:
    cfg = _cfg(tmp_path, "logging.mlflow_run_name=unit", "train.train_iters=10")
    first = MlflowLogger(cfg)
    first.start(world_size=1)
    first.log({"step": 1, "loss": 2.5, "lr": 1e-3, "skipped": False, "straggler_host": "n"})
    first.log({"step": 2, "val_loss": 2.25})
    first.finish()
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    run = client.get_run(first.run_id)
    assert (run.info.run_name, run.info.status) == ("unit", "FINISHED")
    assert run.data.params["train.train_iters"] == "10" and run.data.params["world_size"] == "1"
    assert [
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")
    ] == [(1, 2.5)]
    assert set(run.data.metrics) == {"train/loss", "train/lr", "val/loss"}

    resumed_cfg = _cfg(tmp_path, "logging.mlflow_run_name=unit", "train.train_iters=20")
    resumed = MlflowLogger(resumed_cfg)
    resumed.run_id = first.run_id  # what the checkpoint carries
    resumed.start(world_size=1, step=2)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log({"step": 3, "loss": 2.0})
    resumed.finish(failed=True)
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (3, 2.0)]
    assert run.data.params["train.train_iters"] == "10"  # params never change...
    assert run.data.tags["config_changed.train.train_iters"] == "10 -> 20 at step 2"  # ...this says
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert artifacts == {"config/step0.yaml", "config/step2.yaml"}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    out = capsys.readouterr().out
    assert f"MLflow run {first.run_id} resumed in {tracking_uri(cfg)}" in out


def test_without_mlflow_training_goes_on_and_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real_import = builtins.__import__

    def no_mlflow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("mlflow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    logger = MlflowLogger(_cfg(tmp_path))
    logger.start(world_size=1)
    logger.log({"step": 1, "loss": 1.0})
    logger.finish()
    err = capsys.readouterr().err
    assert "logging.mlflow_experiment='forge-unit' is set but mlflow is not installed" in err
    assert "pip install -e '.[mlflow]'" in err and "training continues without MLflow" in err


def test_callback_is_built_only_when_an_experiment_is_set(tmp_path: Path) -> None:
    names = [type(cb).__name__ for cb in build_callbacks(_cfg(tmp_path))]
    assert "MlflowCallback" in names
    off = load_config(None, [f"logging.dir={tmp_path}"])
    assert "MlflowCallback" not in [type(cb).__name__ for cb in build_callbacks(off)]
    callback = MlflowCallback(_cfg(tmp_path))
    callback.load_state_dict({"run_id": "abc"})
    assert callback.state_dict() == {"run_id": "abc"}


@pytest.mark.slow
def test_resumed_job_continues_the_same_mlflow_run(observed) -> None:  # noqa: F811
    run_ids = [
        observed["ranks"][r][f"job{n}_states"]["MlflowCallback"]["run_id"]
        for r in (0, 1)
        for n in (FIRST_ITERS, RESUMED_ITERS)
    ]
    assert len(set(run_ids)) == 1, run_ids  # both ranks, both jobs
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # to read the store here (undone after)
    client = MlflowClient(tracking_uri=(observed["dir"] / "mlruns").resolve().as_uri())
    run = client.get_run(run_ids[0])
    assert run.info.status == "FINISHED"
    losses = {r["step"]: r["loss"] for r in observed["records"] if "loss" in r and "event" not in r}
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(losses) and sorted(history) == list(range(1, RESUMED_ITERS + 1))
    assert run.data.params["train.train_iters"] == str(FIRST_ITERS)
    changed = run.data.tags["config_changed.train.train_iters"]
    assert changed == f"{FIRST_ITERS} -> {RESUMED_ITERS} at step {FIRST_ITERS}"
    spread = client.get_metric_history(run.info.run_id, "stragglers/busy_spread_s")
    assert len(spread) == RESUMED_ITERS
