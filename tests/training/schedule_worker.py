"""The real Trainer on 2 gloo ranks (DP=2) under torchrun, for test_rampup.py and
test_schedules.py: one process pair runs every scenario, so the slow tier starts
megatron-core once.

    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        -m tests.training.schedule_worker OUT_DIR

- ``rampup``: a 6-step run with a batch-size ramp-up that checkpoints at step 3 (mid-ramp)
  and 6, then a run resumed from the step-3 checkpoint.
- ``wsd``: a warmup-stable-decay run checkpointed at step 4 in its stable phase, then
  resumed with a longer schedule (no ``train.resume_hparams``).

Rank 0 writes each step's metrics to ``OUT_DIR/results.json``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from megatron_forge.config import Config
from megatron_forge.training.callback import Callback

REPO = Path(__file__).resolve().parents[2]
RAMP = ["train.global_batch_size=8", "train.micro_batch_size=1", "train.rampup_batch_size=[2,2,12]"]
RAMP_RUN = [*RAMP, "train.train_iters=6", "train.warmup_iters=2"]
# WSD: warmup 1, stable to step 4, decay over steps 5-6 of 6; extended: stable to step 6,
# decay over 7-8 of 8 (the checkpoint at step 4 is in the stable phase of both).
WSD = [
    "train.decay_style=wsd",
    "train.wsd_decay_iters=2",
    "train.wsd_decay_style=linear",
    "train.warmup_iters=1",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
]
WSD_FIRST = [*WSD, "train.train_iters=4", "train.decay_iters=6"]
WSD_EXTENDED = [*WSD, "train.train_iters=8"]
KEYS = ("loss", "lr", "grad_norm", "consumed_samples", "global_batch_size")


class Record(Callback):
    def __init__(self) -> None:
        self.steps: dict[int, list[Any]] = {}

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.steps[metrics["step"]] = [metrics[k] for k in KEYS]


def _train(cfg: Config, world_size: int, save: bool = False) -> dict[int, list[Any]]:
    from megatron_forge.checkpointing import Checkpointer
    from megatron_forge.training.checkpoint_saver import CheckpointSaver
    from megatron_forge.training.trainer import Trainer

    record = Record()
    callbacks: list[Callback] = [record]
    if save:
        callbacks.append(CheckpointSaver(Checkpointer(cfg.checkpoint.save, cfg.checkpoint)))
    Trainer(cfg, world_size, callbacks).train()
    return record.steps


def main(out: Path) -> int:
    warnings.filterwarnings("ignore")
    from megatron_forge import distributed
    from tests.training.worker import config

    env = distributed.read_environment()
    distributed.initialize(config(out, "init"), env)
    ramp_ckpt, wsd_ckpt = out / "ramp_ckpt", out / "wsd_ckpt"
    save = ["checkpoint.async_save=false"]
    try:
        results = {
            "rampup_whole": _train(
                config(out, "whole", *RAMP_RUN, *save, f"checkpoint.save={ramp_ckpt}",
                       "checkpoint.save_interval=3"),
                env.world_size, save=True,
            ),
            "rampup_resumed": _train(
                config(out, "resumed", *RAMP_RUN, f"checkpoint.load={ramp_ckpt}",
                       "checkpoint.load_iteration=3"),
                env.world_size,
            ),
            "wsd_first": _train(
                config(out, "wsd_first", *WSD_FIRST, *save, f"checkpoint.save={wsd_ckpt}"),
                env.world_size, save=True,
            ),
            "wsd_extended": _train(
                config(out, "wsd_extended", *WSD_EXTENDED, f"checkpoint.load={wsd_ckpt}"),
                env.world_size,
            ),
        }  # fmt: skip
        if env.rank == 0:
            (out / "results.json").write_text(json.dumps(results))
    finally:
        distributed.shutdown()
    return 0


@functools.cache
def results() -> dict[str, Any]:
    """Run the scenarios once per test session: {scenario: {step: [loss, lr, ...]}}, and
    the processes' output under ``output``."""
    out = Path(tempfile.mkdtemp(prefix="schedule_worker_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "tests.training.schedule_worker", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    loaded = json.loads((out / "results.json").read_text())
    runs: dict[str, Any] = {
        name: {int(s): v for s, v in steps.items()} for name, steps in loaded.items()
    }
    runs["output"] = proc.stdout + proc.stderr
    return runs


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
