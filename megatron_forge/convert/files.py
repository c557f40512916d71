"""Output directories written all-or-nothing, and streaming safetensors files.

The safetensors writer is given every tensor's name, shape and dtype up front, writes the
header first and then each tensor's bytes as it arrives, so a conversion holds one
tensor at a time, not a shard. The reader reads one tensor's byte range with plain file
I/O (no mmap), so what it read is freed with the tensor and never lingers in the RSS.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from megatron_forge.errors import ConvertError

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes (decimal units as in HF)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    upper = text.strip().upper()
    for suffix, factor in units.items():
        if upper.endswith(suffix):
            return int(float(upper[: -len(suffix)]) * factor)
    if upper.endswith("B"):
        upper = upper[:-1]
    try:
        return int(upper)
    except ValueError:
        raise ConvertError(f"size {text!r} must look like 5GB, 500MB or a byte count") from None


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_freed_memory() -> None:
    """Hand memory freed by the last tensors back to the OS (glibc's malloc_trim).

    Tensors of a few MB come from malloc's heap, which glibc does not shrink on its own;
    without this a conversion's RSS creeps up by fragments of already-freed tensors."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# Output directories -------------------------------------------------------------------------
def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless overwriting was asked for."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConvertError(
            f"{out_dir} is not empty; pass --overwrite to replace it, or choose a new directory"
        )


RUN_FILES = ("config.yaml", "metrics.jsonl")
"""What megatron_forge.train writes into logging.dir: their presence marks a run directory."""
MAX_SCANNED = 20_000
"""Entries looked at under an output directory before refusing to replace it unseen."""


def run_directory(ckpt_root: str | Path) -> Optional[Path]:
    """The run a checkpoint root belongs to: its parent, when that holds a run's files
    (RUN_FILES; e.g. runs/NAME/ of runs/NAME/checkpoints); None otherwise."""
    parent = Path(os.path.abspath(ckpt_root)).parent
    return parent if any((parent / name).is_file() for name in RUN_FILES) else None


def _spellings(path: str | Path) -> set[Path]:
    """The path as given (absolute, '..' folded) and with symlinks resolved: a check that
    holds for both cannot be bypassed by a link or a relative path."""
    return {Path(os.path.abspath(path)), Path(path).resolve()}


def _relation(out_dir: str | Path, other: str | Path) -> Optional[str]:
    """How ``out_dir`` overlaps ``other``: 'is', 'lies inside' or 'contains'; else None."""
    for out in _spellings(out_dir):
        for path in _spellings(other):
            if out == path:
                return "is"
            if path in out.parents:
                return "lies inside"
            if out in path.parents:
                return "contains"
    return None


def _training_work(out_dir: Path, depth: int = 3) -> Optional[str]:
    """A training checkpoint (iter_N with N > 0) or run (metrics.jsonl) under ``out_dir``,
    ``depth`` levels down at most (runs/NAME/checkpoints/iter_N from runs/): what
    replacing ``out_dir`` would lose that no conversion can recreate. Links are not
    followed (deleting a directory removes the link, not its target)."""
    level, seen = [out_dir], 0
    for _ in range(depth):
        below = []
        for directory in level:
            try:
                entries = list(os.scandir(directory))
            except OSError as err:
                return f"{directory}, which cannot be listed ({err.strerror})"
            for entry in entries:
                seen += 1
                if seen > MAX_SCANNED:
                    return f"more than {MAX_SCANNED} files and directories (not all checked)"
                suffix = entry.name[len("iter_") :]
                if entry.is_dir(follow_symlinks=False):
                    if entry.name.startswith("iter_") and suffix.isdigit() and int(suffix):
                        return f"the checkpoint {entry.path}"
                    below.append(Path(entry.path))
                elif entry.name == "metrics.jsonl":
                    return f"the run metrics {entry.path}"
        level = below
    return None


def check_output(
    out_dir: str | Path, source: str | Path, overwrite: bool, source_kind: str = "checkpoint"
) -> None:
    """Refuse, before anything is read or written, an output that would destroy what a
    conversion cannot recreate, then (:func:`check_output_dir`) a non-empty one without
    ``overwrite``:

    - ``out_dir`` that is ``source`` (the checkpoint root or Hugging Face directory being
      converted), lies inside it or contains it: always, ``--overwrite`` or not;
    - ``out_dir`` that is or contains the run directory of the checkpoint (see
      :func:`run_directory`), and with ``--overwrite`` an existing ``out_dir`` inside that
      run which is not an earlier export (an export holds config.json);
    - with ``--overwrite``, an ``out_dir`` holding a training checkpoint or a run's metrics.

    Paths are compared as given and with symlinks resolved."""
    run = run_directory(source) if source_kind == "checkpoint" else None
    if run is not None and _relation(out_dir, run) in ("is", "contains"):
        raise ConvertError(
            f"output {out_dir} {_relation(out_dir, run)} the run directory {run} of the "
            f"checkpoint {source}; replacing it would delete the run and its checkpoints. "
            "Choose an output directory outside the run"
        )
    relation = _relation(out_dir, source)
    if relation is not None:
        harm = {
            "is": f"writing there would replace the {source_kind} being read",
            "contains": f"replacing it would delete the {source_kind} being read",
            "lies inside": f"the output would be mixed into the {source_kind} being read",
        }[relation]
        raise ConvertError(
            f"output {out_dir} {relation} the {source_kind} directory {source} being "
            f"converted; {harm}. Choose an output directory outside {source}"
        )
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    if not (out.is_dir() and any(out.iterdir())):
        return  # nothing there would be replaced
    if run is not None and _relation(out, run) == "lies inside":
        if not (out / "config.json").is_file():
            raise ConvertError(
                f"--overwrite would replace {out}, which lies inside the run directory {run} "
                "of the checkpoint and is not an earlier export (it holds no config.json). "
                f"Choose a new output directory, or remove {out} yourself if you mean to"
            )
    found = _training_work(out)
    if found is not None:
        raise ConvertError(
            f"--overwrite would delete {out}, which holds {found}; a conversion replaces "
            "only exports. Choose another output directory, or remove it yourself if you "
            "mean to"
        )


