"""One live run per directory: an exclusive advisory lock (``flock``) on ``<dir>/forge.lock``,
held by global rank 0 for the life of the run, with a record of the holder (host, pid,
Slurm job and restart count, start time) to name it when a second run is refused.

A dead holder never blocks: the kernel drops a ``flock`` when its process dies, however
it died (kill -9 included). On shared filesystems a dead node's lock can outlive it for a
while (an NFS lease), so a held lock whose record names a process that is gone (on this
host) or this same Slurm job's previous incarnation (a requeue) counts as stale too.
Forked children (checkpoint writers, data workers) do not keep the lock alive: they close
their copy of the descriptor at fork.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from megatron_forge.checkpointing.ownership import now, slurm_job_id
from megatron_forge.errors import CheckpointError, ForgeError

LOCK_FILE = "forge.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: set[int] = set()
"""Descriptors of the locks this process holds, closed in forked children."""


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def this_process() -> dict[str, Any]:
    """The holder record this process writes."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": slurm_job_id(),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "started": now(),
        "command": " ".join(sys.argv)[:500],
    }


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(holder: dict[str, Any], me: dict[str, Any]) -> Optional[str]:
    """Why a recorded holder is known to be gone, or None when it may still run."""
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        if not pid_alive(holder["pid"]):
            return f"pid {holder['pid']} on {me['host']} is gone"
    if me["job_id"] and holder.get("job_id") == me["job_id"]:
        if int(holder.get("restart", 0)) < me["restart"]:
            return f"it is Slurm job {me['job_id']}'s previous incarnation (before a requeue)"
    return None


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "its holder has not recorded itself yet"
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, started "
        f"{holder.get('started', '?')}"
    )


class DirectoryLock:
    """``acquire`` the lock of ``directory`` (the config field ``field`` names it in
    messages, refusals raise ``error``); ``release`` it at the end of the run."""

    def __init__(
        self, directory: str | Path, field: str, error: type[ForgeError] = CheckpointError
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.field = field
        self.error = error
        self.fd: Optional[int] = None
        self.warning: Optional[str] = None
        """Set when the lock was taken from a stale holder, or the filesystem has no flock."""

    def _read_holder(self) -> dict[str, Any]:
        try:
            data = os.pread(self.fd, 1 << 16, 0)
            holder = json.loads(data) if data.strip() else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict[str, Any], note: str = "") -> ForgeError:
        return self.error(
            f"{self.field}={self.directory} is in use by another run that is still running "
            f"({describe_holder(holder)}; lock {self.path}). Wait for it to end or stop it, "
            f"or point {self.field} at another directory{note}"
        )

    def acquire(self) -> DirectoryLock:
        """Take the lock, or raise naming the live holder. Never blocks on a dead one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        me = this_process()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._read_holder()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                reason = stale_reason(holder, me) if holder else None
                if reason is None:
                    self._close()
                    raise self._refuse(holder, _IF_DEAD.format(self.path)) from None
                self.warning = (
                    f"{self.path} is still locked but its holder ({describe_holder(holder)}) "
                    f"is stale: {reason}; taking it over"
                )
            elif err.errno in _NO_FLOCK:
                reason = stale_reason(holder, me) if holder else "none"
                if holder and reason is None and holder.get("pid") != me["pid"]:
                    self._close()
                    raise self._refuse(holder, _IF_DEAD.format(self.path)) from None
                self.warning = (
                    f"the filesystem of {self.directory} does not support flock; relying on "
                    f"the holder record in {self.path}"
                )
            else:
                self._close()
                raise
        _HELD.add(self.fd)
        self._write(me)
        return self

    def _write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode() if record else b""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def _close(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Clear the record and drop the lock. The file stays: removing it could let two
        runs lock two different files under one name."""
        if self.fd is None:
            return
        try:
            self._write({})
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._close()


_IF_DEAD = ". If that run is dead (its node failed), delete {} and start again"
