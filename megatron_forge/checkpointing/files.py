"""Reading a checkpoint's files without trusting them, and naming what is wrong with them.

A checkpoint someone shared is data, and reading it must run none of its code. Three
kinds of file in a torch_dist iteration directory are pickles:

- ``common.pt`` (iteration, scheduler, config, layout, megatron-core's optimizer entries),
- ``.metadata`` (torch.distributed.checkpoint's index of every tensor and object),
- the objects stored inside the ``.distcp`` shards (per-rank RNG states, layers' extra
  state).

Here each is unpickled with an allowlist of the few types those files hold (plain
containers, tensors, torch.distributed.checkpoint's metadata classes, numpy's RNG state,
and megatron-core's own list of safe types for checkpoints written by Megatron-LM). A file
that needs anything else is refused with :class:`CheckpointError` naming the type, before
it is constructed.

megatron-core's own load path (``dist_checkpointing.load``) unpickles ``.metadata`` with
plain ``pickle.load`` and the ``.distcp`` objects with ``torch.load(weights_only=False)``;
:func:`check_safe_to_load` reads all three kinds of pickle here first, so a checkpoint
that passes it holds only allowlisted types by the time megatron-core reads it.

:func:`verify_iteration` lists what is wrong with an iteration directory (missing or
truncated files, unreadable pickles, optionally every tensor read back), one line per
problem naming the file: what ``tools/inspect_checkpoint.py --verify`` prints and what a
failed read reports.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_forge.errors import CheckpointError

COMMON = "common.pt"
METADATA = ".metadata"
"""torch.distributed.checkpoint's index: every tensor's chunks and where they are stored."""
MAX_LISTED = 20
"""Tensor problems listed one by one; a damaged shard file can hold thousands of tensors."""
SAVE_CONFIG = "metadata.json"
"""megatron-core's backend description, written last: a save without it did not finish."""

TRUSTED_TYPES_HINT = (
    "megatron-forge and Megatron-LM checkpoints never need it; get the checkpoint again "
    "from its source, or, if you trust whoever wrote it, load the file yourself with "
    "torch.load(..., weights_only=False) and save it again without that object"
)


class UntrustedTypeError(pickle.UnpicklingError):
    """A pickle names a global that is not on the allowlist."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# The allowlists ---------------------------------------------------------------------------
def _numpy_rng_types() -> list[Any]:
    """What ``numpy.random.get_state()`` pickles into (the RNG states of every rank)."""
    import numpy as np

    types: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    # numpy 1.x writes the numpy.core name, numpy 2.x the numpy._core one.
    types += [
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
    ]
    return types


@functools.cache
def _megatron_types() -> tuple[Any, ...]:
    """megatron-core's list of types safe in checkpoints (argparse.Namespace of
    Megatron-LM's ``args``, its enums and configs). Imported only when a file needs more
    than our own list: importing megatron-core takes seconds."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    return tuple(SAFE_GLOBALS)


@functools.cache
def _metadata_types() -> dict[str, Any]:
    """Fully qualified name -> object, for everything a ``.metadata`` pickle may name."""
    import builtins
    import collections
    import pathlib

    from torch.distributed.checkpoint import metadata, planner
    from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix

    objects: list[Any] = [
        metadata.Metadata,
        metadata.MetadataIndex,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        metadata.StorageMeta,
        metadata._MEM_FORMAT_ENCODING,
        planner.SavePlan,
        planner.LoadPlan,
        planner.WriteItem,
        planner.WriteItemType,
        planner.TensorWriteData,
        planner.ReadItem,
        planner.LoadItemType,
        _StorageInfo,
        _StoragePrefix,  # in the save plans of a save that reused a cached plan
        torch.Size,
        torch.serialization._get_layout,
        collections.OrderedDict,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
    ]
    names = {f"{o.__module__}.{o.__qualname__}": o for o in objects}
    # dtypes, layouts and memory formats are pickled by name as attributes of torch.
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            names[f"torch.{name}"] = value
    for name in ("set", "frozenset", "slice", "complex"):
        names[f"builtins.{name}"] = getattr(builtins, name)
    return names


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the types :func:`_metadata_types` lists; anything else is refused
    before it is looked up, let alone called."""

    def find_class(self, module: str, name: str) -> Any:
        found = _metadata_types().get(f"{module}.{name}")
        if found is None:
            raise UntrustedTypeError(f"{module}.{name}")
        return found


# Safe loads ---------------------------------------------------------------------------------
def _untrusted_global(err: Exception) -> Optional[str]:
    """The global a restricted unpickling refused, if that is why it failed."""
    if isinstance(err, UntrustedTypeError):
        return err.name
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        found = re.search(r"GLOBAL (\S+)", str(err))
        return found.group(1) if found else None
    return None


def describe_error(err: BaseException) -> str:
    """The cause of a failed read in one line. torch.distributed.checkpoint wraps each
    rank's error (with its traceback) in a CheckpointException; torch's weights-only
    message puts the cause after its advice, and its zip reader's after one sentence."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError) and len(lines) > 2:
        lines = lines[-2:]
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(err).__name__}: {first}"[:200]


