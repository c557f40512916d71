"""The real Trainer on one gloo rank, in a process of its own, driven into faults for
tests/training/test_nonfinite.py, test_resume_policy.py and test_watchdog.py:

    python -m tests.training.fault_worker OUT_DIR SCENARIO [SCENARIO ...]

Each scenario trains the tiny model on synthetic data (``data.format=mock``) and writes
what the tests check to ``OUT_DIR/<scenario>.json``.

Bad data is a :class:`PoisonData` callback: a forward hook that turns the embedding
output into NaN while the trainer reads given samples, so the loss and every gradient are
NaN exactly as a corrupt batch makes them, keyed on the data (a rollback that skips those
samples no longer meets them) rather than on the step.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_forge import distributed  # noqa: E402
from megatron_forge.checkpointing import (  # noqa: E402
    Checkpointer,
    latest_iteration,
    saved_iterations,
)
from megatron_forge.config import Config  # noqa: E402
from megatron_forge.errors import ForgeError  # noqa: E402
from megatron_forge.training.callback import Callback  # noqa: E402
from megatron_forge.training.checkpoint_saver import CheckpointSaver  # noqa: E402
from megatron_forge.training.exit_status import read_exit_status  # noqa: E402
from megatron_forge.training.metrics_logger import MetricsLogger  # noqa: E402
from megatron_forge.training.nonfinite import parameters_finite  # noqa: E402
from megatron_forge.training.trainer import Trainer  # noqa: E402
from megatron_forge.training.watchdog import HangWatchdog  # noqa: E402
from megatron_forge.utils import free_port  # noqa: E402
from tests.training.worker import Record, config  # noqa: E402


class PoisonData(Callback):
    """NaN activations for the steps that read samples in ``[first, end)``."""

    def __init__(self, first: int, end: int) -> None:
        self.first, self.end = first, end
        self.trainer: Any = None

    def _hook(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self.first <= self.trainer.consumed_samples < self.end:
            return output * float("nan")
        return output

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        for chunk in trainer.model:
            chunk.module.embedding.register_forward_hook(self._hook)


class Snapshot(Callback):
    """Copies of the parameters and Adam state after given steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.taken: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.step in self.steps:
            self.taken[trainer.step] = state_of(trainer)


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors = {}
    for c, chunk in enumerate(trainer.model):
        for name, param in chunk.named_parameters():
            tensors[f"param/{c}/{name}"] = param.detach().clone()
    for o, opt in enumerate(getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])):
        for p, (param, state) in enumerate(opt.optimizer.state.items()):
            tensors[f"main/{o}/{p}"] = param.detach().clone()
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"adam/{o}/{p}/{key}"] = value.detach().clone()
    return tensors


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ in any bit (or exist on one side only)."""
    differ = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        if not torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)):
            differ.append(name)
    return differ


def _run(trainer: Trainer) -> str:
    try:
        trainer.train()
    except SystemExit as stop:
        return f"{type(stop).__name__}: {stop.code}"
    return "finished"


def _events(cfg: Config) -> list[dict[str, Any]]:
    path = Path(cfg.logging.dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if "event" in r]


def _finite_checkpoints(out: Path, root: Path) -> dict[int, bool]:
    """Whether each checkpoint under ``root`` loads with finite parameters."""
    found = {}
    for iteration in saved_iterations(root):
        cfg = config(
            out,
            f"check_{iteration}",
            f"checkpoint.load={root}",
            f"checkpoint.load_iteration={iteration}",
            "checkpoint.load_optimizer=false",  # the weights are what is checked
        )
        found[iteration] = parameters_finite(Trainer(cfg, 1, []).model)
    return found


# ---------------------------------------------------------------------------------------
# Non-finite steps


def skip_keeps_params(out: Path) -> dict[str, Any]:
    """Step 3 reads poisoned samples [8, 12): its update is skipped, bit for bit."""
    cfg = config(out, "skip", "train.train_iters=5")
    snapshot, record = Snapshot({2, 3}), Record()
    trainer = Trainer(
        cfg, 1, [PoisonData(8, 12), snapshot, record, MetricsLogger(cfg.logging.dir, 5)]
    )
    raised = _run(trainer)
    return {
        "raised": raised,
        "differ": identical(snapshot.taken[2], snapshot.taken[3]),
        "compared": len(snapshot.taken[2]),
        "metrics": {
            s: {
                k: m[k]
                for k in (
                    "loss",
                    "grad_norm",
                    "lr",
                    "skipped",
                    "nonfinite",
                    "skipped_steps",
                    "nan_steps",
                )
            }
            for s, m in record.metrics.items()
        },
        "events": _events(cfg),
        "status": read_exit_status(cfg.logging.dir),
    }


def nan_stop(out: Path) -> dict[str, Any]:
    """train.lr=1e10: NaN from step 3; saves every step, keep_last=2."""
    root = out / "ckpt_nan"
    cfg = config(
        out,
        "nan",
        "train.train_iters=20",
        "train.lr=1e10",
        "train.min_lr=0",
        f"checkpoint.save={root}",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last=2",
    )
    saver = CheckpointSaver(Checkpointer(root, cfg.checkpoint))
    record = Record()
    raised = _run(Trainer(cfg, 1, [saver, record, MetricsLogger(cfg.logging.dir, 1)]))
    return {
        "raised": raised,
        "steps": sorted(record.metrics),
        "losses": {s: m["loss"] for s, m in record.metrics.items()},
        "iterations": saved_iterations(root),
        "tracker": latest_iteration(root),
        "finite": _finite_checkpoints(out, root),
        "events": _events(cfg),
        "status": read_exit_status(cfg.logging.dir),
    }


def rollback(out: Path) -> dict[str, Any]:
    """Samples [12, 24) are poisoned (steps 4-6); checkpoints every 2 steps; rollback."""
    root = out / "ckpt_rollback"
    cfg = config(
        out,
        "rollback",
        "train.train_iters=10",
        "train.nonfinite_policy=rollback",
        f"checkpoint.save={root}",
        "checkpoint.save_interval=2",
    )
    saver = CheckpointSaver(Checkpointer(root, cfg.checkpoint))
    record = Record()
    trainer = Trainer(
        cfg, 1, [PoisonData(12, 24), saver, record, MetricsLogger(cfg.logging.dir, 1)]
    )
    steps: list[int] = []
    original = trainer.train_step

    def train_step() -> dict[str, Any]:
        metrics = original()
        steps.append(metrics["step"])
        return metrics

    trainer.train_step = train_step
    raised = _run(trainer)
    return {
        "raised": raised,
        "steps": steps,
        "final_loss": record.metrics[10]["loss"],
        "consumed_samples": trainer.consumed_samples,
        "iterations": saved_iterations(root),
        "tracker": latest_iteration(root),
        "rollbacks": trainer.train_state().callbacks.get("nonfinite"),
        "events": _events(cfg),
        "status": read_exit_status(cfg.logging.dir),
    }


def rollback_bounded(out: Path) -> dict[str, Any]:
    """train.lr=1e10 never recovers: one rollback (max_rollbacks=1), then the stop."""
    root = out / "ckpt_bounded"
    cfg = config(
        out,
        "bounded",
        "train.train_iters=30",
        "train.lr=1e10",
        "train.min_lr=0",
        "train.nonfinite_policy=rollback",
        "train.max_rollbacks=1",
        "train.max_nonfinite_steps=2",
        f"checkpoint.save={root}",
        "checkpoint.save_interval=1",
    )
    saver = CheckpointSaver(Checkpointer(root, cfg.checkpoint))
    raised = _run(Trainer(cfg, 1, [saver, MetricsLogger(cfg.logging.dir, 1)]))
    return {
        "raised": raised,
        "tracker": latest_iteration(root),
        "events": _events(cfg),
        "status": read_exit_status(cfg.logging.dir),
    }


# ---------------------------------------------------------------------------------------
# Resuming with other hyper-parameters


def _error(cfg: Config) -> str:
    try:
        Trainer(cfg, 1, [])
    except ForgeError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def resume_hparams(out: Path) -> dict[str, Any]:
    """A checkpoint at step 4 of a 4-step run, resumed with other hyper-parameters."""
    root = out / "ckpt_hparams"
    base = ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_iters=2"]
    cfg = config(out, "hparams", "train.train_iters=4", *base, f"checkpoint.save={root}")
    Trainer(cfg, 1, [CheckpointSaver(Checkpointer(root, cfg.checkpoint))]).train()
    load = [*base, f"checkpoint.load={root}"]

    def resumed(name: str, *overrides: str) -> Config:
        return config(out, name, *load, *overrides)

    def lr_of(trainer: Trainer) -> dict[str, Any]:
        group = trainer.optimizer.param_groups[0]
        return {
            "lr": group["lr"],
            "max_lr": group["max_lr"],
            "betas": list(group["betas"]),
            "scheduler_max_lr": trainer.scheduler.max_lr,
            "decay_steps": trainer.scheduler.lr_decay_steps,
            "step": trainer.step,
        }

    same = Trainer(resumed("same", "train.train_iters=8", "train.decay_iters=4"), 1, [])
    changed = ("train.train_iters=8", "train.lr=2e-3", "train.adam_beta2=0.99")
    return {
        "mismatch": _error(resumed("mismatch", *changed)),
        "finished": _error(resumed("finished", "train.train_iters=4")),
        "below": _error(resumed("below", "train.train_iters=3")),
        "same": lr_of(same),
        "config_wins": lr_of(
            Trainer(resumed("config", *changed, "train.resume_hparams=config"), 1, [])
        ),
        "checkpoint_wins": lr_of(
            Trainer(resumed("ckpt", *changed, "train.resume_hparams=checkpoint"), 1, [])
        ),
    }


# ---------------------------------------------------------------------------------------
# Hang watchdog


class SlowEval(Callback):
    """Each evaluation batch takes ``delay_s`` more: a long but healthy evaluation."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def on_progress(self, trainer: Trainer, activity: str) -> None:
        if activity == "evaluation batch":
            time.sleep(self.delay_s)


