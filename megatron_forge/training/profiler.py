"""Profiling windows: torch.profiler traces, NVTX ranges and cudaProfilerStart/Stop.

A window covers whole steps, ``profile.start_step`` to ``profile.end_step`` (as the
console numbers them), on the ranks in ``profile.ranks``. During it:

- torch.profiler records CPU (and, on GPU, CUDA) activity, with shapes, stacks and memory
  as configured, and writes one Chrome/Perfetto JSON trace per rank to
  ``<logging.dir>/profiles/trace_steps<A>-<B>_rank<R>.json`` (open it in
  https://ui.perfetto.dev or chrome://tracing);
- megatron-core's phases (forward and backward compute, pipeline sends and receives, the
  gradient all-reduce, the optimizer's steps) and the trainer's ``data`` and
  ``optimizer`` are named ranges (:mod:`.ranges`): record_function ranges in the trace,
  NVTX ranges on GPU;
- on GPU, cudaProfilerStart/Stop bracket the window, so
  ``nsys profile --capture-range=cudaProfilerApi`` captures exactly it, and with
  ``profile.memory_snapshot`` the CUDA caching allocator's history is recorded and
  dumped to ``memory_snapshot_steps<A>-<B>_rank<R>.pickle`` (https://pytorch.org/memory_viz).

A running job is profiled without a restart: ``touch <logging.dir>/profile`` (or write a
number of steps into it, ``echo 5 > <logging.dir>/profile``). Global rank 0 looks for the
file every ``profile.trigger_check_interval`` steps; one all-reduce of one number tells
the other ranks, so they all open the window at the same step. The file is removed when
taken, and every profiling rank prints where its trace went.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from megatron_forge.config import Config
from megatron_forge.training.callback import Callback
from megatron_forge.training.ranges import set_ranges, step_timers
from megatron_forge.utils import all_reduce, is_rank0

if TYPE_CHECKING:
    from megatron_forge.training.trainer import Trainer

TRIGGER_FILE = "profile"
"""Touch ``<logging.dir>/profile`` to profile the next steps of a running job."""
TRACE_DIR = "profiles"


@dataclasses.dataclass
class Window:
    first: int
    last: int
    reason: str  # "profile.start_step" or the trigger file


def read_trigger(path: Path, default_steps: int) -> tuple[int, Optional[str]]:
    """Steps the trigger file asks for (0: no file), and a note when its content is not a
    positive number of steps. The file is removed: a request is taken once."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0, None
    except OSError as err:  # a directory in its place, permissions: say so, go on
        return 0, f"cannot read the profiling trigger {path} ({err}); remove it"
    path.unlink(missing_ok=True)
    if not text:
        return default_steps, None
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        return default_steps, (
            f"profiling trigger {path} holds {text[:40]!r}, not a positive number of steps; "
            f"profiling profile.trigger_steps={default_steps} steps"
        )
    return steps, None


class Profiler(Callback):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.pc = cfg.profile
        self.run_dir = Path(cfg.logging.dir)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.profiles_here = self.pc.ranks is None or self.rank in self.pc.ranks
        self.window: Optional[Window] = None
        self.torch_prof: Any = None
        self.cuda = torch.cuda.is_available()
        self.written: list[Path] = []
        """The traces (and memory snapshots) this rank wrote."""

    @property
    def trigger_path(self) -> Path:
        return self.run_dir / TRIGGER_FILE

    # -- the window ----------------------------------------------------------------------

    def _open(self, trainer: Trainer, window: Window) -> None:
        self.window = window
        if not self.profiles_here:
            return
        step_timers(trainer)  # megatron-core's phases become ranges
        if self.pc.torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.torch_prof = torch.profiler.profile(
                activities=activities,
                record_shapes=self.pc.record_shapes,
                with_stack=self.pc.with_stack,
                profile_memory=self.pc.profile_memory,
            )
            self.torch_prof.start()
        if self.cuda:
            if self.pc.memory_snapshot:
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            torch.cuda.profiler.start()  # cudaProfilerStart: nsys --capture-range=cudaProfilerApi
        set_ranges(True)
        if is_rank0():
            print(
                f"profiler: profiling steps {window.first}-{window.last} ({window.reason}) on "
                f"ranks {'all' if self.pc.ranks is None else self.pc.ranks}",
                flush=True,
            )

    def _close(self) -> None:
        window, self.window = self.window, None
        if window is None or not self.profiles_here:
            return
        set_ranges(False)
        out = self.run_dir / TRACE_DIR
        out.mkdir(parents=True, exist_ok=True)
        name = f"steps{window.first}-{window.last}_rank{self.rank}"
        if self.cuda:
            torch.cuda.profiler.stop()
            if self.pc.memory_snapshot:
                snapshot = out / f"memory_snapshot_{name}.pickle"
                torch.cuda.memory._dump_snapshot(str(snapshot))
                torch.cuda.memory._record_memory_history(enabled=None)
                self.written.append(snapshot)
                print(f"profiler: rank {self.rank} wrote a CUDA memory snapshot to {snapshot}")
        if self.torch_prof is not None:
            prof, self.torch_prof = self.torch_prof, None
            prof.stop()
            trace = out / f"trace_{name}.json"
            prof.export_chrome_trace(str(trace))
            self.written.append(trace)
            print(
                f"profiler: rank {self.rank} wrote the trace of steps {window.first}-"
                f"{window.last} to {trace}",
                flush=True,
            )

    def _configured(self, next_step: int) -> Optional[Window]:
        first = self.pc.start_step
        if first is None or next_step != first:
            return None
        last = self.pc.end_step if self.pc.end_step is not None else first
        return Window(first, last, "profile.start_step")

    def _triggered(self, trainer: Trainer) -> int:
        """Steps requested through the trigger file, agreed by every rank (0: none)."""
        interval = self.pc.trigger_check_interval
        if not interval or trainer.step % interval:
            return 0
        steps = 0
        if is_rank0():
            steps, note = read_trigger(self.trigger_path, self.pc.trigger_steps)
            if note:
                print(f"WARNING: {note}", file=sys.stderr, flush=True)
        return int(all_reduce(torch.tensor([steps], dtype=torch.int64), dist.ReduceOp.MAX))

    # -- hooks ---------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer) -> None:
        window = self._configured(trainer.step + 1)
        if window is not None:
            self._open(trainer, window)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = trainer.step
        if self.torch_prof is not None:
            self.torch_prof.step()
        if self.window is not None and step >= self.window.last:
            self._close()
        requested = self._triggered(trainer)
        if requested and self.window is not None:
            if is_rank0():
                print(
                    f"WARNING: profiler: {self.trigger_path} asks for a profile, but steps "
                    f"{self.window.first}-{self.window.last} are being profiled; ignored",
                    file=sys.stderr,
                    flush=True,
                )
        elif requested:
            reason = f"requested by {self.trigger_path}"
            self._open(trainer, Window(step + 1, step + requested, reason))
        if self.window is None and (window := self._configured(step + 1)) is not None:
            self._open(trainer, window)

    def on_train_end(self, trainer: Trainer) -> None:
        self._close()  # a window reaching past the last step ends with the run

    def close(self, trainer: Trainer) -> None:
        self._close()  # writes what was recorded on any exit; no collective
