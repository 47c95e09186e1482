"""Mountpoints: refusing busy ones, cleaning up stale ones, unmounting with a deadline."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from imagefs.errors import InvalidValue
from imagefs.mountinfo import is_mounted, mount_at

log = logging.getLogger(__name__)
FSTYPE = "fuse.imagefs"


def _alive(path: Path) -> bool:
    """False for a FUSE mount whose daemon died (the kernel answers ENOTCONN).

    statfs, not stat: the kernel answers stat from its attribute cache for a while after
    the daemon died, but always forwards statfs.
    """
    try:
        os.statvfs(path)
        return True
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise


def _unmount(path: Path, lazy: bool) -> str | None:
    """fusermount3 -u (or umount); the reason it failed, or None."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u"] if tool else ["umount"]
    if lazy:
        command.append("-z")
    result = subprocess.run([*command, str(path)], capture_output=True, text=True)
    if not result.returncode:
        return None
    return (result.stderr.strip().splitlines() or ["unmount failed"])[-1]


def check_mountpoint(path: Path) -> None:
    """Refuse a mountpoint that is missing, not a folder, busy or already mounted.

    A stale imagefs mount (its daemon was killed) is cleaned up instead: a restart, by
    hand or by systemd, must not need an operator first.
    """
    try:
        mounted = mount_at(path)
        if mounted is not None:
            if _alive(path):
                raise InvalidValue(f"{path} is already a mountpoint (unmount it first: "
                                   f"imagefs umount {path})")
            if mounted.fstype != FSTYPE:
                raise InvalidValue(f"{path} is a stale {mounted.fstype} mount (its daemon "
                                   f"died); clean it up with: umount -l {path}")
            reason = _unmount(path, lazy=True)
            if reason is not None:
                raise InvalidValue(f"{path} is a stale mount and cleaning it up failed: "
                                   f"{reason}")
            log.warning("cleaned up the stale mount at %s left by a daemon that died", path)
        if not path.is_dir():
            raise InvalidValue(f"mountpoint {path} does not exist or is not a directory "
                               f"(create it: mkdir -p {path})")
        if any(os.scandir(path)):
            raise InvalidValue(f"mountpoint {path} is not empty")
    except OSError as exc:
        raise InvalidValue(f"mountpoint {path}: {exc.strerror}") from None


def umount(mountpoint: Path, lazy: bool = False) -> int:
    """`imagefs umount`: unmount and wait (bounded) for the mount to disappear."""
    if not is_mounted(mountpoint):
        raise InvalidValue(f"{mountpoint} is not mounted")
    reason = _unmount(mountpoint, lazy)
    if reason is not None:
        raise InvalidValue(f"cannot unmount {mountpoint}: {reason} (is a file still open? "
                           "try --lazy)")
    deadline = time.monotonic() + 10
    while is_mounted(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0
