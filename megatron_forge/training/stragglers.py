"""Straggler attribution: which rank, on which host, holds the others back.

In synchronous training every rank's step takes as long as the slowest one's, since the
fast ranks wait for it in the gradient all-reduce; step times alone cannot name the
straggler. Its own work can: each rank's *busy* time, the data wait (reading batches) plus
the forward and backward compute (megatron-core's ``forward-compute`` and
``backward-compute`` phases, timed by :mod:`.ranges` with CUDA events on GPU), less the
data wait inside them. Over each log interval every rank averages its step time, data
wait and compute per step, then one all-gather of those three numbers gives every rank
the table. The metrics of the logged step then name the slowest rank and its host:

- ``straggler_rank``, ``straggler_host``: the rank with the most busy time per step;
- ``straggler_busy_s``, ``straggler_data_wait_s``, ``straggler_compute_s``: its time;
- ``busy_median_s``, ``busy_spread_s`` (slowest - fastest), ``straggler_excess`` (how
  much busier than the median rank, 0.5: 50%);
- ``rank_step_time_spread_s``: the spread of the ranks' own step times;
- ``straggler_gather_ms``: what the all-gather cost this rank.

A rank that is the slowest by more than ``logging.straggler_threshold`` in
``logging.straggler_window`` log intervals in a row gets a warning naming it and its
host (console, a ``straggler`` event in metrics.jsonl, a W&B alert).
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from megatron_forge.config import Config
from megatron_forge.monitoring.dashboard import is_log_step
from megatron_forge.training.callback import Callback
from megatron_forge.training.ranges import StepTimers, step_timers
from megatron_forge.utils import device

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer


@dataclasses.dataclass
class Attribution:
    """Who was slowest over one log interval, from the per-rank table."""

    rank: int
    host: str
    busy_s: float
    data_wait_s: float
    compute_s: float
    median_busy_s: float
    spread_s: float
    excess: float
    step_time_spread_s: float
    num_ranks: int

    def metrics(self) -> dict[str, Any]:
        return {
            "straggler_rank": self.rank,
            "straggler_host": self.host,
            "straggler_busy_s": self.busy_s,
            "straggler_data_wait_s": self.data_wait_s,
            "straggler_compute_s": self.compute_s,
            "busy_median_s": self.median_busy_s,
            "busy_spread_s": self.spread_s,
            "straggler_excess": self.excess,
            "rank_step_time_spread_s": self.step_time_spread_s,
        }


def attribute(table: list[list[float]], hosts: list[str]) -> Attribution:
    """The slowest rank of a table of per-rank ``[step time, data wait, compute]`` (each
    per step), by busy time (data wait + compute)."""
    busy = [wait + compute for _, wait, compute in table]
    slowest = max(range(len(busy)), key=lambda r: busy[r])
    median = statistics.median(busy)
    step_times = [row[0] for row in table]
    return Attribution(
        rank=slowest,
        host=hosts[slowest],
        busy_s=busy[slowest],
        data_wait_s=table[slowest][1],
        compute_s=table[slowest][2],
        median_busy_s=median,
        spread_s=busy[slowest] - min(busy),
        excess=(busy[slowest] - median) / median if median > 0 else 0.0,
        step_time_spread_s=max(step_times) - min(step_times),
        num_ranks=len(table),
    )


class StreakTracker:
    """Counts log intervals in a row in which the same rank was the slowest by more than
    the threshold; says when that reaches the window (then counts again from zero)."""

    def __init__(self, window: int, threshold: float) -> None:
        self.window, self.threshold = window, threshold
        self.rank: Optional[int] = None
        self.count = 0

    def update(self, attribution: Attribution) -> bool:
        """Count one log interval; True when the same rank has been the slowest for the
        whole window."""
        if attribution.excess <= self.threshold:
            self.rank, self.count = None, 0
            return False
        if attribution.rank != self.rank:
            self.rank, self.count = attribution.rank, 0
        self.count += 1
        if self.count >= self.window:
            self.rank, self.count = None, 0
            return True
        return False


def _all_gather(values: list[float]) -> list[list[float]]:
    local = torch.tensor(values, dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [local.tolist()]
    moved = local.to(device())
    out = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(out, moved)
    return [row.cpu().tolist() for row in out]


def _hosts() -> list[str]:
    host = socket.gethostname()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [host]
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host)
    return hosts


class StragglerMonitor(Callback):
    """Adds the straggler metrics to each logged step; warns about persistent stragglers.
    Runs before the loggers, on every rank (the gather is a collective)."""

    def __init__(self, cfg: Config) -> None:
        lg = cfg.logging
        self.log_interval = lg.log_interval
        self.tracker = StreakTracker(lg.straggler_window, lg.straggler_threshold)
        self.hosts: list[str] = []
        self.timers: Optional[StepTimers] = None
        self._reset()

    def _reset(self) -> None:
        self.steps, self.step_time_s, self.data_wait_s = 0, 0.0, 0.0

    def on_train_start(self, trainer: Trainer) -> None:
        self.hosts = _hosts()  # once: host names do not change
        self.timers = step_timers(trainer)
        self.timers.measure = True
        self.timers.take_compute_s()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        self.steps += 1
        self.step_time_s += metrics["step_time_rank_s"]
        self.data_wait_s += metrics["data_wait_s"]
        if not is_log_step(step, self.log_interval, trainer.cfg.train.train_iters):
            return
        assert self.timers is not None
        n = self.steps
        compute = max(self.timers.take_compute_s() - self.data_wait_s, 0.0)
        start = time.perf_counter()
        table = _all_gather([self.step_time_s / n, self.data_wait_s / n, compute / n])
        gather_ms = (time.perf_counter() - start) * 1e3
        self._reset()
        found = attribute(table, self.hosts)
        metrics.update(found.metrics())
        metrics["straggler_gather_ms"] = gather_ms
        if self.tracker.update(found):
            trainer.emit(self._event(found, step))

    def _event(self, found: Attribution, step: int) -> dict[str, Any]:
        window = self.tracker.window
        message = (
            f"straggler: rank {found.rank} on host {found.host} was the slowest of "
            f"{found.num_ranks} ranks in each of the last {window} log intervals (up to step "
            f"{step}): busy {found.busy_s:.3f} s/step (data wait {found.data_wait_s:.3f} s, "
            f"compute {found.compute_s:.3f} s) against {found.median_busy_s:.3f} s for the "
            f"median rank (+{found.excess * 100:.0f}%; logging.straggler_threshold="
            f"{self.tracker.threshold:g}); the other ranks wait for it at every step. Check "
            "that host's GPU (clocks, temperature, ECC), its data loading and its network"
        )
        return {
            "event": "straggler",
            "step": step,
            "rank": found.rank,
            "host": found.host,
            "excess": found.excess,
            "message": message,
        }
