"""The FUSE edge: pyfuse3 Operations that translate requests for core.Filesystem.

Nothing here decides anything: it turns request contexts into callers, bytes into
names, core attributes into pyfuse3's, open files into handle numbers, and every domain
error into its errno (errors.py, the one table). Every handler is guarded: anything
unexpected is logged with its traceback and answered with EIO, and the mount lives on.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

import pyfuse3

from imagefs.access import Caller, Who
from imagefs.core import BLOCK, Attributes, Filesystem, file_type
from imagefs.errors import ImagefsError, InvalidValue, errno_for, is_routine
from imagefs.handles import OpenFile

log = logging.getLogger(__name__)


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
            if code == errno.EIO:  # a traceback only for what no one raised on purpose
                log.error("%s failed: %s", handler.__name__, exc,
                          exc_info=not isinstance(exc, ImagefsError))
            elif not is_routine(exc):
                log.info("%s refused: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def _name(raw: bytes) -> str:
    """A name from the kernel; invalid UTF-8 arrives as surrogates, refused where stored."""
    return os.fsdecode(raw)


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, core: Filesystem, entry_timeout: float) -> None:
        super().__init__()
        self.core = core
        self._timeout = entry_timeout
        self._handles = itertools.count(1)
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, list[tuple[str, Attributes]]] = {}

    async def _who(self, ctx: pyfuse3.RequestContext) -> Who:
        return await self.core.who(Caller(ctx.uid, ctx.gid, ctx.pid))

    def _entry(self, attrs: Attributes) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attrs.inode
        entry.generation = 0
        entry.entry_timeout = entry.attr_timeout = self._timeout if attrs.cacheable else 0.0
        entry.st_mode = file_type(attrs)
        entry.st_nlink = 2 if attrs.is_dir else 1
        entry.st_uid, entry.st_gid = attrs.uid, attrs.gid
        entry.st_size = attrs.size
        entry.st_blocks = -(-attrs.size // 512)
        entry.st_blksize = 1 << 20  # cp and friends size their buffers by it
        entry.st_atime_ns = entry.st_mtime_ns = attrs.mtime_ns
        entry.st_ctime_ns = attrs.ctime_ns
        return entry

    def _file(self, fh: int) -> OpenFile:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    # -- names and attributes -----------------------------------------------------------

    @guarded
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.core.lookup(await self._who(ctx), parent_inode, _name(name)))

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.core.getattr(await self._who(ctx), inode))

    @guarded
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        handle = self._files.get(fh) if fh is not None else None
        return self._entry(await self.core.setattr(
            await self._who(ctx), inode, handle, attr.st_size if fields.update_size else None,
            attr.st_mode if fields.update_mode else None,
            attr.st_mtime_ns if fields.update_mtime else None))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        """Inodes are derived from paths and ids, so there is no per-inode state to free."""

    # -- folders ------------------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = next(self._handles)
        self._dirs[fh] = self.core.listing(await self._who(ctx), inode)
        return fh

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for position in range(start_id, len(entries)):
            name, attrs = entries[position]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attrs),
                                         position + 1):
                return

    @guarded
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @guarded
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.core.mkdir(await self._who(ctx), parent_inode, _name(name)))

    # -- files --------------------------------------------------------------------------

    def _handle(self, handle: OpenFile) -> pyfuse3.FileInfo:
        fh = next(self._handles)
        self._files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.keep_cache)

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        return self._handle(await self.core.open(await self._who(ctx), inode, writable,
                                                 bool(flags & os.O_TRUNC)))

    @guarded
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        handle, attrs = await self.core.create(await self._who(ctx), parent_inode, _name(name),
                                               mode)
        return self._handle(handle), self._entry(attrs)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._file(fh).read(off, size)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._file(fh).write(off, buf)

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._file(fh).fsync(datasync)

    @guarded
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            await handle.release()

    # -- gestures -----------------------------------------------------------------------

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.core.unlink(await self._who(ctx), parent_inode, _name(name))

    @guarded
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & getattr(pyfuse3, "RENAME_EXCHANGE", 2):
            raise InvalidValue("rename --exchange swaps nothing here")
        await self.core.rename(await self._who(ctx), parent_inode_old, _name(name_old),
                               parent_inode_new, _name(name_new))

    # -- metadata -----------------------------------------------------------------------

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.core.getxattr(await self._who(ctx), inode, _name(name))

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(k) for k in self.core.listxattr(await self._who(ctx), inode)]

    @guarded
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self.core.setxattr(await self._who(ctx), inode, _name(name), value)

    @guarded
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.core.removexattr(await self._who(ctx), inode, _name(name))

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        space = self.core.statfs(await self._who(ctx))
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK
        data.f_blocks = space.blocks
        data.f_bfree = data.f_bavail = space.free
        data.f_files = space.files
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- everything else that would change something ------------------------------------

    async def _not_permitted(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    rmdir = symlink = link = mknod = _not_permitted  # type: ignore[assignment]
