"""One daemon per cache dir (and spool dir): an flock held for the daemon's lifetime.

Two daemons on one cache dir would each treat the other's open uploads as torn and
discard them. The lock file says who holds it, so the refusal can name the other mount.
The kernel drops an flock when its holder dies, so a killed daemon never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from imagefs.errors import InvalidValue

LOCK_NAME = "imagefs.lock"


class DirLock:
    def __init__(self, directory: Path, purpose: str) -> None:
        self.path = directory / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self, holder: str) -> None:
        """Take the lock or raise InvalidValue naming the daemon that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InvalidValue(f"{self.purpose} {self.path.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another daemon"
            os.close(fd)
            raise InvalidValue(
                f"{self.purpose} {self.path.parent} is in use by {other}; give this mount "
                "its own (--cache-dir DIR, spool_dir in the config)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"imagefs pid {os.getpid()} ({holder})\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
