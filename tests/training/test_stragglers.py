"""Straggler attribution: the slowest rank from a per-rank table, the persistence rule,
and the observed 2-rank run whose rank 1 is slowed (a test-only sleep after each batch
it reads): metrics.jsonl and the warning name rank 1 and its host."""

from __future__ import annotations

import socket

import pytest

from megatron_forge.training.stragglers import StreakTracker, attribute
from tests.training.observed_run import SLOW_RANK, observed  # noqa: F401 (fixture)


def test_slowest_rank_is_the_busiest_not_the_longest_step() -> None:
    # [step time, data wait, compute] per step: every rank's step takes as long (they
    # wait for each other); rank 2 reads its data slowly, rank 1 computes a bit slower.
    table = [[1.0, 0.05, 0.50], [1.0, 0.05, 0.55], [1.02, 0.40, 0.50], [1.0, 0.05, 0.50]]
    found = attribute(table, ["n0", "n0", "n1", "n1"])
    assert (found.rank, found.host) == (2, "n1")
    assert found.busy_s == pytest.approx(0.90) and found.data_wait_s == pytest.approx(0.40)
    assert found.median_busy_s == pytest.approx(0.575)
    assert found.spread_s == pytest.approx(0.35)
    assert found.excess == pytest.approx(0.90 / 0.575 - 1)
    assert found.step_time_spread_s == pytest.approx(0.02)
    assert found.metrics()["straggler_host"] == "n1"


def test_warning_needs_the_same_rank_slowest_for_a_whole_window() -> None:
    slow = [[1.0, 0.0, 0.5], [1.0, 0.0, 0.8]]  # rank 1: +23% over the median
    even = [[1.0, 0.0, 0.5], [1.0, 0.0, 0.51]]  # rank 1 slowest, but within the threshold
    other = [[1.0, 0.0, 0.8], [1.0, 0.0, 0.5]]
    tracker = StreakTracker(window=3, threshold=0.1)
    hosts = ["a", "b"]
    fired = [tracker.update(attribute(t, hosts)) for t in [slow, slow, other]]
    assert fired == [False, False, False]  # a different rank broke the streak
    fired = [tracker.update(attribute(t, hosts)) for t in [slow, even, slow]]
    assert fired == [False, False, False]  # below the threshold breaks it too
    fired = [tracker.update(attribute(t, hosts)) for t in [slow] * 7]
    assert fired == [False, True, False, False, True, False, False]  # then counts anew


@pytest.mark.slow
def test_slowed_rank_is_named_with_its_host(observed) -> None:  # noqa: F811
    host = socket.gethostname()
    steps = [r for r in observed["records"] if "straggler_rank" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))  # log_interval=1, both jobs
    after_first = [r for r in steps if r["step"] > 1]  # step 1 also builds the caches
    named = [r["step"] for r in after_first if r["straggler_rank"] == SLOW_RANK]
    assert len(named) >= len(after_first) - 1, [(r["step"], r["straggler_rank"]) for r in steps]
    first_job = [r for r in after_first if r["step"] <= 10]
    assert all(r["straggler_host"] == host for r in steps)
    assert all(r["straggler_data_wait_s"] < r["straggler_compute_s"] for r in first_job)
    # the sleep is 0.15 s per step on rank 1: its busy time exceeds the median by ~half that
    assert sum(r["busy_spread_s"] for r in first_job) / len(first_job) > 0.1
    assert all(r["straggler_gather_ms"] >= 0 for r in steps)
    warnings = [r for r in observed["records"] if r.get("event") == "straggler"]
    assert warnings and {(w["rank"], w["host"]) for w in warnings} == {(SLOW_RANK, host)}
    assert all(w["step"] <= 10 for w in warnings)  # job 2 has no slow rank
    line = f"WARNING: straggler: rank {SLOW_RANK} on host {host} was the slowest of 2 ranks"
    assert line in observed["logs"][0]
