#!/usr/bin/env python3
"""Python FUSE's own ceiling: one read-only file served from memory by pyfuse3 and trio.

No cache, no checksums, no store: every read is a memoryview of one buffer. What fio gets
from it is the most any pyfuse3 filesystem can answer on this machine, which is what the
read engine's per-request figures are compared with (docs/benchmarks.md).

    .venv/bin/python benchmarks/ceiling_fs.py MOUNTPOINT [--size 1G]
    fio --name=r --filename=MOUNTPOINT/file --rw=randread --bs=4k --direct=1 ...
"""

from __future__ import annotations

import argparse
import errno
import os
import stat

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"file"


class CeilingFS(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.data = memoryview(os.urandom(1 << 20) * (size >> 20))

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE \
            else (stat.S_IFREG | 0o444)
        attrs.st_size = 0 if inode == pyfuse3.ROOT_INODE else len(self.data)
        attrs.attr_timeout = attrs.entry_timeout = 3600
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(self, parent: int, name: bytes,
                     ctx: pyfuse3.RequestContext = None) -> pyfuse3.EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attrs(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        return self.data[off:off + size]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mountpoint")
    p.add_argument("--size", type=int, default=1 << 30, help="file size in bytes (default 1 GiB)")
    a = p.parse_args()
    pyfuse3.init(CeilingFS(a.size), a.mountpoint, {"fsname=ceiling", "ro", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
