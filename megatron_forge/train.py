"""Entry point, one process per GPU (or CPU rank):

    python -m megatron_forge.train --config configs/tiny.yaml [section.key=value ...]

Works the same under ``srun``, ``torchrun``, submitit and plain ``python`` (one rank).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_forge.config import Config, load_config, validate_for_world
from megatron_forge.errors import ForgeError

if TYPE_CHECKING:
    from megatron_forge.training.callback import Callback


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (defaults apply when omitted)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and layout, then exit"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv), []


def build_callbacks(cfg: Config) -> list[Callback]:
    """The side concerns of a run, in hook order: the watchdog first (its clock), the
    saver before the loggers (which report save time), throughput before the loggers (it
    adds TFLOP/s and MFU to the metrics), preemption last (it exits)."""
    from megatron_forge.checkpointing import Checkpointer
    from megatron_forge.training.checkpoint_saver import CheckpointSaver
    from megatron_forge.training.metrics_logger import MetricsLogger
    from megatron_forge.training.monitors import (
        TensorBoardCallback,
        ThroughputCallback,
        WandbCallback,
    )
    from megatron_forge.training.preemption import PreemptionHandler
    from megatron_forge.training.watchdog import HangWatchdog

    callbacks: list[Callback] = []
    if cfg.train.hang_timeout_s:
        callbacks.append(
            HangWatchdog(cfg.logging.dir, cfg.train.hang_timeout_s, cfg.launch.max_requeues)
        )
    saver = None
    if cfg.checkpoint.save:
        saver = CheckpointSaver(Checkpointer(cfg.checkpoint.save, cfg.checkpoint))
        callbacks.append(saver)
    lg = cfg.logging
    callbacks.append(ThroughputCallback(cfg))
    callbacks.append(MetricsLogger(lg.dir, lg.log_interval))
    if lg.wandb_project and lg.wandb_mode != "disabled":
        callbacks.append(WandbCallback(cfg))
    if lg.tensorboard:
        callbacks.append(TensorBoardCallback(cfg))
    callbacks.append(PreemptionHandler(saver, cfg.launch.max_requeues))
    return callbacks


def validate(cfg: Config, world_size: int) -> None:
    """Everything checkable before a process group or a tensor exists: the model family's
    rules (the family registry) and the layout against the world and this machine."""
    from megatron_forge.models import check_model_config

    check_model_config(cfg.model)
    validate_for_world(cfg, world_size)


def run(cfg: Config) -> None:
    """Train with this process's share of the world described by the environment."""
    from megatron_forge import distributed
    from megatron_forge.data.datasets import check_data_paths
    from megatron_forge.training.trainer import Trainer
    from megatron_forge.utils import is_rank0

    env = distributed.read_environment()
    validate(cfg, env.world_size)  # before any process group or allocation
    check_data_paths(cfg)
    distributed.initialize(cfg, env)
    if is_rank0():
        Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.logging.dir) / "config.yaml").write_text(cfg.to_yaml())
    try:
        Trainer(cfg, env.world_size, build_callbacks(cfg)).train()
    finally:
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from megatron_forge import distributed

            world = distributed.read_environment().world_size
            validate(cfg, world)
            print(cfg.to_yaml())
            print(f"world={world} {cfg.describe_layout(world)}")
            return 0
        run(cfg)
    except ForgeError as err:
        print(f"{err.kind}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
