"""The inbox's staging area on local disk: one data file and one metadata file per entry.

    <spool>/<project>/<entry id>.data    the bytes written so far (random writes allowed)
    <spool>/<project>/<entry id>.meta    msgpack: name, metadata set by xattr, mode, times
    <spool>/<project>/<entry id>.error   msgpack: name, reason (a rejected upload)

Everything needed to finish or report an upload after a crash is on disk here, so a
restarted daemon picks up where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack

from imagefs.errors import InvalidValue, StagingFull

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SpoolRecord:
    """What the .meta file holds; `kind` is 'upload' or 'error'."""

    entry_id: str
    project: str
    name: str
    kind: str = "upload"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    mode: int = 0o644
    mtime_ns: int = dataclasses.field(default_factory=time.time_ns)
    reason: str = ""
    # Set while a writer has the file open: a crash then leaves a torn file, not an upload.
    open_for_write: bool = False
    # Why a write failed (ENOSPC...); such a file is reported, never published.
    write_error: str = ""


class Spool:
    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.stat().st_mode & stat.S_IWOTH and any(root.iterdir()):
            raise InvalidValue(f"spool dir {root} is shared: writable by everyone and not "
                               "empty (like /tmp); give imagefs a directory of its own")
        root.chmod(0o700)  # staged uploads of every project: the daemon's alone
        self._lock = threading.Lock()
        self.used = 0  # bytes reserved by entries (their sizes); scan() does not count
        # Known once at start and kept up to date, so listings never scan the disk.
        self._projects = {p.name for p in root.iterdir() if p.is_dir()}

    def project_dir(self, project: str) -> Path:
        return self.root / project

    def data_path(self, record: SpoolRecord) -> Path:
        return self.root / record.project / f"{record.entry_id}.data"

    def _meta_path(self, record: SpoolRecord) -> Path:
        suffix = "error" if record.kind == "error" else "meta"
        return self.root / record.project / f"{record.entry_id}.{suffix}"

    def projects(self) -> set[str]:
        with self._lock:
            return set(self._projects)

    def add_project(self, project: str) -> None:
        """Blocking (mkdir)."""
        self.project_dir(project).mkdir(mode=0o700, exist_ok=True)
        with self._lock:
            self._projects.add(project)

    def save(self, record: SpoolRecord) -> None:
        """Write the metadata file atomically (temp + rename)."""
        path = self._meta_path(record)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.new")
        tmp.write_bytes(msgpack.packb(dataclasses.asdict(record)))
        os.replace(tmp, path)

    def create(self, record: SpoolRecord) -> None:
        """An empty data file and its metadata (blocking)."""
        self.add_project(record.project)
        self.data_path(record).touch()
        self.save(record)

    def remove(self, record: SpoolRecord) -> None:
        """Delete the entry's files (blocking: a large file takes a while to unlink)."""
        for path in (self.data_path(record), self._meta_path(record)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def reserve(self, delta: int) -> None:
        """Account `delta` more staged bytes, or raise StagingFull (ENOSPC)."""
        with self._lock:
            if delta > 0 and self.used + delta > self.limit:
                raise StagingFull(f"inbox staging area is full ({self.used} of {self.limit} "
                                    "bytes); wait for uploads to finish or raise spool_size")
            self.used += delta

    def claim(self, size: int) -> None:
        """Account bytes already on disk (entries found at start), whatever the limit."""
        with self._lock:
            self.used += size

    def release(self, size: int) -> None:
        with self._lock:
            self.used = max(self.used - size, 0)

    def scan(self) -> list[SpoolRecord]:
        """Every entry left on disk (by a previous run); damaged metadata is set aside.

        Leftovers of saves and creates that a crash cut short are removed.
        """
        found = []
        for project in sorted(self._projects):
            paths = sorted(self.project_dir(project).iterdir())
            # Entry ids with a .meta (or a damaged one, kept with its data for inspection).
            described = {p.name.partition(".")[0] for p in paths
                         if p.name.partition(".")[2].startswith("meta")}
            for path in paths:
                if path.suffix == ".new" or (path.suffix == ".data"
                                             and path.name.partition(".")[0] not in described):
                    log.info("removing %s, left by a save or create cut short", path)
                    path.unlink(missing_ok=True)
                if path.suffix not in (".meta", ".error"):
                    continue
                try:
                    fields = msgpack.unpackb(path.read_bytes())
                    record = SpoolRecord(**fields)
                except Exception as exc:
                    log.error("spool file %s is damaged (%s); moved aside", path, exc)
                    path.rename(path.with_suffix(path.suffix + ".damaged"))
                    continue
                if record.kind == "upload" and not self.data_path(record).exists():
                    path.unlink()
                    continue
                found.append(record)
        return found

    def data_size(self, record: SpoolRecord) -> int:
        try:
            return self.data_path(record).stat().st_size
        except FileNotFoundError:
            return 0
