"""One observed 2-rank run shared by test_profiling.py, test_stragglers.py and
test_loss_spikes.py (and the MLflow checks in tests/monitoring): the real Trainer and the
callbacks of ``train.build_callbacks`` on two gloo ranks under torchrun,

    python -m torch.distributed.run --standalone --nproc_per_node=2 \
        -m tests.training.observed_run OUT_DIR

with faults injected by test-only callbacks, never by the package:

- :class:`SlowRank`: rank 1 sleeps after reading each training batch (a slow host);
- :class:`SpikeLogits`: the output layer's logits are scaled up in one step's forward, a
  real loss (and gradient) spike at that step;
- :class:`TouchTrigger`: writes ``<logging.dir>/profile`` mid-run, as a user would.

Job 1 trains steps 1-10 with a profiling window at steps 3-4 and W&B (offline) and
MLflow (file store) on; job 2 resumes its checkpoint and trains to step 12. Each rank's
console goes to ``rank<R>.log``, what the tests need besides the run directory to
``results.json``. The run happens once per test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from megatron_forge.config import Config, load_config
from megatron_forge.train import build_callbacks
from megatron_forge.training.callback import Callback
from tests.conftest import MOCK_TINY, REPO, read_metrics

PROFILE_WINDOW = (3, 4)
TRIGGER_AT, TRIGGER_STEPS = 5, 2  # written after step 5: the window is steps 7-8
SPIKE_STEP = 9
SLOW_RANK, SLOW_SLEEP_S = 1, 0.15
FIRST_ITERS, RESUMED_ITERS = 10, 12


class SlowRank(Callback):
    """Test-only: ``rank`` sleeps after each training batch it reads."""

    def __init__(self, rank: int, sleep_s: float) -> None:
        self.rank, self.sleep_s = rank, sleep_s

    def on_progress(self, trainer: Any, activity: str) -> None:
        if activity == "training batch" and dist.get_rank() == self.rank:
            time.sleep(self.sleep_s)


class SpikeLogits(Callback):
    """Test-only: logits x ``factor`` in the forward passes of step ``step``."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor
        self.trainer: Any = None

    def _hook(self, module: Any, inputs: Any, output: Any) -> Any:
        if self.trainer.step + 1 != self.step:
            return output
        logits, bias = output
        return logits * self.factor, bias

    def on_train_start(self, trainer: Any) -> None:
        self.trainer = trainer
        trainer.model[0].module.output_layer.register_forward_hook(self._hook)


class TouchTrigger(Callback):
    """Test-only: on rank 0, after step ``step``, asks for a profile as a user would."""

    def __init__(self, path: Path, step: int, steps: int) -> None:
        self.path, self.step, self.steps = path, step, steps

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.step == self.step and dist.get_rank() == 0:
            self.path.write_text(f"{self.steps}\n")


def job_config(run_dir: Path, train_iters: int) -> Config:
    ckpt = run_dir / "ckpt"
    return load_config(
        REPO / "configs/tiny.yaml",
        [
            *MOCK_TINY,
            f"logging.dir={run_dir}",
            f"train.train_iters={train_iters}",
            "train.eval_interval=0",
            "train.hang_timeout_s=null",
            "train.resume_hparams=checkpoint",
            "logging.log_interval=1",
            "logging.straggler_window=3",
            "logging.straggler_threshold=0.1",
            "logging.spike_window=5",
            # W&B in job 1 only (its resumption is tests/monitoring/test_runs.py's)
            f"logging.wandb_project={'forge-test' if train_iters == FIRST_ITERS else 'null'}",
            "logging.wandb_mode=offline",
            "logging.mlflow_experiment=forge-test",
            f"profile.start_step={PROFILE_WINDOW[0]}",
            f"profile.end_step={PROFILE_WINDOW[1]}",
            "profile.ranks=[0, 1]",
            f"profile.trigger_steps={TRIGGER_STEPS}",
            f"checkpoint.save={ckpt}",
            f"checkpoint.load={ckpt}",
            f"checkpoint.save_interval={FIRST_ITERS}",
            "checkpoint.async_save=false",
        ],
    )


def _jobs(run_dir: Path) -> dict[str, Any]:
    from megatron_forge.training.trainer import Trainer

    rank = dist.get_rank()
    log = open(run_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (kept for the process)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    out: dict[str, Any] = {"rank": rank}
    for iters in (FIRST_ITERS, RESUMED_ITERS):
        cfg = job_config(run_dir, iters)
        callbacks = build_callbacks(cfg)
        if iters == FIRST_ITERS:
            callbacks += [
                SlowRank(SLOW_RANK, SLOW_SLEEP_S),
                SpikeLogits(SPIKE_STEP, -30.0),
                TouchTrigger(run_dir / "profile", TRIGGER_AT, TRIGGER_STEPS),
            ]
        started = time.perf_counter()
        Trainer(cfg, dist.get_world_size(), callbacks).train()
        out[f"job{iters}_s"] = time.perf_counter() - started
        ids = {type(cb).__name__: cb.state_dict() for cb in callbacks if cb.state_key}
        out[f"job{iters}_states"] = ids
    log.flush()
    return out


def main(run_dir: Path) -> int:
    from megatron_forge import distributed

    distributed.initialize(job_config(run_dir, FIRST_ITERS), distributed.read_environment())
    try:
        out = _jobs(run_dir)
    finally:
        distributed.shutdown()
    (run_dir / f"results_rank{out['rank']}.json").write_text(json.dumps(out))
    return 0


_CACHE: dict[str, Any] = {}


def observed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the two jobs once per session; what the tests read back."""
    if "run" not in _CACHE:
        run_dir = tmp_path_factory.mktemp("observed")
        env_keys = ("WANDB_API_KEY", "WANDB_DIR", "WANDB_MODE", "MLFLOW_TRACKING_URI")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node=2", "-m", "tests.training.observed_run", str(run_dir)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        for key in env_keys:
            env.pop(key, None)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        wall_s = time.perf_counter() - started
        logs = [(run_dir / f"rank{r}.log") for r in range(2)]
        tail = "".join(p.read_text()[-3000:] for p in logs if p.exists())
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + tail
        _CACHE["run"] = {
            "dir": run_dir,
            "ranks": [
                json.loads((run_dir / f"results_rank{r}.json").read_text()) for r in range(2)
            ],
            "wall_s": wall_s,
            "records": read_metrics(run_dir),
            "logs": [(run_dir / f"rank{r}.log").read_text() for r in range(2)],
        }
    return _CACHE["run"]


@pytest.fixture(scope="session")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return observed_run(tmp_path_factory)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
