"""The W&B callback without a training run: API-key detection, what wandb.init is given,
and that a failing W&B never stops training."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import wandb

from megatron_forge.config import load_config
from megatron_forge.monitoring.wandb_logger import has_api_key, resolve_mode
from megatron_forge.train import build_callbacks
from megatron_forge.training.monitors import WandbCallback
from tests.conftest import REPO


def test_api_key_from_env_or_netrc(tmp_path: Path) -> None:
    empty = tmp_path / "empty_netrc"
    empty.write_text("")
    assert has_api_key({"WANDB_API_KEY": "k" * 40, "NETRC": str(empty)})
    assert not has_api_key({"NETRC": str(empty)})
    assert not has_api_key({"NETRC": str(tmp_path / "missing")})
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert has_api_key({"NETRC": str(netrc)})
    # a self-hosted server needs an entry for its own host
    assert not has_api_key({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.corp.example"})


def test_online_without_key_goes_offline_and_says_so(tmp_path: Path) -> None:
    env = {"NETRC": str(tmp_path / "none")}
    mode, note = resolve_mode("online", env)
    assert mode == "offline" and "no API key" in note and "wandb sync" in note
    assert resolve_mode("online", {**env, "WANDB_API_KEY": "k"}) == ("online", None)
    assert resolve_mode("offline", env) == ("offline", None)


class FakeRun:
    def __init__(self, run_id: str, fail_log: bool = False) -> None:
        self.id, self.dir, self.url = run_id, "/tmp/wandb/offline-run-x/files", None
        self.config = SimpleNamespace(update=self._update)
        self.config_values: dict[str, Any] = {}
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.fail_log = fail_log
        self.finished = False
        self.exit_code: int | None = None
        self.alerts: list[tuple[str, str, str]] = []

    def _update(self, values: dict[str, Any], allow_val_change: bool = False) -> None:
        assert allow_val_change
        self.config_values.update(values)

    def log(self, data: dict[str, float], step: int) -> None:
        if self.fail_log:
            raise OSError("disk full")
        self.logged.append((step, data))

    def finish(self, exit_code: int | None = None) -> None:
        self.finished, self.exit_code = True, exit_code

    def alert(self, title: str, text: str, level: Any, wait_duration: int) -> None:
        self.alerts.append((title, text, str(level.value)))


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(
        REPO / "configs/tiny.yaml",
        [
            f"logging.dir={tmp_path / 'run'}",
            "logging.wandb_project=forge-unit",
            "logging.wandb_entity=team",
            "logging.wandb_tags=[tiny, unit]",
            "logging.wandb_group=ablation-1",
            "logging.log_interval=2",
            "train.train_iters=4",
            "model.vocab_size=2048",
            "checkpoint.save=null",
            "checkpoint.load=null",
            "train.hang_timeout_s=null",
            *overrides,
        ],
    )


def _trainer(cfg) -> SimpleNamespace:
    return SimpleNamespace(
        cfg=cfg, world_size=8, step=0, consumed_samples=0, tokenizer=None, callbacks=[]
    )


def _resumed(callback: WandbCallback, run_id: str) -> WandbCallback:
    """The callback as Trainer leaves it after loading a checkpoint holding ``run_id``."""
    callback.load_state_dict({"run_id": run_id})
    return callback


def test_init_gets_config_fields_and_resumes_the_stored_id(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_init(**kwargs: Any) -> FakeRun:
        calls.append(kwargs)
        return FakeRun(kwargs["id"] or "newid123")

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[001-016]")
    monkeypatch.setenv("SLURM_NNODES", "16")
    cfg = _cfg(tmp_path, "logging.wandb_mode=offline")

    fresh = _trainer(cfg)
    logger = WandbCallback(cfg)
    assert logger.state_dict() == {}  # nothing to resume before the run opens
    logger.on_train_start(fresh)
    assert logger.state_dict() == {"run_id": "newid123"}
    kwargs = calls[0]
    assert kwargs["project"] == "forge-unit" and kwargs["entity"] == "team"
    assert kwargs["tags"] == ["tiny", "unit"] and kwargs["group"] == "ablation-1"
    assert kwargs["name"] == "run" and kwargs["mode"] == "offline"
    assert kwargs["id"] is None and kwargs["resume"] == "allow"
    assert kwargs["dir"] == str(tmp_path / "run")
    values = logger.logger.run.config_values
    assert values["model"]["hidden_size"] == 64 and values["world_size"] == 8
    assert values["slurm"] == {
        "job_id": "4242",
        "job_nodelist": "gpu[001-016]",
        "num_nodes": "16",
        "restart_count": None,
    }
    # dashboard names at the training step; only log steps and evaluations
    logger.on_step_end(fresh, {"step": 1, "loss": 9.0})
    logger.on_step_end(fresh, {"step": 2, "loss": 8.0, "skipped": False, "mfu": 0.4})
    logger.on_eval_end(fresh, {"step": 2, "val_loss": 8.5, "val_ppl": 4914.8})
    assert logger.logger.run.logged == [
        (2, {"train/loss": 8.0, "throughput/mfu": 0.4}),
        (2, {"val/loss": 8.5, "val/ppl": 4914.8}),
    ]
    run = logger.logger.run
    logger.on_train_end(fresh)
    logger.close(fresh)
    assert run.finished and run.exit_code is None

    resumed = _resumed(WandbCallback(cfg), "newid123")  # what a checkpoint restores
    resumed.on_train_start(_trainer(cfg))
    assert calls[1]["id"] == "newid123" and calls[1]["resume"] == "allow"
    assert resumed.state_dict() == {"run_id": "newid123"}


def test_failing_wandb_init_leaves_training_running(tmp_path, monkeypatch, capsys) -> None:
    """The callbacks train.py builds, driven through two steps with wandb.init raising:
    a warning, then metrics.jsonl, TensorBoard and the console carry on."""

    def broken_init(**kwargs: Any) -> None:
        raise RuntimeError("simulated W&B outage")

    monkeypatch.setattr(wandb, "init", broken_init)
    # (straggler attribution times megatron-core's phases: it needs a real Trainer)
    cfg = _cfg(
        tmp_path,
        "logging.wandb_mode=online",
        "logging.tensorboard=true",
        "logging.straggler_window=0",
    )
    trainer = _trainer(cfg)
    callbacks = trainer.callbacks = build_callbacks(cfg)
    (wandb_cb,) = [cb for cb in callbacks if isinstance(cb, WandbCallback)]
    _resumed(wandb_cb, "keepme1")
    for cb in callbacks:
        cb.on_train_start(trainer)
    for step in (1, 2):
        metrics = {
            "step": step,
            "loss": 8.0,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "consumed_samples": 16 * step,
            "step_time_s": 0.5,
            "step_time_min_s": 0.4,
            "tokens_per_s": 4096.0,
            "tokens_per_s_per_gpu": 512.0,
            "peak_mem_gb": 0.5,
        }
        trainer.step = step
        for cb in callbacks:
            cb.on_step_end(trainer, metrics)
    for cb in callbacks:
        cb.on_train_end(trainer)
    for cb in callbacks:
        cb.close(trainer)
    out = capsys.readouterr()
    assert "W&B failed to start (RuntimeError: simulated W&B outage); training continues" in (
        out.err
    )
    assert "iteration        2/       4" in out.out
    run_dir = tmp_path / "run"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2] and "tflops_per_gpu" in records[0]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert wandb_cb.state_dict() == {"run_id": "keepme1"}  # a later job can still resume it


def test_failing_wandb_log_stops_wandb_only(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun("abcd1234", fail_log=True))
    cfg = _cfg(tmp_path, "logging.wandb_mode=offline")
    logger, trainer = WandbCallback(cfg), _trainer(cfg)
    logger.on_train_start(trainer)
    logger.on_step_end(trainer, {"step": 2, "loss": 1.0})
    logger.on_eval_end(trainer, {"step": 2, "val_loss": 1.0})
    logger.on_train_end(trainer)
    logger.close(trainer)
    err = capsys.readouterr().err
    assert err.count("W&B logging failed (OSError: disk full); W&B logging stops here") == 1
    assert logger.logger.run is None


def test_failed_run_is_finished_as_failed(tmp_path, monkeypatch) -> None:
    run = FakeRun("abcd1234")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    cfg = _cfg(tmp_path, "logging.wandb_mode=offline")
    logger, trainer = WandbCallback(cfg), _trainer(cfg)
    logger.on_train_start(trainer)
    logger.on_error(trainer, RuntimeError("boom"))
    logger.close(trainer)
    assert run.finished and run.exit_code == 1
    logger.close(trainer)  # a second close is harmless


@pytest.mark.parametrize(
    "overrides", [["logging.wandb_mode=disabled"], ["logging.wandb_project=null"]]
)
def test_no_wandb_callback_when_off(tmp_path: Path, overrides: list[str]) -> None:
    callbacks = build_callbacks(_cfg(tmp_path, *overrides))
    assert not any(isinstance(cb, WandbCallback) for cb in callbacks)


def _alerting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str):
    run = FakeRun("alerts01")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    cfg = _cfg(tmp_path, "logging.wandb_mode=offline", *overrides)
    callback, trainer = WandbCallback(cfg), _trainer(cfg)
    trainer.callbacks = [callback]
    callback.on_train_start(trainer)
    return run, callback, trainer


def test_events_become_wandb_alerts(tmp_path, monkeypatch) -> None:
    run, callback, trainer = _alerting(tmp_path, monkeypatch)
    for kind in ("loss_spike", "rollback", "nonfinite_stop", "straggler"):
        callback.on_event(trainer, {"event": kind, "step": 7, "message": f"{kind} at step 7"})
    where = str(tmp_path / "run")
    assert run.alerts == [
        ("Loss spike", f"{where}: loss_spike at step 7", "WARN"),
        ("Stopped: NaN/inf steps", f"{where}: nonfinite_stop at step 7", "ERROR"),
        ("Straggler", f"{where}: straggler at step 7", "WARN"),
    ]  # a rollback is no alert
    assert not run.finished


def test_no_alerts_when_switched_off(tmp_path, monkeypatch) -> None:
    run, callback, trainer = _alerting(tmp_path, monkeypatch, "logging.wandb_alerts=false")
    callback.on_event(trainer, {"event": "loss_spike", "step": 7, "message": "spike"})
    assert run.alerts == []


def test_hang_is_alerted_and_the_run_finished_before_the_exit(tmp_path, monkeypatch) -> None:
    from megatron_forge.training.watchdog import HangWatchdog

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run, callback, trainer = _alerting(tmp_path, monkeypatch)
    watchdog = HangWatchdog(tmp_path / "run", 60, 0)
    exits: list[int] = []
    watchdog.exit_process = exits.append
    watchdog.trainer, watchdog.step = trainer, 5
    watchdog._fire()  # as its thread does after train.hang_timeout_s without progress
    assert exits == [4]
    ((title, text, level),) = run.alerts
    assert (title, level) == ("Hang: exiting", "ERROR")
    assert "made no progress for" in text and "last step 5" in text
    assert run.finished and run.exit_code == 4  # the process exits without close


def test_preemption_is_alerted(tmp_path, monkeypatch) -> None:
    import signal

    from megatron_forge.training.preemption import Preempted, PreemptionHandler

    run, callback, trainer = _alerting(tmp_path, monkeypatch)
    handler = PreemptionHandler(None, 0)
    handler.received = signal.SIGTERM
    trainer.step = 3
    with pytest.raises(Preempted):
        handler.on_step_end(trainer, {"step": 3})
    ((title, text, level),) = run.alerts
    assert (title, level) == ("Preempted", "WARN")
    assert "SIGTERM at step 3: no checkpoint saved; not requeued" in text
