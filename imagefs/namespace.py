"""Path <-> image, per caller: what each folder of the mount holds (ARCHITECTURE.md).

Pure logic over a catalog snapshot and the inbox, with no FUSE in it. It answers with
node kinds — a folder, an image, an inbox file — and ImageNotFound for anything the
caller may not see (the rules are in access.py). Folder contents are computed for a
caller's view and cached per (catalog generation, inbox generation, view, folder).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from imagefs import manifest as mf
from imagefs.access import VISIBLE_STATUSES, Policy, Who
from imagefs.catalog import Snapshot
from imagefs.errors import ImageNotFound
from imagefs.inodes import ROOT_INODE, dir_inode, image_inode, is_inbox_inode
from imagefs.naming import assign_names, clean_component
from imagefs.records import ImageRecord

Path = tuple[str, ...]

TOP_FOLDERS = ("by-id", "community", "inbox", "projects", "public", "tags")
VISIBILITY_FOLDERS = ("private", "shared", "community", "public")
MEMBER_FOLDERS = {"shared-with-me": "accepted", "invitations": "pending"}
PROJECT_FOLDERS = VISIBILITY_FOLDERS + tuple(MEMBER_FOLDERS)


@dataclass(frozen=True)
class Entry:
    """A name in a folder: a folder (path set), an image (image_id set) or an inbox file."""

    inode: int
    path: Path | None = None
    image_id: str | None = None


@dataclass(frozen=True)
class FolderNode:
    path: Path

    @property
    def inode(self) -> int:
        return dir_inode(self.path)

    @property
    def same_for_everyone(self) -> bool:
        """The root and its fixed folders exist for every caller alike."""
        return len(self.path) <= 1


@dataclass(frozen=True)
class ImageNode:
    manifest: mf.Manifest

    @property
    def record(self) -> ImageRecord:
        return self.manifest.record

    @property
    def inode(self) -> int:
        return image_inode(self.record.id)


@dataclass(frozen=True)
class InboxNode:
    entry: Any  # imagefs.inbox.InboxEntry; the namespace only needs its inode

    @property
    def inode(self) -> int:
        return self.entry.inode


Node = FolderNode | ImageNode | InboxNode


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

    def by_inode(self, inode: int) -> Any:
        """The inbox entry with that inode, or None."""


class Namespace:
    def __init__(self, snapshot: Callable[[], Snapshot], policy: Policy,
                 configured_projects: Iterable[str] = (), inbox: InboxView | None = None,
                 cache_entries: int = 512) -> None:
        self._snapshot = snapshot
        self.inbox = inbox
        self.policy = policy
        self._configured = tuple(configured_projects)
        self._listings: OrderedDict[tuple, dict[str, Entry]] = OrderedDict()  # type: ignore[type-arg]
        self._cache_entries = cache_entries
        self._dirs: dict[int, Path] = {ROOT_INODE: ()}
        self._file_inodes: dict[int, str] = {}
        self._file_inodes_gen = -1

    # -- nodes --------------------------------------------------------------------------

    def resolve(self, who: Who, inode: int) -> Node:
        """The node behind an inode, if the caller may see it; else ImageNotFound."""
        path = self._dirs.get(inode)
        if path is not None:
            if path and self.listing(who, path) is None:
                raise ImageNotFound(f"no folder {'/'.join(path)} for {who}")
            return FolderNode(path)
        if is_inbox_inode(inode):
            return self._inbox_node(who, inode)
        return ImageNode(self._image(who, inode))

    def folder(self, who: Who, inode: int) -> Path:
        node = self.resolve(who, inode)
        if not isinstance(node, FolderNode):
            raise ImageNotFound("not a folder")
        return node.path

    def lookup(self, who: Who, parent: Path, name: str) -> Node:
        if parent == ("by-id",):
            manifest = self._snapshot().images.get(name)
            if manifest is not None and self.policy.can_see(who, manifest.record):
                return ImageNode(manifest)
            raise ImageNotFound(f"no image {name} for {who}")
        listing = self.listing(who, parent)
        entry = listing.get(name) if listing is not None else None
        if entry is None:
            raise ImageNotFound(f"no {name} in {'/'.join(parent) or 'the root'}")
        return self.node_of(who, entry)

    def node_of(self, who: Who, entry: Entry) -> Node:
        """The node a listing entry names (raises if it vanished since the listing)."""
        if entry.path is not None:
            return FolderNode(entry.path)
        if entry.image_id is not None:
            manifest = self._snapshot().images.get(entry.image_id)
            if manifest is None:
                raise ImageNotFound(f"image {entry.image_id} is gone")
            return ImageNode(manifest)
        return self._inbox_node(who, entry.inode)

    def _image(self, who: Who, inode: int) -> mf.Manifest:
        snap = self._snapshot()
        if self._file_inodes_gen != snap.generation:
            self._file_inodes = {image_inode(i): i for i in snap.images}
            self._file_inodes_gen = snap.generation
        image_id = self._file_inodes.get(inode)
        manifest = snap.images.get(image_id) if image_id else None
        if manifest is None or not self.policy.can_see(who, manifest.record):
            raise ImageNotFound(f"no image with inode {inode} for {who}")
        return manifest

    def _inbox_node(self, who: Who, inode: int) -> InboxNode:
        entry = self.inbox.by_inode(inode) if self.inbox is not None else None
        if entry is None or not self.policy.enters_project(who, entry.record.project):
            raise ImageNotFound(f"no inbox file with inode {inode} for {who}")
        return InboxNode(entry)

    # -- folders ------------------------------------------------------------------------

    def listing(self, who: Who, path: Path) -> dict[str, Entry] | None:
        """Name -> entry for the folder at `path` as `who` sees it; None if no folder."""
        snap = self._snapshot()
        inbox_gen = self.inbox.generation if self.inbox and path[:1] == ("inbox",) else 0
        key = (snap.generation, inbox_gen, who.view, path)
        cached = self._listings.get(key)
        if cached is not None:
            self._listings.move_to_end(key)
            return cached
        listing = self._compute(who, snap, path)
        if listing is None:
            return None
        for entry in listing.values():
            if entry.path is not None:
                self._dirs[entry.inode] = entry.path
        self._listings[key] = listing
        while len(self._listings) > self._cache_entries:
            self._listings.popitem(last=False)
        return listing

    def reconfigure(self, configured_projects: Iterable[str]) -> None:
        """A reload changed the access rules or the configured projects: list afresh."""
        self._configured = tuple(configured_projects)
        self._listings.clear()

    def known_projects(self, snap: Snapshot | None = None) -> set[str]:
        """Owners and members of any image, and configured projects (for the inbox)."""
        known = set(self._configured)
        for manifest in (snap or self._snapshot()).images.values():
            known.add(manifest.record.owner)
            known.update(manifest.record.members)
        return known

    def kernel_cached(self, snap: Snapshot) -> dict[tuple[int, str], int]:
        """(folder inode, name) -> inode of every entry the kernel may cache in `snap`.

        Every catalog folder when all callers share one view; with caller-dependent
        rules only those that read the same for everyone (core.py decides alike).
        by-id/ is left out: its names never move, and kernel_cache.py forgets the
        entries of changed images itself.
        """
        anyone = Who(0, "the kernel's cache")
        shared = not self.policy.caller_dependent()
        found: dict[tuple[int, str], int] = {}
        pending: list[Path] = [("projects",), ("tags",)] if shared else []
        pending += [("public",), ("community",)]
        while pending:
            path = pending.pop()
            if shared:
                listing = self._compute(anyone, snap, path) or {}
            else:  # what everyone who may list the folder sees
                listing = self._files(m.record for m in snap.images.values()
                                      if m.record.visibility == path[0]
                                      and m.record.status in VISIBLE_STATUSES
                                      and not m.record.os_hidden)
            for name, entry in listing.items():
                found[(dir_inode(path), name)] = entry.inode
                if entry.path is not None:
                    pending.append(entry.path)
        return found

    def _compute(self, who: Who, snap: Snapshot, path: Path) -> dict[str, Entry] | None:
        depth = len(path)
        if depth == 0:
            return {name: _dir((name,)) for name in TOP_FOLDERS}
        top = path[0]
        if top == "inbox":
            return self._inbox(who, path)
        images = [m.record for m in snap.images.values()]

        def listed(folder: str, keep: Callable[[ImageRecord], bool]) -> list[ImageRecord]:
            return [i for i in images if keep(i) and self.policy.listed(who, i, folder)]

        if top == "projects":
            projects = self.policy.project_names(who, self.known_projects(snap))
            if depth == 1:
                return {p: _dir(path + (p,)) for p in projects}
            project = path[1]
            if project not in projects or not self.policy.enters_project(who, project):
                return None
            if depth == 2:
                return {f: _dir(path + (f,)) for f in PROJECT_FOLDERS}
            if depth == 3 and path[2] in VISIBILITY_FOLDERS:
                return self._files(listed("project", lambda i: i.owner == project
                                          and i.visibility == path[2]))
            if depth == 3 and path[2] in MEMBER_FOLDERS:
                status = MEMBER_FOLDERS[path[2]]
                return self._files(listed("project", lambda i: i.visibility == "shared"
                                          and i.members.get(project) == status))
            return None
        if depth == 1 and top in ("public", "community"):
            return self._files(listed(top, lambda i: i.visibility == top))
        if depth == 1 and top == "by-id":
            return {i.id: _file(i) for i in listed("by-id", lambda i: True)}
        if top == "tags":
            tagged = listed("tags", lambda i: bool(i.tags))
            tags = {clean_component(t) for i in tagged for t in i.tags}
            if depth == 1:
                return {t: _dir(("tags", t)) for t in tags}
            if depth == 2 and path[1] in tags:
                return self._files(i for i in tagged
                                   if path[1] in {clean_component(t) for t in i.tags})
        return None

    def _inbox(self, who: Who, path: Path) -> dict[str, Entry] | None:
        if self.inbox is None:
            return None
        projects = {p for p in self.policy.project_names(who, self.inbox.projects())
                    if self.policy.enters_project(who, p)}
        if len(path) == 1:
            return {p: _dir(("inbox", p)) for p in projects}
        if len(path) == 2 and path[1] in projects:
            return {name: Entry(entry.inode) for name, entry in
                    self.inbox.listing(path[1]).items()}
        return None

    @staticmethod
    def _files(images: Iterable[ImageRecord]) -> dict[str, Entry]:
        return {name: _file(image) for name, image in assign_names(images).items()}