@contextlib.contextmanager
def staged_output(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir`` that becomes ``out_dir`` only when the
    block finishes, so an interrupted conversion never leaves a directory that looks
    complete. An existing ``out_dir`` (with ``overwrite``) is replaced at that moment."""
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConvertError(f"{path} is not valid JSON: {err}") from None


# Safetensors ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape and dtype, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsFileWriter:
    """One safetensors file whose header is fixed by ``specs``; each tensor is written
    whole, or row by row along its first axis (e.g. one expert at a time), in any order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: Optional[dict] = None):
        self.path = path
        self.specs = {spec.name: spec for spec in specs}
        self._begin: dict[str, int] = {}
        self._rows_written: dict[str, set[int]] = {spec.name: set() for spec in specs}
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.num_bytes],
            }
            self._begin[spec.name] = offset
            offset += spec.num_bytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors does
        self._data_start = 8 + len(raw)
        self._file: Optional[BinaryIO] = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor, row: Optional[int] = None) -> None:
        """Write tensor ``name`` whole, or its row ``row`` (``tensor`` = ``name[row]``)."""
        spec = self.specs.get(name)
        if spec is None:
            raise RuntimeError(f"{self.path.name}: {name} is not in the planned header")
        shape = spec.shape if row is None else spec.shape[1:]
        if tuple(tensor.shape) != shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"{name}: planned {shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        rows = range((spec.shape or (1,))[0]) if row is None else [row]
        if self._rows_written[name] & set(rows):
            raise RuntimeError(f"{self.path.name}: {name} written twice")
        self._rows_written[name].update(rows)
        offset = self._begin[name]
        if row is not None:
            offset += row * (spec.num_bytes // spec.shape[0])
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(data.numpy()))

    def close(self) -> None:
        """Close the file; raise if any planned tensor (or row) was never written."""
        if self._file is not None:
            self._file.close()
            self._file = None
        missing = [
            n for n, s in self.specs.items() if len(self._rows_written[n]) != (s.shape or (1,))[0]
        ]
        if missing:
            raise RuntimeError(f"{self.path.name}: never received {missing[:3]}")


class ShardedSafetensorsWriter:
    """Hugging Face's sharded layout: model-0000i-of-0000n.safetensors files of at most
    ``max_shard_bytes`` each (a larger tensor gets its own), and model.safetensors.index.json."""

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.num_bytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.num_bytes
        total = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.shards = shards
        self.file_of = {s.name: i for i, shard in enumerate(shards) for s in shard}
        self.total_size = sum(s.num_bytes for s in specs)
        self._open: dict[int, SafetensorsFileWriter] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index = self.file_of[name]
        if index not in self._open:
            path = self.out_dir / self.files[index]
            self._open[index] = SafetensorsFileWriter(path, self.shards[index])
        self._open[index].write(name, tensor)

    def close(self) -> None:
        for index in range(len(self.shards)):
            if index not in self._open:
                raise RuntimeError(f"{self.files[index]} was never written")
            self._open[index].close()
        weight_map = {name: self.files[i] for name, i in self.file_of.items()}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        write_json(self.out_dir / "model.safetensors.index.json", index)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConvertError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ConvertError(f"{path} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["data_start"] = 8 + length
    return header


class SafetensorsReader:
    """The tensors of a Hugging Face directory (one file or sharded with an index), read
    one at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(read_json(index).get("weight_map", {}).values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise ConvertError(
                f"{directory} holds no *.safetensors weights (PyTorch .bin files are not "
                "read; re-save the model with safe_serialization)"
            )
        self.entries: dict[str, tuple[Path, dict[str, Any]]] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ConvertError(f"{index} names {name}, which does not exist")
            for tensor_name, entry in read_safetensors_header(path).items():
                self.entries[tensor_name] = (path, entry)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name][1]["dtype"]
        if code not in TORCH_DTYPES:
            raise ConvertError(f"{name}: safetensors dtype {code} is not supported")
        return TORCH_DTYPES[code]

    def read(self, name: str) -> torch.Tensor:
        path, entry = self.entries[name]
        return read_safetensors_tensor(path, name, entry)


def read_safetensors_tensor(path: Path, name: str, entry: dict[str, Any]) -> torch.Tensor:
    """Tensor ``name`` of the safetensors file ``path``, from its header ``entry`` (see
    :func:`read_safetensors_header`), with plain file I/O."""
    begin, end = entry["data_offsets"]
    if entry["dtype"] not in TORCH_DTYPES:
        raise ConvertError(f"{name}: safetensors dtype {entry['dtype']} is not supported")
    dtype, shape = TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"])
    buffer = bytearray(end - begin)
    with open(path, "rb") as f:
        f.seek(entry["data_start"] + begin)
        if f.readinto(buffer) != len(buffer):
            raise ConvertError(f"{path}: truncated data for {name}")
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
