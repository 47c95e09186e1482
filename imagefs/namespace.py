"""Path <-> image, per caller: what each folder of the mount holds (ARCHITECTURE.md).

Pure logic over a catalog snapshot, with no FUSE in it. Folder contents are computed
for a caller's view and cached per (catalog generation, view key, folder).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from imagefs.access import AccessPolicy, Caller
from imagefs.catalog import Snapshot
from imagefs.inodes import ROOT_INODE, dir_inode, image_inode
from imagefs.naming import assign_names, clean_component
from imagefs.records import ImageRecord

Path = tuple[str, ...]

TOP_FOLDERS = ("by-id", "community", "inbox", "projects", "public", "tags")
VISIBILITY_FOLDERS = ("private", "shared", "community", "public")
MEMBER_FOLDERS = {"shared-with-me": "accepted", "invitations": "pending"}
PROJECT_FOLDERS = VISIBILITY_FOLDERS + tuple(MEMBER_FOLDERS)


@dataclass(frozen=True)
class Entry:
    """A folder (path set), an image file (image_id set) or an inbox file (neither)."""

    inode: int
    path: Path | None = None
    image_id: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.path is not None


def _dir(path: Path) -> Entry:
    return Entry(dir_inode(path), path=path)


def _file(image: ImageRecord) -> Entry:
    return Entry(image_inode(image.id), image_id=image.id)


class InboxView(Protocol):
    @property
    def generation(self) -> int: ...

    def projects(self) -> set[str]: ...

    def listing(self, project: str) -> dict[str, Any]:
        """Name -> inbox entry (anything with an `inode`)."""


class Namespace:
    def __init__(self, snapshot: Callable[[], Snapshot], policy: AccessPolicy,
                 configured_projects: Iterable[str] = (), inbox: InboxView | None = None,
                 cache_entries: int = 512) -> None:
        self._snapshot = snapshot
        self.inbox = inbox
        self.policy = policy
        self._configured = tuple(configured_projects)
        self._listings: OrderedDict[tuple, dict[str, Entry]] = OrderedDict()
        self._cache_entries = cache_entries
        self._dirs: dict[int, Path] = {ROOT_INODE: ()}
        self._file_inodes: dict[int, str] = {}
        self._file_inodes_gen = -1

    # -- inode resolution ---------------------------------------------------------------

    def dir_path(self, inode: int) -> Path | None:
        return self._dirs.get(inode)

    def image_for_inode(self, caller: Caller, inode: int) -> ImageRecord | None:
        """The image behind a file inode, if it is active and the caller may see it."""
        snap = self._snapshot()
        if self._file_inodes_gen != snap.generation:
            self._file_inodes = {image_inode(i): i for i in snap.images}
            self._file_inodes_gen = snap.generation
        image_id = self._file_inodes.get(inode)
        record = snap.record(image_id) if image_id else None
        if record is None or not self._showable(caller, record):
            return None
        return record

    # -- folders ------------------------------------------------------------------------

    def lookup(self, caller: Caller, parent: Path, name: str) -> Entry | None:
        if parent == ("by-id",):
            record = self._snapshot().record(name)
            if record is not None and self._showable(caller, record):
                return _file(record)
            return None
        listing = self.listing(caller, parent)
        return listing.get(name) if listing is not None else None

    def listing(self, caller: Caller, path: Path) -> dict[str, Entry] | None:
        """Name -> entry for the folder at `path` as `caller` sees it; None if no folder."""
        snap = self._snapshot()
        inbox_gen = self.inbox.generation if self.inbox and path[:1] == ("inbox",) else 0
        key = (snap.generation, inbox_gen, self.policy.view_key(caller), path)
        cached = self._listings.get(key)
        if cached is not None:
            self._listings.move_to_end(key)
            return cached
        listing = self._compute(caller, snap, path)
        if listing is None:
            return None
        for entry in listing.values():
            if entry.path is not None:
                self._dirs[entry.inode] = entry.path
        self._listings[key] = listing
        while len(self._listings) > self._cache_entries:
            self._listings.popitem(last=False)
        return listing

    def _showable(self, caller: Caller, record: ImageRecord) -> bool:
        return record.status == "active" and self.policy.can_show(caller, record)

    def _listable(self, caller: Caller, snap: Snapshot) -> list[ImageRecord]:
        return [m.record for m in snap.images.values()
                if m.record.status == "active" and not m.record.os_hidden
                and self.policy.can_list(caller, m.record)]

    def known_projects(self) -> set[str]:
        """Owners and members of any image, and configured projects (for the inbox)."""
        known = set(self._configured)
        for manifest in self._snapshot().images.values():
            known.add(manifest.record.owner)
            known.update(manifest.record.members)
        return known

    def _projects(self, caller: Caller, images: list[ImageRecord]) -> set[str]:
        known = set(self._configured)
        for image in images:
            known.add(image.owner)
            known.update(image.members)
        return self.policy.projects(caller, known)

    def _compute(self, caller: Caller, snap: Snapshot, path: Path) -> dict[str, Entry] | None:
        depth = len(path)
        if depth == 0:
            return {name: _dir((name,)) for name in TOP_FOLDERS}
        top = path[0]
        if top == "inbox":
            return self._inbox(caller, path)
        images = self._listable(caller, snap)
        if top == "projects":
            if depth == 1:
                return {p: _dir(path + (p,)) for p in self._projects(caller, images)}
            if path[1] not in self._projects(caller, images):
                return None
            if depth == 2:
                return {f: _dir(path + (f,)) for f in PROJECT_FOLDERS}
            if depth == 3 and path[2] in VISIBILITY_FOLDERS:
                return self._files(i for i in images
                                   if i.owner == path[1] and i.visibility == path[2])
            if depth == 3 and path[2] in MEMBER_FOLDERS:
                status = MEMBER_FOLDERS[path[2]]
                return self._files(i for i in images if i.members.get(path[1]) == status
                                   and i.visibility == "shared")
            return None
        if depth == 1 and top in ("public", "community"):
            return self._files(i for i in images if i.visibility == top)
        if depth == 1 and top == "by-id":
            return {i.id: _file(i) for i in images}
        if top == "tags":
            tags = {clean_component(t) for i in images for t in i.tags}
            if depth == 1:
                return {t: _dir(("tags", t)) for t in tags}
            if depth == 2 and path[1] in tags:
                return self._files(i for i in images
                                   if path[1] in {clean_component(t) for t in i.tags})
        return None

    def _inbox(self, caller: Caller, path: Path) -> dict[str, Entry] | None:
        if self.inbox is None:
            return None
        projects = self.policy.projects(caller, self.inbox.projects())
        if len(path) == 1:
            return {p: _dir(("inbox", p)) for p in projects}
        if len(path) == 2 and path[1] in projects:
            return {name: Entry(entry.inode) for name, entry in
                    self.inbox.listing(path[1]).items()}
        return None

    @staticmethod
    def _files(images: Iterable[ImageRecord]) -> dict[str, Entry]:
        return {name: _file(image) for name, image in assign_names(images).items()}
