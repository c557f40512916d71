"""Configuration: the typed schema (:mod:`.schema`), the YAML/override loader
(:mod:`.loader`) and :func:`validate_for_world`, everything a launcher needs to check a
run before it submits or allocates anything.
"""

from __future__ import annotations

from typing import Optional

from megatron_forge.config.loader import apply_overrides, from_dict, load_config
from megatron_forge.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    ExportConfig,
    LaunchConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    TrainConfig,
)
from megatron_forge.errors import ConfigError


def validate_for_world(
    cfg: Config,
    world_size: int,
    *,
    cuda_available: Optional[bool] = None,
    te_available: Optional[bool] = None,
) -> None:
    """:meth:`Config.validate` against ``world_size`` and this machine (CUDA, Transformer
    Engine), or against the machines of a cluster when the caller says what they have."""
    import torch

    from megatron_forge.utils import transformer_engine_available

    cfg.validate(
        world_size,
        cuda_available=torch.cuda.is_available() if cuda_available is None else cuda_available,
        te_available=transformer_engine_available() if te_available is None else te_available,
    )


__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ExportConfig",
    "LaunchConfig",
    "LoggingConfig",
    "ModelConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RecomputeConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "validate_for_world",
]
