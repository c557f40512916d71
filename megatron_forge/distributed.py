"""Process groups and megatron-core parallel state, from Slurm or torchrun environments.

Scheduler environment variables are read in one place, :func:`read_environment`. The
same entry point then works under ``srun`` (SLURM_*), ``torchrun`` (RANK/WORLD_SIZE/...),
submitit (which runs under srun) and a plain ``python`` (a world of one).
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_forge.config import Config
from megatron_forge.utils import free_port


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str
    """'slurm', 'torchrun' or 'single'."""


def expand_first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist: ``gpu[001-004,010],cpu1`` -> ``gpu001``.

    Handles several bracket groups in one name (``rack[1-2]-n[01-04]`` -> ``rack1-n01``),
    keeping zero padding as Slurm does.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty")
    # The first comma outside brackets ends the first host expression.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]

    def first_of_range(match: re.Match) -> str:
        return re.split(r"[,-]", match.group(1))[0]

    return re.sub(r"\[([^\]]+)\]", first_of_range, first)


def port_from_job_id(job_id: str | int, base: int = 20000, span: int = 20000) -> int:
    """A port for the rendezvous derived from the job id, so concurrent jobs on a shared
    node rarely collide and every task of a job computes the same one."""
    return base + int(job_id) % span


def read_environment(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from Slurm or torchrun."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or a launcher that set them
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        job_id = env.get("SLURM_JOB_ID", "0")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_first_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or port_from_job_id(job_id)),
            source="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def initialize(cfg: Config, env: Optional[DistEnv] = None, timeout_minutes: int = 10) -> DistEnv:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU) and megatron's parallel state.

    On a machine without CUDA this installs :mod:`megatron_forge.cpu` first.
    """
    env = env or read_environment()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        from megatron_forge import cpu

        cpu.install()  # before megatron-core's first import (see cpu.import_mcore_without_compile)
        backend = "gloo"
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Seeds the default generator per PP stage and the TP-aware RNG tracker (dropout).
    torch.manual_seed(cfg.train.seed)
    model_parallel_cuda_manual_seed(cfg.train.seed)
    return env


def shutdown() -> None:
    """Tear down megatron's parallel state and the process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
