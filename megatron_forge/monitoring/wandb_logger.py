"""Weights & Biases logging from global rank 0, offline-capable, resumable, never fatal.

- Active when ``logging.wandb_project`` is set and ``logging.wandb_mode`` is not
  ``disabled``. ``online`` without an API key (``WANDB_API_KEY`` or a netrc entry for the
  W&B host) becomes ``offline``, said once in the log; offline runs are written to
  ``<logging.dir>/wandb/offline-run-*`` (or ``$WANDB_DIR/wandb``) and uploaded later with
  ``wandb sync``.
- The run id is part of the W&B callback's state, which every checkpoint stores, so a
  resumed or requeued job reopens the same run (``resume="allow"``). Offline, each job writes its
  own ``offline-run-*`` directory under that id; ``wandb sync`` uploads them into one run.
  Metrics are logged at ``step=`` the training step: after a requeue that resumes from an
  earlier checkpoint, W&B (online) drops the replayed steps it already has.
- The resolved config, the world size and the Slurm job (``SLURM_JOB_ID``,
  ``SLURM_JOB_NODELIST``, ``SLURM_NNODES``) are the run's config.
- :meth:`WandbLogger.alert` sends ``wandb.alert`` (spikes, stragglers, NaN stops, hangs,
  preemptions: ``training.monitors.ALERTS``); offline runs keep alerts as ``alert``
  records in their ``.wandb`` file, sent when synced.
- Failures (wandb missing, ``wandb.init`` or ``log`` raising) print a warning and training
  goes on with metrics.jsonl, the console and TensorBoard.
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlparse

import torch.distributed as dist

from megatron_forge.monitoring.dashboard import dashboard_scalars
from megatron_forge.utils import is_rank0

if TYPE_CHECKING:
    from megatron_forge.config import Config


ALERT_INTERVAL_S = 60
"""W&B sends at most one alert of a title (one kind of event) per this many seconds."""


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def has_api_key(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether wandb would find credentials: ``WANDB_API_KEY`` (or an identity token
    file), else a netrc entry (``$NETRC`` or ``~/.netrc``) for the W&B host."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = env.get("NETRC") or str(Path("~/.netrc").expanduser())
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str, env: Optional[Mapping[str, str]] = None) -> tuple[str, Optional[str]]:
    """The mode to run W&B in, and a note when ``online`` had to become ``offline``."""
    if mode != "online" or has_api_key(env):
        return mode, None
    return "offline", (
        "W&B: no API key (WANDB_API_KEY or a netrc entry; `wandb login` writes one), so "
        "logging offline; upload later with `wandb sync <dir>/wandb/offline-run-*`"
    )


def slurm_job(env: Optional[Mapping[str, str]] = None) -> dict[str, Optional[str]]:
    """The Slurm job of this run, for the W&B config (labels only: the layout comes from
    megatron_forge.distributed.read_environment)."""
    env = os.environ if env is None else env
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "job_nodelist": env.get("SLURM_JOB_NODELIST"),
        "num_nodes": env.get("SLURM_NNODES"),
        "restart_count": env.get("SLURM_RESTART_COUNT"),
    }


def run_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """What the W&B run records as its config: the resolved config tree plus the job."""
    return {**cfg.to_dict(), "world_size": world_size, "slurm": slurm_job()}


def init_run(cfg: Config, run_id: Optional[str], world_size: int) -> Any:
    """Start (or, with ``run_id``, resume) the W&B run; None when that fails."""
    lg = cfg.logging
    mode, note = resolve_mode(lg.wandb_mode)
    if note:
        print(note, flush=True)
    try:
        import wandb

        run = wandb.init(
            project=lg.wandb_project,
            entity=lg.wandb_entity,
            name=lg.wandb_run_name or Path(lg.dir).name,
            tags=list(lg.wandb_tags) or None,
            group=lg.wandb_group,
            mode=mode,
            id=run_id,
            resume="allow",
            # $WANDB_DIR, when set, is where the user wants W&B's files.
            dir=None if os.environ.get("WANDB_DIR") else lg.dir,
        )
        # allow_val_change: a resumed run may change e.g. train.train_iters.
        run.config.update(run_config(cfg, world_size), allow_val_change=True)
    except Exception as err:  # W&B must never stop training
        _warn(
            f"W&B failed to start ({type(err).__name__}: {err}); training continues, "
            f"metrics go to {Path(lg.dir) / 'metrics.jsonl'} and the console"
        )
        return None
    where = run.url if mode == "online" else str(Path(run.dir).parent)  # offline: no URL
    print(f"W&B run {run.id} ({mode}): {where}", flush=True)
    return run


def broadcast_from_rank0(value: Optional[str]) -> Optional[str]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class WandbLogger:
    """One W&B run, written from global rank 0: metric dicts in, never an exception out."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run: Any = None
        self.run_id: Optional[str] = None
        """The run to resume (set before :meth:`start`), then the run opened."""
        self.started = False

    def start(self, world_size: int) -> None:
        """Open (or resume ``run_id``) once. Every rank calls this: rank 0's run id is
        broadcast so that the checkpoints every rank writes agree on it."""
        if self.started:
            return
        self.started = True
        run_id = self.run_id
        if is_rank0():
            self.run = init_run(self.cfg, run_id, world_size)
            run_id = self.run.id if self.run is not None else run_id
        self.run_id = broadcast_from_rank0(run_id)

    def log(self, metrics: dict[str, Any]) -> None:
        """Log one step's (or evaluation's) metrics at ``metrics["step"]``."""
        if self.run is None:
            return
        try:
            self.run.log(dashboard_scalars(metrics), step=int(metrics["step"]))
        except Exception as err:  # W&B must never stop training
            _warn(f"W&B logging failed ({type(err).__name__}: {err}); W&B logging stops here")
            self.run = None

    def alert(self, title: str, text: str, error: bool = False) -> None:
        """A W&B alert (e-mail or Slack, per the user's W&B settings); offline runs keep
        it in their ``.wandb`` file. Never raises."""
        if self.run is None:
            return
        try:
            import wandb

            level = wandb.AlertLevel.ERROR if error else wandb.AlertLevel.WARN
            # wait_duration: W&B sends an alert of the same title at most once per interval
            self.run.alert(title=title, text=text, level=level, wait_duration=ALERT_INTERVAL_S)
        except Exception as err:  # W&B must never stop training
            _warn(f"W&B alert failed ({type(err).__name__}: {err})")

    def finish(self, exit_code: Optional[int] = None) -> None:
        """Close the run; a nonzero ``exit_code`` marks it failed in W&B."""
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as err:
            _warn(f"W&B failed to finish the run ({type(err).__name__}: {err})")
        self.run = None
