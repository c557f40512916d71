"""The hooks through which side concerns join the train loop, instead of ``if`` branches.

A callback overrides any of the hooks below. Callbacks run in list order on every rank;
those that write files decide themselves which rank writes. Every run ends in
:meth:`Callback.close`, whether it finished, was preempted or failed, so loggers, writer
processes and threads shut down on every path.

Every hook gets the :class:`~megatron_forge.training.trainer.Trainer` running the loop
(typed ``Any`` here: the trainer imports this module, never the other way round).

A callback with resumable state (the W&B run id, say) names it with :attr:`state_key`;
what :meth:`~Callback.state_dict` returns goes into every checkpoint under that key and
comes back through :meth:`~Callback.load_state_dict` when a run resumes.
"""

from __future__ import annotations

import sys
from typing import Any, Optional


class StopTraining(SystemExit):
    """Raised by a callback (or the trainer) to end the run early and cleanly, having
    saved what it needed: ``close`` runs, ``on_error`` does not, and the process exits
    with ``code``. ``reason`` and ``details`` go into ``<logging.dir>/exit_status.json``."""

    reason = "stopped"

    def __init__(self, code: int, details: Optional[dict[str, Any]] = None) -> None:
        super().__init__(code)
        self.details: dict[str, Any] = dict(details or {})


class Callback:
    state_key: Optional[str] = None
    """Stable name of this callback's state in checkpoints; None: nothing to resume."""

    def state_dict(self) -> dict[str, Any]:
        """Small, picklable state to resume from; the same on every rank."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned when the checkpoint was written."""

    def on_train_start(self, trainer: Any) -> None:
        """Before the first step (not called for evaluation-only runs)."""

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """After every optimizer step; callbacks may add to ``metrics`` for later ones."""

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """After every evaluation."""

    def on_progress(self, trainer: Any, activity: str) -> None:
        """A sign of life short of a finished step: a training or evaluation microbatch
        was read, a checkpoint save starts or ends (``activity`` says which). Called
        often, on each rank on its own schedule: keep it cheap, start no collective."""

    def on_event(self, trainer: Any, event: dict[str, Any]) -> None:
        """Something the run did besides stepping, as a record with ``event`` (its kind),
        ``step`` and a one-line ``message``: ``nonfinite_step`` (a step whose update was
        refused), ``rollback``, ``nonfinite_stop``, ``checkpoint_refused``, ``loss_spike``,
        ``grad_norm_spike``, ``straggler``, ``preempted``. Every rank gets the same
        events, except ``hang``: the hang watchdog's thread delivers it on the rank that
        gives up, just before that process exits (``close`` does not run after it)."""

    def finish_writes(self, trainer: Any) -> None:
        """The run needs its newest checkpoint complete now: a rollback reloads it, a
        stop names it. Finish writes in flight (all ranks call this; collectives are
        allowed)."""

    def on_train_end(self, trainer: Any) -> None:
        """After the last step of a run that finished."""

    def on_error(self, trainer: Any, error: BaseException) -> None:
        """When the run fails with ``error`` (before :meth:`close`). Other ranks may not
        have failed: start no collective here."""

    def close(self, trainer: Any) -> None:
        """Release what the callback holds (runs, files, threads, processes); the last hook
        of every run. After :meth:`on_error`, start no collective."""


def announce(trainer: Any, event: dict[str, Any]) -> None:
    """Hand ``event`` to every callback's :meth:`Callback.on_event` without printing it
    (the caller has said it already), each even when another fails."""
    for cb in getattr(trainer, "callbacks", []):
        try:
            cb.on_event(trainer, event)
        except Exception as err:
            print(
                f"WARNING: {type(cb).__name__}.on_event failed ({type(err).__name__}: {err})",
                file=sys.stderr,
                flush=True,
            )
