"""The inbox's entries: one per file in inbox/<project>/, and the registry that finds them.

Touched on the trio thread only (FUSE handlers and the committer); worker threads get
the records and files they need and hand results back.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict

import trio

from imagefs.inbox.streaming import StreamingStage
from imagefs.inodes import inbox_inode
from imagefs.naming import is_temporary
from imagefs.spool import SpoolRecord

ERROR_SUFFIX = ".error"
# What an entry's status says (user.imagefs.status): settling -> inspecting ->
# uploading -> gone, or failed; writing while a writer has it open.
STATES = ("writing", "settling", "inspecting", "uploading", "failed")
_RECENT = 1000  # recent publishes remembered per project, for `imagefs inbox wait`


def never_committed(name: str) -> bool:
    """Temporary names that tools use while writing; they never become images."""
    return is_temporary(name) or name.endswith(ERROR_SUFFIX)


@dataclasses.dataclass
class InboxEntry:
    record: SpoolRecord
    size: int = 0  # the file's size, as its writers made it
    reserved: int = 0  # bytes of staging space held for it (0 once it is done with)
    writers: int = 0
    state: str = "settling"  # settling -> inspecting -> uploading -> gone, or failed
    last_change: float = dataclasses.field(default_factory=time.monotonic)
    not_before: float = 0.0  # a retried upload waits until then
    attempts: int = 0
    dropped: bool = False  # unlinked, renamed over or published; open handles may remain
    stream: StreamingStage | None = None  # staging alongside in-order writes
    handles: int = 0  # open file handles, readers and writers
    # Record saves run in threads; one at a time per entry, each on top of the last.
    save_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)

    @property
    def inode(self) -> int:
        return inbox_inode(self.record.entry_id)

    @property
    def is_error(self) -> bool:
        return self.record.kind == "error"

    @property
    def status(self) -> str:
        if self.is_error:
            return "failed"
        return "writing" if self.writers else self.state

    @property
    def report(self) -> bytes:
        """What an .error file reads as."""
        return self.record.reason.encode()

    @property
    def apparent_size(self) -> int:
        return len(self.report) if self.is_error else self.size

    def touch(self) -> None:
        """The data or metadata changed: a new mtime, and the settle time starts again."""
        self.settle_again()
        self.record.mtime_ns = time.time_ns()

    def settle_again(self) -> None:
        """Opened or closed: the settle time starts again, the mtime stays the last write's."""
        self.last_change = time.monotonic()


class Registry:
    """Entries by folder and name, and by inode; `generation` moves on every change."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[str, InboxEntry]] = {}
        self._by_inode: dict[int, InboxEntry] = {}
        # Unlinked or renamed over while open: gone from the folder, still there for the
        # handles open on it (as on a local filesystem), until the last one closes.
        self._detached: dict[int, InboxEntry] = {}
        self._published: dict[str, OrderedDict[str, str]] = {}
        self.generation = 0

    def add(self, entry: InboxEntry) -> None:
        self._by_name.setdefault(entry.record.project, {})[entry.record.name] = entry
        self._by_inode[entry.inode] = entry
        self._detached.pop(entry.inode, None)
        self.generation += 1

    def drop(self, entry: InboxEntry) -> None:
        folder = self._by_name.get(entry.record.project, {})
        if folder.get(entry.record.name) is entry:
            del folder[entry.record.name]
        if self._by_inode.get(entry.inode) is entry:
            del self._by_inode[entry.inode]
            if entry.handles:
                self._detached[entry.inode] = entry
        entry.dropped = True
        self.generation += 1

    def closed(self, entry: InboxEntry) -> None:
        """A handle on the entry closed; a detached entry goes with its last handle."""
        entry.handles -= 1
        if not entry.handles and self._detached.get(entry.inode) is entry:
            del self._detached[entry.inode]

    def lookup(self, project: str, name: str) -> InboxEntry | None:
        return self._by_name.get(project, {}).get(name)

    def listing(self, project: str) -> dict[str, InboxEntry]:
        return dict(self._by_name.get(project, {}))

    def by_inode(self, inode: int) -> InboxEntry | None:
        return self._by_inode.get(inode) or self._detached.get(inode)

    def all(self) -> list[InboxEntry]:
        return list(self._by_inode.values())

    def streams(self) -> int:
        return sum(1 for e in self._by_inode.values() if e.stream is not None)

    def note_published(self, project: str, name: str, image_id: str) -> None:
        recent = self._published.setdefault(project, OrderedDict())
        recent.pop(name, None)
        recent[name] = image_id
        while len(recent) > _RECENT:
            recent.popitem(last=False)

    def recently_published(self, project: str) -> dict[str, str]:
        return dict(self._published.get(project, {}))
