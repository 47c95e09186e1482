"""The inbox's write path: creating, writing, truncating, renaming and removing files.

Data goes to the entry's spool file (random writes allowed), space is reserved against
the staging limit before a byte is written, and in-order writes feed a stream that
uploads alongside (streaming.py). File I/O runs in worker threads, never on the trio
thread. A record change is saved to the spool before it shows in memory, so a failed
save leaves the entry as it was; a write error is remembered even when it cannot be
saved, so an incomplete file is never published.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import trio

from imagefs.errors import (ImageNotFound, InvalidValue, NoSuchAttribute, NotPermitted,
                            QuotaExceeded, StagingFull)
from imagefs.inbox.entries import ERROR_SUFFIX, InboxEntry, Registry
from imagefs.inbox.streaming import StreamingStage
from imagefs.naming import MAX_NAME_BYTES, clean_component
from imagefs.quotas import Quotas, Usage
from imagefs.records import MUTABLE_FIELDS, ImageRecord, parse_field
from imagefs.spool import Spool, SpoolRecord
from imagefs.stores import Store

log = logging.getLogger(__name__)

# Fields a file may carry into its image, set as user.glance.* xattrs before the commit.
UPLOAD_FIELDS = MUTABLE_FIELDS | {"disk_format", "container_format"}
MAX_STREAMS = 4  # files staged while being written; others get a full pass at commit
_BUSY_STATES = ("inspecting", "uploading")


def check_name(name: str) -> None:
    """An inbox file name: one clean component of valid UTF-8, not a report's name."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue(f"{name!r} is not valid UTF-8; image names are text") from None
    if clean_component(name) != name or name.endswith(ERROR_SUFFIX):
        raise InvalidValue(f"{name!r} cannot be an inbox file name")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidValue(f"inbox file names are at most {MAX_NAME_BYTES} bytes")


