"""Which run a checkpoint directory belongs to, so that a new run never writes over another
run's checkpoints.

``<root>/forge_owner.json`` records the owning run (its id, the hash of its config, the
Slurm job and host that created it, when) and the complete checkpoints it wrote, the
only ones retention may remove. A run *resumes* from its save directory when
``checkpoint.load`` points at it and it holds a checkpoint: that run continues the
directory's owner (a requeued job, a longer run, a changed recipe). Any other run is
*new* there and may write only into a directory without a tracker, without complete
checkpoints and owned by nobody else, unless ``checkpoint.overwrite`` hands it over.

:func:`plan_claim` decides without writing anything (a refused run leaves the directory
byte-identical); :func:`apply_claim` writes the decision, under the directory's lock.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_forge.checkpointing.directory import (
    TRACKER,
    atomic_write_text,
    complete_iterations,
    is_complete,
    iteration_dir,
    latest_iteration,
    resolve_iteration,
    saved_iterations,
)
from megatron_forge.errors import CheckpointError

OWNER_FILE = "forge_owner.json"


def slurm_job_id(env: Optional[dict[str, str]] = None) -> Optional[str]:
    """This job's id as Slurm names it (``123_4`` for an array task); stays the same
    across requeues. None outside Slurm."""
    env = dict(os.environ if env is None else env)
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a resolved config tree."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Owner:
    """The content of ``forge_owner.json``."""

    run_id: str
    config_hash: str
    job_id: Optional[str]
    """The Slurm job that created the directory (None outside Slurm)."""
    host: str
    created: str
    iterations: list[int] = field(default_factory=list)
    """Complete checkpoints this run wrote: the only ones retention removes."""
    adopted: list[int] = field(default_factory=list)
    """Complete checkpoints that were there when this run resumed from a directory without
    an owner record (an older version's run, a converted model): resumed from, never
    removed by retention."""
    not_ours: list[int] = field(default_factory=list)
    """Complete checkpoints of the previous owner, kept when this run took the directory
    over (checkpoint.overwrite): never resumed, never removed by retention."""
    previous: Optional[dict[str, Any]] = None
    """On a take-over: the previous owner record and what its tracker held."""
    load_iteration_done: Optional[int] = None
    """The checkpoint.load_iteration a job of this run resumed from. Later jobs with the
    same setting (a requeue of the same command) resume from the tracker instead, once it
    names a newer checkpoint of this run."""

    @classmethod
    def new(cls, digest: str, **kwargs: Any) -> Owner:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return cls(
            run_id=f"{stamp}-{uuid.uuid4().hex[:8]}",
            config_hash=digest,
            job_id=slurm_job_id(),
            host=socket.gethostname(),
            created=now(),
            **kwargs,
        )

    def is_same_run(self, digest: str) -> bool:
        """A later job of this run: the same Slurm job (a requeue), or the same config."""
        job = slurm_job_id()
        return (job is not None and job == self.job_id) or digest == self.config_hash

    def describe(self) -> str:
        job = f"Slurm job {self.job_id}" if self.job_id else "no Slurm job"
        return f"run {self.run_id} ({job} on {self.host}, created {self.created})"


def read_owner(root: str | Path) -> Optional[Owner]:
    """The owner record of ``root``, or None when it has none."""
    path = Path(root) / OWNER_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(Owner)}
        return Owner(**{k: v for k, v in data.items() if k in names})
    except (ValueError, TypeError) as err:
        raise CheckpointError(
            f"{path} is not a valid owner record ({err}); restore it, or, if every checkpoint "
            f"in {root} is this run's to continue, delete it (the run resuming from {root} "
            "then records itself as the owner)"
        ) from None


def kept_from_previous_owner(root: str | Path) -> list[int]:
    """Complete iterations of ``root`` that are not its owner's own (see Owner.not_ours)."""
    try:
        owner = read_owner(root)
    except CheckpointError:
        return []
    return list(owner.not_ours) if owner is not None else []


def effective_load_iteration(
    root: str | Path, owner: Optional[Owner], requested: Optional[int]
) -> Optional[int]:
    """``requested`` (checkpoint.load_iteration for a run that resumes from its save
    directory ``root``), or None when a job of this run already resumed from it and has
    saved a newer checkpoint since: then the tracker's is the one to continue from."""
    if requested is None or owner is None or owner.load_iteration_done != requested:
        return requested
    try:
        tracker = latest_iteration(root)
    except CheckpointError:
        return requested
    if tracker is not None and tracker > requested and tracker in owner.iterations:
        return None
    return requested


def write_owner(root: str | Path, owner: Owner, consequence: str) -> None:
    """Write the owner record atomically; ``consequence``: what stays true when the disk
    is full (the message says it)."""
    text = json.dumps(dataclasses.asdict(owner), indent=1) + "\n"
    atomic_write_text(Path(root) / OWNER_FILE, text, consequence)


@dataclass
class Claim:
    """What a run does to its save directory before it starts (see :func:`apply_claim`)."""

    root: Path
    owner: Owner
    write: bool
    """Whether the owner record changes."""
    remove_tracker: bool = False
    """A take-over: the previous owner's tracker goes (its value kept in owner.previous)."""
    resumes_from: Optional[int] = None


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _newest(root: Path, complete: list[int]) -> str:
    try:
        tracker = latest_iteration(root)
    except CheckpointError:
        tracker = None
    if tracker is not None:
        return f"newest iteration {tracker} (the tracker's)"
    if complete:
        return f"newest complete iteration {complete[-1]}"
    found = saved_iterations(root)
    return f"no complete checkpoint (iter_ directories: {found})" if found else "no checkpoint"


def plan_claim(
    save: str | Path,
    load: Optional[str | Path],
    digest: str,
    overwrite: bool = False,
    load_iteration: Optional[int] = None,
    load_optimizer: bool = True,
) -> Claim:
    """Decide, without writing anything, how this run may use ``save``; raises
    :class:`CheckpointError` naming the directory, its owner and its newest iteration
    when it may not."""
    root = Path(save)
    owner = read_owner(root)
    ignored = set(owner.not_ours) if owner else set()
    if load is not None and _same_dir(load, root):
        requested = effective_load_iteration(root, owner, load_iteration)
        iteration = resolve_iteration(root, requested, ignored)
        if iteration is not None:
            _refuse_overwriting_newer(
                root, iteration if load_optimizer else 0, ignored, requested, load_optimizer
            )
            write = owner is None or (
                requested is not None and owner.load_iteration_done != requested
            )
            if owner is None:  # written before owner records: this run adopts it
                owner = Owner.new(digest, adopted=complete_iterations(root))
            if requested is not None:
                owner.load_iteration_done = requested
            return Claim(root, owner, write, False, iteration)
    complete = [i for i in complete_iterations(root) if i not in ignored]
    has_tracker = (root / TRACKER).exists()
    same_run = owner is not None and owner.is_same_run(digest)
    if not complete and not has_tracker and (owner is None or same_run):
        if owner is None:
            return Claim(root, Owner.new(digest), True)
        return Claim(root, owner, False)
    if overwrite:
        previous = {
            "owner": dataclasses.asdict(owner) if owner else None,
            "tracker": (root / TRACKER).read_text().strip() if has_tracker else None,
            "taken_over": now(),
        }
        kept = sorted(set(complete) | ignored)
        taker = Owner.new(digest, not_ours=kept, previous=previous)
        return Claim(root, taker, True, has_tracker)
    raise CheckpointError(_refusal(root, load, owner, same_run, complete))


def _refusal(
    root: Path,
    load: Optional[str | Path],
    owner: Optional[Owner],
    same_run: bool,
    complete: list[int],
) -> str:
    newest = _newest(root, complete)
    keep = (
        f"Nothing in {root} was changed. To start a new run, point checkpoint.save at "
        "another directory; to give this one to this run, set checkpoint.overwrite=true "
        "(the checkpoints there are kept, never resumed and never removed by retention)"
    )
    loads = f"checkpoint.load={load}" if load is not None else "checkpoint.load is unset"
    if owner is not None and same_run:
        return (
            f"checkpoint.save={root} holds this run's checkpoints ({owner.describe()}; "
            f"{newest}) but {loads}, so this run would start again from step 0 and write "
            f"over them. Set checkpoint.load={root} to resume (what a requeued job needs). " + keep
        )
    if owner is not None:
        return (
            f"checkpoint.save={root} belongs to another run: {owner.describe()}, {newest}; "
            f"this run does not resume from it ({loads}). To continue that run, set "
            f"checkpoint.load={root}. " + keep
        )
    return (
        f"checkpoint.save={root} holds checkpoints this run did not write ({newest}; "
        f"no {OWNER_FILE}: written by another tool or an older version) and this run does "
        f"not resume from them ({loads}). To continue from them, set checkpoint.load={root}. "
        + keep
    )


def _refuse_overwriting_newer(
    root: Path,
    start: int,
    ignored: set[int],
    load_iteration: Optional[int],
    load_optimizer: bool,
) -> None:
    """A run resuming at ``start`` would save over the complete checkpoints after it."""
    newer = [
        i
        for i in saved_iterations(root)
        if i > start and i not in ignored and is_complete(iteration_dir(root, i))
    ]
    if not newer:
        return
    if not load_optimizer:
        why = "checkpoint.load_mode=finetune (or load_optimizer=false) starts again from step 0"
    elif load_iteration is not None:
        why = f"checkpoint.load_iteration={load_iteration} resumes before them"
    else:
        why = "the tracker names an older iteration (its update after those saves failed)"
    raise CheckpointError(
        f"checkpoint.save={root} holds complete checkpoints after step {start} (iterations "
        f"{', '.join(map(str, newer))}) that this run would write over: {why}. To resume "
        f"from the newest, set checkpoint.load_iteration={newer[-1]}; to branch off, keep "
        f"checkpoint.load={root} and point checkpoint.save at a new directory. Nothing in "
        f"{root} was changed"
    )


def apply_claim(claim: Claim) -> None:
    """Write what :func:`plan_claim` decided (rank 0, holding the directory's lock)."""
    claim.root.mkdir(parents=True, exist_ok=True)
    if claim.write:
        write_owner(claim.root, claim.owner, "the directory is left as it was")
    if claim.remove_tracker:
        (claim.root / TRACKER).unlink(missing_ok=True)
