"""Read back what W&B wrote to a run's ``.wandb`` file, decoded with wandb's own protobuf.

wandb 0.31 writes the file from its Go core and no longer ships the Python reader
(``wandb.sdk.internal.datastore``). The file is a leveldb log (header ``:W&B``, magic
0xBEE1, 32 KiB blocks of checksummed FULL/FIRST/MIDDLE/LAST chunks); the framing is undone
here, checksums included, and each record is parsed as ``wandb_internal_pb2.Record``,
the message ``wandb sync`` uploads.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32 of type + data, length, type
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:  # block trailer: zero padding
            pos += left_in_block
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):
            pos += left_in_block
            continue
        body = data[pos + CHUNK.size : pos + CHUNK.size + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at {pos}"
        pos += CHUNK.size + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    out = []
    for payload in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        out.append(record)
    return out


def run_file(run_dir: Path) -> Path:
    (path,) = run_dir.glob("run-*.wandb")
    return path


def run_info(run_dir: Path) -> wandb_internal_pb2.RunRecord:
    return next(r.run for r in records(run_file(run_dir)) if r.WhichOneof("record_type") == "run")


def history(run_dir: Path) -> dict[int, dict[str, Any]]:
    """History rows by W&B step: {step: {"train/loss": ..., ...}}."""
    rows: dict[int, dict[str, Any]] = {}
    for record in records(run_file(run_dir)):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


def config(run_dir: Path) -> dict[str, Any]:
    """The run's config: the init record plus later config updates."""
    values: dict[str, Any] = {}
    for record in records(run_file(run_dir)):
        kind = record.WhichOneof("record_type")
        update = record.run.config.update if kind == "run" else None
        if kind == "config":
            update = record.config.update
        for item in update or []:
            values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values
