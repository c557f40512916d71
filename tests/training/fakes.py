"""A Trainer without a model (its loop, callbacks and outcome only) and a Checkpointer
stand-in, for fast tests of the loop's fault handling."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from megatron_forge.config import load_config
from megatron_forge.training.callback import Callback
from megatron_forge.training.nonfinite import NonFiniteGuard
from megatron_forge.training.trainer import Trainer
from tests.conftest import REPO


class FakeCheckpointer:
    """What CheckpointSaver asks of a Checkpointer; records the steps it saved and how it
    was closed (``abort``)."""

    def __init__(self, root: Path = Path("/nonexistent"), save_interval: int = 0) -> None:
        self.root = root
        self.save_interval = save_interval
        self.saved: list[int] = []
        self.closed: list[bool] = []
        self.finalized = 0
        self.last_blocked_s = 0.0

    def finalize(self, blocking: bool) -> None:
        self.finalized += blocking

    def due(self, step: int) -> bool:
        return bool(self.save_interval) and step % self.save_interval == 0

    def save(self, model, optimizer, scheduler, state, config, blocking=False) -> None:
        if state.step not in self.saved:  # as Checkpointer: a step already saved is a no-op
            self.saved.append(state.step)

    def close(self, abort: bool = False) -> None:
        self.closed.append(abort)


def fake_trainer(
    callbacks: list[Callback],
    train_iters: int = 3,
    losses: Optional[dict[int, float]] = None,
    status_dir: Optional[Path] = None,
    overrides: tuple[str, ...] = (),
) -> Trainer:
    """A Trainer whose step only counts (its loss is ``losses[step]``, else 1.0): the
    loop, its hooks, the non-finite policy and the recorded outcome, nothing else."""
    cfg = load_config(
        REPO / "configs/tiny.yaml",
        [
            f"train.train_iters={train_iters}",
            "train.eval_interval=0",
            "model.vocab_size=2048",
            f"logging.dir={status_dir or '/nonexistent'}",
            "checkpoint.save=null",
            "checkpoint.load=null",
            *overrides,
        ],
    )
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.callbacks, trainer.valid_ds = cfg, callbacks, None
    trainer.step, trainer.consumed_samples, trainer._callback_states = 0, 0, {}
    trainer.model = trainer.optimizer = trainer.scheduler = None
    trainer.guard = NonFiniteGuard(cfg.train)
    trainer.status_dir = status_dir
    losses = losses or {}

    def train_step() -> dict[str, Any]:
        trainer.step += 1
        trainer.consumed_samples += cfg.train.global_batch_size
        loss = losses.get(trainer.step, 1.0)
        nonfinite = not math.isfinite(loss)
        return {
            "step": trainer.step,
            "loss": loss,
            "lr": 1e-3,
            "grad_norm": loss,
            "skipped": nonfinite,
            "nonfinite": nonfinite,
            "skipped_steps": 0,
            "nan_steps": 0,
            "consumed_samples": trainer.consumed_samples,
            "step_time_s": 0.1,
            "step_time_min_s": 0.1,
            "tokens_per_s": 1.0,
            "tokens_per_s_per_gpu": 1.0,
            "peak_mem_gb": 0.0,
        }

    trainer.train_step = train_step
    return trainer
