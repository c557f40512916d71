"""The on-disk layout of a checkpoint root, Megatron-LM's: ``<root>/iter_0000100/`` holds
one checkpoint, ``<root>/latest_checkpointed_iteration.txt`` names the newest COMPLETE one.

Listing, the tracker, which iteration to load and the retention rule live here, apart
from megatron-core, so that conversion and inspection tools read a root without building
a model. Every write here is atomic and says so when the disk is full.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Optional

from megatron_forge.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "metadata.json"
"""Written last by megatron-core's save (after every rank's shards and .metadata)."""
CHECKPOINT_FILES = ("*.distcp", "*.metadata", "*.metadata.tmp", "common.pt", COMPLETE_MARKER)
"""The files a torch_dist save writes into its iter_ directory; removing a checkpoint
removes these and nothing else."""
DISK_FULL = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def is_complete(path: Path) -> bool:
    """Whether an iter_ directory holds a finished checkpoint."""
    return (path / COMPLETE_MARKER).is_file()


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        complete = complete_iterations(root)
        fix = (
            f"write one of the complete iterations ({_listed(complete)}) into it, or set "
            "checkpoint.load_iteration (convert: --iteration) to pick one"
            if complete
            else "no iter_ directory here holds a complete checkpoint: remove it to start "
            "from scratch"
        )
        raise CheckpointError(f"{tracker} holds {text[:80]!r}, not an iteration number; {fix}")
    return int(text)


def saved_iterations(root: str | Path) -> list[int]:
    """Iterations with an iter_NNNNNNN directory (complete or not), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("iter_*"):
        suffix = path.name[len("iter_") :]
        if path.is_dir() and suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def complete_iterations(root: str | Path) -> list[int]:
    """Iterations whose iter_ directory holds a finished checkpoint, ascending."""
    return [i for i in saved_iterations(root) if is_complete(iteration_dir(root, i))]


def _listed(iterations: list[int]) -> str:
    return ", ".join(str(i) for i in iterations) if iterations else "none"


def resolve_iteration(
    root: str | Path, requested: Optional[int] = None, ignored: Collection[int] = ()
) -> Optional[int]:
    """The iteration of ``root`` to load: ``requested``, else the tracker's; None when the
    directory holds no checkpoint. Refuses (never guesses) when the tracker is unreadable,
    names a missing iteration, or is gone while complete checkpoints remain.

    ``ignored``: complete iterations that are not this directory's own (those a run kept
    when it took the directory over); they never count as a checkpoint to resume.
    """
    root = Path(root)
    complete = [i for i in complete_iterations(root) if i not in ignored]
    if requested is not None:
        if not is_complete(iteration_dir(root, requested)):
            state = "incomplete" if iteration_dir(root, requested).is_dir() else "missing"
            raise CheckpointError(
                f"checkpoint.load_iteration={requested}: {iteration_dir(root, requested)} is "
                f"{state}; complete iterations in {root}: {_listed(complete)}"
            )
        return requested
    iteration = latest_iteration(root)
    if iteration is not None and iteration not in ignored:
        path = iteration_dir(root, iteration)
        if not is_complete(path):
            state = "incomplete (no metadata.json)" if path.is_dir() else "missing"
            raise CheckpointError(
                f"{root / TRACKER} names iteration {iteration} but {path} is {state}; "
                f"complete iterations in {root}: {_listed(complete)}. Set "
                "checkpoint.load_iteration to one of them (or write it into the tracker)"
            )
        return iteration
    if complete:
        raise CheckpointError(
            f"{root} has no {TRACKER} but holds complete checkpoints at iterations "
            f"{_listed(complete)}: refusing to start again from step 0 over them. Set "
            f"checkpoint.load_iteration={complete[-1]} (the newest) or another of them to "
            f"resume from it, or restore the tracker (echo {complete[-1]} > {root / TRACKER})"
        )
    return None


def free_space(path: Path) -> str:
    """Free space on the filesystem holding ``path`` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "unknown space"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


def disk_full_cause(error: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT error behind ``error`` (its cause chain, or one rank's failure
    wrapped by torch's CheckpointException), or None when the disk is not the cause."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        for failure in (getattr(err, "failures", None) or {}).values():
            wrapped = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(wrapped, BaseException):
                stack.append(wrapped)
        stack.extend(e for e in (err.__cause__, err.__context__) if e is not None)
    return None


def disk_full_error(path: Path, cause: OSError, consequence: str) -> CheckpointError:
    """What the user sees when a checkpoint write runs out of space: where, how much is
    left, what still holds, and the fix."""
    what = DISK_FULL.get(cause.errno or 0, "disk full")
    return CheckpointError(
        f"{what} while writing {path} ({free_space(path)} free there): {consequence}. Free "
        "space (delete old iter_ directories, lower checkpoint.keep_last) or point "
        "checkpoint.save at a filesystem with room, then resume"
    )


def atomic_write_text(path: Path, text: str, consequence: str) -> None:
    """Replace ``path`` by ``text`` so that a reader never sees a partial file; a full disk
    leaves the previous file as it was and raises :func:`disk_full_error`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in DISK_FULL:
            raise disk_full_error(path, err, consequence) from err
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CheckpointError(
                f"cannot write {path}: {err.strerror}; make {path.parent} writable or point "
                "checkpoint.save elsewhere"
            ) from err
        raise


def write_tracker(root: str | Path, iteration: int, previous: Optional[int] = None) -> None:
    """Point the tracker at ``iteration`` atomically (a reader never sees a partial file);
    on a full disk the tracker keeps naming ``previous``."""
    root = Path(root)
    atomic_write_text(
        root / TRACKER,
        f"{iteration}\n",
        f"the tracker still names iteration {previous if previous is not None else 'none'}, "
        f"so iteration {iteration} is not resumed from",
    )


def remove_checkpoint(path: Path) -> list[str]:
    """Delete the checkpoint files of an iter_ directory, and the directory when nothing
    else is in it; returns the names of what was kept (files that are not the checkpoint's,
    which stay where they are)."""
    if not path.is_dir():
        return []
    kept = []
    for entry in sorted(path.iterdir()):
        if entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in CHECKPOINT_FILES):
            entry.unlink()
        else:
            kept.append(entry.name)
    if not kept:
        path.rmdir()
    return kept


def iterations_to_delete(
    iterations: list[int], latest: int, keep_last: Optional[int], keep_every: Optional[int]
) -> list[int]:
    """Complete checkpoints (<= latest) that retention removes; never ``latest`` itself.
    ``iterations`` are those retention may touch at all: this run's own."""
    if keep_last is None:
        return []
    complete = [i for i in iterations if i <= latest]
    kept = set(complete[-keep_last:]) | {latest}
    if keep_every:
        kept |= {i for i in complete if i % keep_every == 0}
    return [i for i in complete if i not in kept]
