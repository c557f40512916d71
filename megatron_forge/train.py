"""Entry point, one process per GPU (or CPU rank):

    python -m megatron_forge.train --config configs/tiny.yaml [section.key=value ...]

Works the same under ``srun``, ``torchrun``, submitit and plain ``python`` (one rank).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_forge.config import Config, ConfigError, load_config, validate_for_world


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (defaults apply when omitted)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and layout, then exit"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv), []


def run(cfg: Config) -> None:
    """Train with this process's share of the world described by the environment."""
    from megatron_forge import distributed
    from megatron_forge.data.datasets import check_data_paths
    from megatron_forge.training.callbacks import build_callbacks, is_logging_rank
    from megatron_forge.training.trainer import Trainer

    env = distributed.read_environment()
    validate_for_world(cfg, env.world_size)  # before any process group or allocation
    check_data_paths(cfg)
    distributed.initialize(cfg, env)
    if is_logging_rank():
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
            validate_for_world(cfg, world)
            print(cfg.to_yaml())
            print(f"world={world} {cfg.describe_layout(world)}")
            return 0
        run(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
