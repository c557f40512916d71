"""Rank/world/rendezvous from Slurm and torchrun environments (no processes started)."""

from __future__ import annotations

import pytest

from megatron_forge.distributed import expand_first_host, port_from_job_id, read_environment


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("gpu001", "gpu001"),
        ("gpu[001-004,010]", "gpu001"),
        ("gpu[010,001-004]", "gpu010"),
        ("node7,node8", "node7"),
        ("a[3-4],b[1-2]", "a3"),
        ("rack[1-2]-n[01-04]", "rack1-n01"),
        ("dgx-h100-[0007-0012]", "dgx-h100-0007"),
    ],
)
def test_first_host_of_nodelist(nodelist: str, first: str) -> None:
    assert expand_first_host(nodelist) == first


def test_empty_nodelist_is_an_error() -> None:
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST is empty"):
        expand_first_host("")


def test_slurm_environment() -> None:
    env = read_environment(
        {
            "SLURM_PROCID": "13",
            "SLURM_NTASKS": "32",
            "SLURM_LOCALID": "5",
            "SLURM_JOB_NODELIST": "gpu[001-004]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (env.rank, env.world_size, env.local_rank) == (13, 32, 5)
    assert env.master_addr == "gpu001"
    assert env.master_port == port_from_job_id(123456)
    assert 20000 <= env.master_port < 40000
    assert env.source == "slurm"


def test_step_nodelist_wins_and_explicit_master_is_kept() -> None:
    env = read_environment(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_JOB_NODELIST": "a[1-9]",
            "SLURM_STEP_NODELIST": "a[5-6]",
            "SLURM_JOB_ID": "7",
            "MASTER_PORT": "29999",
        }
    )
    assert env.master_addr == "a5" and env.master_port == 29999


def test_torchrun_environment_takes_precedence() -> None:
    env = read_environment(
        {
            "RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "host0",
            "MASTER_PORT": "29500",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        1,
        4,
        1,
        "host0",
        29500,
    )
    assert env.source == "torchrun"


def test_plain_python_is_a_world_of_one() -> None:
    env = read_environment({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")
    assert env.master_port > 0
