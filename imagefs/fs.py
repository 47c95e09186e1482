"""The FUSE edge: pyfuse3 Operations that forward to the namespace, reader and inbox.

Image data is read-only; writes happen only in inbox/<project>/, and metadata changes
are gestures (rm, mv, setfattr) mapped to catalog operations. Every handler is guarded:
a domain error becomes its errno, anything unexpected is logged with its traceback and
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
import trio

from imagefs import xattrs
from imagefs.access import Caller
from imagefs.errors import NotPermitted, errno_for
from imagefs.gestures import Gestures
from imagefs.inbox import Inbox, InboxEntry
from imagefs.inodes import image_inode, is_inbox_inode
from imagefs.manifest import Manifest
from imagefs.namespace import Entry, Namespace
from imagefs.reader import ImageReader, Stream
from imagefs.records import ImageRecord, json_text

log = logging.getLogger(__name__)

XATTR_PREFIX = xattrs.GLANCE_PREFIX
_BLOCK = 4096


def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every failure of a handler into an errno; never let one escape to pyfuse3."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:  # local disk trouble in the inbox spool: ENOSPC, EIO...
            log.warning("%s failed: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
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
class _ImageHandle:
    manifest: Manifest
    stream: Stream


@dataclass
class _InboxHandle:
    entry: InboxEntry
    fd: int | None  # None for an .error report, served from memory
    writable: bool


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, namespace: Namespace, reader: ImageReader, inbox: Inbox,
                 gestures: Gestures, snapshot_images: Callable[[], dict[str, Manifest]],
                 entry_timeout: float, stats: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.namespace = namespace
        self.reader = reader
        self.inbox = inbox
        self._images = snapshot_images
        self._stats = stats
        self.gestures = gestures
        # Caller-dependent views must not be answered from the kernel's shared caches.
        self._timeout = 0.0 if namespace.policy.caller_dependent() else entry_timeout
        self._handles = itertools.count(1)
        self._open: dict[int, _ImageHandle | _InboxHandle] = {}
        # Images with open handles, by inode: a deleted image reads on through them.
        self._opened: dict[int, tuple[int, Manifest]] = {}
        self._open_dirs: dict[int, list[tuple[str, Entry]]] = {}
        self._started_ns = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()

    # -- who may change things ----------------------------------------------------------

    def _require_admin(self, ctx: pyfuse3.RequestContext) -> Caller:
        """Until per-caller access control lands: root and the mounting user only."""
        caller = _caller(ctx)
        if caller.uid not in (0, self._uid):
            raise pyfuse3.FUSEError(errno.EACCES)
        return caller

    # -- attributes ---------------------------------------------------------------------

    def _base_attrs(self, inode: int, timeout: float) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = attrs.attr_timeout = timeout
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_blksize = 1 << 20  # cp and friends size their buffers by it
        attrs.st_nlink = 1
        return attrs

    def _dir_attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = self._base_attrs(inode, self._timeout)
        attrs.st_mode = stat.S_IFDIR | 0o755
        attrs.st_nlink = 2
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._started_ns
        return attrs

    def _image_attrs(self, record: ImageRecord) -> pyfuse3.EntryAttributes:
        attrs = self._base_attrs(image_inode(record.id), self._timeout)
        # 0644 so the mounting user may setfattr; opening for writing still answers EROFS.
        attrs.st_mode = stat.S_IFREG | 0o644
        attrs.st_size = record.size or 0
        attrs.st_blocks = -(-attrs.st_size // 512)
        attrs.st_mtime_ns = attrs.st_atime_ns = record.created_mtime_ns
        attrs.st_ctime_ns = record.updated_mtime_ns
        return attrs

    def _inbox_attrs(self, entry: InboxEntry) -> pyfuse3.EntryAttributes:
        attrs = self._base_attrs(entry.inode, 0.0)  # changes under writers: never cached
        attrs.st_mode = stat.S_IFREG | (0o444 if entry.is_error else entry.record.mode & 0o777)
        attrs.st_size = entry.apparent_size
        attrs.st_blocks = -(-attrs.st_size // 512)
        attrs.st_mtime_ns = attrs.st_atime_ns = attrs.st_ctime_ns = entry.record.mtime_ns
        return attrs

    def _attrs_of(self, caller: Caller, inode: int) -> pyfuse3.EntryAttributes:
        path = self.namespace.dir_path(inode)
        if path is not None:
            if path and self.namespace.listing(caller, path) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_attrs(inode)
        if is_inbox_inode(inode):
            return self._inbox_attrs(self._inbox_entry(inode))
        return self._image_attrs(self._record(caller, inode))

    def _record(self, caller: Caller, inode: int) -> ImageRecord:
        record = self.namespace.image_for_inode(caller, inode)
        if record is None and inode in self._opened:  # deleted, still open: reads go on
            record = self._opened[inode][1].record
        if record is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return record

    def _inbox_entry(self, inode: int) -> InboxEntry:
        entry = self.inbox.registry.by_inode(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _folder(self, inode: int) -> tuple[str, ...]:
        path = self.namespace.dir_path(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    @guarded
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        caller = _caller(ctx)
        entry = self.namespace.lookup(caller, self._folder(parent_inode), os.fsdecode(name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs_of(caller, entry.inode)

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs_of(_caller(ctx), inode)

    @guarded
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._require_admin(ctx)
        if not is_inbox_inode(inode):
            if fields.update_size:
                raise pyfuse3.FUSEError(errno.EROFS)
            raise NotPermitted("catalog files keep their mode, owner and times")
        entry = self._inbox_entry(inode)
        if fields.update_size:
            handle = self._open.get(fh) if fh is not None else None
            fd = handle.fd if isinstance(handle, _InboxHandle) else None
            await self.inbox.files.truncate(entry, fd, attr.st_size)
        await self.inbox.files.set_attributes(
            entry, attr.st_mode & 0o777 if fields.update_mode else None,
            attr.st_mtime_ns if fields.update_mtime else None)
        return self._inbox_attrs(entry)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        """Inodes are derived from paths and ids, so there is no per-inode state to free."""

    # -- directories --------------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        listing = self.namespace.listing(_caller(ctx), self._folder(inode))
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
            if entry.is_dir:
                attrs = self._dir_attrs(entry.inode)
            elif entry.image_id is not None:
                manifest = images.get(entry.image_id)
                if manifest is None:
                    continue
                attrs = self._image_attrs(manifest.record)
            else:
                inbox_entry = self.inbox.registry.by_inode(entry.inode)
                if inbox_entry is None:
                    continue
                attrs = self._inbox_attrs(inbox_entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, position + 1):
                return

    @guarded
    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    @guarded
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._require_admin(ctx)
        if self._folder(parent_inode) != ("inbox",):
            raise NotPermitted("folders are made by the catalog; only inbox/<project> "
                               "can be created")
        project = os.fsdecode(name)
        await trio.to_thread.run_sync(self.inbox.add_project, project)
        entry = self.namespace.lookup(_caller(ctx), ("inbox",), project)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return self._dir_attrs(entry.inode)

    # -- files --------------------------------------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if is_inbox_inode(inode):
            entry = self._inbox_entry(inode)
            if writable or flags & os.O_TRUNC:
                self._require_admin(ctx)
            if entry.is_error:
                if writable:
                    raise NotPermitted("upload reports are read-only")
                return self._new_handle(_InboxHandle(entry, None, False))
            fd = await self.inbox.files.open(entry, writable, bool(flags & os.O_TRUNC))
            return self._new_handle(_InboxHandle(entry, fd, writable))
        if writable or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        record = self._record(_caller(ctx), inode)
        manifest = self._images().get(record.id)
        if manifest is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        count = self._opened.get(inode, (0, manifest))[0]
        self._opened[inode] = (count + 1, manifest)
        # Image data is immutable: the kernel's page cache stays valid across opens.
        return self._new_handle(_ImageHandle(manifest, Stream()), keep_cache=True)

    def _new_handle(self, handle: _ImageHandle | _InboxHandle,
                    keep_cache: bool = False) -> pyfuse3.FileInfo:
        fh = next(self._handles)
        self._open[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @guarded
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        self._require_admin(ctx)
        path = self._folder(parent_inode)
        if len(path) != 2 or path[0] != "inbox":
            raise pyfuse3.FUSEError(errno.EROFS)
        entry = await self.inbox.files.create(path[1], os.fsdecode(name), mode & 0o777)
        fd = await self.inbox.files.open(entry, True, False)
        return self._new_handle(_InboxHandle(entry, fd, True)), self._inbox_attrs(entry)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._open.get(fh)
        if isinstance(handle, _ImageHandle):
            return await self.reader.read(handle.manifest, off, size, handle.stream)
        if isinstance(handle, _InboxHandle):
            if handle.fd is None:
                return handle.entry.report[off:off + size]
            return await self.inbox.files.read(handle.fd, off, size)
        raise pyfuse3.FUSEError(errno.EBADF)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._open.get(fh)
        if not isinstance(handle, _InboxHandle) or handle.fd is None or not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.inbox.files.write(handle.entry, handle.fd, off, buf)

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._open.get(fh)
        if isinstance(handle, _InboxHandle) and handle.fd is not None:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, handle.fd)

    @guarded
    async def release(self, fh: int) -> None:
        handle = self._open.pop(fh, None)
        if isinstance(handle, _ImageHandle):
            inode = image_inode(handle.manifest.record.id)
            count, manifest = self._opened[inode]
            if count > 1:
                self._opened[inode] = (count - 1, manifest)
            else:
                del self._opened[inode]
        if isinstance(handle, _InboxHandle) and handle.fd is not None:
            await self.inbox.files.close(handle.entry, handle.fd, handle.writable)

    # -- gestures -----------------------------------------------------------------------

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        caller = self._require_admin(ctx)
        await self.gestures.unlink(caller, self._folder(parent_inode), os.fsdecode(name))

    @guarded
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        caller = self._require_admin(ctx)
        if flags & getattr(pyfuse3, "RENAME_EXCHANGE", 2):
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self.gestures.rename(caller, self._folder(parent_inode_old),
                                   os.fsdecode(name_old), self._folder(parent_inode_new),
                                   os.fsdecode(name_new))

    # -- metadata -----------------------------------------------------------------------

    def _inbox_xattrs(self, entry: InboxEntry) -> dict[str, str]:
        items = {xattrs.STATUS: entry.status}
        if not entry.is_error:
            items[xattrs.IMAGE_ID] = entry.record.entry_id
        items.update({f"{XATTR_PREFIX}{k}": json_text(v)
                      for k, v in entry.record.metadata.items()})
        return items

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        key = os.fsdecode(name)
        if inode == pyfuse3.ROOT_INODE and key == xattrs.STATS:
            return json.dumps(self._stats(), sort_keys=True).encode()
        folder = self.namespace.dir_path(inode)
        if is_inbox_inode(inode):
            value = self._inbox_xattrs(self._inbox_entry(inode)).get(key)
        elif folder is not None and folder[:1] == ("inbox",) and len(folder) == 2 \
                and key == xattrs.PUBLISHED:
            value = json.dumps(self.inbox.registry.recently_published(folder[1]),
                               sort_keys=True)
        elif folder is not None or not key.startswith(XATTR_PREFIX):
            value = None
        else:
            items = self._record(_caller(ctx), inode).metadata_items()
            value = items.get(key[len(XATTR_PREFIX):])
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value.encode("utf-8")

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == pyfuse3.ROOT_INODE:
            return [xattrs.STATS.encode()]
        if is_inbox_inode(inode):
            return [k.encode() for k in sorted(self._inbox_xattrs(self._inbox_entry(inode)))]
        if self.namespace.dir_path(inode) is not None:
            return []
        items = self._record(_caller(ctx), inode).metadata_items()
        return [f"{XATTR_PREFIX}{key}".encode("utf-8") for key in sorted(items)]

    def _glance_key(self, name: bytes) -> str:
        key = os.fsdecode(name)
        if not key.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        return key[len(XATTR_PREFIX):]

    @guarded
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        caller = self._require_admin(ctx)
        key = self._glance_key(name)
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if is_inbox_inode(inode):
            await self.inbox.files.set_metadata(self._inbox_entry(inode), key, text)
            return
        if self.namespace.dir_path(inode) is not None:
            raise NotPermitted("folders carry no metadata")
        await self.gestures.set_field(self._record(caller, inode), key, text)

    @guarded
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        caller = self._require_admin(ctx)
        key = self._glance_key(name)
        if is_inbox_inode(inode):
            await self.inbox.files.set_metadata(self._inbox_entry(inode), key, None)
            return
        if self.namespace.dir_path(inode) is not None:
            raise NotPermitted("folders carry no metadata")
        await self.gestures.remove_field(self._record(caller, inode), key)

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        images = self._images()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = _BLOCK
        data.f_blocks = sum(-(-(m.record.size or 0) // _BLOCK) for m in images.values())
        free = max(self.inbox.spool.limit - self.inbox.spool.used, 0) // _BLOCK
        data.f_blocks += free
        data.f_bfree = data.f_bavail = free  # room left in the inbox's staging area
        data.f_files = len(images)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- everything else that would change something ------------------------------------

    async def _not_permitted(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    rmdir = symlink = link = mknod = _not_permitted
