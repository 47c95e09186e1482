"""The filesystem's semantics, independent of the FUSE binding (fs.py only translates).

Each operation takes the caller (a `Who`), resolves inodes to node kinds through the
namespace, asks access.py where a rule applies, and answers with plain attributes,
open-file objects or domain errors; errors.py maps those to errnos at the FUSE edge. A
refused change is also kept for its caller (refusals.py), who reads why in an xattr.
docs/semantics.md describes what each operation does; this is where it is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from imagefs import manifest as mf
from imagefs.access import Caller, Policy, Who
from imagefs.errors import ImagefsError, ImageNotFound, NotPermitted, ReadOnly
from imagefs.gestures import Gestures
from imagefs.handles import OpenFile, OpenImage, OpenInboxFile, OpenReport
from imagefs.inbox import Inbox
from imagefs.metadata import Metadata
from imagefs.namespace import FolderNode, ImageNode, InboxNode, Namespace, Node, Path
from imagefs.reader import ImageReader

BLOCK = 4096
# Folders whose names mean the same image for every caller who may see it (by-id/: ids;
# public/, community/: every caller lists the same images there, so names match).
_SAME_NAMES = (("by-id",), ("public",), ("community",))


@dataclass(frozen=True)
class Attributes:
    inode: int
    is_dir: bool
    mode: int  # permission bits
    size: int
    mtime_ns: int
    ctime_ns: int
    uid: int
    gid: int
    # May the kernel answer later lookups from its cache? Only if every caller would get
    # this same answer: the kernel's caches are shared by all users of the mount.
    cacheable: bool


@dataclass(frozen=True)
class Space:
    """statfs: image bytes in blocks; free space is what the inbox can still stage."""

    blocks: int
    free: int
    files: int


class Filesystem:
    def __init__(self, namespace: Namespace, policy: Policy, reader: ImageReader,
                 inbox: Inbox, gestures: Gestures, metadata: Metadata,
                 images: Callable[[], dict[str, mf.Manifest]], owner: tuple[int, int]) -> None:
        self.namespace = namespace
        self.policy = policy
        self.reader = reader
        self.inbox = inbox
        self.gestures = gestures
        self.metadata = metadata
        self._images = images
        self._owner = owner  # files show as the mounting user's
        self._started_ns = time.time_ns()
        self._shared_view = not policy.caller_dependent()
        # Images with open handles, by inode: a deleted image reads on through them.
        self._held: dict[int, tuple[int, mf.Manifest]] = {}

    async def who(self, caller: Caller) -> Who:
        """The caller as the rules see it; a database lookup runs in a worker thread."""
        known = self.policy.identified(caller)
        if known is not None:
            return known
        return await trio.to_thread.run_sync(self.policy.identify, caller)

    @contextlib.contextmanager
    def _refusal(self, who: Who, what: str, *folders: Path) -> Iterator[None]:
        """Keep the reason if the change `what` is refused, for the caller to read."""
        try:
            yield
        except ImagefsError as exc:
            self.metadata.refusals.note(who.uid, folders, what, exc)
            raise

    @staticmethod
    def _folders(node: Node) -> tuple[Path, ...]:
        """Where a change to the node shows its refusal: an inbox file's folder, a folder."""
        if isinstance(node, InboxNode):
            return (("inbox", node.entry.record.project),)
        return (node.path,) if isinstance(node, FolderNode) else ()

    # -- attributes ---------------------------------------------------------------------

    def attributes(self, node: Node, parent: tuple[str, ...] | None = None) -> Attributes:
        """A node's attributes; `parent` is the folder it was named in, if any.

        The kernel may cache an entry only if every caller would get the same answer:
        with per-caller views, that is a public or community image named by id or in
        public/ or community/ (docs/access.md has the measurements behind this).
        """
        uid, gid = self._owner
        if isinstance(node, FolderNode):
            return Attributes(node.inode, True, 0o755, 0, self._started_ns, self._started_ns,
                              uid, gid, self._shared_view or node.same_for_everyone)
        if isinstance(node, ImageNode):
            record = node.record
            cacheable = self._shared_view or (
                (parent is None or parent in _SAME_NAMES) and self.policy.everyone_sees(record))
            return Attributes(node.inode, False, 0o644, record.size or 0,
                              record.created_mtime_ns, record.updated_mtime_ns, uid, gid,
                              cacheable)
        entry = node.entry  # an inbox file changes under its writers: never cached
        mode = 0o444 if entry.is_error else entry.record.mode & 0o777
        return Attributes(node.inode, False, mode, entry.apparent_size, entry.record.mtime_ns,
                          entry.record.mtime_ns, uid, gid, False)

    def lookup(self, who: Who, parent_inode: int, name: str) -> Attributes:
        parent = self.namespace.folder(who, parent_inode)
        return self.attributes(self.namespace.lookup(who, parent, name), parent)

    def getattr(self, who: Who, inode: int) -> Attributes:
        try:
            return self.attributes(self.namespace.resolve(who, inode))
        except ImageNotFound:
            held = self._held.get(inode)
            if held is None:
                raise
            # Deleted or hidden, still open: its readers go on; never cached for others.
            return dataclasses.replace(self.attributes(ImageNode(held[1])), cacheable=False)

    async def setattr(self, who: Who, inode: int, handle: OpenFile | None, size: int | None,
                      mode: int | None, mtime_ns: int | None) -> Attributes:
        node = self.namespace.resolve(who, inode)
        with self._refusal(who, "truncate" if size is not None else "chmod or touch",
                           *self._folders(node)):
            if not isinstance(node, InboxNode):
                if size is not None:
                    raise ReadOnly("image data never changes")
                raise NotPermitted("catalog files and folders keep their mode, owner and times")
            entry = node.entry
            self.policy.check_inbox(who, entry.record.project)
            if size is not None:
                fd = handle.fd if isinstance(handle, OpenInboxFile) else None
                await self.inbox.files.truncate(entry, fd, size)
            await self.inbox.files.set_attributes(
                entry, None if mode is None else mode & 0o777, mtime_ns)
        return self.attributes(node)

    # -- folders ------------------------------------------------------------------------

    def listing(self, who: Who, inode: int) -> list[tuple[str, Attributes]]:
        """A folder as the caller sees it, fixed at opendir (readdir has no caller)."""
        path = self.namespace.folder(who, inode)
        entries = self.namespace.listing(who, path) or {}
        listed = []
        for name, entry in sorted(entries.items()):
            try:
                listed.append((name, self.attributes(self.namespace.node_of(who, entry),
                                                     path)))
            except ImageNotFound:  # gone since the listing was computed
                continue
        return listed

    async def mkdir(self, who: Who, parent_inode: int, name: str) -> Attributes:
        parent = self.namespace.folder(who, parent_inode)
        with self._refusal(who, f"mkdir {name}", parent):
            if parent != ("inbox",):
                raise NotPermitted("folders are made by the catalog; only inbox/<project> can "
                                   "be created")
            self.policy.check_inbox(who, name)
            await trio.to_thread.run_sync(self.inbox.add_project, name)
        return self.attributes(self.namespace.lookup(who, ("inbox",), name), ("inbox",))

    # -- files --------------------------------------------------------------------------

    async def open(self, who: Who, inode: int, writable: bool, truncate: bool) -> OpenFile:
        node = self.namespace.resolve(who, inode)
        with self._refusal(who, "open for writing" if writable or truncate else "open",
                           *self._folders(node)):
            return await self._open(who, node, writable, truncate)

    async def _open(self, who: Who, node: Node, writable: bool, truncate: bool) -> OpenFile:
        if isinstance(node, ImageNode):
            if writable or truncate:
                raise ReadOnly("image data never changes; write new images into the inbox")
            self.policy.check_open(who, node.record)
            count = self._held.get(node.inode, (0, node.manifest))[0]
            self._held[node.inode] = (count + 1, node.manifest)
            return OpenImage(self.reader, node.manifest, lambda: self._let_go(node.inode))
        if isinstance(node, InboxNode):
            entry = node.entry
            if writable or truncate:
                self.policy.check_inbox(who, entry.record.project)
            if entry.is_error:
                if writable:
                    raise NotPermitted("upload reports are read-only")
                return OpenReport(entry)
            fd = await self.inbox.files.open(entry, writable, truncate)
            return OpenInboxFile(self.inbox.files, entry, fd, writable)
        raise NotPermitted("folders are not opened as files")

    async def create(self, who: Who, parent_inode: int, name: str,
                     mode: int) -> tuple[OpenFile, Attributes]:
        path = self.namespace.folder(who, parent_inode)
        with self._refusal(who, f"create {name}", path):
            if len(path) != 2 or path[0] != "inbox":
                raise ReadOnly("files are created only in inbox/<project>/")
            self.policy.check_inbox(who, path[1])
            entry = await self.inbox.files.create(path[1], name, mode & 0o777)
            fd = await self.inbox.files.open(entry, True, False)
        return (OpenInboxFile(self.inbox.files, entry, fd, True),
                self.attributes(InboxNode(entry)))

    def _let_go(self, inode: int) -> None:
        count, manifest = self._held[inode]
        if count > 1:
            self._held[inode] = (count - 1, manifest)
        else:
            del self._held[inode]

    # -- gestures -----------------------------------------------------------------------

    async def unlink(self, who: Who, parent_inode: int, name: str) -> None:
        folder = self.namespace.folder(who, parent_inode)
        with self._refusal(who, f"rm {name}", folder):
            await self.gestures.unlink(who, folder, name)

    async def rename(self, who: Who, old_parent: int, old_name: str, new_parent: int,
                     new_name: str) -> None:
        old = self.namespace.folder(who, old_parent)
        new = self.namespace.folder(who, new_parent)
        with self._refusal(who, f"mv {'/'.join(old)}/{old_name} {'/'.join(new)}/{new_name}",
                           old, new):
            await self.gestures.rename(who, old, old_name, new, new_name)

    # -- metadata -----------------------------------------------------------------------

    async def getxattr(self, who: Who, inode: int, key: str) -> bytes:
        return (await self.metadata.get(who, self.namespace.resolve(who, inode), key)).encode()

    def listxattr(self, who: Who, inode: int) -> list[str]:
        return sorted(self.metadata.items(who, self.namespace.resolve(who, inode)))

    async def setxattr(self, who: Who, inode: int, key: str, value: bytes) -> None:
        node = self.namespace.resolve(who, inode)
        with self._refusal(who, f"setfattr -n {key} {_shown(node)}", *self._folders(node)):
            await self.metadata.set(who, node, key, value)

    async def removexattr(self, who: Who, inode: int, key: str) -> None:
        node = self.namespace.resolve(who, inode)
        with self._refusal(who, f"setfattr -x {key} {_shown(node)}", *self._folders(node)):
            await self.metadata.remove(who, node, key)

    def statfs(self, who: Who) -> Space:
        """Image bytes and count; free is what the inbox can still stage.

        With per-caller views a non-admin is told about the images it may list, and a
        fixed free space: the spool's fill level would show it other tenants' uploads.
        """
        images = self._images()
        spool = self.inbox.spool
        if self._shared_view or who.admin:
            counted = list(images.values())
            free = max(spool.limit - spool.used, 0) // BLOCK
        else:
            listed = self.namespace.listing(who, ("by-id",)) or {}
            counted = [images[i] for i in listed if i in images]
            free = spool.limit // BLOCK
        used = sum(-(-(m.record.size or 0) // BLOCK) for m in counted)
        return Space(used + free, free, len(counted))


def _shown(node: Node) -> str:
    """A node as a refusal names it (a setxattr names no path)."""
    if isinstance(node, ImageNode):
        return f"image {node.record.id}"
    if isinstance(node, InboxNode):
        return f"inbox/{node.entry.record.project}/{node.entry.record.name}"
    return "/".join(node.path) or "the mount root"


def file_type(attrs: Attributes) -> int:
    return (stat.S_IFDIR if attrs.is_dir else stat.S_IFREG) | attrs.mode
