"""Inbox uploads: files written into inbox/<project>/ become images.

    entries.py    the entries and the registry that finds them (by folder, by inode)
    files.py      the write path: create, write, truncate, rename, rm, staging quota
    streaming.py  uploading a file while it is written in order
    committer.py  when a file is committed, and what a failure becomes

Everything needed to finish or report an upload after a crash is in the spool
(spool.py), so a restarted daemon picks up where the killed one stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from imagefs import manifest as mf
from imagefs.catalog_store import CatalogStore
from imagefs.inbox.committer import Committer
from imagefs.inbox.entries import ERROR_SUFFIX, InboxEntry, Registry, never_committed
from imagefs.inbox.files import InboxFiles
from imagefs.quotas import Quotas, Usage
from imagefs.records import validate_project
from imagefs.spool import Spool, SpoolRecord

__all__ = ["ERROR_SUFFIX", "Inbox", "InboxEntry", "never_committed"]
log = logging.getLogger(__name__)


class Inbox:
    """The inbox's parts, wired together; also the folder view the namespace reads."""

    def __init__(self, spool: Spool, catalog_store: CatalogStore, block_size: int,
                 settle_time: float, on_publish: Callable[[mf.Manifest], None],
                 known_projects: Callable[[], set[str]], quotas: Quotas,
                 stored: Callable[[str], Usage]) -> None:
        """`stored(project)`: what the project's images in the catalog count (quotas)."""
        self.spool = spool
        self.registry = Registry()
        self.files = InboxFiles(spool, self.registry, catalog_store.store, block_size,
                                self.projects, quotas, stored)
        self.committer = Committer(self.registry, self.files, spool, catalog_store,
                                   block_size, settle_time, on_publish, quotas, stored)
        self._known_projects = known_projects
        for record in sorted(spool.scan(), key=lambda r: r.mtime_ns):
            self._resume(record)
        if self.registry.all():
            log.info("inbox: resuming %d entries left by the previous run",
                     len(self.registry.all()))

    def _resume(self, record: SpoolRecord) -> None:
        """Take up an entry left by the previous run (called oldest first).

        Two entries under one name mean a rename over a file was cut short: the newer
        (the renamed one) wins, as the rename would have made it.
        """
        older = self.registry.lookup(record.project, record.name)
        if older is not None:
            log.info("inbox/%s/%s: a rename over it was cut short; finishing it",
                     record.project, record.name)
            self.registry.drop(older)
            self.spool.remove(older.record)
            self.spool.release(older.reserved)
        size = self.spool.data_size(record)
        entry = InboxEntry(record, size=size, reserved=size)
        self.spool.claim(size)
        if record.open_for_write:  # the daemon died while a writer had it open
            record.write_error = "the daemon stopped while the file was being written"
            record.open_for_write = False
        self.registry.add(entry)

    async def run(self) -> None:
        await self.committer.run()

    # -- the folder view (namespace.InboxView) ------------------------------------------

    @property
    def generation(self) -> int:
        return self.registry.generation

    def projects(self) -> set[str]:
        return self.spool.projects() | self._known_projects()

    def listing(self, project: str) -> dict[str, InboxEntry]:
        return self.registry.listing(project)

    def by_inode(self, inode: int) -> InboxEntry | None:
        return self.registry.by_inode(inode)

    def add_project(self, project: str) -> None:
        """Blocking (mkdir): run in a worker thread."""
        validate_project(project)
        self.spool.add_project(project)
        self.registry.generation += 1
