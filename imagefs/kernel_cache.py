"""Telling the kernel what the catalog changed, so no cached entry outlives its truth.

The kernel keeps an entry for `entry_timeout` only where every caller gets the same
answer (core.py): everywhere when all callers share one view (no [access] table), else
`by-id/<id>` and the names in `public/` and `community/`. When the catalog changes under
those — a rename, a delete, an image made private, on this host or another — the
entries that changed are invalidated at once instead of living out their timeout, and
so are the cached attributes of every image that changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyfuse3
import trio

from imagefs.catalog import Snapshot
from imagefs.inodes import dir_inode, image_inode

log = logging.getLogger(__name__)
_POLL = 0.1  # seconds between looks at the catalog's generation
Names = Callable[[Snapshot], dict[tuple[int, str], int]]


def stale_entries(old: Snapshot, new: Snapshot, names: Names
                  ) -> tuple[list[tuple[int, str]], list[int]]:
    """(parent inode, name) of cached entries that changed, and inodes whose attributes did."""
    before, after = names(old), names(new)
    entries = [key for key in before.keys() | after.keys() if before.get(key) != after.get(key)]
    changed = [i for i in old.images.keys() | new.images.keys()
               if old.record(i) != new.record(i)]
    entries += [(dir_inode(("by-id",)), image_id) for image_id in changed]
    return entries, [image_inode(i) for i in changed]


class KernelCache:
    def __init__(self, snapshot: Callable[[], Snapshot], names: Names) -> None:
        """`names`: the entries the kernel may cache in a snapshot (Namespace.kernel_cached)."""
        self._snapshot = snapshot
        self._names = names

    async def run(self) -> None:
        """Watch the catalog; invalidate what each change made stale (runs forever)."""
        last = self._snapshot()
        while True:
            await trio.sleep(_POLL)
            current = self._snapshot()
            if current.generation == last.generation:
                continue
            entries, inodes = await trio.to_thread.run_sync(stale_entries, last, current,
                                                            self._names)
            last = current
            for parent, name in entries:
                pyfuse3.invalidate_entry_async(parent, name.encode("utf-8", "surrogateescape"),
                                               ignore_enoent=True)
            for inode in inodes:
                await trio.to_thread.run_sync(_forget_attributes, inode)


def _forget_attributes(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError:  # the kernel does not know the inode: nothing cached
        pass
