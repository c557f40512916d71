"""Inspect and verify megatron-forge / Megatron-LM torch_dist checkpoints.

    python tools/inspect_checkpoint.py CKPT_DIR                  # iterations + latest summary
    python tools/inspect_checkpoint.py CKPT_DIR --iteration 100 --tensors
    python tools/inspect_checkpoint.py CKPT_DIR --verify         # read every tensor back

CKPT_DIR is a ``checkpoint.save`` directory (``iter_NNNNNNN/`` +
``latest_checkpointed_iteration.txt``) or one ``iter_NNNNNNN`` directory. Needs no GPU and
no process group. Safe on a checkpoint from anywhere: its pickles (common.pt, .metadata,
the objects in the shards) are read with an allowlist of types, so a file that would run
code is reported, not loaded (megatron_forge/checkpointing/files.py).

Always checked: the tracker, that the save finished, that every shard file the metadata
names exists and is long enough, that the pickles load. ``--verify`` also loads every
tensor, one at a time (memory stays at one tensor), and checks it is finite. Exit status
0: complete and readable; 1: a problem, each one printed on a ``PROBLEM:`` line.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_forge.checkpointing import (
    TRACKER,
    iteration_dir,
    latest_iteration,
    saved_iterations,
)
from megatron_forge.checkpointing.files import (
    SAVE_CONFIG,
    load_common_state,
    load_metadata,
    verify_iteration,
)
from megatron_forge.errors import CheckpointError, ForgeError

# torch.distributed.checkpoint's note on every load without a process group: the intent
# here; megatron-core's on import (of its list of safe types) that TE and apex are absent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

HINT = (
    "hint: each PROBLEM names the file at fault; copy a damaged file again from where the "
    "checkpoint was written, or use another iteration (--iteration N)"
)


def list_iterations(root: Path) -> tuple[int | None, list[str]]:
    """Print the tracker and every iter_ directory; return (tracker's iteration, problems)."""
    problems = []
    try:
        latest = latest_iteration(root)
        shown = str(latest) if latest is not None else "none"
    except CheckpointError as err:
        latest, shown = None, "UNREADABLE"
        problems.append(str(err))
    print(f"{root}: tracker -> {shown}")
    for it in saved_iterations(root):
        directory = iteration_dir(root, it)
        state = "complete" if (directory / SAVE_CONFIG).is_file() else "INCOMPLETE"
        if latest is not None and it > latest:
            state += " (newer than the tracker: an interrupted save)"
        size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
        print(f"  iter_{it:07d}  {size / 2**20:9.1f} MiB  {state}")
    return latest, problems


def choose(root: Path, iteration: int | None, latest: int | None) -> tuple[Path, list[str]]:
    """The iteration directory to inspect: ``iteration``, else the tracker's, else (no
    readable tracker) the newest iter_ directory; and the problems found on the way."""
    found = saved_iterations(root)
    if iteration is not None:
        if iteration not in found:
            raise CheckpointError(
                f"{iteration_dir(root, iteration)} does not exist (iterations: {found or 'none'})"
            )
        problems = []
        if latest is not None and iteration > latest:
            problems.append(
                f"{iteration_dir(root, iteration)} is newer than {root / TRACKER}: "
                "not a finished save"
            )
        return iteration_dir(root, iteration), problems
    if latest is not None and latest in found:
        return iteration_dir(root, latest), []
    if not found:
        raise CheckpointError(f"{root}: no {TRACKER} and no iter_* directories")
    problems = []
    if latest is not None:
        problems.append(
            f"{root / TRACKER} names iteration {latest} but {iteration_dir(root, latest)} is "
            "missing; point the tracker at a complete iter_ directory"
        )
    print(f"  inspecting the newest directory, iter_{found[-1]:07d}")
    return iteration_dir(root, found[-1]), problems


def summarize(directory: Path, show_tensors: bool) -> None:
    common = load_common_state(directory)
    cfg = common.get("config", {})
    model = cfg.get("model", {})
    print(
        f"{directory}: iteration {common.get('iteration')}, consumed samples "
        f"{common.get('consumed_samples')}, optimizer state: {common.get('has_optimizer')}"
    )
    if model:
        print(
            f"  model: {model.get('family')} layers={model.get('num_layers')} "
            f"hidden={model.get('hidden_size')} heads={model.get('num_attention_heads')}"
            f"/{model.get('num_query_groups')} experts={model.get('num_experts')}"
        )
    if "layout" in common:
        print("  saved under layout: " + " ".join(f"{k}={v}" for k, v in common["layout"].items()))
    metadata = load_metadata(directory)
    tensors = {
        k: v
        for k, v in metadata.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    numel = sum(v.size.numel() for k, v in tensors.items() if not k.startswith("optimizer."))
    print(f"  {len(tensors)} tensors, {numel / 1e6:.2f} M model-state elements")
    if show_tensors:
        for key, meta in sorted(tensors.items()):
            print(f"    {key:70s} {str(tuple(meta.size)):24s} {meta.properties.dtype}")


def inspect(path: Path, iteration: int | None, show_tensors: bool, verify: bool) -> list[str]:
    """Print what the checkpoint holds; return its problems."""
    problems: list[str] = []
    if path.name.startswith("iter_") and path.is_dir():
        directory = path
    else:
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory")
        latest, problems = list_iterations(path)
        directory, found = choose(path, iteration, latest)
        problems += found
    try:
        summarize(directory, show_tensors)
    except CheckpointError as err:
        problems.append(str(err))
    problems += [p for p in verify_iteration(directory, read_tensors=verify) if p not in problems]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="checkpoint.save directory or an iter_ dir")
    parser.add_argument("--iteration", type=int, help="iteration to inspect (default latest)")
    parser.add_argument("--tensors", action="store_true", help="list tensor names and shapes")
    parser.add_argument("--verify", action="store_true", help="read every tensor back")
    args = parser.parse_args(argv)
    try:
        problems = inspect(args.path, args.iteration, args.tensors, args.verify)
    except (ForgeError, OSError) as err:
        print(f"{getattr(err, 'kind', 'error')}: {err}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if args.verify:
        print("verify: FAILED" if problems else "verify: OK, complete and readable")
    elif problems:
        print("check: FAILED (--verify also reads every tensor back)")
    if problems:
        print(HINT)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
