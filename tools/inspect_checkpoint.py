"""Inspect and verify megatron-forge / Megatron-LM torch_dist checkpoints.

    python tools/inspect_checkpoint.py CKPT_DIR                  # iterations + latest summary
    python tools/inspect_checkpoint.py CKPT_DIR --iteration 100 --tensors
    python tools/inspect_checkpoint.py CKPT_DIR --verify         # read every tensor back

CKPT_DIR is a ``checkpoint.save`` directory (``iter_NNNNNNN/`` +
``latest_checkpointed_iteration.txt``) or one ``iter_NNNNNNN`` directory. Needs no GPU and
no process group: metadata comes from torch.distributed.checkpoint's reader, the config
and layout from the checkpoint's common state. ``--verify`` checks that the files the
metadata names exist and are long enough, then loads every tensor one at a time (memory
stays at one tensor) and checks it is finite. Exit status 0: complete and readable;
1: a problem, each one printed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

with warnings.catch_warnings():  # megatron-core's import-time note: no TE or apex here
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron_forge.checkpointing import (
        TRACKER,
        iteration_dir,
        latest_iteration,
        saved_iterations,
    )

# torch.distributed.checkpoint's note on every load without a process group: the intent here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def resolve(path: Path, iteration: int | None) -> tuple[Path, Path | None, int | None]:
    """(iteration directory, save root, iteration) for a save root; (path, None, None) for
    one iter_ directory."""
    if path.name.startswith("iter_") and path.is_dir():
        return path, None, None
    if iteration is None:
        iteration = latest_iteration(path)
        if iteration is None:
            found = saved_iterations(path)
            if not found:
                raise SystemExit(f"{path}: no {TRACKER} and no iter_* directories")
            iteration = found[-1]
    target = iteration_dir(path, iteration)
    if not target.is_dir():
        raise SystemExit(f"{target} does not exist (iterations: {saved_iterations(path)})")
    return target, path, iteration


def list_iterations(root: Path) -> None:
    latest = latest_iteration(root)
    print(f"{root}: tracker -> {latest if latest is not None else 'none'}")
    for it in saved_iterations(root):
        directory = iteration_dir(root, it)
        state = "complete" if (directory / "metadata.json").is_file() else "INCOMPLETE"
        if latest is not None and it > latest:
            state += " (newer than the tracker: an interrupted save)"
        size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
        print(f"  iter_{it:07d}  {size / 2**20:9.1f} MiB  {state}")


def common_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / "common.pt", map_location="cpu", weights_only=False)


def summarize(directory: Path, show_tensors: bool) -> None:
    common = common_state(directory)
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
    metadata = FileSystemReader(str(directory)).read_metadata()
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


def verify(directory: Path, root: Path | None, iteration: int | None) -> list[str]:
    """Problems found (empty when complete and readable); `iteration` of `root` when given."""
    problems = []
    if not (directory / "metadata.json").is_file():
        problems.append(f"{directory}/metadata.json missing: the save did not finish")
    if not (directory / ".metadata").is_file():
        return problems + [f"{directory}/.metadata missing: no tensors were written"]
    if root is not None:
        latest = latest_iteration(root)
        if latest is None or iteration > latest:
            problems.append(f"{directory} is newer than {root / TRACKER}: not a finished save")
    reader = FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} missing")
        elif path.stat().st_size < end:
            problems.append(f"{path} is truncated: {path.stat().st_size} bytes, needs {end}")
    if problems:
        return problems
    try:
        common_state(directory)
    except Exception as err:  # noqa: BLE001 - report whatever the file's problem is
        problems.append(f"{directory}/common.pt unreadable: {err}")
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        try:
            torch.distributed.checkpoint.load({key: tensor}, storage_reader=reader, no_dist=True)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{key}: unreadable ({type(err).__name__}: {err})")
            continue
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            problems.append(f"{key}: holds NaN or Inf")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="checkpoint.save directory or an iter_ dir")
    parser.add_argument("--iteration", type=int, help="iteration to inspect (default latest)")
    parser.add_argument("--tensors", action="store_true", help="list tensor names and shapes")
    parser.add_argument("--verify", action="store_true", help="read every tensor back")
    args = parser.parse_args(argv)
    if not args.path.exists():
        print(f"{args.path} does not exist", file=sys.stderr)
        return 1
    directory, root, iteration = resolve(args.path, args.iteration)
    if root is not None:
        list_iterations(root)
    summarize(directory, args.tensors)
    if not args.verify:
        return 0
    problems = verify(directory, root, iteration)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(
        "verify: OK, complete and readable"
        if not problems
        else f"verify: {len(problems)} problem(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
