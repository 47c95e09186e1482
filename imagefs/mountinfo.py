"""What the kernel says is mounted where: one reader of /proc/self/mountinfo.

Paths in mountinfo escape space, tab, newline and backslash as octal (`\\040`...); a
mountpoint with a space in its name only matches once they are decoded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str = ""  # "major:minor": also the name of the mount's bdi in /sys/class/bdi


def mounts(table: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount, in the kernel's order (a later entry stacks on an earlier one)."""
    entries = []
    with open(table, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                tail = fields.index("-")  # optional fields end at a lone '-'
                entries.append(MountEntry(_unescape(fields[4]), _unescape(fields[tail + 1]),
                                          _unescape(fields[tail + 2]), fields[2]))
            except (ValueError, IndexError):
                continue
    return entries


def mount_at(path: Path | str) -> MountEntry | None:
    """The topmost mount whose mountpoint is `path`, or None if nothing is mounted there."""
    return _topmost(os.path.realpath(path))


def _topmost(target: str) -> MountEntry | None:
    found = None
    for entry in mounts():
        if entry.mountpoint == target:
            found = entry
    return found


def is_mounted(path: Path | str) -> bool:
    return mount_at(path) is not None


def set_read_ahead(resolved: str, size: int) -> bool:
    """Set the kernel's readahead window for the mount at `resolved` (its bdi's
    read_ahead_kb).

    A FUSE mount starts at 128 KiB, so a sequential reader sends 128 KiB requests whatever
    its read size; a larger window means fewer, larger requests (docs/benchmarks.md).
    `resolved` is the mountpoint's real path, taken before mounting: a daemon that does
    not serve its mount yet must not look it up (stat, realpath) itself. False when it
    could not be set (not root, no sysfs); the kernel's default stays then.
    """
    entry = _topmost(resolved)
    if entry is None or not entry.device:
        return False
    try:
        Path("/sys/class/bdi", entry.device, "read_ahead_kb").write_text(f"{size // 1024}\n")
    except OSError:
        return False
    return True