def slow_eval(out: Path) -> dict[str, Any]:
    """hang_timeout_s=3 and an evaluation of 8 batches of 0.8 s: no hang."""
    cfg = config(
        out,
        "slow_eval",
        "train.train_iters=2",
        "train.eval_interval=2",
        "train.eval_iters=8",
        "train.hang_timeout_s=3",
    )
    fired: list[int] = []
    watchdog = HangWatchdog(cfg.logging.dir, 3, 0)
    watchdog.exit_process = fired.append  # record instead of exiting
    evals: list[float] = []

    class EvalTimer(Callback):
        def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
            evals.append(time.monotonic())

        def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
            evals.append(time.monotonic())

    raised = _run(Trainer(cfg, 1, [watchdog, EvalTimer(), SlowEval(0.8)]))
    return {"raised": raised, "fired": fired, "eval_s": evals[-1] - evals[-2]}


SCENARIOS = {
    "skip_keeps_params": skip_keeps_params,
    "nan_stop": nan_stop,
    "rollback": rollback,
    "rollback_bounded": rollback_bounded,
    "resume_hparams": resume_hparams,
    "slow_eval": slow_eval,
}


def main(out: Path, names: list[str]) -> int:
    os.environ.pop("SLURM_JOB_ID", None)  # never requeue a real job from a test
    cfg = config(out, "init")
    distributed.initialize(cfg, distributed.DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    try:
        for name in names:
            result = SCENARIOS[name](out)
            (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