def read_errors() -> tuple[type[BaseException], ...]:
    """What a read of a damaged shard raises: any Exception, and torch.distributed.
    checkpoint's CheckpointException, which is a BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _refuse(where: str, err: Exception) -> CheckpointError:
    name = _untrusted_global(err)
    if name is not None:
        return CheckpointError(
            f"{where} needs {name} to be unpickled, which is not on the list of types a "
            f"checkpoint may hold: loading it could run code, so it is refused. "
            + TRUSTED_TYPES_HINT
        )
    return CheckpointError(
        f"{where} is truncated or corrupt ({describe_error(err)}); copy it again from where the "
        "checkpoint was written, or use an earlier iteration"
    )


def _weights_only_load(source: Callable[[], Any], types: list[Any]) -> Any:
    # Only the types not allowed already: leaving torch's safe_globals context removes the
    # types it added from the process-wide list, and megatron-core registers its own there
    # at import (argparse.Namespace for Megatron-LM's ``args``), which later loads need.
    registered = torch.serialization.get_safe_globals()
    added = [t for t in types if t not in registered]
    with warnings.catch_warnings(), torch.serialization.safe_globals(added):
        warnings.simplefilter("ignore")
        return torch.load(source(), map_location="cpu", weights_only=True)


def _torch_load_trusted(source: Callable[[], Any], where: str) -> Any:
    """torch.load(weights_only=True) of ``source()`` (a path or a fresh buffer) with our
    allowlist, then (only when that refuses a type) with megatron-core's added; any other
    failure is a broken file."""
    try:
        return _weights_only_load(source, _numpy_rng_types())
    except Exception as err:  # noqa: BLE001 - torch raises many types for a broken file
        if _untrusted_global(err) is None:
            raise _refuse(where, err) from None
        first = err
    try:
        extra = list(_megatron_types())
    except ImportError:  # without megatron-core our own list is all there is
        raise _refuse(where, first) from None
    try:
        return _weights_only_load(source, _numpy_rng_types() + extra)
    except Exception as err:  # noqa: BLE001
        raise _refuse(where, err) from None


def load_common_state(directory: str | Path) -> dict[str, Any]:
    """``common.pt`` of an iteration directory, unpickled with the allowlist.

    A drop-in for megatron-core's ``dist_checkpointing.load_common_state_dict`` (torch
    backend). Raises :class:`CheckpointError` naming the file when it is missing,
    truncated, or needs a type not on the allowlist."""
    path = Path(directory) / COMMON
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {directory} is incomplete or not a torch_dist checkpoint"
        )
    common = _torch_load_trusted(lambda: path, str(path))
    if not isinstance(common, dict):
        raise CheckpointError(f"{path} holds a {type(common).__name__}, not a dict of entries")
    return common


def load_metadata(directory: str | Path) -> Any:
    """torch.distributed.checkpoint's ``.metadata`` of an iteration directory, unpickled
    with the allowlist (torch's own reader uses plain pickle.load)."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(directory) / METADATA
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: no tensors were written, {directory} is not a complete "
            "torch_dist checkpoint"
        )
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise _refuse(str(path), err) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def open_reader(directory: str | Path, metadata: Any = None) -> Any:
    """A torch.distributed.checkpoint FileSystemReader of ``directory`` whose metadata is
    the allowlisted :func:`load_metadata` (read once), for ``dcp.load`` of tensors, which
    torch itself reads with weights_only=True."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = load_metadata(directory) if metadata is None else metadata

    class TrustedMetadataReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    return TrustedMetadataReader(str(directory))


def _object_items(metadata: Any) -> Iterator[tuple[str, Any]]:
    """(key, storage info) of every pickled object (not tensor) stored in the shards."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    objects = {
        key
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, BytesStorageMetadata)
    }
    for index, info in metadata.storage_data.items():
        if index.fqn in objects:
            yield index.fqn, info


