"""Inbox uploads: files written into inbox/<project>/ become images.

A file is committed once no writer has it open and it has not changed for `settle_time`
(tools like qemu-img and rsync close and reopen or rename their targets, so "last close"
is not enough). Then the shared pipeline inspects, hashes and uploads it, the manifest is
written last, and the entry leaves the inbox. A rejected file leaves `<name>.error`.
Store failures are retried with backoff; spools survive restarts. A file whose writing
was cut short (a failed write, a daemon that died while it was open) is reported, never
published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from imagefs import manifest as mf
from imagefs.catalog import CatalogStore
from imagefs.errors import (ImageNotFound, InvalidValue, NoSuchAttribute, NotPermitted,
                            QuotaExceeded, StoreUnavailable)
from imagefs.naming import clean_component
from imagefs.pipeline import StagedData, publish, stage_data
from imagefs.records import MUTABLE_FIELDS, ImageRecord, parse_field, validate_project
from imagefs.spool import Spool, SpoolRecord
from imagefs.stream_upload import StreamingStage

log = logging.getLogger(__name__)

_INBOX_BIT = 1 << 59
ERROR_SUFFIX = ".error"
# Fields a file may carry into its image, set as user.glance.* xattrs before the commit.
UPLOAD_FIELDS = MUTABLE_FIELDS | {"disk_format", "container_format"}
_RETRY_FIRST, _RETRY_MAX = 2.0, 300.0
_MAX_ATTEMPTS = 5  # for failures that are not plain unavailability
_RECENT = 1000
MAX_STREAMS = 4  # files staged while being written; others get a full pass at commit
_STREAM_IDLE = 10.0  # a temp name not renamed this long after its last write stops streaming


def never_committed(name: str) -> bool:
    """Temporary names that tools use while writing; they never become images."""
    return name.startswith(".") or name.endswith((".part", ".tmp", "~", ERROR_SUFFIX))


def entry_inode(entry_id: str) -> int:
    digest = hashlib.blake2b(entry_id.encode(), digest_size=8).digest()
    return _INBOX_BIT | (int.from_bytes(digest, "big") & (_INBOX_BIT - 1))


def is_inbox_inode(inode: int) -> bool:
    return inode & ~(_INBOX_BIT - 1) == _INBOX_BIT


@dataclasses.dataclass
class InboxEntry:
    record: SpoolRecord
    size: int = 0  # bytes reserved in the spool: the file's size as its writers made it
    writers: int = 0
    state: str = "settling"
    last_change: float = dataclasses.field(default_factory=time.monotonic)
    not_before: float = 0.0
    attempts: int = 0
    dropped: bool = False
    stream: StreamingStage | None = None  # staging alongside in-order writes

    @property
    def inode(self) -> int:
        return entry_inode(self.record.entry_id)

    @property
    def is_error(self) -> bool:
        return self.record.kind == "error"

    @property
    def status(self) -> str:
        if self.is_error:
            return "failed"
        return "writing" if self.writers else self.state

    def touch(self) -> None:
        self.last_change = time.monotonic()
        self.record.mtime_ns = time.time_ns()


class Inbox:
    """The inbox's entries and their commits.

    Entry bookkeeping happens on the trio thread only (FUSE handlers and the commit
    loop); worker threads do the uploads, unlinks and stream cancellation, and touch
    nothing but the files and records they were handed.
    """

    def __init__(self, spool: Spool, catalog_store: CatalogStore, block_size: int,
                 settle_time: float, on_publish: Callable[[mf.Manifest], None],
                 known_projects: Callable[[], set[str]]) -> None:
        self.spool = spool
        self.catalog_store = catalog_store
        self.block_size = block_size
        self.settle_time = settle_time
        self._on_publish = on_publish
        self._known_projects = known_projects
        self._entries: dict[str, dict[str, InboxEntry]] = {}
        self._by_inode: dict[int, InboxEntry] = {}
        # name -> image id of recent publishes, so `inbox wait` can answer after the fact.
        self._published: dict[str, OrderedDict[str, str]] = {}
        self._upload_limiter = trio.CapacityLimiter(2)
        self._io_limiter = trio.CapacityLimiter(4)
        self.generation = 0
        for record in spool.scan():
            self._resume(record)
        if self._by_inode:
            log.info("inbox: resuming %d entries left by the previous run", len(self._by_inode))

    def _resume(self, record: SpoolRecord) -> None:
        entry = InboxEntry(record, size=self.spool.data_size(record))
        self.spool.claim(entry.size)
        if record.open_for_write:  # the daemon died while a writer had it open
            record.write_error = "the daemon stopped while the file was being written"
            record.open_for_write = False
        self._add(entry)

    # -- the folder view ----------------------------------------------------------------

    def projects(self) -> set[str]:
        return set(self.spool.projects()) | self._known_projects()

    def add_project(self, project: str) -> None:
        validate_project(project)
        self.spool.add_project(project)
        self.generation += 1

    def listing(self, project: str) -> dict[str, InboxEntry]:
        return dict(self._entries.get(project, {}))

    def lookup(self, project: str, name: str) -> InboxEntry | None:
        return self._entries.get(project, {}).get(name)

    def recently_published(self, project: str) -> dict[str, str]:
        return dict(self._published.get(project, {}))

    def by_inode(self, inode: int) -> InboxEntry | None:
        return self._by_inode.get(inode)

    def size(self, entry: InboxEntry) -> int:
        return len(self.error_text(entry)) if entry.is_error else entry.size

    @staticmethod
    def error_text(entry: InboxEntry) -> bytes:
        return entry.record.reason.encode()

    def _add(self, entry: InboxEntry) -> None:
        self._entries.setdefault(entry.record.project, {})[entry.record.name] = entry
        self._by_inode[entry.inode] = entry
        self.generation += 1

    def _drop(self, entry: InboxEntry) -> None:
        folder = self._entries.get(entry.record.project, {})
        if folder.get(entry.record.name) is entry:
            del folder[entry.record.name]
        self._by_inode.pop(entry.inode, None)
        entry.dropped = True
        self.generation += 1

    async def _discard(self, entry: InboxEntry) -> None:
        """Forget an entry: stop its stream, delete its files, release its space."""
        self._drop(entry)
        await self._cancel_stream(entry)
        await trio.to_thread.run_sync(self.spool.remove, entry.record)
        self._release_space(entry)

    def _release_space(self, entry: InboxEntry) -> None:
        self.spool.release(entry.size)
        entry.size = 0  # a writer still holding it open reserves anew; see close_data

    # -- writing ------------------------------------------------------------------------

    async def create(self, project: str, name: str) -> InboxEntry:
        if project not in self.projects():
            raise ImageNotFound(f"no inbox for project {project}")
        if clean_component(name) != name or name.endswith(ERROR_SUFFIX):
            raise InvalidValue(f"{name!r} cannot be an inbox file name")
        old = self.lookup(project, name)
        if old is not None:
            await self.unlink(old)
        entry = InboxEntry(SpoolRecord(str(uuid.uuid4()), project, name))
        await trio.to_thread.run_sync(self._create_files, entry.record)
        self._add(entry)
        return entry

    def _create_files(self, record: SpoolRecord) -> None:
        self.spool.create_data(record)
        self.spool.save(record)

    def check_writable(self, entry: InboxEntry) -> None:
        if entry.is_error:
            raise NotPermitted(f"{entry.record.name} is an upload report; rm it to clear it")
        if entry.state in ("inspecting", "uploading"):
            raise NotPermitted(f"{entry.record.name} is being uploaded; write a new file")

    def open_data(self, entry: InboxEntry, writable: bool, truncate: bool) -> int:
        """An fd on the spool data; counted as a writer only once it is open."""
        if writable or truncate:
            self.check_writable(entry)
        fd = os.open(self.spool.data_path(entry.record), os.O_RDWR)
        try:
            if truncate:
                self.truncate(entry, fd, 0)
        except BaseException:
            os.close(fd)
            raise
        if writable:
            entry.writers += 1
            entry.touch()
            if entry.writers == 1:
                entry.record.open_for_write = True
                self.spool.save(entry.record)
        return fd

    def close_data(self, entry: InboxEntry, fd: int, writable: bool) -> None:
        os.close(fd)
        if not writable:
            return
        entry.writers -= 1
        entry.touch()
        if not entry.writers:
            entry.record.open_for_write = False
            if entry.dropped:
                self._release_space(entry)
            else:
                self.spool.save(entry.record)

    def _note_write_error(self, entry: InboxEntry, exc: Exception) -> None:
        entry.record.write_error = str(exc) if isinstance(exc, QuotaExceeded) else \
            os.strerror(getattr(exc, "errno", 0) or 5)
        if not entry.dropped:
            self.spool.save(entry.record)

    async def write(self, entry: InboxEntry, fd: int, offset: int, data: bytes) -> int:
        end = offset + len(data)
        growth = max(end - entry.size, 0)
        try:
            self.spool.reserve(growth)
        except QuotaExceeded as exc:
            self._note_write_error(entry, exc)
            raise
        entry.size += growth
        if entry.stream is None and offset == 0 and entry.size == growth \
                and not entry.dropped and self._streams < MAX_STREAMS:
            entry.stream = StreamingStage(self.catalog_store.store,
                                          self.spool.data_path(entry.record),
                                          entry.record.entry_id, self.block_size)
        try:
            written = await trio.to_thread.run_sync(os.pwrite, fd, data, offset,
                                                    limiter=self._io_limiter)
        except OSError as exc:
            self._note_write_error(entry, exc)
            raise
        entry.touch()
        if entry.stream is not None:
            entry.stream.source.wrote(offset, written)
        return written

    async def read(self, fd: int, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, fd, size, offset,
                                             limiter=self._io_limiter)

    def truncate(self, entry: InboxEntry, fd: int | None, size: int) -> None:
        self.check_writable(entry)
        if size > entry.size:
            self.spool.reserve(size - entry.size)
        else:
            self.spool.release(entry.size - size)
        if fd is not None:
            os.ftruncate(fd, size)
        else:
            os.truncate(self.spool.data_path(entry.record), size)
        entry.size = size
        if size == 0 and entry.record.write_error:  # rewritten from scratch
            entry.record.write_error = ""
            self.spool.save(entry.record)
        if entry.stream is not None:
            entry.stream.source.resized(size)
        entry.touch()

    @property
    def _streams(self) -> int:
        return sum(1 for e in self._by_inode.values() if e.stream is not None)

    async def _cancel_stream(self, entry: InboxEntry) -> None:
        """Stop the entry's stream and remove what it uploaded (in a worker thread)."""
        stream, entry.stream = entry.stream, None
        if stream is not None:
            await trio.to_thread.run_sync(stream.cancel)

    async def unlink(self, entry: InboxEntry) -> None:
        if entry.state in ("inspecting", "uploading") and not entry.is_error:
            raise NotPermitted(f"{entry.record.name} is being uploaded; wait for it "
                               "(imagefs inbox wait) and delete the image instead")
        await self._discard(entry)

    async def rename(self, entry: InboxEntry, new_project: str, new_name: str) -> None:
        if entry.is_error or new_name.endswith(ERROR_SUFFIX):
            raise NotPermitted("upload reports cannot be renamed")
        self.check_writable(entry)
        if clean_component(new_name) != new_name:
            raise InvalidValue(f"{new_name!r} cannot be an inbox file name")
        if new_project != entry.record.project:
            raise NotPermitted("inbox files cannot move between projects")
        target = self.lookup(new_project, new_name)
        if target is not None and target is not entry:
            await self.unlink(target)
        self._drop(entry)
        entry.dropped = False
        entry.record.name = new_name
        entry.touch()
        self.spool.save(entry.record)
        self._add(entry)

    def set_metadata(self, entry: InboxEntry, key: str, text: str | None) -> None:
        """Set (or with None remove) a Glance field the image will be created with."""
        self.check_writable(entry)
        if text is None:
            if entry.record.metadata.pop(key, None) is None:
                raise NoSuchAttribute(f"{key} is not set")
        else:
            value = parse_field(key, text)
            if key in ImageRecord.__dataclass_fields__ and key not in UPLOAD_FIELDS:
                raise NotPermitted(f"{key} is computed at upload and cannot be set")
            entry.record.metadata[key] = value
        entry.touch()
        self.spool.save(entry.record)

    # -- committing ---------------------------------------------------------------------

    async def run(self) -> None:
        """Commit settled entries, forever; at most two uploads at once."""
        async with trio.open_nursery() as nursery:
            while True:
                now = time.monotonic()
                for entry in list(self._by_inode.values()):
                    if not self._settled(entry, now):
                        continue
                    if entry.record.write_error:
                        entry.state = "failed"
                        nursery.start_soon(self._fail, entry, "a write to it failed ("
                                           f"{entry.record.write_error}), so it is incomplete")
                    elif self._committable(entry, now):
                        entry.state = "inspecting"
                        nursery.start_soon(self._commit, entry)
                    elif entry.stream is not None and \
                            now - entry.last_change >= _STREAM_IDLE:
                        stream, entry.stream = entry.stream, None
                        nursery.start_soon(trio.to_thread.run_sync, stream.cancel)
                await trio.sleep(max(min(self.settle_time / 4, 0.25), 0.05))

    def _settled(self, entry: InboxEntry, now: float) -> bool:
        return (not entry.is_error and entry.state == "settling" and not entry.writers
                and now - entry.last_change >= self.settle_time and now >= entry.not_before)

    def _committable(self, entry: InboxEntry, now: float) -> bool:
        return not never_committed(entry.record.name) and entry.size > 0

    async def _commit(self, entry: InboxEntry) -> None:
        name = f"inbox/{entry.record.project}/{entry.record.name}"
        stream, entry.stream = entry.stream, None
        record = dataclasses.replace(entry.record, metadata=dict(entry.record.metadata))
        try:
            async with self._upload_limiter:
                # Abandoned on shutdown: the spool stays, and the next start resumes it.
                manifest = await trio.to_thread.run_sync(
                    self._upload, record, entry.size, stream, entry, abandon_on_cancel=True)
        except (InvalidValue, NotPermitted) as exc:
            log.warning("%s rejected: %s", name, exc)
            await self._fail(entry, str(exc))
            return
        except Exception as exc:
            entry.attempts += 1
            if not isinstance(exc, StoreUnavailable):
                log.error("%s: upload failed (%r), attempt %d of %d", name, exc,
                          entry.attempts, _MAX_ATTEMPTS, exc_info=not hasattr(exc, "errno"))
                if entry.attempts >= _MAX_ATTEMPTS:
                    await self._fail(entry, f"the upload kept failing: {exc}")
                    return
            delay = min(_RETRY_FIRST * 2 ** (entry.attempts - 1), _RETRY_MAX)
            log.warning("%s: upload failed (%s); retrying in %.0fs (attempt %d)", name, exc,
                        delay, entry.attempts)
            entry.state = "settling"
            entry.not_before = time.monotonic() + delay
            return
        await trio.to_thread.run_sync(self._on_publish, manifest)
        recent = self._published.setdefault(entry.record.project, OrderedDict())
        recent.pop(entry.record.name, None)
        recent[entry.record.name] = manifest.record.id
        while len(recent) > _RECENT:
            recent.popitem(last=False)
        await self._discard(entry)
        stale = self.lookup(entry.record.project, entry.record.name + ERROR_SUFFIX)
        if stale is not None:  # an earlier attempt's report no longer applies
            await self.unlink(stale)
        log.info("%s published as image %s (%s, %d bytes)", name, manifest.record.id,
                 manifest.record.disk_format, manifest.record.size or 0)

    def _upload(self, record: SpoolRecord, size: int, stream: StreamingStage | None,
                entry: InboxEntry) -> mf.Manifest:
        """Blocking: stage (unless the stream did) and publish. Runs in a worker thread."""
        try:  # published by a run that died before cleaning up?
            return self.catalog_store.load(record.entry_id)
        except ImageNotFound:
            pass
        staged: StagedData | None = stream.result(size) if stream is not None else None
        if staged is None:
            trio.from_thread.run_sync(setattr, entry, "state", "uploading")
            with open(self.spool.data_path(record), "rb") as source:
                staged = stage_data(self.catalog_store.store, source, record.entry_id,
                                    self.block_size)
        fields: dict[str, Any] = {"name": record.name, "container_format": "bare"}
        fields.update(record.metadata)
        image = ImageRecord(id=record.entry_id, owner=record.project, status="saving",
                            **{k: v for k, v in fields.items() if k in UPLOAD_FIELDS})
        image.properties = {k: v for k, v in fields.items() if k not in UPLOAD_FIELDS}
        return publish(self.catalog_store.store, image, staged)

    async def _fail(self, entry: InboxEntry, reason: str) -> None:
        """Replace the entry with `<name>.error`, explaining why and what to do.

        The report appears before the entry goes, so a watcher never sees neither.
        """
        name = entry.record.name + ERROR_SUFFIX
        old = self.lookup(entry.record.project, name)
        if old is not None:
            await self._discard(old)
        report = SpoolRecord(str(uuid.uuid4()), entry.record.project, name, kind="error",
                             reason=f"{entry.record.name} was not published: {reason}\n"
                                    "Fix the file and copy it into the inbox again; "
                                    "rm this .error file to clear it.\n")
        await trio.to_thread.run_sync(self.spool.save, report)
        self._add(InboxEntry(report, state="failed"))
        await self._discard(entry)
