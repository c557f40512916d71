"""The real Trainer on one gloo rank, in a process of its own (megatron's process group and
the CPU emulation last for the life of the process; async checkpoint writers need a
process that may have children), for tests/training/test_lifecycle.py:

    python -m tests.training.worker OUT_DIR

Runs each scenario on synthetic data (``data.format=mock``: no tokenizer, no corpus) and
writes what the tests check to ``OUT_DIR/results.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")

from megatron_forge import distributed  # noqa: E402
from megatron_forge.checkpointing import Checkpointer, iteration_dir, latest_iteration  # noqa: E402
from megatron_forge.config import Config, load_config  # noqa: E402
from megatron_forge.training.callback import Callback  # noqa: E402
from megatron_forge.training.checkpoint_saver import CheckpointSaver  # noqa: E402
from megatron_forge.training.monitors import WandbCallback  # noqa: E402
from megatron_forge.training.preemption import PreemptionHandler  # noqa: E402
from megatron_forge.training.trainer import Trainer  # noqa: E402
from megatron_forge.training.watchdog import HangWatchdog  # noqa: E402
from megatron_forge.utils import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def config(out: Path, name: str, *overrides: str) -> Config:
    return load_config(
        REPO / "configs/tiny.yaml",
        [
            "data.format=mock",
            f"data.tokenizer={out}/absent/tokenizer.model",  # mock data never reads it
            f"data.blend=[{out}/absent/corpus]",
            "model.vocab_size=2048",
            "model.num_layers=2",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.eval_interval=0",
            "checkpoint.save=null",
            "checkpoint.load=null",
            "logging.wandb_project=null",
            f"logging.dir={out / name}",
            *overrides,
        ],
    )


class Record(Callback):
    """Keeps each step's metrics and which end hooks ran; fails or signals where told to."""

    def __init__(self, fail_at: int = 0, sigterm_at: int = 0) -> None:
        self.fail_at, self.sigterm_at = fail_at, sigterm_at
        self.metrics: dict[int, dict[str, Any]] = {}
        self.on_error_ran = self.closed = False

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.metrics[trainer.step] = dict(metrics)
        if trainer.step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as Slurm does on preemption
        if trainer.step == self.fail_at:
            raise RuntimeError(f"boom at step {trainer.step}")

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.on_error_ran = True

    def close(self, trainer: Trainer) -> None:
        self.closed = True


def data_wait(out: Path) -> dict[int, float]:
    """data_wait_s of every step of a run that evaluates after steps 2 and 4."""
    cfg = config(out, "data_wait", "train.train_iters=4", "train.eval_interval=2")
    record = Record()
    Trainer(cfg, 1, [record]).train()
    return {step: m["data_wait_s"] for step, m in record.metrics.items()}


def wandb_state(out: Path) -> dict[str, Any]:
    """A W&B run id saved by its callback at step 0, read back by a new run's callback and
    carried along by a run without W&B."""
    root = out / "ckpt_wandb"
    cfg = config(out, "wandb", f"checkpoint.save={root}")
    wandb = WandbCallback(cfg)
    wandb.load_state_dict({"run_id": "run-42"})
    saver = CheckpointSaver(Checkpointer(root, cfg.checkpoint))
    trainer = Trainer(cfg, 1, [saver, wandb])
    saver.save(trainer, blocking=True)
    trainer.close()
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_common_state_dict(str(iteration_dir(root, 0)))
    resumed_cfg = config(out, "wandb", f"checkpoint.load={root}")
    restored = WandbCallback(resumed_cfg)
    Trainer(resumed_cfg, 1, [restored])
    without_wandb = Trainer(resumed_cfg, 1, [])
    return {
        "stored": stored["callback_states"],
        "restored": restored.state_dict(),
        "carried": without_wandb.train_state().callbacks,
    }


def _writers() -> list[str]:
    """Live checkpoint writer processes (torch_dist's shared-state manager is not one)."""
    return [p.name for p in multiprocessing.active_children() if "Manager" not in p.name]


def _run_to_the_end(cfg: Config, callbacks: list[Callback]) -> str:
    try:
        Trainer(cfg, 1, callbacks).train()
    except BaseException as err:  # the Preempted SystemExit too
        return f"{type(err).__name__}: {err}"
    return "finished"


def error(out: Path) -> dict[str, Any]:
    """Async saves every step; step 2's write is in flight when a callback fails."""
    root = out / "ckpt_error"
    cfg = config(
        out,
        "error",
        f"checkpoint.save={root}",
        "checkpoint.async_save=true",
        "checkpoint.save_interval=1",
        "train.train_iters=5",
        "train.hang_timeout_s=60",
    )
    saver = CheckpointSaver(Checkpointer(root, cfg.checkpoint))
    record = Record(fail_at=2)
    watchdog = HangWatchdog(cfg.logging.dir, 60, 0)
    callbacks = [watchdog, saver, record, PreemptionHandler(saver, 0)]
    raised = _run_to_the_end(cfg, callbacks)
    return {
        "raised": raised,
        "tracker": latest_iteration(root),
        "queued": len(saver.checkpointer.queue.async_calls),
        "writers": _writers(),
        "closed": record.closed and watchdog._thread is None,
    }


def preempt(out: Path) -> dict[str, Any]:
    """SIGTERM after step 3, with async saves every 2 steps."""
    root = out / "ckpt_preempt"
    cfg = config(
        out,
        "preempt",
        f"checkpoint.save={root}",
        "checkpoint.async_save=true",
        "checkpoint.save_interval=2",
        "train.train_iters=6",
    )
    saver = CheckpointSaver(Checkpointer(root, cfg.checkpoint))
    record = Record(sigterm_at=3)
    env_job = os.environ.pop("SLURM_JOB_ID", None)  # never requeue a real job from a test
    try:
        raised = _run_to_the_end(cfg, [saver, record, PreemptionHandler(saver, 0)])
    finally:
        if env_job is not None:
            os.environ["SLURM_JOB_ID"] = env_job
    return {
        "raised": raised,
        "tracker": latest_iteration(root),
        "queued": len(saver.checkpointer.queue.async_calls),
        "writers": _writers(),
        "on_error": record.on_error_ran,
        "closed": record.closed,
    }


def main(out: Path) -> int:
    cfg = config(out, "init")
    distributed.initialize(cfg, distributed.DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    try:
        results = {
            "data_wait": data_wait(out),
            "wandb_state": wandb_state(out),
            "error": error(out),
            "preempt": preempt(out),
        }
    finally:
        distributed.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
