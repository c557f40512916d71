"""Entry point, one process per GPU (or CPU rank):

    python -m megatron_forge.train --config configs/tiny.yaml [section.key=value ...]

Works the same under ``srun``, ``torchrun``, submitit and plain ``python`` (one rank).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron_forge.config import Config, load_config, validate_for_world
from megatron_forge.errors import CheckpointError, ConfigError, ForgeError

if TYPE_CHECKING:
    from megatron_forge.checkpointing.lock import DirectoryLock
    from megatron_forge.checkpointing.ownership import Claim
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
    profiler next (its window closes right after a step), the saver before the loggers
    (which report save time), throughput, spike detection and straggler attribution
    before the loggers (they add to the metrics), preemption last (it exits)."""
    from megatron_forge.checkpointing import Checkpointer
    from megatron_forge.training.checkpoint_saver import CheckpointSaver
    from megatron_forge.training.loss_spikes import LossSpikeDetector
    from megatron_forge.training.metrics_logger import MetricsLogger
    from megatron_forge.training.monitors import (
        MlflowCallback,
        TensorBoardCallback,
        ThroughputCallback,
        WandbCallback,
    )
    from megatron_forge.training.preemption import PreemptionHandler
    from megatron_forge.training.profiler import Profiler
    from megatron_forge.training.stragglers import StragglerMonitor
    from megatron_forge.training.watchdog import HangWatchdog

    callbacks: list[Callback] = []
    if cfg.train.hang_timeout_s:
        callbacks.append(
            HangWatchdog(cfg.logging.dir, cfg.train.hang_timeout_s, cfg.launch.max_requeues)
        )
    if cfg.profile.start_step is not None or cfg.profile.trigger_check_interval:
        callbacks.append(Profiler(cfg))
    saver = None
    if cfg.checkpoint.save:
        saver = CheckpointSaver(Checkpointer(cfg.checkpoint.save, cfg.checkpoint))
        callbacks.append(saver)
    lg = cfg.logging
    callbacks.append(ThroughputCallback(cfg))
    if lg.spike_window:
        callbacks.append(LossSpikeDetector(cfg))
    if lg.straggler_window:
        callbacks.append(StragglerMonitor(cfg))
    callbacks.append(MetricsLogger(lg.dir, lg.log_interval))
    if lg.wandb_project and lg.wandb_mode != "disabled":
        callbacks.append(WandbCallback(cfg))
    if lg.mlflow_experiment:
        callbacks.append(MlflowCallback(cfg))
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


def claim_directories(cfg: Config, held: list[DirectoryLock]) -> None:
    """Before anything is built, on global rank 0 (every rank raises its refusal): the
    checkpoint to load exists and is unambiguous; this run may write into checkpoint.save
    (:mod:`megatron_forge.checkpointing.ownership`); no other live run writes into
    logging.dir or checkpoint.save (their locks, appended to ``held`` for the life of the
    run). A refusal writes nothing into another run's directory."""
    from megatron_forge.checkpointing.collective import on_rank0
    from megatron_forge.checkpointing.loader import iteration_to_load
    from megatron_forge.checkpointing.lock import DirectoryLock
    from megatron_forge.checkpointing.ownership import apply_claim, config_hash, plan_claim

    ck = cfg.checkpoint
    digest = config_hash(cfg.to_dict())

    def plan() -> Optional[Claim]:
        if ck.save:
            return plan_claim(
                ck.save, ck.load, digest, ck.overwrite, ck.load_iteration, ck.load_optimizer
            )
        return None

    def claim() -> None:
        if ck.load:
            iteration_to_load(ck.load, ck)
        plan()  # refuse before touching anything, the locks included
        directories = [("logging.dir", Path(cfg.logging.dir), ConfigError)]
        if ck.save and Path(ck.save).resolve() != Path(cfg.logging.dir).resolve():
            directories.append(("checkpoint.save", Path(ck.save), CheckpointError))
        for name, directory, error in directories:
            lock = DirectoryLock(directory, name, error).acquire()
            held.append(lock)
            if lock.warning:
                print(f"WARNING: {lock.warning}", file=sys.stderr, flush=True)
        decided = plan()  # again, now that no other run can change the directory
        if decided is not None:
            apply_claim(decided)

    on_rank0(claim)


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
    held: list[DirectoryLock] = []
    try:
        claim_directories(cfg, held)
        if is_rank0():
            (Path(cfg.logging.dir) / "config.yaml").write_text(cfg.to_yaml())
        Trainer(cfg, env.world_size, build_callbacks(cfg)).train()
    finally:
        for lock in reversed(held):
            lock.release()
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
