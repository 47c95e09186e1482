"""A read-only passthrough FUSE filesystem, to play a network share that can hang.

    python tests/passthroughfs.py SOURCE MOUNTPOINT

Stop it with SIGSTOP and every access to MOUNTPOINT blocks, as on a hard NFS mount
whose server went away; SIGCONT brings it back. Tests put a file:// store behind it.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self._paths = {pyfuse3.ROOT_INODE: source}
        self._inodes = {source: pyfuse3.ROOT_INODE}

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        inode = self._inodes.setdefault(path, st.st_ino + 1)
        self._paths[inode] = path
        attrs = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
                      "st_mtime_ns", "st_ctime_ns"):
            setattr(attrs, field, getattr(st, field))
        attrs.st_ino = inode
        attrs.st_blksize, attrs.st_blocks = 4096, st.st_blocks
        attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(inode))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path = self._path(fh)
        names = sorted(os.listdir(path))
        for index in range(start_id, len(names)):
            full = os.path.join(path, names[index])
            try:
                attrs = self._attrs(full)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attrs, index + 1):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        path = self._path(inode)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=os.open(path, os.O_RDONLY))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data


def main() -> None:
    source, mountpoint = sys.argv[1:3]
    pyfuse3.init(Passthrough(os.path.abspath(source)), mountpoint,
                 {"fsname=passthroughfs", "ro", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
