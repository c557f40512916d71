"""What happens when the loss or the gradient norm turns NaN or inf.

The step itself never updates the parameters (:func:`~.optim.optimizer_step` refuses it);
:class:`NonFiniteGuard` counts such steps in a row and decides what the run does next,
per ``train.nonfinite_policy``:

- ``skip`` (default): keep going while fewer than ``train.max_nonfinite_steps`` steps in a
  row were bad (an isolated bad batch is simply skipped), then stop with
  :data:`~.exit_status.EXIT_NONFINITE`.
- ``rollback``: at that point reload the newest checkpoint and continue with the data
  after the bad steps, so the batches read since that checkpoint are skipped (the
  recovery PaLM and OLMo describe for loss spikes), at most ``train.max_rollbacks``
  times in a run, then stop.

No checkpoint is written while the newest step was non-finite, nor from parameters that
are not all finite (:func:`parameters_finite`), so retention never replaces good
checkpoints with bad ones.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

from megatron_forge.config import TrainConfig
from megatron_forge.training.callback import StopTraining
from megatron_forge.training.exit_status import EXIT_NONFINITE
from megatron_forge.utils import all_reduce, device

Action = Optional[Literal["stop", "rollback"]]


class NonFiniteStop(StopTraining):
    """Raised out of the train loop when non-finite steps end the run."""

    reason = "nonfinite"

    def __init__(self, message: str, step: int) -> None:
        super().__init__(EXIT_NONFINITE, {"message": message, "step": step})
        self.message = message


def parameters_finite(model_chunks: list[Any]) -> bool:
    """Whether every parameter of every rank is finite (one all-reduce, one host sync)."""
    checks = [torch.isfinite(p).all() for chunk in model_chunks for p in chunk.parameters()]
    bad = (~torch.stack(checks).all()).to(torch.int64) if checks else torch.tensor(0)
    flag = bad.reshape(1).to(device())
    return int(all_reduce(flag, op=dist.ReduceOp.MAX).item()) == 0


def describe_value(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.6g}"


class NonFiniteGuard:
    """Counts non-finite steps in a row and says when to stop or roll back."""

    state_key = "nonfinite"
    """Where :meth:`state_dict` goes among a checkpoint's callback states."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.policy = cfg.nonfinite_policy
        self.max_steps = cfg.max_nonfinite_steps
        self.max_rollbacks = cfg.max_rollbacks
        self.streak: list[int] = []
        """Steps of the current run of non-finite steps (empty after a finite one)."""
        self.rollbacks = 0
        """Rollbacks so far in this run, jobs before this one included."""

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks} if self.rollbacks else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))

    def record(self, step: int, nonfinite: bool) -> None:
        """Take in one step's outcome."""
        if nonfinite:
            self.streak.append(step)
        else:
            self.streak.clear()

    def decide(self) -> Action:
        """What the run must do after the steps recorded so far."""
        if len(self.streak) < self.max_steps:
            return None
        if self.policy == "rollback" and self.rollbacks < self.max_rollbacks:
            return "rollback"
        return "stop"

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.streak.clear()

    def steps_text(self) -> str:
        first, last = self.streak[0], self.streak[-1]
        return f"step {first}" if first == last else f"steps {first}-{last}"

    def skipped_message(self, step: int, loss: float, grad_norm: Optional[float]) -> str:
        return (
            f"non-finite step {step}: lm loss {describe_value(loss)}, grad norm "
            f"{describe_value(grad_norm)}; the update was skipped ({len(self.streak)} in a "
            f"row, train.max_nonfinite_steps={self.max_steps})"
        )

    def stop_message(
        self, step: int, newest_checkpoint: Optional[str], why_no_rollback: str = ""
    ) -> str:
        if why_no_rollback:
            tried = f"; no rollback: {why_no_rollback}"
        elif self.policy == "rollback":
            plural = "" if self.rollbacks == 1 else "s"
            tried = f", after {self.rollbacks} rollback{plural} (train.max_rollbacks={self.max_rollbacks})"
        else:
            tried = ""
        kept = (
            f"the newest checkpoint, {newest_checkpoint}, holds finite parameters"
            if newest_checkpoint
            else "no checkpoint was written"
        )
        advice = "lower train.lr or raise train.warmup_iters, then resume"
        if self.policy == "skip":
            advice += ", or set train.nonfinite_policy=rollback to skip the data that caused it"
        return (
            f"stopping at step {step}: loss or grad norm NaN/inf at {self.steps_text()}, "
            f"{len(self.streak)} in a row (train.max_nonfinite_steps={self.max_steps}, "
            f"train.nonfinite_policy={self.policy}){tried}; {kept}. To recover: {advice}. "
            f"Exit status {EXIT_NONFINITE} (nonfinite)"
        )
