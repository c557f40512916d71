"""MLflow logging from global rank 0: the same metrics, config and resumption as W&B.

- Active when ``logging.mlflow_experiment`` is set; needs the ``mlflow`` extra
  (``mlflow-skinny``: the tracking client, no server). Without it training goes on and
  the log says how to install it.
- The tracking store is ``logging.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``,
  else a local file store in ``<logging.dir>/mlruns``: no server and no network, viewed
  with ``mlflow ui --backend-store-uri <logging.dir>/mlruns`` or copied to a tracking
  server later. MLflow 3 keeps its file store in maintenance mode and refuses it unless
  ``MLFLOW_ALLOW_FILE_STORE=true``; this logger sets that for local paths only (a
  ``sqlite:///`` URI is the alternative, with SQLAlchemy installed).
- The run id is part of the MLflow callback's state in every checkpoint, so a resumed or
  requeued job reopens the same run (its status goes back to RUNNING) and its metrics
  continue at their training steps.
- The resolved config, world size and Slurm job are the run's params (flattened,
  ``train.lr``); MLflow params cannot change, so a resumed job logs the keys that are new
  and records the keys whose value changed as tags ``config_changed.<key>``. The whole
  config is an artifact, ``config/step<N>.yaml`` for the job that started at step N.
- Metrics carry their dashboard names (``train/loss``) at ``step=`` the training step.
- Failures (mlflow missing, a store that refuses) print a warning; training continues
  with metrics.jsonl, the console and the other loggers.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlparse

import yaml

from megatron_forge.monitoring.dashboard import dashboard_scalars
from megatron_forge.monitoring.wandb_logger import broadcast_from_rank0, run_config
from megatron_forge.utils import is_rank0

if TYPE_CHECKING:
    from megatron_forge.config import Config

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value
BATCH_LIMIT = 100  # MLflow's limit on params or tags per log_batch call
METRICS_PER_BATCH = 1000

INSTALL_HINT = "install the mlflow extra (pip install -e '.[mlflow]', or pip install mlflow-skinny)"


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def tracking_uri(cfg: Config, env: Optional[dict[str, str]] = None) -> str:
    """Where the run is tracked: the config, $MLFLOW_TRACKING_URI, else <dir>/mlruns."""
    env = dict(os.environ if env is None else env)
    uri = cfg.logging.mlflow_tracking_uri or env.get("MLFLOW_TRACKING_URI")
    if not uri:
        return Path(cfg.logging.dir, "mlruns").resolve().as_uri()
    if is_local_store(uri) and not uri.startswith("file:"):
        return Path(uri).resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    """A plain path or a ``file:`` URI: MLflow's file store."""
    return urlparse(uri).scheme in ("", "file")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 3e-4}}`` -> ``{"train.lr": "0.0003"}``, values as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else yaml.safe_dump(value).strip()
            text = text.removesuffix("\n...").strip()
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class MlflowLogger:
    """One MLflow run, written from global rank 0: metric dicts in, never an exception out."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.client: Any = None
        self.run_id: Optional[str] = None
        """The run to resume (set before :meth:`start`), then the run opened."""
        self.started = False

    def start(self, world_size: int, step: int = 0) -> None:
        """Open (or resume ``run_id``) once. Every rank calls this: rank 0's run id is
        broadcast so that the checkpoints every rank writes agree on it."""
        if self.started:
            return
        self.started = True
        run_id = self.run_id
        if is_rank0():
            try:
                run_id = self._open(world_size, step)
            except Exception as err:  # MLflow must never stop training
                _warn(
                    f"MLflow failed to start ({type(err).__name__}: {err}); training "
                    f"continues, metrics go to {Path(self.cfg.logging.dir) / 'metrics.jsonl'}"
                )
                self.client = None
        self.run_id = broadcast_from_rank0(run_id)

    def _open(self, world_size: int, step: int) -> Optional[str]:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            _warn(
                f"logging.mlflow_experiment={self.cfg.logging.mlflow_experiment!r} is set but "
                f"mlflow is not installed: {INSTALL_HINT}; training continues without MLflow"
            )
            return self.run_id
        lg = self.cfg.logging
        uri = tracking_uri(self.cfg)
        if is_local_store(uri):  # MLflow 3 refuses its file store without this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        run = None
        if self.run_id:
            try:
                run = client.get_run(self.run_id)
            except MlflowException:
                _warn(f"MLflow run {self.run_id} is not in {uri}; starting a new run there")
        if run is None:
            experiment = client.get_experiment_by_name(lg.mlflow_experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(lg.mlflow_experiment)
            )
            run = client.create_run(experiment_id, run_name=lg.mlflow_run_name or Path(lg.dir).name)
            verb = "started"
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            verb = "resumed"
        run_id = run.info.run_id
        self._log_config(client, run, world_size, step)
        self.client = client
        print(f"MLflow run {run_id} {verb} in {uri}", flush=True)
        return run_id

    def _log_config(self, client: Any, run: Any, world_size: int, step: int) -> None:
        from mlflow.entities import Param, RunTag

        values = run_config(self.cfg, world_size)
        params = flatten(values)
        logged = dict(run.data.params)
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [
            RunTag(f"config_changed.{k}", f"{logged[k]} -> {v} at step {step}"[:MAX_PARAM_LENGTH])
            for k, v in params.items()
            if k in logged and logged[k] != v
        ]
        for chunk in _chunks(new, BATCH_LIMIT):
            client.log_batch(run.info.run_id, params=chunk)
        for chunk in _chunks(changed, BATCH_LIMIT):
            client.log_batch(run.info.run_id, tags=chunk)
        text = yaml.safe_dump(values, sort_keys=False)
        client.log_text(run.info.run_id, text, f"config/step{step}.yaml")

    def log(self, metrics: dict[str, Any]) -> None:
        """Log one step's (or evaluation's) metrics at ``metrics["step"]``."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(metrics["step"])
        batch = [Metric(k, v, now, step) for k, v in dashboard_scalars(metrics).items()]
        try:
            for chunk in _chunks(batch, METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=chunk)
        except Exception as err:  # MLflow must never stop training
            _warn(f"MLflow logging failed ({type(err).__name__}: {err}); MLflow stops here")
            self.client = None

    def finish(self, failed: bool = False) -> None:
        """Mark the run FINISHED (a resumed job reopens it), or FAILED."""
        if self.client is None:
            return
        try:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        except Exception as err:
            _warn(f"MLflow failed to close the run ({type(err).__name__}: {err})")
        self.client = None
