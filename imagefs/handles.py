"""What an open file is: an image, an inbox file, or an upload report.

The access decision is made at open (pyfuse3 passes no caller to read or write) and the
handle carries it: whatever a handle allows was allowed to the caller who opened it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

from imagefs import manifest as mf
from imagefs.errors import BadHandle
from imagefs.inbox import InboxEntry
from imagefs.inbox.files import InboxFiles
from imagefs.reader import ImageReader, Stream

log = logging.getLogger(__name__)
CACHE_WRITE_WAIT = 30.0  # seconds an fsync of an image waits for its chunks to be cached


class OpenFile:
    """Reads by default; subclasses that may write say so."""

    keep_cache = False  # may the kernel keep its page cache of the file across opens?

    async def read(self, offset: int, size: int) -> bytes:
        raise BadHandle("not open for reading")

    async def write(self, offset: int, data: bytes) -> int:
        raise BadHandle("not open for writing")

    async def fsync(self, datasync: bool) -> None:
        return None

    async def release(self) -> None:
        return None


class OpenImage(OpenFile):
    keep_cache = True  # image data never changes

    def __init__(self, reader: ImageReader, manifest: mf.Manifest,
                 on_release: Callable[[], None]) -> None:
        self.reader = reader
        self.manifest = manifest
        self.geometry = reader.geometry(manifest)
        self.stream = Stream()  # this open's read pattern, for prefetch
        self._on_release = on_release

    async def read(self, offset: int, size: int) -> bytes:
        return await self.reader.read(self.geometry, offset, size, self.stream)

    async def fsync(self, datasync: bool) -> None:
        """Return once the chunks read so far are in the LMDB cache, not just fetched.

        `imagefs cache warm` relies on it. Cache writes happen behind the reads; a mount
        too busy to get through them in time answers anyway (every call has a deadline).
        """
        with trio.move_on_after(CACHE_WRITE_WAIT) as waited:
            await self.reader.drain()
        if waited.cancelled_caught:
            log.warning("fsync of image %s: chunks still being cached after %gs",
                        self.manifest.record.id, CACHE_WRITE_WAIT)

    async def release(self) -> None:
        self._on_release()


class OpenReport(OpenFile):
    """An .error file: its text lives in memory (and in the spool's record)."""

    def __init__(self, entry: InboxEntry) -> None:
        self.entry = entry

    async def read(self, offset: int, size: int) -> bytes:
        return self.entry.report[offset:offset + size]


class OpenInboxFile(OpenFile):
    def __init__(self, files: InboxFiles, entry: InboxEntry, fd: int, writable: bool) -> None:
        self.files = files
        self.entry = entry
        self.fd = fd
        self.writable = writable

    async def read(self, offset: int, size: int) -> bytes:
        return await self.files.read(self.fd, offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            await super().write(offset, data)
        return await self.files.write(self.entry, self.fd, offset, data)

    async def fsync(self, datasync: bool) -> None:
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, self.fd)

    async def release(self) -> None:
        await self.files.close(self.entry, self.fd, self.writable)
