"""One writer per run directory: an exclusive ``fcntl.flock`` on ``DIR/.metaprox.lock``, held while a process
writes the directory (``train``, ``--resume``, ``--auto-resume``, ``eval`` writing its files).

The operating system releases the lock when its holder exits in any way, SIGKILL included, so a lock file left by
a dead process never blocks: the next writer takes it over at once. The lock file is never removed while a run
directory exists (removing it would let two writers lock two different files); it holds the holder's PID, host
and command line, which the refusal names. Under torchrun only rank 0 writes, so only rank 0 locks; an elastic
restart's new rank 0 takes the lock over from the dead one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from metaprox.checkpoint import remove_leftovers
from metaprox.errors import UserError

__all__ = ["LOCK_NAME", "RunDirectoryBusy", "RunLock", "run_lock"]

LOCK_NAME = ".metaprox.lock"


class RunDirectoryBusy(UserError):
    """Another live process holds the run directory's lock."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (it has not written its PID yet)"
    host = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    cmd = f" ({info['command']})" if info.get("command") else ""
    return f"process {info['pid']}{host}{cmd}"


class RunLock:
    """The exclusive lock of one run directory, taken in ``__init__`` (created if needed); :meth:`release` it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"{str(self.run_dir)!r} is a file, not a run directory; choose another --out.")
        self.created = not self.run_dir.exists()
        self.path = self.run_dir / LOCK_NAME
        while True:  # retry if the file we locked was replaced in between (then it is not the lock any more)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunDirectoryBusy(
                    f"run directory {str(self.run_dir)!r} is in use by {holder}; wait for it to finish (or stop "
                    f"it), or choose another --out.") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(["metaprox", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        remove_leftovers(self.run_dir)  # what a killed writer left: temporaries, uncommitted tensors files

    def release(self) -> None:
        """Unlock; a directory this lock created and nothing else wrote into is removed again."""
        if self.fd < 0:
            return
        try:
            if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                self.run_dir.rmdir()
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


@contextmanager
def run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[RunLock | None]:
    """Hold ``run_dir``'s lock for the ``with`` block (nothing when ``enabled`` is False: a torchrun rank > 0)."""
    if not enabled:
        yield None
        return
    lock = RunLock(run_dir)
    try:
        yield lock
    finally:
        lock.release()
