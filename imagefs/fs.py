"""The FUSE edge: pyfuse3 Operations that forward to the namespace and the reader.

Read-only in this version: every change answers EROFS. Every handler is guarded: a
domain error becomes its errno, anything unexpected is logged with its traceback and
answered with EIO, and the mount lives on.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3

from imagefs.access import Caller
from imagefs.errors import errno_for
from imagefs.manifest import Manifest
from imagefs.namespace import Entry, Namespace
from imagefs.reader import ImageReader, Stream
from imagefs.records import ImageRecord

log = logging.getLogger(__name__)

XATTR_PREFIX = "user.glance."
STATS_XATTR = "user.imagefs.stats"
_BLOCK = 4096


def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every failure of a handler into an errno; never let one escape to pyfuse3."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = errno_for(exc)
            if code == errno.EIO:
                log.error("%s failed: %s", handler.__name__, exc,
                          exc_info=not hasattr(exc, "errno"))
            else:
                log.info("%s refused: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid)


@dataclass
class _OpenFile:
    manifest: Manifest
    stream: Stream


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, namespace: Namespace, reader: ImageReader,
                 snapshot_images: Callable[[], dict[str, Manifest]], entry_timeout: float,
                 stats: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.namespace = namespace
        self.reader = reader
        self._images = snapshot_images
        self._stats = stats
        # Caller-dependent views must not be answered from the kernel's shared caches.
        self._timeout = 0.0 if namespace.policy.caller_dependent() else entry_timeout
        self._handles = itertools.count(1)
        self._open_files: dict[int, _OpenFile] = {}
        self._open_dirs: dict[int, list[tuple[str, Entry]]] = {}
        self._started_ns = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()

    # -- attributes ---------------------------------------------------------------------

    def _attrs(self, entry: Entry, record: ImageRecord | None = None) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = entry.inode
        attrs.generation = 0
        attrs.entry_timeout = self._timeout
        attrs.attr_timeout = self._timeout
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_blksize = 128 * 1024
        if entry.is_dir:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
            attrs.st_size = 0
            attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._started_ns
        else:
            assert record is not None
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = record.size or 0
            attrs.st_blocks = -(-attrs.st_size // 512)
            attrs.st_mtime_ns = attrs.st_atime_ns = record.created_mtime_ns
            attrs.st_ctime_ns = record.updated_mtime_ns
        return attrs

    def _record(self, caller: Caller, inode: int) -> ImageRecord:
        record = self.namespace.image_for_inode(caller, inode)
        if record is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return record

    @guarded
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        caller = _caller(ctx)
        path = self.namespace.dir_path(parent_inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry = self.namespace.lookup(caller, path, os.fsdecode(name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        record = None if entry.is_dir else self._record(caller, entry.inode)
        return self._attrs(entry, record)

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        caller = _caller(ctx)
        path = self.namespace.dir_path(inode)
        if path is not None:
            if path and self.namespace.listing(caller, path) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(Entry(inode, path=path))
        record = self._record(caller, inode)
        return self._attrs(Entry(inode, image_id=record.id), record)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        """Inodes are derived from paths and ids, so there is no per-inode state to free."""

    # -- directories --------------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self.namespace.dir_path(inode)
        listing = self.namespace.listing(_caller(ctx), path) if path is not None else None
        if listing is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        handle = next(self._handles)
        # The caller's view is fixed at opendir; readdir has no caller context.
        self._open_dirs[handle] = sorted(listing.items())
        return handle

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._open_dirs.get(fh, [])
        images = self._images()
        for position in range(start_id, len(entries)):
            name, entry = entries[position]
            record = None
            if not entry.is_dir:
                manifest = images.get(entry.image_id or "")
                if manifest is None:
                    continue
                record = manifest.record
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(entry, record),
                                         position + 1):
                return

    @guarded
    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    # -- files --------------------------------------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        record = self._record(_caller(ctx), inode)
        manifest = self._images().get(record.id)
        if manifest is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        handle = next(self._handles)
        self._open_files[handle] = _OpenFile(manifest, Stream())
        # Image data is immutable: the kernel's page cache stays valid across opens.
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._open_files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.reader.read(handle.manifest, off, size, handle.stream)

    @guarded
    async def release(self, fh: int) -> None:
        self._open_files.pop(fh, None)

    # -- metadata -----------------------------------------------------------------------

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        key = os.fsdecode(name)
        if inode == pyfuse3.ROOT_INODE and key == STATS_XATTR:
            return json.dumps(self._stats(), sort_keys=True).encode()
        if self.namespace.dir_path(inode) is not None or not key.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.ENODATA)
        items = self._record(_caller(ctx), inode).metadata_items()
        value = items.get(key[len(XATTR_PREFIX):])
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value.encode("utf-8")

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == pyfuse3.ROOT_INODE:
            return [STATS_XATTR.encode()]
        if self.namespace.dir_path(inode) is not None:
            return []
        items = self._record(_caller(ctx), inode).metadata_items()
        return [f"{XATTR_PREFIX}{key}".encode("utf-8") for key in sorted(items)]

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        images = self._images()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = _BLOCK
        data.f_blocks = sum(-(-(m.record.size or 0) // _BLOCK) for m in images.values())
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(images)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- everything that would change something -----------------------------------------

    async def _read_only(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = _read_only
