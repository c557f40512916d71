"""megatron_forge.distributed.initialize and the shared collectives on 2 real gloo ranks,
in-process (tests/multiprocess.py), without the training loop."""

from __future__ import annotations

from typing import Any

import torch

from tests.multiprocess import run_distributed


def _layout_and_collectives(cfg: Any) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_forge import utils

    rank = dist.get_rank()
    total = utils.all_reduce(torch.tensor([float(rank + 1)]))
    top = utils.all_reduce(torch.tensor([float(rank)]), op=dist.ReduceOp.MAX)
    return {
        "rank0": utils.is_rank0(),
        "world": utils.world_size(),
        "sum": total.item(),
        "max": top.item(),
        "tp": (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
        "dp": ps.get_data_parallel_world_size(),
    }


def test_tensor_parallel_groups_and_all_reduce_on_two_ranks() -> None:
    results = run_distributed(_layout_and_collectives, 2, overrides=["parallel.tensor=2"])
    assert [r["rank0"] for r in results] == [True, False]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["max"] == 1.0 for r in results)
    assert [r["tp"] for r in results] == [(2, 0), (2, 1)]
    assert all(r["dp"] == 1 for r in results)


def test_data_parallel_layout_on_two_ranks() -> None:
    results = run_distributed(_layout_and_collectives, 2)
    assert [r["tp"] for r in results] == [(1, 0), (1, 0)]
    assert all(r["dp"] == 2 for r in results)


def _fails_on_rank1(cfg: Any) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("planted failure")


def test_a_failing_rank_is_reported_with_its_traceback() -> None:
    try:
        run_distributed(_fails_on_rank1, 2)
    except AssertionError as err:
        assert "rank 1" in str(err) and "planted failure" in str(err)
    else:
        raise AssertionError("the failure on rank 1 was not reported")
