"""Profiling windows: the trigger file, the ranges megatron-core's phases become, the
config's checks, and the observed 2-rank run: a window at steps 3-4 writes one trace
per rank with the forward, backward, optimizer, data and communication ranges, and a
trigger file written during the run profiles the next steps without a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_forge.config import ConfigError, load_config
from megatron_forge.training.profiler import read_trigger
from megatron_forge.training.ranges import StepTimers, annotate, set_ranges
from tests.training.observed_run import (
    PROFILE_WINDOW,
    TRIGGER_AT,
    TRIGGER_STEPS,
    observed,  # noqa: F401 (fixture)
)

RANGES = {
    "forward-compute",
    "backward-compute",
    "optimizer",
    "optimizer-inner-step",
    "data",
    "all-grads-sync",
    "params-all-gather",
}


def test_trigger_file_is_taken_once(tmp_path: Path) -> None:
    path = tmp_path / "profile"
    assert read_trigger(path, 2) == (0, None)
    path.touch()
    assert read_trigger(path, 2) == (2, None) and not path.exists()
    path.write_text("7\n")
    assert read_trigger(path, 2) == (7, None)
    path.write_text("lots")
    steps, note = read_trigger(path, 3)
    assert steps == 3 and "holds 'lots', not a positive number of steps" in note
    path.mkdir()
    steps, note = read_trigger(path, 3)
    assert steps == 0 and f"cannot read the profiling trigger {path}" in note


def test_megatron_phases_become_ranges_only_in_a_window() -> None:
    # (the ranges in real traces: the observed run below; here, that none is opened
    # outside a window, where they must cost nothing)
    timers = StepTimers()
    timers("forward-compute").start()
    assert timers._open["forward-compute"] == (None, None)
    timers("forward-compute").stop()
    set_ranges(True)
    try:
        timers("forward-compute", log_level=2).start(barrier=True)  # barrier: never taken
        span, _ = timers._open["forward-compute"]
        assert span is not None and span.name == "forward-compute"
        timers("forward-compute").stop()
        assert timers._open == {}
        with annotate("data"):
            pass
    finally:
        set_ranges(False)


def test_compute_time_is_measured_when_asked() -> None:
    timers = StepTimers()
    timers("forward-compute").start()
    timers("forward-compute").stop()
    assert timers.take_compute_s() == 0.0
    timers.measure = True
    for name in ("forward-compute", "backward-compute", "all-grads-sync"):
        timers(name).start()
        torch.ones(256, 256) @ torch.ones(256, 256)
        timers(name).stop()
    first = timers.take_compute_s()
    assert first > 0 and timers.take_compute_s() == 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["profile.start_step=5", "profile.end_step=4"], "profile.end_step=4 is before"),
        (["profile.end_step=4"], "profile.end_step=4 needs profile.start_step"),
        (["profile.start_step=0"], "profile.start_step=0 must be >= 1"),
        (["profile.ranks=[0, -1]"], "profile.ranks=[0, -1] must be a list of global ranks"),
        (["profile.trigger_steps=0"], "profile.trigger_steps=0 must be >= 1"),
    ],
)
def test_bad_profile_settings_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_profile_ranks_and_memory_snapshot_are_checked_against_the_world() -> None:
    cfg = load_config(None, ["profile.ranks=[0, 4]", "precision.params_dtype=fp32"])
    with pytest.raises(ConfigError, match=r"names ranks \[4\] outside the world of 2 ranks"):
        cfg.validate(2, cuda_available=False, te_available=False)
    cfg = load_config(None, ["profile.memory_snapshot=true", "precision.params_dtype=fp32"])
    with pytest.raises(ConfigError, match="CUDA is not available; set profile.memory_snapshot"):
        cfg.validate(1, cuda_available=False, te_available=False)


def _trace_names(path: Path) -> set[str]:
    trace = json.loads(path.read_text())  # loads as JSON: Chrome/Perfetto trace format
    return {e.get("name") for e in trace["traceEvents"] if e.get("cat") == "user_annotation"}


@pytest.mark.slow
def test_window_writes_one_trace_per_rank_with_the_step_ranges(observed) -> None:  # noqa: F811
    first, last = PROFILE_WINDOW
    for rank in (0, 1):
        path = observed["dir"] / "profiles" / f"trace_steps{first}-{last}_rank{rank}.json"
        assert RANGES <= _trace_names(path), path
        assert (
            f"profiler: rank {rank} wrote the trace of steps {first}-{last} to {path}"
            in (observed["logs"][rank])
        )
    assert f"profiler: profiling steps {first}-{last} (profile.start_step)" in observed["logs"][0]


@pytest.mark.slow
def test_trigger_file_profiles_the_running_job(observed) -> None:  # noqa: F811
    run_dir = observed["dir"]
    first, last = TRIGGER_AT + 2, TRIGGER_AT + 1 + TRIGGER_STEPS  # seen after the next step
    assert (
        f"profiling steps {first}-{last} (requested by {run_dir / 'profile'})"
        in (observed["logs"][0])
    )
    for rank in (0, 1):
        path = run_dir / "profiles" / f"trace_steps{first}-{last}_rank{rank}.json"
        assert {"forward-compute", "backward-compute", "optimizer"} <= _trace_names(path)
    assert not (run_dir / "profile").exists()  # taken
    names = sorted(p.name for p in (run_dir / "profiles").iterdir())
    assert len(names) == 4, names  # nothing else was profiled, in either job
