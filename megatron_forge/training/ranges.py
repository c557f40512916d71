"""Named ranges over the train step (for torch.profiler and nsys) and per-rank compute time.

megatron-core times its own phases through a timers object set on its configs: with
``TransformerConfig.timers`` and ``OptimizerConfig.timers`` set, it calls
``timers(name).start()`` / ``.stop()`` around each microbatch's forward and backward
(``forward-compute``, ``backward-compute``), the pipeline sends and receives
(``forward-recv``, ``backward-send``...), the gradient all-reduce (``all-grads-sync``),
the parameter all-gather and the optimizer's phases (``optimizer-inner-step``...).
:class:`StepTimers` is such an object, installed by :func:`step_timers`; the trainer adds
``data`` (each batch read) and ``optimizer`` (the whole update) with :func:`annotate`.

- While a profiling window is open (:func:`set_ranges`), every one of those phases is a
  ``torch.profiler.record_function`` range (it shows in Chrome/Perfetto traces) and, on
  CUDA, an NVTX range (it shows in Nsight Systems). Outside a window they cost nothing.
- When ``measure`` is set, the forward and backward compute of each microbatch is timed
  (CUDA events on GPU, so it is the GPU's time; the wall clock on CPU): the straggler
  monitor reads it once per log interval.

Barriers that megatron-core asks the timers for (``barrier_with_L1_time``) are not taken:
a timer must never add a collective.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Optional

import torch

COMPUTE_PHASES = ("forward-compute", "backward-compute")
"""megatron-core's names for a microbatch's forward and backward compute."""

_ranges_on = False


def set_ranges(on: bool) -> None:
    """Emit profiler and NVTX ranges (a profiling window is open) or not."""
    global _ranges_on
    _ranges_on = on


def ranges_on() -> bool:
    return _ranges_on


class _Range:
    """One named range: a profiler range and, on CUDA, an NVTX range."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.record = torch.profiler.record_function(name)
        self.nvtx = torch.cuda.is_available()

    def __enter__(self) -> _Range:
        self.record.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self.record.__exit__(None, None, None)


@contextlib.contextmanager
def annotate(name: str) -> Iterator[None]:
    """A named range around a block while a profiling window is open; free otherwise."""
    if not _ranges_on:
        yield
        return
    with _Range(name):
        yield


class _Timer:
    """What megatron-core's ``timers(name, log_level)`` returns: ``start`` and ``stop``."""

    def __init__(self, owner: StepTimers, name: str) -> None:
        self.owner, self.name = owner, name

    def start(self, barrier: bool = False) -> None:
        self.owner._start(self.name)

    def stop(self, barrier: bool = False) -> None:
        self.owner._stop(self.name)


class StepTimers:
    """megatron-core's timers interface, turned into ranges and compute time."""

    def __init__(self) -> None:
        self.measure = False
        """Time the forward and backward compute (the straggler monitor sets this)."""
        self._cuda = torch.cuda.is_available()
        self._open: dict[str, tuple[Optional[_Range], Any]] = {}
        self._compute_s = 0.0
        self._events: list[tuple[Any, Any]] = []

    def __call__(self, name: str, log_level: Optional[int] = None) -> _Timer:
        return _Timer(self, name)

    def _start(self, name: str) -> None:
        span = _Range(name).__enter__() if _ranges_on else None
        begin: Any = None
        if self.measure and name in COMPUTE_PHASES:
            if self._cuda:
                begin = torch.cuda.Event(enable_timing=True)
                begin.record()
            else:
                begin = time.perf_counter()
        self._open[name] = (span, begin)

    def _stop(self, name: str) -> None:
        span, begin = self._open.pop(name, (None, None))
        if begin is not None:
            if self._cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((begin, end))
            else:
                self._compute_s += time.perf_counter() - begin
        if span is not None:
            span.__exit__(None, None, None)

    def take_compute_s(self) -> float:
        """Forward and backward compute time since the last call (waits for the GPU to
        reach the last recorded event), and restart the count."""
        total, self._compute_s = self._compute_s, 0.0
        if self._events:
            self._events[-1][1].synchronize()
            total += sum(begin.elapsed_time(end) for begin, end in self._events) / 1e3
            self._events.clear()
        return total


def step_timers(trainer: Any) -> StepTimers:
    """The trainer's :class:`StepTimers`, set on megatron-core's model and optimizer
    configs the first time it is asked for (the profiler and the straggler monitor share
    it)."""
    current = trainer.tf_config.timers
    if isinstance(current, StepTimers):
        return current
    timers = StepTimers()
    trainer.tf_config.timers = timers
    optimizer = trainer.optimizer
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        opt.config.timers = timers
    return timers