class InboxFiles:
    def __init__(self, spool: Spool, registry: Registry, store: Store, block_size: int,
                 projects: Callable[[], set[str]], quotas: Quotas,
                 stored: Callable[[str], Usage]) -> None:
        """`stored(project)`: what the project's images in the catalog use."""
        self.spool = spool
        self._projects = projects
        self.quotas = quotas
        self._stored = stored
        self.registry = registry
        self.store = store
        self.block_size = block_size
        self._io = trio.CapacityLimiter(4)

    async def _io_call(self, fn, *args: Any) -> Any:  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(fn, *args, limiter=self._io)

    async def _save(self, entry: InboxEntry, then: Callable[[], None] | None = None,
                    **changes: Any) -> None:
        """Persist the record with `changes`, then show them; on failure nothing changes.

        The changes are applied to the live record (not a copy swapped in), so what
        others changed meanwhile (a write's mtime) stays; `then()` runs after that (a
        rename re-files the entry). One save at a time per entry.
        """
        async with entry.save_lock:
            record = dataclasses.replace(entry.record, **changes)
            record.metadata = dict(record.metadata)
            await self._io_call(self.spool.save, record)
            if then is not None:
                self.registry.drop(entry)
            for key, value in changes.items():
                setattr(entry.record, key, value)
            if then is not None:
                then()

    # -- creating and opening -----------------------------------------------------------

    async def create(self, project: str, name: str, mode: int = 0o644) -> InboxEntry:
        if project not in self._projects():
            raise ImageNotFound(f"no inbox for project {project}")
        check_name(name)
        old = self.registry.lookup(project, name)
        if old is not None:
            await self.unlink(old)
        entry = InboxEntry(SpoolRecord(str(uuid.uuid4()), project, name, mode=mode))
        await self._io_call(self.spool.create, entry.record)
        self.registry.add(entry)
        return entry

    def check_writable(self, entry: InboxEntry) -> None:
        if entry.is_error:
            raise NotPermitted(f"{entry.record.name} is an upload report; rm it to clear it")
        if entry.state in _BUSY_STATES:
            raise NotPermitted(f"{entry.record.name} is being uploaded; write a new file")

    async def open(self, entry: InboxEntry, writable: bool, truncate: bool) -> int:
        """An fd on the spool data; counted as a writer only once it is open."""
        if writable or truncate:
            self.check_writable(entry)
        fd = await self._io_call(os.open, self.spool.data_path(entry.record), os.O_RDWR)
        entry.handles += 1
        counted = False
        try:
            if truncate:
                await self.truncate(entry, fd, 0)
            if writable:
                entry.writers += 1
                counted = True
                entry.settle_again()
                if not entry.record.open_for_write:
                    await self._save(entry, open_for_write=True)
        except BaseException:
            if counted:
                entry.writers -= 1
            self.registry.closed(entry)
            await self._io_call(os.close, fd)
            raise
        return fd

    async def close(self, entry: InboxEntry, fd: int, writable: bool) -> None:
        self.registry.closed(entry)
        if not writable:
            await self._io_call(os.close, fd)
            return
        entry.writers -= 1  # counted at once: the closer's next getxattr must see it
        entry.settle_again()
        try:
            if not entry.writers and not entry.dropped:
                # "Closed" in the spool must mean the bytes are on disk: after a power
                # loss, a file recorded as closed is published as it stands.
                await self._io_call(os.fsync, fd)
        except OSError as exc:
            await self._note_write_error(entry, os.strerror(exc.errno or 5))
        finally:
            await self._io_call(os.close, fd)
        if entry.writers:
            return
        if entry.dropped:
            self.release_space(entry)
            return
        try:
            await self._save(entry, open_for_write=False)
        except OSError as exc:  # still open on disk: a crash now would report it torn
            log.warning("inbox/%s/%s: could not note its close in the spool (%s)",
                        entry.record.project, entry.record.name, exc)
            entry.record.open_for_write = False

    # -- data ---------------------------------------------------------------------------

    def _check_quota(self, entry: InboxEntry, growth: int) -> None:
        """Staged files count as the images they are about to become."""
        project = entry.record.project
        if growth <= 0 or not self.quotas.limits(project):
            return
        staged = [e for e in self.registry.listing(project).values() if not e.is_error]
        pending = Usage(sum(1 for e in staged if e.size), sum(e.size for e in staged),
                        sum(e.size for e in staged))
        self.quotas.check(project, self._stored(project) + pending,
                          Usage(0 if entry.size else 1, growth, growth))

    def _reserve_to(self, entry: InboxEntry, size: int) -> None:
        """Hold staging space for `size` bytes of the entry, or raise (nothing held).

        Growing the file must fit the project's quotas. Unlinked files still open hold
        their space too: their data stays on disk until the last handle closes.
        """
        if size > entry.size:
            self._check_quota(entry, size - entry.size)
        if size > entry.reserved:
            self.spool.reserve(size - entry.reserved)
        else:
            self.spool.release(entry.reserved - size)
        entry.reserved = size

    async def write(self, entry: InboxEntry, fd: int, offset: int, data: bytes) -> int:
        size = max(offset + len(data), entry.size)
        try:
            self._reserve_to(entry, size)
        except (StagingFull, QuotaExceeded) as exc:
            await self._note_write_error(entry, str(exc))
            raise
        if entry.stream is None and offset == 0 and entry.size == 0 \
                and not entry.dropped and self.registry.streams() < MAX_STREAMS:
            entry.stream = StreamingStage(self.store, self.spool.data_path(entry.record),
                                          entry.record.entry_id, self.block_size)
        entry.size = size
        try:
            written = await self._io_call(os.pwrite, fd, data, offset)
        except OSError as exc:
            await self._note_write_error(entry, os.strerror(exc.errno or 5))
            raise
        entry.touch()
        if entry.stream is not None:
            entry.stream.source.wrote(offset, written)
        return written

    async def _note_write_error(self, entry: InboxEntry, reason: str) -> None:
        """Remember that the file is incomplete: in memory always, on disk if it can."""
        if entry.dropped:
            return
        try:
            await self._save(entry, write_error=reason)
        except OSError:
            entry.record.write_error = reason

    async def read(self, fd: int, offset: int, size: int) -> bytes:
        return await self._io_call(os.pread, fd, size, offset)

    async def truncate(self, entry: InboxEntry, fd: int | None, size: int) -> None:
        self.check_writable(entry)
        held = entry.reserved
        if size > held:  # growing: the space is held before the file grows
            self._reserve_to(entry, size)
        try:
            if fd is not None:
                await self._io_call(os.ftruncate, fd, size)
            else:
                await self._io_call(os.truncate, self.spool.data_path(entry.record), size)
        except BaseException:
            self._reserve_to(entry, held)
            raise
        entry.size = size
        self._reserve_to(entry, size)  # shrinking: the space goes back
        if entry.stream is not None:
            entry.stream.source.resized(size)
        entry.touch()
        if size == 0 and entry.record.write_error:  # rewritten from scratch
            await self._save(entry, write_error="")

    def release_space(self, entry: InboxEntry) -> None:
        self._reserve_to(entry, 0)  # a writer still holding it open reserves anew

    # -- names and metadata -------------------------------------------------------------

    async def set_attributes(self, entry: InboxEntry, mode: int | None,
                             mtime_ns: int | None) -> None:
        """chmod and utimes: kept in the spool, shown in the listing (images are 0644)."""
        changes: dict[str, Any] = {k: v for k, v in (("mode", mode), ("mtime_ns", mtime_ns))
                                   if v is not None}
        if changes:
            await self._save(entry, **changes)
            entry.settle_again()

    async def set_metadata(self, entry: InboxEntry, key: str, text: str | None,
                           allowed: Callable[[object], None] = lambda value: None) -> None:
        """Set (or with None remove) a Glance field the image will be created with.

        `allowed(value)` raises if the caller may not publish with that value.
        """
        self.check_writable(entry)
        metadata = dict(entry.record.metadata)
        if text is None:
            if metadata.pop(key, None) is None:
                raise NoSuchAttribute(f"{key} is not set")
        else:
            value = parse_field(key, text)
            if key in ImageRecord.__dataclass_fields__ and key not in UPLOAD_FIELDS:
                raise NotPermitted(f"{key} is computed at upload and cannot be set")
            allowed(value)
            metadata[key] = value
        await self._save(entry, metadata=metadata)
        entry.touch()

    async def rename(self, entry: InboxEntry, new_project: str, new_name: str) -> None:
        if entry.is_error or new_name.endswith(ERROR_SUFFIX):
            raise NotPermitted("upload reports cannot be renamed")
        self.check_writable(entry)
        check_name(new_name)
        if new_project != entry.record.project:
            raise NotPermitted("inbox files cannot move between projects")
        target = self.registry.lookup(new_project, new_name)
        if target is not None and target is not entry:
            self.check_writable(target)  # rename(2) over a file being uploaded: refused

        def refile() -> None:
            entry.dropped = False
            entry.settle_again()
            self.registry.add(entry)

        # Saved under the new name first, and newest: if the daemon dies before the
        # replaced file is removed, the next start keeps the newer of the two.
        await self._save(entry, refile, name=new_name, mtime_ns=time.time_ns())
        if target is not None and target is not entry:
            await self.discard(target)

    # -- removing -----------------------------------------------------------------------

    async def unlink(self, entry: InboxEntry) -> None:
        """rm of an inbox file; refused while it is being uploaded."""
        if entry.state in _BUSY_STATES and not entry.is_error:
            raise NotPermitted(f"{entry.record.name} is being uploaded; wait for it "
                               "(imagefs inbox wait) and delete the image instead")
        await self.cancel_stream(entry)
        await self._io_call(self.spool.remove, entry.record)  # fails: the entry stays
        self._forget(entry)

    async def discard(self, entry: InboxEntry) -> None:
        """Forget an entry whose job is done (published, reported); never raises.

        Files that cannot be removed now are found again at the next start, where a
        published entry is recognised and cleaned up.
        """
        self._forget(entry)
        try:
            await self.cancel_stream(entry)
            await self._io_call(self.spool.remove, entry.record)
        except Exception as exc:
            log.warning("inbox/%s/%s: could not remove its spool files (%s); they are "
                        "cleaned up at the next start", entry.record.project,
                        entry.record.name, exc)

    def _forget(self, entry: InboxEntry) -> None:
        self.registry.drop(entry)
        self.release_space(entry)

    async def cancel_stream(self, entry: InboxEntry) -> None:
        """Stop the entry's stream and remove what it uploaded (in a worker thread)."""
        stream, entry.stream = entry.stream, None
        if stream is not None:
            await trio.to_thread.run_sync(stream.cancel)