def check_sharded_objects(
    directory: str | Path, metadata: Any = None, keys: Optional[set[str]] = None
) -> None:
    """Unpickle, with the allowlist, the objects stored in the ``.distcp`` shards (all of
    them, or those whose key is in ``keys``): RNG states and layers' extra state, which
    megatron-core loads with weights_only=False. Raises :class:`CheckpointError` naming
    the shard file and the object."""
    directory = Path(directory)
    metadata = load_metadata(directory) if metadata is None else metadata
    for key, info in _object_items(metadata):
        if keys is not None and key not in keys:
            continue
        path = directory / info.relative_path
        where = f"{path} (object {key})"
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{where} is stored with transforms {list(info.transform_descriptors)}, "
                "which megatron-forge does not write and cannot check; refusing to load it"
            )
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length:
            raise CheckpointError(f"{where} is truncated: {path} ends inside it")
        _torch_load_trusted(lambda data=data: io.BytesIO(data), where)


def check_safe_to_load(directory: str | Path) -> dict[str, Any]:
    """Every pickle of an iteration directory read with the allowlist (``.metadata``,
    ``common.pt``, the objects in the shards); returns the common state. Call it before
    megatron-core's ``dist_checkpointing.load``, which unpickles the same bytes without
    restriction; raises :class:`CheckpointError` naming the file at fault."""
    metadata = load_metadata(directory)
    common = load_common_state(directory)
    problems = _storage_problems(Path(directory), metadata)
    if problems:
        raise CheckpointError("; ".join(problems))
    check_sharded_objects(directory, metadata)
    return common


# Verification --------------------------------------------------------------------------------
def _storage_problems(directory: Path, metadata: Any) -> list[str]:
    """Shard files the metadata names that are missing, too short, or outside ``directory``."""
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = info.relative_path
        ends[name] = max(ends.get(name, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(ends.items()):
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{directory / METADATA} names {name}, outside the checkpoint")
        elif not path.is_file():
            problems.append(f"{path} missing")
        elif path.stat().st_size < end:
            problems.append(f"{path} is truncated: {path.stat().st_size} bytes, needs {end}")
    return problems


def damaged_files(directory: str | Path, metadata: Any, key: str) -> list[Path]:
    """The shard files holding a chunk of tensor ``key`` that does not load on its own
    (each chunk is a torch.save blob; weights-only, so nothing in it runs); all files
    holding ``key`` when every chunk loads (the failure lies elsewhere)."""
    directory = Path(directory)
    holding, damaged = set(), set()
    for index, info in metadata.storage_data.items():
        if index.fqn != key:
            continue
        holding.add(info.relative_path)
        if info.relative_path in damaged:
            continue
        try:
            with open(directory / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = io.BytesIO(f.read(info.length))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(blob, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any failure marks the file
            damaged.add(info.relative_path)
    return [directory / name for name in sorted(damaged or holding)]


def _tensor_problems(directory: Path, metadata: Any) -> list[str]:
    """Read every tensor back, one at a time, and check it is finite."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = open_reader(directory, metadata)
    problems = []
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        try:
            with warnings.catch_warnings():  # "torch.distributed is disabled"
                warnings.simplefilter("ignore")
                dcp.load({key: tensor}, storage_reader=reader, no_dist=True)
        except read_errors() as err:  # report whatever the file's problem is
            names = ", ".join(map(str, damaged_files(directory, metadata, key)))
            problems.append(f"{key}: unreadable from {names} ({describe_error(err)})")
            continue
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            problems.append(f"{key}: holds NaN or Inf")
    if len(problems) > MAX_LISTED:
        problems[MAX_LISTED:] = [f"... and {len(problems) - MAX_LISTED} more tensors like these"]
    return problems


def verify_iteration(
    directory: str | Path, read_tensors: bool = False, metadata: Any = None
) -> list[str]:
    """What is wrong with one iteration directory, one line per problem naming the file
    (empty when complete and readable): the save finished, ``.metadata`` and
    ``common.pt`` unpickle with the allowlist, every shard file the metadata names exists
    and is long enough, the objects in them unpickle with the allowlist; with
    ``read_tensors``, every tensor reads back finite (one tensor in memory at a time).
    ``metadata``: the directory's :func:`load_metadata`, when already read."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} does not exist"]
    problems = []
    if not (directory / SAVE_CONFIG).is_file():
        problems.append(f"{directory / SAVE_CONFIG} missing: the save did not finish")
    try:
        metadata = load_metadata(directory) if metadata is None else metadata
    except CheckpointError as err:
        return problems + [str(err)]
    storage = _storage_problems(directory, metadata)
    if storage:
        return problems + storage
    for check in (load_common_state, lambda d: check_sharded_objects(d, metadata)):
        try:
            check(directory)
        except CheckpointError as err:
            problems.append(str(err))
        except OSError as err:
            problems.append(f"{directory}: {describe_error(err)}")
    if read_tensors:
        problems += _tensor_problems(directory, metadata)
    return problems
