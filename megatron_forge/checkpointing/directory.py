"""The on-disk layout of a checkpoint root, Megatron-LM's: ``<root>/iter_0000100/`` holds
one checkpoint, ``<root>/latest_checkpointed_iteration.txt`` names the newest COMPLETE one.

Listing, the tracker and the retention rule live here, apart from megatron-core, so that
conversion and inspection tools read a root without building a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from megatron_forge.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(
            f"{tracker} holds {text!r}, not an iteration number; write the newest complete "
            f"iter_NNNNNNN number into it (or remove it to start from scratch)"
        )
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


def write_tracker(root: str | Path, iteration: int) -> None:
    """Point the tracker at ``iteration`` atomically (a reader never sees a partial file)."""
    root = Path(root)
    tmp = root / f".{TRACKER}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, root / TRACKER)


def iterations_to_delete(
    iterations: list[int], latest: int, keep_last: Optional[int], keep_every: Optional[int]
) -> list[int]:
    """Complete checkpoints (<= latest) that retention removes; never ``latest`` itself."""
    if keep_last is None:
        return []
    complete = [i for i in iterations if i <= latest]
    kept = set(complete[-keep_last:]) | {latest}
    if keep_every:
        kept |= {i for i in complete if i % keep_every == 0}
    return [i for i in complete if i not in kept]
